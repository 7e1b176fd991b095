"""ONNX exports on the device: edgetune's exporter vs onnxruntime-genai's model builder, side by side.

    python -m edgetune.benchmarks.bench_onnx [--prompt-tokens 128] [--new-tokens 128] [--repeats 3] [--quick]

One run prepares everything in a work folder, then measures:

- preparation: a LoRA adapter trained for a few steps on examples/data/assistant.jsonl, the
  merged model written as a Hugging Face folder, edgetune's exports (fp32 merged, fp32
  adapter-inputs, int4 and int8 merged) and the builder's fp32 and int4 exports of that merged
  folder; prefix-tuning and serial-adapter adapters exported merged, for their speed;
- speed: batch 1, a `--prompt-tokens` prompt, exactly `--new-tokens` greedy tokens (no stop
  at eos). Every ONNX graph runs under the same numpy + onnxruntime loop of this file (one
  prompt pass, then one-token steps feeding present -> past; `position_ids` only where the
  graph has that input), so the graphs are what differs. Beside them: edgetune's PyTorch
  generation, transformers' `generate`, and onnxruntime-genai's own loop on both fp32 exports.
  Each measured run is its own subprocess; the runners alternate round by round; medians;
- quality: perplexity on benchmarks/data/heldout.txt (windows of `--window` tokens, one
  full-sequence pass each with an empty past) for the fp32, int4 and int8 exports;
- the int4 graphs' MatMulNBits attributes, edgetune's against the builder's.

A table of the targets with PASS/MISS ends the report.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from edgetune.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data" / "assistant.jsonl"
HELDOUT = Path(__file__).resolve().parent / "data" / "heldout.txt"

# runner -> (engine, folder in the work dir). Engines: "ort" = this file's onnxruntime loop,
# "genai" = onnxruntime-genai's Generator, "edgetune" = edgetune's PyTorch generate,
# "hf" = transformers' generate.
RUNNERS = {
    "edgetune-fp32": ("ort", "edgetune-fp32"),
    "edgetune-inputs": ("ort", "edgetune-inputs"),
    "edgetune-int4": ("ort", "edgetune-int4"),
    "edgetune-int8": ("ort", "edgetune-int8"),
    "edgetune-prefix": ("ort", "edgetune-prefix"),
    "edgetune-serial": ("ort", "edgetune-serial"),
    "builder-fp32": ("ort", "builder-fp32"),
    "builder-int4": ("ort", "builder-int4"),
    "edgetune-pytorch": ("edgetune", "merged-hf"),
    "transformers": ("hf", "merged-hf"),
    "genai:edgetune-fp32": ("genai", "edgetune-fp32"),
    "genai:builder-fp32": ("genai", "builder-fp32"),
    "genai:edgetune-prefix": ("genai", "edgetune-prefix"),
}
PPL_RUNNERS = ("edgetune-fp32", "builder-fp32", "edgetune-int4", "builder-int4", "edgetune-int8")
PROFILE_RUNNERS = ("edgetune-fp32", "builder-fp32", "edgetune-int4", "builder-int4")
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONWARNINGS": "ignore"}


@dataclass(frozen=True)
class BenchConfig:
    """Settings shared by the parent and every worker (passed as JSON)."""

    workdir: str
    prompt_tokens: int = 128
    new_tokens: int = 128
    warmup_tokens: int = 8
    threads: int = 2
    window: int = 256
    max_windows: int = 0  # 0: every window of the held-out text
    train_steps: int = 10
    profile: bool = False

    def __post_init__(self) -> None:
        problems = [f"{k} must be positive, got {getattr(self, k)}"
                    for k in ("prompt_tokens", "new_tokens", "threads", "train_steps") if getattr(self, k) <= 0]
        if self.window < 2:
            problems.append(f"window must be at least 2 tokens, got {self.window}")
        if self.warmup_tokens < 1:
            problems.append(f"warmup_tokens must be >= 1, got {self.warmup_tokens}")
        if problems:
            raise ConfigError("bench_onnx: " + "; ".join(problems))

    def folder(self, name: str) -> Path:
        return Path(self.workdir) / name


# ------------------------------------------------------------------ preparation (parent)
def _timed(label: str, times: dict, fn, *args) -> None:
    t = time.perf_counter()
    fn(*args)
    times[label] = time.perf_counter() - t
    print(f"prepared {label} in {times[label]:.0f} s", file=sys.stderr, flush=True)


# the file each preparation step writes last (exports: genai_config.json)
DONE_MARKER = {"adapter": "adapter_config.json", "adapter-prefix": "adapter_config.json",
               "adapter-serial": "adapter_config.json", "merged-hf": "config.json"}


def prepare(cfg: BenchConfig) -> dict:
    """Build whatever the work folder lacks; returns seconds per step (reused steps are left out)."""
    from edgetune.runtime.model.embedded import embedded_model_path

    base = embedded_model_path()
    _prompt_ids(cfg, base)  # a too long --prompt-tokens fails here, before the long work
    times: dict[str, float] = {}
    steps = [
        ("adapter", lambda: _train_adapter(cfg, base, "lora", "adapter")),
        ("adapter-prefix", lambda: _train_adapter(cfg, base, "prefix", "adapter-prefix")),
        ("adapter-serial", lambda: _train_adapter(cfg, base, "serial_adapter", "adapter-serial")),
        ("merged-hf", lambda: _merged_folder(cfg, base)),
        ("edgetune-fp32", lambda: _edgetune_export(cfg, base, "edgetune-fp32", "merged", None)),
        ("edgetune-inputs", lambda: _edgetune_export(cfg, base, "edgetune-inputs", "adapter-inputs", None)),
        ("edgetune-int4", lambda: _edgetune_export(cfg, base, "edgetune-int4", "merged", "int4")),
        ("edgetune-int8", lambda: _edgetune_export(cfg, base, "edgetune-int8", "merged", "int8")),
        ("edgetune-prefix", lambda: _edgetune_export(cfg, base, "edgetune-prefix", "merged", None, "adapter-prefix")),
        ("edgetune-serial", lambda: _edgetune_export(cfg, base, "edgetune-serial", "merged", None, "adapter-serial")),
        ("builder-fp32", lambda: _builder_export(cfg, "fp32")),
        ("builder-int4", lambda: _builder_export(cfg, "int4")),
    ]
    for name, build in steps:
        if not (cfg.folder(name) / DONE_MARKER.get(name, "genai_config.json")).exists():
            _timed(name, times, build)
    return times


def _train_adapter(cfg: BenchConfig, base: Path, method: str, name: str) -> None:
    """LoRA r=8 on q/v (the merged exports'), or prefix tuning (20 virtual tokens) or a serial adapter
    (bottleneck 64) for the plainer graphs' speed."""
    from edgetune.runtime.train.loop import TrainConfig, finetune

    run_dir = cfg.folder(f"run-{name}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a run interrupted earlier
    run = finetune(TrainConfig(model=str(base), data=str(EXAMPLES), out=str(run_dir), method=method, rank=8,
                               alpha=16, target_modules=("q_proj", "v_proj"), lr=3e-3, steps=cfg.train_steps,
                               batch_size=2, max_seq_len=64, eval_fraction=0.0, save_every=0, progress=False,
                               threads=cfg.threads))
    shutil.copytree(run.adapter_dir, cfg.folder(name))


def _merged_folder(cfg: BenchConfig, base: Path) -> None:
    """The base model with the adapter folded in, as a Hugging Face folder (the builder's and transformers' input)."""
    from safetensors.torch import save_file

    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.peft.hf_format import load_adapter

    model = load_model(base)
    load_adapter(model, cfg.folder("adapter")).merge_into(model)
    model.adapter = None
    out = cfg.folder("merged-hf")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().clone() for name, t in model.hf_state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for src in base.iterdir():  # config.json last: its presence marks the folder complete
        if src.suffix in (".json", ".jinja", ".txt") and src.name != "config.json":
            shutil.copyfile(src, out / src.name)
    shutil.copyfile(base / "config.json", out / "config.json")


def _edgetune_export(cfg: BenchConfig, base: Path, name: str, mode: str, quantize: str | None,
                     adapter: str = "adapter") -> None:
    import logging

    from edgetune.runtime.onnx.export import ExportOptions, export

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per MatMul otherwise
    export(ExportOptions(model=str(base), adapter=str(cfg.folder(adapter)), out=str(cfg.folder(name)), mode=mode,
                         quantize=quantize))


def _builder_export(cfg: BenchConfig, precision: str) -> None:
    """onnxruntime-genai's model builder on the merged folder, with its CPU defaults."""
    out = cfg.folder(f"builder-{precision}")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(cfg.folder("merged-hf")), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cfg.folder("builder-cache"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV}, check=False)
    if proc.returncode != 0 or not (out / "genai_config.json").exists():
        raise RuntimeError(f"the model builder failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def _tokenizer(folder: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def _prompt_ids(cfg: BenchConfig, folder: Path) -> list[int]:
    """The first `prompt_tokens` tokens of the example conversations' text: the same ids for every runner."""
    texts = [m["content"] for line in EXAMPLES.read_text().splitlines() if line.strip()
             for m in json.loads(line)["messages"]]
    ids = _tokenizer(folder).encode("\n".join(texts)).ids
    if len(ids) < cfg.prompt_tokens:
        raise ConfigError(f"bench_onnx: {EXAMPLES} has only {len(ids)} tokens; use --prompt-tokens <= {len(ids)}")
    return ids[:cfg.prompt_tokens]


# ------------------------------------------------------------------ the onnxruntime loop (worker)
_NP_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
             "tensor(int32)": "int32"}


class OrtDecoder:
    """One decoder graph with a KV cache, driven the same way whoever exported it."""

    def __init__(self, folder: Path, threads: int, profile_prefix: str | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        self.session = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.types = {name: _NP_TYPES[i.type] for name, i in inputs.items()}
        self.has_position_ids = "position_ids" in inputs
        # past_key_values.{i}.key|value: (B, kv_heads, past, head_dim), sizes from genai_config.json (the
        # builder leaves head_dim symbolic); LoRA inputs have defaults and are not fed
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        kv = (decoder["num_key_value_heads"], decoder["head_size"])
        self.past = {name: kv for name in inputs if name.startswith("past_key_values.")}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def feeds(self, ids, total: int, past: dict | None) -> dict:
        """Inputs for `ids` (1, T) after `total - T` cached positions."""
        import numpy as np

        T = ids.shape[1]
        feeds = {"input_ids": ids.astype(self.types["input_ids"]),
                 "attention_mask": np.ones((1, total), self.types["attention_mask"])}
        if self.has_position_ids:
            feeds["position_ids"] = np.arange(total - T, total, dtype=self.types["position_ids"])[None]
        if past is None:
            past = {name: np.zeros((1, kvh, 0, hd), self.types[name]) for name, (kvh, hd) in self.past.items()}
        return {**feeds, **past}

    def run(self, feeds: dict) -> tuple:
        """(logits (1, T, V), next past) for one forward pass."""
        out = dict(zip(self.outputs, self.session.run(None, feeds)))
        past = {k.replace("present", "past_key_values", 1): v for k, v in out.items() if k.startswith("present.")}
        return out["logits"], past

    def generate(self, prompt: list[int], n_new: int) -> tuple[list[int], list[float]]:
        """Greedy tokens and the perf_counter time at which each one was known; never stops early."""
        import numpy as np

        ids = np.array([prompt], np.int64)
        total, past, tokens, stamps = len(prompt), None, [], []
        for _ in range(n_new):
            logits, past = self.run(self.feeds(ids, total, past))
            tokens.append(int(logits[0, -1].argmax()))
            stamps.append(time.perf_counter())
            ids = np.array([[tokens[-1]]], np.int64)
            total += 1
        return tokens, stamps

    def nll(self, ids: list[int]) -> tuple[float, int]:
        """Summed next-token negative log-likelihood over one window (full sequence, empty past)."""
        import numpy as np

        logits, _ = self.run(self.feeds(np.array([ids], np.int64), len(ids), None))
        x = logits[0, :-1].astype(np.float64)  # (T-1, V)
        m = x.max(-1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(x - m).sum(-1)))
        return float((logz - x[np.arange(len(ids) - 1), ids[1:]]).sum()), len(ids) - 1


# ------------------------------------------------------------------ workers
class CpuProbe:
    """Share of the machine's CPU time that other processes used while this one measured.

    /proc/stat counts busy time of every process; time.process_time() counts this process's
    threads. On a shared 2-core machine a second busy process halves what a 2-thread runtime
    gets, so every run reports it and the parent retries runs taken under contention.
    """

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy_s(), time.process_time()

    @staticmethod
    def _busy_s() -> float:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def foreign_share(self) -> float:
        wall = time.perf_counter() - self.t0
        foreign = (self._busy_s() - self.busy0) - (time.process_time() - self.own0)
        return max(0.0, foreign / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0


def wait_for_quiet(max_share: float, max_wait_s: float) -> float:
    """Block (0.5 s samples) until other processes use at most `max_share` of the CPUs; returns seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        probe = CpuProbe()
        time.sleep(0.5)
        if probe.foreign_share() <= max_share:
            break
    return time.perf_counter() - t0


def _measure(generate, cfg: BenchConfig, load_s: float, **extra) -> dict:
    """One untimed warm-up generation, then one timed generation of exactly cfg.new_tokens tokens.

    `generate(n)` returns the tokens and the perf_counter time at which each was known;
    tokens/s = new tokens / (prompt pass + every decode step).
    """
    generate(cfg.warmup_tokens)
    probe = CpuProbe()
    t0 = time.perf_counter()
    tokens, stamps = generate(cfg.new_tokens)
    foreign = probe.foreign_share()
    n, total, decode = len(tokens), stamps[-1] - t0, stamps[-1] - stamps[0]
    return {"tokens_per_s": n / total, "prompt_s": stamps[0] - t0, "total_s": total,
            "decode_tokens_per_s": (n - 1) / decode if n > 1 and decode > 0 else float("nan"),
            "load_s": load_s, "foreign_cpu": foreign, "rss_peak_mb": _max_rss_mb(), "tokens": tokens, **extra}


def _max_rss_mb() -> float:
    """Peak RSS of this process image. Not ru_maxrss: Linux carries that over exec from the
    parent, which holds the exports' memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


def _ort_worker(cfg: BenchConfig, runner: str, prompt: list[int]) -> dict:
    t = time.perf_counter()
    dec = OrtDecoder(cfg.folder(RUNNERS[runner][1]), cfg.threads)
    record = _measure(lambda n: dec.generate(prompt, n), cfg, time.perf_counter() - t,
                      position_ids=dec.has_position_ids)
    if cfg.profile and runner in PROFILE_RUNNERS:
        record["profile"] = _profile(cfg, runner, prompt)
    return record


def _profile(cfg: BenchConfig, runner: str, prompt: list[int]) -> dict:
    """Kernel ms per op (MatMuls by output width) in the prompt pass and per decode step, one profiled generation."""
    prefix = str(Path(tempfile.mkdtemp(prefix="bench_onnx_prof_")) / runner)
    dec = OrtDecoder(cfg.folder(RUNNERS[runner][1]), cfg.threads, profile_prefix=prefix)
    dec.generate(prompt, cfg.warmup_tokens)
    probe = CpuProbe()
    dec.generate(prompt, cfg.new_tokens)
    foreign = probe.foreign_share()
    events = json.loads(Path(dec.session.end_profiling()).read_text())
    shutil.rmtree(Path(prefix).parent, ignore_errors=True)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    runs = runs[-cfg.new_tokens:]  # the profiled generation: one prompt pass, then decode steps
    prompt_ms, decode_ms = defaultdict(float), defaultdict(float)
    steps = max(1, len(runs) - 1)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op = e["args"]["op_name"]
        if op.startswith(("MatMul", "Gemm")):  # which projection: its output width
            op += f" ->{next(iter(e['args']['output_type_shape'][0].values()))[-1]}"
        if runs[0][0] <= e["ts"] <= runs[0][1]:
            prompt_ms[op] += e["dur"] / 1000
        elif len(runs) > 1 and runs[1][0] <= e["ts"] <= runs[-1][1]:
            decode_ms[op] += e["dur"] / 1000 / steps
    return {"prompt_ms": dict(prompt_ms), "decode_ms_per_step": dict(decode_ms), "foreign_cpu": foreign,
            "run_ms": {"prompt": (runs[0][1] - runs[0][0]) / 1000,
                       "decode_step": statistics.median(b - a for a, b in runs[1:]) / 1000 if runs[1:] else 0.0}}


def _genai_worker(cfg: BenchConfig, runner: str, prompt: list[int]) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    t = time.perf_counter()
    config = og.Config(str(cfg.folder(RUNNERS[runner][1])))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": cfg.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t

    def generate(n_new: int) -> tuple[list[int], list[float]]:
        params = og.GeneratorParams(model)
        length = len(prompt) + n_new  # min = max: exactly n_new tokens, eos or not
        params.set_search_options(do_sample=False, min_length=length, max_length=length)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([prompt], np.int32))
        tokens, stamps = [], []
        while not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            stamps.append(time.perf_counter())
        return tokens, stamps

    return _measure(generate, cfg, load_s)


def _torch_worker(cfg: BenchConfig, runner: str, prompt: list[int]) -> dict:
    import torch

    torch.set_num_threads(cfg.threads)
    folder = cfg.folder(RUNNERS[runner][1])
    ids = torch.tensor([prompt])
    t = time.perf_counter()
    if RUNNERS[runner][0] == "edgetune":
        from edgetune.runtime.model.loader import load_model

        model = load_model(folder)

        def run(n_new: int, on_token):
            return model.generate(ids, max_new_tokens=n_new, greedy=True, on_token=on_token)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        mask = torch.ones_like(ids)

        def run(n_new: int, on_token):
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new,
                                      min_new_tokens=n_new, streamer=_Streamer(on_token),
                                      pad_token_id=model.config.eos_token_id)
    load_s = time.perf_counter() - t

    def generate(n_new: int) -> tuple[list[int], list[float]]:
        stamps: list[float] = []
        out = run(n_new, lambda tok: stamps.append(time.perf_counter()))
        return out[0, len(prompt):].tolist(), stamps

    return _measure(generate, cfg, load_s, torch_threads=torch.get_num_threads())


