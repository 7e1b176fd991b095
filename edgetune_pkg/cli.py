"""The `edgetune` command.

Parsing imports nothing heavy: each subcommand imports its implementation
(and torch) only when it runs, so `edgetune --help` works on a device with
only the base install.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to options whose help does not already say their default."""

    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


# finetune options: (flag, type, help). Defaults come from TrainConfig so the
# CLI, config files and the Python API cannot drift apart; --help shows them.
_FINETUNE_OPTIONS: list[tuple[str, type, str]] = [
    ("model", str, "base model: a Hugging Face folder, a .gguf file, or 'embedded' (SmolLM2-135M-Instruct)"),
    ("data", str, "training data, JSONL: {text} | {prompt, completion} | {messages: [{role, content}, ...]}"),
    ("out", str, "run folder: config, metrics.jsonl, checkpoints/, adapter/"),
    ("method", str, "PEFT method: lora, dora, ia3, prefix, prompt, ln_tuning, serial_adapter, parallel_adapter, bitfit, "
                    "sparse, adalora, vera, lokr, mam (prefix + parallel adapter), unipelt (gated LoRA + prefix + "
                    "adapter); `edgetune methods` compares them"),
    ("rank", int, "rank r of LoRA/DoRA, LoKr, VeRA and UniPELT's LoRA; AdaLoRA: the average rank it ends at"),
    ("alpha", float, "LoRA/DoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with --use-rslora)"),
    ("dropout", float, "LoRA dropout probability"),
    ("target_modules", str, "comma-separated module names (q_proj,v_proj), 'all-linear', or a regex"),
    ("layers_to_transform", str, "comma-separated block indices to adapt (default: all)"),
    ("num_virtual_tokens", int, "prefix/prompt tuning: number of virtual tokens"),
    ("bottleneck_size", int, "serial/parallel adapters: bottleneck width"),
    ("adapter_scaling", float, "parallel adapter (and mam): output scaling s"),
    ("mask", str, "sparse: how the trained entries of each weight are chosen: fisher (the empirical Fisher of the "
                  "frozen weights on --calibration-examples, computed where the weights are), magnitude, random"),
    ("density", float, "sparse: train this fraction of each targeted weight (saved as edgetune's EDGETUNE_SPARSE)"),
    ("shira_rank", int, "sparse: instead of --density, train exactly r * (in + out) entries of each targeted weight "
                        "(as many numbers as a rank-r LoRA; saved in peft's SHIRA layout); 0: use --density"),
    ("calibration_examples", int, "sparse --mask fisher: training examples the Fisher is estimated on"),
    ("init_rank", int, "adalora: every targeted module's rank at the start (0: 1.5 x --rank, peft's 12 for 8)"),
    ("tinit", int, "adalora: steps of warmup before ranks are reduced"),
    ("tfinal", int, "adalora: final steps at the target budget"),
    ("orth_reg_weight", float, "adalora: weight of the orthogonality regularizer of P and Q"),
    ("projection_seed", int, "vera: seed of the shared frozen random projections (every node rebuilds them)"),
    ("lr", float, "peak learning rate (AdamW)"),
    ("weight_decay", float, "AdamW weight decay"),
    ("warmup_steps", int, "linear warmup steps before the cosine decay"),
    ("min_lr_ratio", float, "final learning rate as a fraction of the peak"),
    ("steps", int, "optimizer steps"),
    ("batch_size", int, "sequences per batch"),
    ("grad_accum", int, "batches per optimizer step (gradient accumulation)"),
    ("micro_batches", int, "split each batch in this many micro-batches, pipelined across nodes when distributed; "
                           "0: 1 with --local, on a cluster chosen at start from the measured round trip to the route "
                           "and the nodes' profiled speed (recorded in the run's config.json, reused by --resume)"),
    ("max_grad_norm", float, "gradient clipping norm (0 disables)"),
    ("max_seq_len", int, "truncate examples to this many tokens"),
    ("seed", int, "seed for adapter init, data order and dropout masks"),
    ("eval_fraction", float, "fraction of examples held out for eval loss"),
    ("eval_data", str, "a held-out JSONL file for eval loss (instead of --eval-fraction of --data)"),
    ("eval_every", int, "eval every N steps (0: only at the end)"),
    ("save_every", int, "checkpoint every N steps (0: only at the end)"),
    ("keep_checkpoints", int, "how many recent checkpoints to keep"),
    ("device", str, "cpu, cuda, cuda:N or auto"),
    ("head_dtype", str, "the edge's LM-head matmuls in the loss: fp32, bf16, or auto (bf16 for a vocabulary of 32k+ "
                        "where the edge computes it natively: CUDA, AVX512-BF16/AMX CPUs; softmax and loss stay fp32)"),
    ("kernels", str, "--local: what the blocks run: eager, compiled (torch.compile), fused (CUDA) or auto (fused on "
                     "CUDA, else eager); cluster nodes use their own --kernels"),
    ("threads", int, "torch CPU threads (0: local: torch's default; distributed: cores / edgetune processes here)"),
    ("coordinator", str, "HOST:PORT of `edgetune coordinator`: train on its cluster (instead of --local)"),
    ("codec", str, "activations and their gradients on the wire: fp32, fp16, bf16, int8 (adapters stay exact)"),
    ("adapter_codec", str, "distributed: adapter traffic: raw (the whole adapter, exact, each step) or bf16 / int8 "
                           "(deltas against the nodes' replicas and gradients, with error feedback)"),
    ("join", str, "distributed: a join string (`edgetune token create --role edge` on the coordinator's host): join "
                  "the cluster as an edge first; the credentials are kept for later runs"),
    ("credentials", str, "distributed: the edge's credentials folder (empty: ~/.config/edgetune/edge)"),
    ("identity", str, "distributed: this edge's name when joining (empty: edge-HOST)"),
    ("token_file", str, "--insecure: the cluster's token file (empty: ~/.config/edgetune/token)"),
    ("max_step_retries", int, "distributed: replays of one step after node failures before giving up"),
    ("route_timeout_s", float, "distributed: seconds to wait for the coordinator to (re)assign blocks"),
    ("reply_timeout_s", float, "distributed: longest silence from the route within a step, in seconds"),
    ("verify", float, "distributed: recompute this fraction of micro-batches (a seeded choice) on verifier replicas "
                      "of every stage's blocks on other nodes and compare the hidden states; a node that disagrees "
                      "beyond its precision's tolerance is banned and the step replayed (0: no verification)"),
]
_FINETUNE_FLAGS = {"use_rslora": "use rsLoRA scaling alpha / sqrt(r)", "prefix_projection": "prefix tuning through an MLP projection",
                   "insecure": "LOOPBACK DEVELOPMENT ONLY: plaintext gRPC with the shared --token-file instead of "
                               "mutual TLS (anyone on the path reads activations and the token)",
                   "special_tokens_in_text": "special tokens spelled in the data's text (<|im_end|> in a message) become "
                                             "control tokens; off, they are plain text and only the chat template's own "
                                             "are control tokens"}


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on a cluster (--coordinator) or here (--local)",
                       description="Fine-tune a PEFT adapter, on a cluster's nodes (--coordinator HOST:PORT) or in this "
                                   "process (--local). Options may come from --config (YAML or TOML); flags override it.")
    p.add_argument("--local", action="store_true", help="train in this process instead of on a cluster (default: off)")
    p.add_argument("--config", type=Path, default=None, help="YAML or TOML file with finetune options; flags override it (default: none)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out (default: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: a progress bar)")
    # argparse defaults stay None: only the flags given override a --config file
    _add_options(p, _FINETUNE_OPTIONS, _train_defaults(), parse_defaults=False)
    for name, help_text in _FINETUNE_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", default=None,
                       help=f"{help_text} (default: off)")
    p.set_defaults(func=_run_finetune)


