"""The coordinator: the Ray head's side of the cluster.

- `core`: `Coordinator`, plain Python over Ray: membership, profiles, partitions (through
  `edgetune.runtime.plan`), placements, routes and replanning after a node dies.
- `placement`: profiling and shard actors placed on nodes (by import path, never importing nodes/).
- `ray_head`: starting (or joining) the Ray head.
- `service`: the thin gRPC servicer over `Coordinator`.

May import `edgetune.runtime` and `edgetune.proto`; never `edgetune.nodes` or the CLI.
The `edgetune coordinator` command itself is `edgetune.commands.coordinator`.
"""