class _Streamer:
    """transformers' streamer protocol: put() gets the prompt first, then each new token."""

    def __init__(self, on_token) -> None:
        self.on_token, self.seen_prompt = on_token, False

    def put(self, value) -> None:
        if self.seen_prompt:
            self.on_token(value)
        self.seen_prompt = True

    def end(self) -> None:
        pass


def _ppl_worker(cfg: BenchConfig, runner: str) -> dict:
    import math

    ids = _tokenizer(cfg.folder("merged-hf")).encode(HELDOUT.read_text()).ids
    windows = [ids[i:i + cfg.window] for i in range(0, len(ids), cfg.window)]
    windows = [w for w in windows if len(w) >= 2][:cfg.max_windows or None]
    dec = OrtDecoder(cfg.folder(RUNNERS[runner][1]), cfg.threads)
    nll, n = 0.0, 0
    for w in windows:
        a, b = dec.nll(w)
        nll, n = nll + a, n + b
    return {"ppl": math.exp(nll / n), "nll_per_token": nll / n, "tokens": n, "windows": len(windows),
            "heldout_tokens": len(ids)}


def run_worker(cfg: BenchConfig, job: str) -> dict:
    """One measured run ("RUNNER" or "ppl:RUNNER") in this process; a JSON-ready record."""
    if job.startswith("ppl:"):
        return {"job": job, **_ppl_worker(cfg, job[4:])}
    prompt = _prompt_ids(cfg, cfg.folder("merged-hf"))
    engine = RUNNERS[job][0]
    work = {"ort": _ort_worker, "genai": _genai_worker, "edgetune": _torch_worker, "hf": _torch_worker}[engine]
    return {"job": job, "runner": job, **work(cfg, job, prompt)}


