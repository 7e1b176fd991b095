"""`edgetune plan`: what a fine-tuning run will need and take, from shapes alone (no weights).

    edgetune plan --model llama-3-8b --method lora --rank 16 --target-modules all-linear \\
        --batch-size 8 --max-seq-len 2048 --nodes nodes.yaml --link 100mbit,50ms

--model is a shipped shape (SHAPES: public configs, nothing is fetched), a config.json or a
Hugging Face folder holding one, a .gguf file (its header), or `embedded`. The nodes file:

    nodes:
      - {name: gpu-a, memory: 80G, tflops: 400, dtype: bf16}
      - {name: gpu-b, memory: 80G, tflops: 400, quantize: nf4, link: 1gbit,5ms}
    edge: {tflops: 2, head_dtype: bf16}      # optional; link: the edge's own link

`tflops` is sustained throughput of the blocks' matmuls (e.g. ~400 for an H100 in bf16, ~0.2 for
a 2-core laptop CPU in fp32). The adapter's sizes come from the runtime's own PEFT code, run on
fake tensors (no memory is allocated for weights or adapters).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from edgetune.runtime.errors import ConfigError


def load_config(model: str):
    """A ModelConfig from a shipped shape name, a config.json (or a folder with one), a .gguf header or 'embedded'."""
    from edgetune.runtime.model.config import ModelConfig
    from edgetune.runtime.model.embedded import EMBEDDED_NAME, embedded_gguf_path
    from edgetune.runtime.model.gguf import gguf_config
    from edgetune.runtime.plan import shapes

    if model in shapes.names():
        return ModelConfig.from_hf_dict(shapes.load(model))
    if model == EMBEDDED_NAME:
        return gguf_config(embedded_gguf_path())
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        return gguf_config(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"--model {model!r}: not a shipped shape ({', '.join(shapes.names())}), a config.json, "
                          "a folder with one, a .gguf file, or 'embedded'")
    return ModelConfig.from_file(path)


class AdapterSizes(NamedTuple):
    per_block: list[int]  # values the edge pushes for each block
    trainable: int  # the adapter's master copy (what AdamW updates)
    tensors_per_block: list[int]  # how many tensors carry them (each has a header on the wire)


def adapter_sizes(config, methods, seed: int = 0) -> AdapterSizes:
    """The adapter's sizes, counted by the runtime's own method code on fake tensors: exact, and no
    memory for any weight."""
    from edgetune.commands.methods import shapes_only
    from edgetune.runtime.peft.adapter import Adapter, split_block_key

    L = config.num_layers
    with shapes_only(config) as (edge, blocks):
        adapter = Adapter.create(edge, methods, seed=seed, block_source=blocks)
        frozen = adapter.frozen_keys()  # sparse masks' indices: once a session, not every step
        views = {k: t for k, t in adapter.block_tensor_views(range(L)).items() if k not in frozen}
        per_block, tensors = [0] * L, [0] * L
        for key, t in views.items():
            per_block[split_block_key(key)[1]] += t.numel()
            tensors[split_block_key(key)[1]] += 1
        return AdapterSizes(per_block, adapter.num_parameters(), tensors)


def _number(node: dict, key: str, where: str) -> float:
    value = node.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def load_nodes(path: str | Path) -> tuple[list, Any]:
    """(PlanNodes, EdgeSpec) from a nodes file (YAML or JSON); ConfigError saying what is wrong."""
    from edgetune.nodes.profile import parse_size
    from edgetune.runtime.plan.planner import EdgeSpec, PlanNode, parse_link
    from edgetune.runtime.train.options import load_config_file

    path = Path(path)
    data = json.loads(path.read_text()) if path.suffix.lower() == ".json" else load_config_file(path)
    entries = data.get("nodes")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected a non-empty list under 'nodes:'")
    nodes = []
    for i, node in enumerate(entries):
        where = f"{path}: node {i + 1}"
        if not isinstance(node, dict) or not isinstance(node.get("name"), str):
            raise ConfigError(f"{where}: expected a mapping with a name")
        unknown = sorted(set(node) - {"name", "memory", "tflops", "dtype", "quantize", "link", "device"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}")
        try:
            memory = parse_size(str(node.get("memory", "")))
        except ValueError as e:
            raise ConfigError(f"{where}: memory: {e}") from None
        nodes.append(PlanNode(node["name"], memory, _number(node, "tflops", where) * 1e12, node.get("dtype", "bf16"),
                              node.get("quantize", "none"), parse_link(node["link"]) if node.get("link") else None))
    edge = data.get("edge") or {}
    if not isinstance(edge, dict):
        raise ConfigError(f"{path}: 'edge:' must be a mapping")
    spec = EdgeSpec(flops=_number({"tflops": edge.get("tflops", 1.0)}, "tflops", f"{path}: edge") * 1e12,
                    link=parse_link(edge["link"]) if edge.get("link") else None, head_dtype=edge.get("head_dtype", "fp32"))
    return nodes, spec


def run_plan(args) -> int:
    from edgetune.runtime.peft.prompt import PromptTuningConfig
    from edgetune.runtime.plan.planner import Workload, auto_micro_batches, format_plan, parse_link, plan
    from edgetune.runtime.train.options import TrainConfig, coerce_options

    config = load_config(args.model)
    # the same method configs finetune builds from these options ('data' is not read here)
    options = {k: getattr(args, k) for k in ("method", "rank", "alpha", "target_modules", "layers_to_transform",
                                             "num_virtual_tokens", "bottleneck_size", "use_rslora") if getattr(args, k) is not None}
    cfg = TrainConfig.from_dict(coerce_options({"data": "(not read by plan)", **options}), source="edgetune plan")
    methods = cfg.methods()
    sizes = adapter_sizes(config, methods)
    nodes, edge = load_nodes(args.nodes)
    if args.micro_batches < 0:
        raise ConfigError(f"--micro-batches must be positive, or 0 to choose as finetune would; got {args.micro_batches}")
    link = parse_link(args.link)
    work = Workload(args.batch_size, args.max_seq_len, args.micro_batches or 1, args.codec, args.adapter_codec,
                    tuple(sizes.per_block), sizes.trainable, tuple(sizes.tensors_per_block),
                    input_grads=any(isinstance(m, PromptTuningConfig) for m in methods))
    if not args.micro_batches:
        work = replace(work, micro_batches=auto_micro_batches(config, args.model, nodes, edge, work, link))
    report = plan(config, args.model, nodes, edge, work, link)
    if not args.micro_batches:
        report.notes.append(f"{work.micro_batches} micro-batches: what finetune's --micro-batches 0 would choose "
                            f"(route round trip {report.route_rtt_s * 1e3:.0f} ms)")
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_plan(report))
    return 0