def _add_options(p, options: list[tuple[str, type, str]], defaults: dict, parse_defaults: bool) -> None:
    """One --flag per (name, type, help) of a dataclass-backed option list; its help names the
    dataclass default, which is also argparse's default when `parse_defaults`."""
    for name, typ, help_text in options:
        shown = defaults.get(name)
        if isinstance(shown, tuple):
            shown = ",".join(map(str, shown))
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ,
                       default=defaults.get(name) if parse_defaults else None, help=f"{help_text} (default: {shown})")


def _train_defaults() -> dict:
    from edgetune.runtime.train.options import TRAIN_DEFAULTS

    return TRAIN_DEFAULTS


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model (+ adapter), or from an ONNX export (--onnx)",
                       description="Stream generated text to stdout: with PyTorch (--model [--adapter]), or from an "
                                   "`edgetune export` folder with onnxruntime and no torch (--onnx [--onnx-adapter]).")
    # --model has no argparse default, so that giving it next to --onnx can be told apart and refused.
    p.add_argument("--model", default=None, help="PyTorch: Hugging Face folder, .gguf file, or 'embedded' "
                                                 "(the default without --onnx)")
    p.add_argument("--adapter", default=None, help="PyTorch: adapter folder (HF PEFT layout) to apply (default: none, the base model)")
    p.add_argument("--onnx", default=None, metavar="DIR", help="ONNX export folder (`edgetune export --out`): "
                                                               "generate with onnxruntime, without torch (default: none, PyTorch)")
    p.add_argument("--onnx-adapter", default=None, metavar="FILE",
                   help="with --onnx: an .onnx_adapter file to activate (adapter-inputs exports; default: none)")
    p.add_argument("--prompt", required=True, help="prompt text (required)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the model's chat template (default: off)")
    p.add_argument("--system", default=None, help="with --chat: a system message (default: none)")
    p.add_argument("--special-tokens-in-text", action="store_true",
                   help="with --chat: special tokens spelled in --prompt / --system (<|im_end|>) become control tokens "
                        "(default: off, they are plain text and only the chat template's own are control tokens)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (default unless --temperature is given)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (sampling when given; default: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="PyTorch: cpu, cuda or auto (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="with --onnx: onnxruntime intra-op threads (default: %(default)s, onnxruntime's choice)")
    p.set_defaults(func=_run_generate)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model (+ adapter) to ONNX for onnxruntime / onnxruntime-genai",
                       formatter_class=_Defaults)
    p.add_argument("--model", default="embedded", help="base model: Hugging Face folder, .gguf file or 'embedded'")
    p.add_argument("--adapter", default=None, help="adapter folder (HF PEFT layout) to export with the base")
    p.add_argument("--out", required=True, help="output folder: model.onnx, its weights, genai_config.json, tokenizer")
    p.add_argument("--mode", default="merged", choices=["merged", "adapter-inputs"],
                   help="merged: adapter folded into the weights; adapter-inputs: LoRA tensors as graph inputs "
                        "plus an .onnx_adapter file, so one base serves many adapters")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="float type of weights and activations")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"], help="weight-only quantization (MatMulNBits)")
    p.add_argument("--context-length", type=int, default=0, help="longest sequence (0: the model's maximum)")
    p.set_defaults(func=_run_export)


