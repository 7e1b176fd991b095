"""How frozen blocks are held and run, on a node and in `finetune --local`.

- `precision`: `--dtype auto|fp32|bf16|fp16`: parsing, resolving `auto` for a device, and the
  bytes a value takes (the cost model charges a node its real bytes per block); the edge's
  `--head-dtype` for the loss's LM head.
- `quantize`: `--quantize none|int8|nf4`: a node's frozen linear weights held as torchao's
  quantized tensors, dequantized on the fly (QLoRA-style).
- `kernels`: `--kernels auto|eager|compiled|fused`: the registry of block ops and their faster
  versions (`BlockOps` sets).
- `executor`: `BlockExecutor`, which runs a part's blocks with one kernel set (torch.compile'd
  per block shape for `compiled`).
- `adapted_linear`: LoRA/rsLoRA/(IA)^3 linears as one autograd function; `triton_lora`: LoRA's
  GEMM with a fused low-rank epilogue in Triton (CUDA, or Triton's interpreter in tests).

May import: `edgetune.runtime` helpers, `model`, `peft`, `plan`. Used by nodes and by the edge's
local engine; never imports nodes or coordinator.
"""
