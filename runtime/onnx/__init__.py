"""ONNX: the decoder graph, `edgetune export`, and generation with onnxruntime alone.

- `graph`: the decoder written node by node with onnxruntime's fused operators.
- `export`: base model + adapter -> an ONNX folder (merged, or LoRA tensors as inputs).
- `generate`: `OnnxGenerator`, torch-free generation from an export folder.

May import: `edgetune.runtime` helpers, `model`, `peft`, `text`. `generate` never imports
torch (a device runs it with the base install).
"""