def _add_prepare_model(sub) -> None:
    p = sub.add_parser("prepare-model", help="convert a GGUF (default: the embedded SmolLM2) into a cached HF folder and print its path")
    p.add_argument("model", nargs="?", default="embedded", help="a .gguf file, a folder, or 'embedded' (default: embedded)")
    p.set_defaults(func=_run_prepare_model)


def _add_token_file(p) -> None:
    p.add_argument("--insecure", action="store_true",
                   help="LOOPBACK DEVELOPMENT ONLY: plaintext gRPC with a shared token file instead of mutual TLS; "
                        "anyone on the network path reads activations and the token and can join")
    p.add_argument("--token-file", default=None, help="--insecure: the cluster's shared token "
                                                      "(default: ~/.config/edgetune/token)")


def _add_state(p) -> None:
    p.add_argument("--state", default=None, metavar="DIR", help="the coordinator's state folder: its CA, join tokens, "
                   "issued and revoked certificates (default: ~/.config/edgetune/coordinator)")


def _add_credentials(p, role: str) -> None:
    p.add_argument("--join", default=None, metavar="STRING", help=f"join the cluster as a {role} with a one-time "
                   f"string from `edgetune token create --role {role}` (once: the credentials are kept)")
    p.add_argument("--credentials", default=None, metavar="DIR",
                   help=f"this {role}'s key, certificate and CA (default: ~/.config/edgetune/{role})")


