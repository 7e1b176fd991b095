"""A worker node's side of the cluster: the shard it serves and how it joins.

- `shard`: plain Python and torch: a node's blocks, their forward/backward, the cache of
  activations saved for backward, adapter versions.
- `service`: the thin gRPC servicer over a shard (decode, call, encode).
- `actor`: the Ray actor the coordinator places on this node (it loads the blocks, serves).
- `profile`: what the coordinator measures on a node (memory, threads, block time, link).
- `ray_join`: `ray start --address ...` with edgetune's resources and labels.

May import `edgetune.runtime` and `edgetune.proto`; never `edgetune.coordinator` or the CLI.
The `edgetune node` command itself is `edgetune.commands.node`.
"""
