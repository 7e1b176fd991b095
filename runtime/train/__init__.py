"""The edge's training: options, data, loss, checkpoints, and the two engines that run a step.

- `options`: `TrainConfig`, parsed once from flags and config files (torch-free).
- `data`: JSONL records -> tokenized, masked batches; `loss`: the LM-head loss.
- `calibrate`: before the first step, the sparse methods' masks from the empirical Fisher (or |W|)
  of the frozen weights, computed here or by the nodes.
- `checkpoints`: training checkpoints (adapter, AdamW state, schedule, data position, RNG).
- `loop`: `finetune(TrainConfig)`, setup -> train -> save as one explicit loop, with a local
  engine (all blocks here).
- `remote`: the edge's engine on a cluster: embeddings, head and adapter here, the blocks on
  the route's nodes over gRPC; steps replayed on node failure.

May import: `edgetune.runtime` helpers, `model`, `text`, `peft`, `wire`, `plan`. Never `onnx`,
`cluster`, nodes or coordinator.
"""