def spawn_worker(cfg: BenchConfig, job: str) -> dict:
    cmd = [sys.executable, "-m", "edgetune.benchmarks.bench_onnx", "--worker", job, "--spec", json.dumps(asdict(cfg))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV}, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {job} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ graph inspection (parent)
def inspect_graph(folder: Path) -> dict:
    """Op histogram, MatMulNBits attributes, and MatMuls left in float, of one exported graph."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    nbits, zero_points = Counter(), 0
    for n in graph.node:
        if n.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            nbits[(attrs.get("bits", 4), attrs.get("block_size"), attrs.get("accuracy_level", 0))] += 1
            zero_points += len(n.input) > 3 and bool(n.input[3])
    float_matmuls = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in inits for i in n.input)]
    return {"ops": Counter(n.op_type for n in graph.node), "matmulnbits": nbits, "zero_points": zero_points,
            "float_weight_matmuls": float_matmuls, "inputs": [i.name for i in graph.input]}


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx")) / 2 ** 20


# ------------------------------------------------------------------ parent: schedule and report
@dataclass(frozen=True)
class Schedule:
    """How many measured runs, and when a run taken under contention is run again."""

    repeats: int = 3
    max_foreign_cpu: float = 0.15  # share of the machine other processes may use during a kept run
    retries: int = 2  # per run; the last try is kept whatever the contention
    quiet_wait_s: float = 30.0  # before each run, wait at most this long for the other processes to calm down


def _measured_run(cfg: BenchConfig, runner: str, sched: Schedule, discarded: list[dict]) -> dict:
    """One kept run of `runner`; the runs it took under contention go to `discarded`."""
    for attempt in range(sched.retries + 1):
        waited = wait_for_quiet(sched.max_foreign_cpu, sched.quiet_wait_s)
        record = {**spawn_worker(cfg, runner), "waited_s": waited}
        if record["foreign_cpu"] <= sched.max_foreign_cpu or attempt == sched.retries:
            break
        discarded.append(record)
        print(f"  {runner}: other processes used {record['foreign_cpu']:.0%} of the CPU; run again",
              file=sys.stderr, flush=True)
    return record


def run_parent(cfg: BenchConfig, sched: Schedule, json_path: str | None) -> dict:
    t_start = time.perf_counter()
    prep = prepare(cfg)
    runs: list[dict] = []
    discarded: list[dict] = []
    order = list(RUNNERS)
    for r in range(sched.repeats):
        for runner in (order if r % 2 == 0 else order[::-1]):  # alternate, and flip the order each round
            runs.append(_measured_run(cfg, runner, sched, discarded))
            print(f"round {r + 1}/{sched.repeats} {runner}: {runs[-1]['tokens_per_s']:.1f} tok/s "
                  f"(other processes {runs[-1]['foreign_cpu']:.0%})", file=sys.stderr, flush=True)
    ppl = {}
    for runner in PPL_RUNNERS:
        ppl[runner] = spawn_worker(cfg, f"ppl:{runner}")
        print(f"perplexity {runner}: {ppl[runner]['ppl']:.4f}", file=sys.stderr, flush=True)
    graphs = {name: inspect_graph(cfg.folder(name)) for name in ("edgetune-fp32", "edgetune-inputs", "builder-fp32",
                                                                 "edgetune-int4", "builder-int4", "edgetune-int8",
                                                                 "edgetune-prefix", "edgetune-serial")}
    sizes = {name: _size_mb(cfg.folder(name)) for name in graphs}
    result = {"config": asdict(cfg), "schedule": asdict(sched), "prepare_s": prep, "runs": runs,
              "discarded_runs": discarded, "ppl": ppl,
              "graphs": {k: {**v, "ops": dict(v["ops"]),
                             "matmulnbits": [[*attrs, count] for attrs, count in v["matmulnbits"].items()]}
                         for k, v in graphs.items()},
              "sizes_mb": sizes, "wall_s": None}
    result["summary"] = summarize(runs, ppl, graphs)
    result["wall_s"] = time.perf_counter() - t_start
    print(format_report(cfg, result, graphs))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=str))
    return result


def summarize(runs: list[dict], ppl: dict, graphs: dict) -> dict:
    med = {r: {k: statistics.median(x[k] for x in runs if x["runner"] == r)
               for k in ("tokens_per_s", "decode_tokens_per_s", "prompt_s", "load_s", "rss_peak_mb", "foreign_cpu")}
           for r in RUNNERS}
    tps = {r: m["tokens_per_s"] for r, m in med.items()}
    attrs = {name: set(graphs[name]["matmulnbits"]) for name in ("edgetune-int4", "builder-int4")}
    p = {r: v["ppl"] for r, v in ppl.items()}
    targets = [
        ("edgetune fp32 / builder fp32 (tokens/s)", tps["edgetune-fp32"] / tps["builder-fp32"], ">=", 0.9),
        ("edgetune adapter-inputs, no adapter / builder fp32", tps["edgetune-inputs"] / tps["builder-fp32"], ">=", 0.9),
        ("edgetune int4 / builder int4 (tokens/s)", tps["edgetune-int4"] / tps["builder-int4"], ">=", 0.9),
        ("edgetune int4 ppl / builder int4 ppl", p["edgetune-int4"] / p["builder-int4"], "<=", 1.01),
        ("int4 MatMulNBits (bits, block, accuracy) = builder's", float(attrs["edgetune-int4"] == attrs["builder-int4"]),
         ">=", 1.0),
    ]
    info = {
        "builder fp32 / transformers (issue: ~2.0)": tps["builder-fp32"] / tps["transformers"],
        "builder int4 / transformers (issue: ~5.6)": tps["builder-int4"] / tps["transformers"],
        "edgetune fp32 / transformers": tps["edgetune-fp32"] / tps["transformers"],
        "edgetune int4 / transformers": tps["edgetune-int4"] / tps["transformers"],
        "edgetune PyTorch / transformers": tps["edgetune-pytorch"] / tps["transformers"],
        "genai: edgetune fp32 / builder fp32": tps["genai:edgetune-fp32"] / tps["genai:builder-fp32"],
        "edgetune int4 ppl / edgetune fp32 ppl": p["edgetune-int4"] / p["edgetune-fp32"],
        "edgetune int8 ppl / edgetune fp32 ppl": p["edgetune-int8"] / p["edgetune-fp32"],
        "edgetune int8 / edgetune fp32 (tokens/s)": tps["edgetune-int8"] / tps["edgetune-fp32"],
        "edgetune prefix (20 tokens) / edgetune fp32 (tokens/s)": tps["edgetune-prefix"] / tps["edgetune-fp32"],
        "edgetune serial adapter / edgetune fp32 (tokens/s)": tps["edgetune-serial"] / tps["edgetune-fp32"],
        "genai: edgetune prefix / edgetune fp32": tps["genai:edgetune-prefix"] / tps["genai:edgetune-fp32"],
        "builder int4 ppl / builder fp32 ppl": p["builder-int4"] / p["builder-fp32"],
        "builder fp32 ppl / edgetune fp32 ppl": p["builder-fp32"] / p["edgetune-fp32"],
    }
    return {"median": med, "targets": [{"name": n, "value": v, "op": op, "target": t,
                                        "pass": v >= t if op == ">=" else v <= t} for n, v, op, t in targets],
            "info": info}


# whose greedy tokens each runner's are compared with: the same merged model in fp32, the other int4 export;
# adapter-inputs with no adapter active is the base model, with nothing to compare to
AGREEMENT_REFERENCE = {"edgetune-int4": "builder-int4", "builder-int4": "edgetune-int4", "edgetune-inputs": None,
                       "edgetune-prefix": None, "edgetune-serial": None, "genai:edgetune-prefix": "edgetune-prefix"}


def _agreement(runs: list[dict]) -> dict[str, str]:
    """Leading greedy tokens (first round) each runner shares with its reference runner's."""
    first = {}
    for r in runs:
        first.setdefault(r["runner"], r["tokens"])
    out = {}
    for name, tok in first.items():
        ref_name = AGREEMENT_REFERENCE.get(name, "edgetune-fp32")
        if ref_name is None or ref_name == name:
            out[name] = "-"
            continue
        ref = first[ref_name]
        same = next((i for i, (a, b) in enumerate(zip(tok, ref)) if a != b), min(len(tok), len(ref)))
        out[name] = f"{same}/{len(tok)} {ref_name}"
    return out


