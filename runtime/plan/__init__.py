"""Planning without a cluster: what a model costs and how its blocks split over nodes.

- `cost`: bytes a block needs (weights, activations saved for backward, hidden state on the
  wire) and its FLOPs, from a model config's shapes.
- `partition`: the dynamic program that splits blocks into contiguous ranges over
  heterogeneous nodes.
- `methods`: what a PEFT method costs the edge (memory with AdamW) and the wire (bytes per
  step, once per session), from counts of its tensors; the `edgetune methods` table.

May import: `edgetune.runtime` helpers only. Never torch or Ray: the coordinator calls it,
and so can a planner on a laptop.
"""
