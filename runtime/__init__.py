"""edgetune's library: everything the commands, the nodes and the coordinator are built from.

One subpackage per concern (each `__init__` is this kind of docstring and imports nothing):

| subpackage | what lives there |
|---|---|
| `model/` | model config, the transformer (blocks take adapters explicitly), safetensors and GGUF loaders, the embedded model, manifests, torch generation |
| `text/` | tokenizer and chat template, sampling settings: torch-free |
| `peft/` | PEFT methods, the Adapter that holds their tensors, the HF PEFT file layout, keyed dropout |
| `train/` | options, data, loss, training checkpoints, the local loop, the edge's remote engine |
| `wire/` | wire messages, serde (the only user of the protobuf messages), gRPC plumbing, the coordinator client, ports |
| `onnx/` | the ONNX graph, export, torch-free generation with onnxruntime |
| `cluster/` | Ray process supervision, node labels, a whole local cluster |
| `compute/` | a node's compute path: the precision its frozen blocks run in |
| `plan/` | the cost model and the partition of blocks over nodes: free of Ray and torch |

Shared helpers stay here at the top: `errors` (the project's exceptions), `atomic` (atomic
file writes), `jsonfile` (JSON files users may damage), `threads` (CPU thread counts). They
import no subpackage.

Import rules, checked by import-linter (`[tool.importlinter]` in pyproject.toml): `runtime`
imports neither `edgetune.nodes`, `edgetune.coordinator` nor the CLI and its commands; its
subpackages are layered (train | onnx | cluster) > compute > peft > model > (wire | text | plan), and a
lower layer never imports a higher one.
"""