def _add_coordinator(sub) -> None:
    from edgetune.commands.ray_ports import add_ray_ports

    p = sub.add_parser("coordinator", help="start a coordinator: a Ray head (or join one) + the route service",
                       formatter_class=_Defaults)
    p.add_argument("--host", default="0.0.0.0", help="interface the coordinator's gRPC service listens on")
    p.add_argument("--port", type=int, default=7700, help="port of the coordinator's gRPC service (0: pick a free one)")
    p.add_argument("--ray-address", default=None, help="join this existing Ray cluster instead of starting a Ray head")
    p.add_argument("--ray-port", type=int, default=0, help="GCS port of the Ray head it starts (0: pick a free one)")
    p.add_argument("--advertise", default=None, help="host name/IP nodes and edges use to reach this machine "
                   "(default: this host's address as Ray sees it)")
    p.add_argument("--model", default=None, help="pre-load this model (path, .gguf or 'embedded') as soon as nodes join")
    p.add_argument("--temp-dir", default=None, help="Ray's session folder (default: a fresh temporary folder)")
    p.add_argument("--join-port", type=int, default=None, help="port where nodes and edges join: TLS without a client "
                   "certificate, serving only Enroll (default: --port + 1; 0: a free one)")
    p.add_argument("--ban-s", type=float, default=60.0, help="seconds a node whose shard stopped answering (hung, "
                   "cut off) gets no blocks; it is used again afterwards")
    p.add_argument("--no-ray-tls", action="store_true", help="run Ray's own channels without TLS (default: Ray's TLS "
                   "from a Ray-only CA that only nodes get)")
    _add_state(p)
    _add_token_file(p)
    p.add_argument("--new-token", action="store_true", help="--insecure: write a fresh token to --token-file even if one exists")
    add_ray_ports(p)
    p.set_defaults(func=_run_coordinator)


