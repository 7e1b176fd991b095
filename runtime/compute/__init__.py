"""A node's compute path: how its frozen blocks are held and run (precision, quantization).

- `precision`: `--dtype auto|fp32|bf16|fp16`: parsing, resolving `auto` for a device, and the
  bytes a value takes (the cost model charges a node its real bytes per block).
- `quantize`: `--quantize none|int8|nf4`: a node's frozen linear weights held as torchao's
  quantized tensors, dequantized on the fly (QLoRA-style).

May import: `edgetune.runtime` helpers, `model`, `peft`, `plan`. Used by nodes and by the edge's
local engine; never imports nodes or coordinator.
"""
