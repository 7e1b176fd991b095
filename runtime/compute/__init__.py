"""A node's compute path: the precision its frozen blocks are held and run in.

- `precision`: `--dtype auto|fp32|bf16|fp16`: parsing, resolving `auto` for a device, and the
  bytes a value takes (the cost model charges a node its real bytes per block).

May import: `edgetune.runtime` helpers, `model`, `peft`, `plan`. Used by nodes and by the edge's
local engine; never imports nodes or coordinator.
"""
