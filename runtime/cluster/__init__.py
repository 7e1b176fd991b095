"""Processes of a cluster: Ray supervision, node labels, and a whole cluster on this machine.

- `ray_process`: starting, watching and stopping `ray start` processes (auth, ports, session ids).
- `node_labels`: `NodeOptions`, the Ray labels a node carries and the coordinator reads back.
- `local_cluster`: `LocalCluster`, a coordinator and nodes as separate processes here (the demo
  and the multi-process tests).

May import: `edgetune.runtime` helpers and `wire`. Never `train`, nodes or coordinator.
"""