def _add_node(sub) -> None:
    from edgetune.commands.ray_ports import add_ray_ports
    from edgetune.runtime.compute.kernels import KERNELS
    from edgetune.runtime.compute.precision import DTYPES
    from edgetune.runtime.compute.quantize import SCHEMES

    p = sub.add_parser("node", help="join a coordinator's cluster as a worker node (foreground; Ctrl-C leaves)",
                       formatter_class=_Defaults)
    p.add_argument("--coordinator", default=None, help="HOST:PORT of `edgetune coordinator` (default: where the "
                   "credentials say)")
    _add_credentials(p, "node")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where this node runs its blocks")
    p.add_argument("--memory-limit", default=None, help="memory this node may use for blocks, e.g. 2G or 512M "
                   "(default: what is free on the device)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="precision of this node's frozen blocks (auto: bf16 on a CUDA GPU that supports it, else "
                        "fp32); the adapter and its gradients stay fp32")
    p.add_argument("--quantize", default="none", choices=SCHEMES,
                   help="hold the blocks' frozen linear weights quantized (nf4: ~0.52 bytes a value, int8: ~1), "
                        "dequantized on the fly; DoRA needs none")
    p.add_argument("--kernels", default="auto", choices=KERNELS,
                   help="what the blocks run (auto: fused Triton/Liger kernels on CUDA, eager PyTorch on a CPU; "
                        "compiled: torch.compile, any device, seconds of warm-up per block shape)")
    p.add_argument("--name", default=None, help="node name shown in status (default: HOST-PID)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: cores / edgetune processes on this host)")
    p.add_argument("--fetch-weights", action="store_true", help="read no model file here: receive this node's "
                   "block weights from the coordinator (through Ray's object store)")
    p.add_argument("--shard-port", type=int, default=0, help="gRPC port of this node's shard, which the edge and the "
                   "previous node connect to (0: a free one)")
    p.add_argument("--temp-dir", default=None, help="Ray's folder for this node (default: a fresh temporary folder)")
    p.add_argument("--node-ip", default=None, help="this machine's address as the other nodes reach it")
    _add_token_file(p)
    add_ray_ports(p)
    p.set_defaults(func=_run_node)


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="print the cluster: nodes, hardware, assigned layers, health, load and "
                                      "sessions by edge", formatter_class=_Defaults)
    p.add_argument("--coordinator", default=None, help="HOST:PORT of `edgetune coordinator` (default: where the state "
                   "folder or the credentials say)")
    p.add_argument("--credentials", default=None, metavar="DIR", help="an edge's or a node's credentials folder "
                   "(default: none: use the coordinator's --state, on its host)")
    _add_state(p)
    _add_token_file(p)
    p.set_defaults(func=_run_status)


def _add_token(sub) -> None:
    p = sub.add_parser("token", help="create or list one-time join strings (on the coordinator's host)",
                       formatter_class=_Defaults)
    p.add_argument("action", choices=["create", "list"], help="create: print a new join string; list: unused ones")
    p.add_argument("--role", default="node", choices=["node", "edge"], help="what the joiner becomes")
    p.add_argument("--ttl", default="1h", help="how long the string may be used (s, m, h, d)")
    p.add_argument("--quiet", action="store_true", help="print only the join string")
    _add_state(p)
    p.set_defaults(func=_run_token)


def _add_revoke(sub) -> None:
    p = sub.add_parser("revoke", help="refuse an identity from now on: its calls, open streams and shard "
                                      "(on the coordinator's host)", formatter_class=_Defaults)
    p.add_argument("name", help="the node's or edge's name")
    _add_state(p)
    p.set_defaults(func=_run_revoke)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="plot a run folder's loss, throughput and per-node times; print a summary",
                       description="Read RUN_DIR (the --out of `edgetune finetune`) and write loss.png, throughput.png, "
                                   "nodes.png (distributed runs) and summary.txt; the summary is also printed.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder with config.json and metrics.jsonl")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for the plots and summary.txt (default: RUN_DIR)")
    p.set_defaults(func=_run_report)


def _add_plan(sub) -> None:
    from edgetune.runtime.plan import shapes

    p = sub.add_parser("plan", help="predict a run before it starts: partition, memory per node and on the edge, "
                                    "FLOPs, bytes on every link, step time and what bounds it",
                       description="Plan a distributed fine-tuning run from shapes alone (no weights): the partition "
                                   "over the nodes in --nodes, memory per node and on the edge, FLOPs per token, bytes "
                                   "per step each way on every link, and the predicted step time with its bound "
                                   "(compute, bandwidth or latency).", formatter_class=_Defaults)
    p.add_argument("--model", required=True, help=f"a shipped shape ({', '.join(shapes.names())}), a config.json or "
                   "a folder with one, a .gguf file (its header), or 'embedded'")
    p.add_argument("--nodes", required=True, help="YAML/JSON file: nodes: [{name, memory, tflops, dtype, quantize, "
                   "link}], edge: {tflops, link, head_dtype}")
    p.add_argument("--link", default="100mbit,50ms", help="RATE,RTT of every hop without a link of its own")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--micro-batches", type=int, default=0,
                   help="micro-batches a step; 0: what finetune's default would choose for these nodes and links")
    p.add_argument("--codec", default="fp32", choices=["fp32", "fp16", "bf16", "int8"], help="activations on the wire")
    p.add_argument("--adapter-codec", default="raw", choices=["raw", "bf16", "int8"],
                   help="adapter deltas and gradients on the wire (steady state)")
    p.add_argument("--method", default=None, help="PEFT method, as in finetune (default: lora)")
    p.add_argument("--rank", type=int, default=None, help="LoRA/DoRA rank (default: finetune's)")
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--target-modules", default=None, help="as in finetune, e.g. all-linear or q_proj,v_proj")
    p.add_argument("--layers-to-transform", default=None)
    p.add_argument("--num-virtual-tokens", type=int, default=None)
    p.add_argument("--bottleneck-size", type=int, default=None)
    p.add_argument("--use-rslora", action="store_true", default=None)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_run_plan)


