"""The model: config, the transformer, weights on disk, and generation with torch.

- `config`: `ModelConfig`, parsed and checked from a Hugging Face `config.json` (torch-free).
- `transformer`: `CausalLM` and its `Block`s; a block takes the adapter tensors as an
  explicit argument, so one frozen block serves any PEFT method.
- `weights`: selective reads from a safetensors checkpoint (only the tensors asked for).
- `gguf`: GGUF -> Hugging Face folder conversion (cached); `embedded`: the packaged SmolLM2.
- `loader`: `load_model` (whole model, a block range, or the edge's part).
- `manifest`: SHA-256 manifest of a checkpoint, so every side checks it holds the same weights.
- `generation`: greedy / sampled generation with the KV cache.

May import: `edgetune.runtime` helpers, `text`, `wire` (manifest entries are wire messages);
`peft` only for type checking. Never `train`, `onnx`, `cluster`, nodes or coordinator.
"""