def format_report(cfg: BenchConfig, result: dict, graphs: dict) -> str:
    s, runs = result["summary"], result["runs"]
    med = s["median"]
    lines = [(f"SmolLM2-135M + LoRA (r=8, q/v, {cfg.train_steps} steps), batch 1, prompt {cfg.prompt_tokens} tokens, "
             f"{cfg.new_tokens} new tokens (greedy, no eos stop), {result['schedule']['repeats']} runs per runner; "
             f"threads: ORT intra-op {cfg.threads} (inter-op 1, sequential, ORT_ENABLE_ALL), torch {cfg.threads}, "
             f"genai intra-op {cfg.threads} (inter-op 1); {os.cpu_count()} CPUs"), ""]
    if result["prepare_s"]:
        lines.append("preparation (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["prepare_s"].items()))
    lines.append("model.onnx(+data) MB: " + ", ".join(f"{k} {v:.0f}" for k, v in result["sizes_mb"].items()))
    lines += ["", "1. speed (medians): tokens/s = new tokens / (prompt pass + all decode steps)", ""]
    agree = _agreement(runs)
    lines.append(f"{'runner':<22}{'tokens/s':>9}{'decode t/s':>11}{'prompt s':>9}{'load s':>7}{'RSS MB':>7}"
                 f"{'other CPU':>10}   {'per-run tokens/s':<20} same greedy tokens as")
    for r in RUNNERS:
        m = med[r]
        per = ", ".join(f"{x['tokens_per_s']:.1f}" for x in runs if x["runner"] == r)
        lines.append(f"{r:<22}{m['tokens_per_s']:>9.1f}{m['decode_tokens_per_s']:>11.1f}{m['prompt_s']:>9.3f}"
                     f"{m['load_s']:>7.1f}{m['rss_peak_mb']:>7.0f}{m['foreign_cpu']:>10.0%}   {per:<20} {agree[r]}")
    dropped = result["discarded_runs"]
    waited = sum(x.get("waited_s", 0) for x in runs + dropped)
    lines += ["(RSS MB: the worker's peak resident memory; other CPU: share of the machine used by other processes "
              f"during the timed generation; each run waited for a quiet machine ({waited:.0f} s in all); runs above "
              f"{result['schedule']['max_foreign_cpu']:.0%} were run again, {len(dropped)} dropped"
              + (": " + ", ".join(f"{x['runner']} {x['tokens_per_s']:.1f} tok/s at {x['foreign_cpu']:.0%}"
                                  for x in dropped) if dropped else "") + ")",
              ("(same greedy tokens: leading tokens equal to the named runner's; transformers and genai suppress eos "
              "until the last token, this loop does not)"), "", "2. perplexity on benchmarks/data/heldout.txt", ""]
    for r, v in result["ppl"].items():
        lines.append(f"{r:<22} ppl {v['ppl']:.4f}  ({v['tokens']} predicted tokens, {v['windows']} windows of "
                     f"<= {cfg.window}; text {v['heldout_tokens']} tokens)")
    lines += ["", ("3. int4 graphs: MatMulNBits (bits, block_size, accuracy_level) x count; zero points; "
              "float MatMuls with a weight initializer"), ""]
    for name in ("edgetune-int4", "builder-int4"):
        g = graphs[name]
        nb = ", ".join(f"{k} x{c}" for k, c in sorted(g["matmulnbits"].items()))
        lines.append(f"{name:<16} {nb}; zero points {g['zero_points']}; float weight MatMuls "
                     f"{len(g['float_weight_matmuls'])} {g['float_weight_matmuls'][:3]}")
    lines += ["", "4. graph ops (as exported, before ORT's optimizer)", ""]
    for name, g in graphs.items():
        lines.append(f"{name:<16} " + ", ".join(f"{op} {c}" for op, c in g["ops"].most_common()))
        lines.append(f"{'':<16} inputs: {_short_inputs(g['inputs'])}")
    profiles = {x["runner"]: x["profile"] for x in runs if "profile" in x}
    if profiles:
        lines += ["", *format_profiles(profiles)]
    lines += ["", "5. ratios (info)", ""]
    lines += [f"{k:<58}{v:>8.3f}" for k, v in s["info"].items()]
    lines += ["", "6. targets", "", f"{'target':<56}{'value':>8}   {'goal':<8}result"]
    for t in s["targets"]:
        lines.append(f"{t['name']:<56}{t['value']:>8.3f}   {t['op']} {t['target']:<5}{'PASS' if t['pass'] else 'MISS'}")
    lines.append(f"\nwall time {result['wall_s']:.0f} s")
    return "\n".join(lines)


def _short_inputs(names: list[str]) -> str:
    past = [n for n in names if n.startswith("past_key_values.")]
    rest = [n for n in names if n not in past and n.count(".") == 0]
    adapter = len(names) - len(past) - len(rest)  # adapter-inputs: LoRA (and DoRA) tensors, with defaults
    return ", ".join(rest) + f", past_key_values x{len(past)}" + (f", adapter inputs x{adapter}" if adapter else "")


def format_profiles(profiles: dict) -> list[str]:
    """Per-op-type time of the profiled graphs side by side (ms per decode step, ms in the prompt pass)."""
    names = list(profiles)
    ops = sorted({op for p in profiles.values() for op in p["decode_ms_per_step"]},
                 key=lambda op: -max(p["decode_ms_per_step"].get(op, 0) for p in profiles.values()))
    lines = [("profile (ORT session profiling, one generation after the timed one): kernel ms per decode step | "
             "ms in the prompt pass; MatMuls by output width"), "",
             f"{'op type':<36}" + "".join(f"{n:>24}" for n in names)]
    def row(label: str, cells) -> str:
        return f"{label:<36}" + "".join(cells)

    for op in ops[:20]:
        lines.append(row(op, (f"{p['decode_ms_per_step'].get(op, 0):>12.3f}{p['prompt_ms'].get(op, 0):>12.1f}"
                              for p in profiles.values())))
    lines.append(row("sum of kernels", (f"{sum(p['decode_ms_per_step'].values()):>12.3f}"
                                        f"{sum(p['prompt_ms'].values()):>12.1f}" for p in profiles.values())))
    lines.append(row("model_run (wall)", (f"{p['run_ms']['decode_step']:>12.3f}{p['run_ms']['prompt']:>12.1f}"
                                          for p in profiles.values())))
    lines.append(row("other CPU during the profile", (f"{p['foreign_cpu']:>24.0%}" for p in profiles.values())))
    return lines


# ------------------------------------------------------------------ CLI
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m edgetune.benchmarks.bench_onnx", description=__doc__.split("\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per run, exactly (no stop at eos)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over every runner")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for onnxruntime, genai and torch")
    p.add_argument("--window", type=int, default=256, help="perplexity window, tokens")
    p.add_argument("--train-steps", type=int, default=10, help="LoRA training steps before the exports")
    p.add_argument("--max-other-cpu", type=float, default=0.15,
                   help="run again a run during which other processes used more than this share of the CPUs")
    p.add_argument("--retries", type=int, default=2, help="extra tries per run under contention (the last is kept)")
    p.add_argument("--workdir", default=None,
                   help="keep the adapter and exports here and reuse what is already there "
                        "(default: a temporary folder, removed at the end)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one generation per ONNX graph (first round) and print per-op times")
    p.add_argument("--quick", action="store_true", help="smoke run: 16 new tokens, 1 round, 2 perplexity windows")
    p.add_argument("--json", default=None, help="write every run and the summary to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(BenchConfig(**json.loads(args.spec)), args.worker)))
        return
    try:
        _main(args)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def _main(args: argparse.Namespace) -> None:
    if args.repeats <= 0:
        raise ConfigError(f"bench_onnx: --repeats must be positive, got {args.repeats}")
    new_tokens, repeats, max_windows, retries = args.new_tokens, args.repeats, 0, args.retries
    if args.quick:
        new_tokens, repeats, max_windows, retries = 16, 1, 2, 0
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_onnx_")
    cfg = BenchConfig(workdir=str(Path(workdir).resolve()), prompt_tokens=args.prompt_tokens, new_tokens=new_tokens,
                      threads=args.threads, window=args.window, max_windows=max_windows, train_steps=args.train_steps,
                      profile=args.profile)
    try:
        sched = Schedule(repeats=repeats, max_foreign_cpu=args.max_other_cpu, retries=retries,
                         quiet_wait_s=5.0 if args.quick else Schedule.quiet_wait_s)
        run_parent(cfg, sched, args.json)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