# finetune's options that change an adapter's size: the ones `edgetune methods` takes
_METHOD_SIZE_OPTIONS = ("rank", "target_modules", "layers_to_transform", "num_virtual_tokens", "bottleneck_size",
                        "density", "shira_rank", "init_rank")


def _add_methods(sub) -> None:
    from edgetune.runtime.plan import shapes

    p = sub.add_parser("methods", help="every PEFT method side by side on one model: survey branch, trainable "
                                       "values, edge memory, bytes per step, merging and export",
                       description="A table of every --method finetune accepts, from one model's shapes alone (no "
                                   "weights are read; a 70B shape takes seconds): its branch in Han et al.'s PEFT "
                                   "survey, trainable values, the edge's memory for them with AdamW, bytes pushed to "
                                   "the nodes per step, whether it merges into the weights, how `edgetune export` "
                                   "writes it, and its PEFT type. The method options are finetune's.",
                       formatter_class=_Defaults)
    p.add_argument("--model", default="embedded", help=f"a shipped shape ({', '.join(shapes.names())}), a config.json "
                   "or a folder with one, a .gguf file (its header), or 'embedded'")
    p.add_argument("--json", action="store_true", help="print the table as JSON (default: text)")
    _add_options(p, [o for o in _FINETUNE_OPTIONS if o[0] in _METHOD_SIZE_OPTIONS],
                 _train_defaults(), parse_defaults=False)
    p.add_argument("--prefix-projection", dest="prefix_projection", action="store_true", default=None,
                   help=f"{_FINETUNE_FLAGS['prefix_projection']} (default: off)")
    p.set_defaults(func=_run_methods)


def _run_methods(args: argparse.Namespace) -> int:
    from edgetune.commands.methods import run_methods

    return run_methods(args)


# demo options: (flag, type, help); defaults come from DemoOptions
_DEMO_OPTIONS: list[tuple[str, type, str]] = [
    ("out", str, "folder for the run, the adapter and the ONNX export (an earlier demo's is replaced; any other existing folder is refused)"),
    ("steps", int, "fine-tuning steps"),
    ("prompts", int, "held-out questions answered side by side by the base and the fine-tuned model"),
    ("max_new_tokens", int, "longest answer, in tokens"),
    ("small_node_memory", str, "--memory-limit of node-small, the node that gets fewer blocks"),
    ("model", str, "base model: a Hugging Face folder, a .gguf file, or 'embedded'"),
    ("data", str, "training data (JSONL)"),
    ("eval_data", str, "held-out data (JSONL): eval loss, and the questions asked at the end"),
    ("lr", float, "peak learning rate"),
]


def _add_demo(sub) -> None:
    from dataclasses import fields

    from edgetune.commands.demo import DemoOptions

    p = sub.add_parser("demo", help="the whole journey on this machine: a local cluster, distributed fine-tuning, "
                                    "ONNX export, base vs fine-tuned answers with onnxruntime",
                       description="Start a coordinator and two worker nodes of different capacity here, fine-tune "
                                   "the embedded SmolLM2-135M-Instruct on the Fernhill Library facts through them, "
                                   "export to ONNX, answer held-out questions with the base and the fine-tuned model "
                                   "(onnxruntime only) and plot the run. A few minutes on 2 CPU cores; every process "
                                   "it starts is stopped at the end.")
    _add_options(p, _DEMO_OPTIONS, {f.name: f.default for f in fields(DemoOptions)}, parse_defaults=True)
    p.set_defaults(func=_run_demo)


def build_parser() -> argparse.ArgumentParser:
    from edgetune.commands.logs import LOG_FORMATS, LOG_LEVELS  # light: logging and json only

    parser = argparse.ArgumentParser(prog="edgetune", description="Fine-tune LLMs from a weak device; run adapters on the edge.")
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS, help="log verbosity (default: %(default)s)")
    parser.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                        help="text: readable lines; json: one JSON object per line with time, level, logger, "
                             "message (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_finetune(sub)
    _add_generate(sub)
    _add_prepare_model(sub)
    _add_export(sub)
    _add_coordinator(sub)
    _add_node(sub)
    _add_status(sub)
    _add_token(sub)
    _add_revoke(sub)
    _add_report(sub)
    _add_plan(sub)
    _add_methods(sub)
    _add_demo(sub)
    return parser


# ---------------------------------------------------------------- handlers
def _run_finetune(args: argparse.Namespace) -> int:
    from edgetune.runtime.train.options import train_config_from

    cfg = train_config_from(args)
    if args.local == cfg.distributed:
        print("edgetune finetune: give either --coordinator HOST:PORT, --join STRING or --credentials DIR (train on "
              "a cluster), or --local (train in this process)", file=sys.stderr)
        return 2
    from edgetune.runtime.train.loop import finetune

    result = finetune(cfg)
    print(f"adapter saved to {result.adapter_dir}")
    if result.eval_loss is not None:
        print(f"final eval loss {result.eval_loss:.4f}")
    return 0


def _run_plan(args: argparse.Namespace) -> int:
    from edgetune.commands.plan import run_plan

    return run_plan(args)


def _run_generate(args: argparse.Namespace) -> int:
    from edgetune.commands.generate import run_generate

    return run_generate(args)


def _run_coordinator(args: argparse.Namespace) -> int:
    from edgetune.commands.coordinator import run_coordinator

    return run_coordinator(args)


def _run_node(args: argparse.Namespace) -> int:
    from edgetune.commands.node import run_node

    return run_node(args)


def _run_token(args: argparse.Namespace) -> int:
    from edgetune.commands.trust import run_token

    return run_token(args)


def _run_revoke(args: argparse.Namespace) -> int:
    from edgetune.commands.trust import run_revoke

    return run_revoke(args)


def _run_status(args: argparse.Namespace) -> int:
    from edgetune.commands.status import run_status

    return run_status(args)


def _run_demo(args: argparse.Namespace) -> int:
    from edgetune.commands.demo import DemoOptions, run_demo

    run_demo(DemoOptions(**{name: getattr(args, name) for name, _, _ in _DEMO_OPTIONS}))
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from edgetune.commands.report import run_report

    return run_report(args)


def _run_export(args: argparse.Namespace) -> int:
    from edgetune.runtime.onnx.export import ExportOptions, export

    out = export(ExportOptions(model=args.model, adapter=args.adapter, out=args.out, mode=args.mode, dtype=args.dtype,
                               quantize=args.quantize, context_length=args.context_length))
    print(f"exported to {out}")
    return 0


def _run_prepare_model(args: argparse.Namespace) -> int:
    from edgetune.runtime.model.embedded import resolve_model_path

    print(resolve_model_path(args.model))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from edgetune.commands.logs import setup_logging
    from edgetune.runtime.errors import EdgetuneError

    setup_logging(args.log_level, args.log_format)

    try:
        return args.func(args)
    except EdgetuneError as e:
        print(f"edgetune {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edgetune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
