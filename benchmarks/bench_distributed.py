"""Distributed LoRA training (edge + 2 worker nodes on loopback gRPC) vs --local, in one run.

    python -m edgetune.benchmarks.bench_distributed --steps 20 --json bench_distributed.json
    python -m edgetune.benchmarks.bench_distributed --quick          # smoke run: 3 steps, one round

The model is SmolLM2-135M (the embedded model, fp32) with LoRA r=8 on q_proj and
v_proj. The parent starts two node processes, each serving half of the blocks with
`edgetune.nodes.service.serve` on 127.0.0.1, then runs every measured training
run as a fresh edge subprocess (`--worker`) calling `finetune()` exactly as
`edgetune finetune` does: `--local` runs in one process, distributed runs reach
the nodes through the route `edgetune.tests.node_harness.patch_connect` hands
them (no coordinator, no Ray). Every run trains on the same fixed-length batches
(B sequences of exactly T tokens, loss on every token) with the same seed.

What it measures (the first `--warmup` steps of each run are not timed):

1. step time, distributed (fp32 codec) vs local, medians over all timed steps;
2. where a distributed step goes: each node's compute (the `stages` metrics),
   edge compute, (de)serialisation and wire wait, from timestamped intervals
   that the edge and node processes record by wrapping serde, `RouteStream.recv`
   and `ShardSession.forward/backward` in their own process (the runtime is not
   edited; CLOCK_MONOTONIC is shared by all processes of the machine);
3. bytes per step on the edge <-> first node link for the fp32, bf16 and int8 codecs;
4. the training loss after the last step, int8 vs fp32;
5. the edge's memory (peak RSS minus RSS after imports) vs the local run's;
6. what mutual TLS costs: a second pair of node processes serves the same blocks with
   certificates from a CA made for the run (each node admitting only the hop before it), and
   "tls" runs (fp32) alternate with the plaintext ones ("dist"); step time TLS / plaintext.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from edgetune.benchmarks.bench_train import _max_rss_mb
from edgetune.runtime.errors import ConfigError

MODULE = "edgetune.benchmarks.bench_distributed"
CODECS = ("fp32", "bf16", "int8")
ACTIVATION_MESSAGES = ("Forward", "ForwardResult", "Backward", "BackwardResult")  # hidden states and dL/dh
ADAPTER_MESSAGES = ("AdapterPush", "Gradients")
INT8_BLOCK = 64  # serde.INT8_BLOCK_SIZE, the codec's elements per fp32 scale
TARGETS = {  # name -> (limit, comparison)
    "step time distributed/local": (1.3, "<="),
    "(serialisation + wire)/step": (0.10, "<="),
    "payload bf16/fp32": (0.51, "<="),
    "payload int8/fp32": (0.27, "<="),
    "loss |int8 - fp32|/fp32": (0.01, "<="),
    "edge RSS increase/local": (0.5, "<="),
    "step time TLS/plaintext": (1.05, "<="),
}
SIDES = ("local", "dist", "tls")  # in one process; plaintext nodes; mutual-TLS nodes


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark's settings; every worker gets them unchanged."""

    model: str  # Hugging Face folder (fp32)
    data: str  # JSONL of text records, each longer than seq_len tokens
    steps: int = 20
    warmup: int = 1
    batch_size: int = 4
    seq_len: int = 256
    micro_batches: int = 2  # distributed: pipelined through the nodes
    local_micro_batches: int = 1  # --local: the whole batch at once (its default, and its fastest)
    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-4
    threads: int = 1  # torch threads of the edge and of each node
    local_threads: int = 2  # torch threads of the --local run
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [f"{k} must be positive, got {getattr(self, k)}" for k in
                    ("steps", "batch_size", "micro_batches", "local_micro_batches", "rank", "threads", "local_threads")
                    if getattr(self, k) <= 0]
        if self.seq_len < 2:
            problems.append(f"seq_len must be at least 2 (next-token loss), got {self.seq_len}")
        if not 0 <= self.warmup < self.steps:
            problems.append(f"warmup must be in [0, steps), got {self.warmup} with steps={self.steps}")
        if max(self.micro_batches, self.local_micro_batches) > self.batch_size:
            problems.append(f"micro-batches cannot exceed the batch size {self.batch_size}")
        if problems:
            raise ConfigError("bench_distributed: " + "; ".join(problems))


@dataclass(frozen=True)
class RouteSpec:
    """How an edge worker reaches the node processes."""

    fingerprint: str
    token_file: str
    hops: tuple[tuple[str, str, int, int], ...]  # (name, "127.0.0.1:port", start, end)
    events: tuple[str, ...]  # each node's event file
    ca_dir: str = ""  # mutual TLS: the run's CA (ca.pem, ca.key), which certifies nodes and edges alike


# ------------------------------------------------------------------ data
def write_dataset(path: Path, seq_len: int, count: int) -> None:
    """`count` text records, each far longer than `seq_len` tokens.

    Tokenization truncates every record to exactly seq_len tokens, so every batch
    is (B, seq_len) with no padding and a loss on every token; the worker checks.
    The text is the example assistant conversations, rotated so records differ.
    """
    import edgetune.examples

    source = Path(edgetune.examples.__file__).parent / "data" / "assistant.jsonl"
    sentences = [m["content"] for line in source.read_text(encoding="utf-8").splitlines() if line.strip()
                 for m in json.loads(line)["messages"]]
    need_chars = 8 * seq_len  # English runs ~4 characters per token: twice what truncation keeps
    lines = []
    for i in range(count):
        parts, j = [], 7 * i
        while sum(len(p) + 1 for p in parts) < need_chars:
            parts.append(sentences[j % len(sentences)])
            j += 1
        lines.append(json.dumps({"text": " ".join(parts)}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------ recording (edge and node processes)
class Recorder:
    """Timestamped intervals (kind, start_s, end_s) of one process on the machine-wide monotonic clock,
    and bytes per message type (edge only)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[tuple[str, float, float]] = []
        self.bytes: Counter = Counter()
        self.step_bytes: list[dict[str, int]] = []

    def add(self, kind: str, start: float, end: float) -> None:
        with self._lock:
            self.events.append((kind, start, end))

    def count(self, message: str, nbytes: int) -> None:
        with self._lock:
            self.bytes[message] += nbytes

    def end_step(self, start: float, end: float) -> None:
        with self._lock:
            self.events.append(("step", start, end))
            self.step_bytes.append(dict(self.bytes))
            self.bytes.clear()

    def dump(self, path: Path) -> None:
        """Append the events so far to `path` (one JSON line) and forget them."""
        with self._lock:
            events, self.events = self.events, []
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(events) + "\n")

    def timed(self, kind: str, fn, materialize: bool = False):
        """`fn` wrapped to record each call as an interval; `materialize` drains a returned generator."""
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if materialize:
                out = list(out)
            self.add(kind, start, time.perf_counter())
            return out
        return wrapper


def _timed_feed(rec: Recorder, feed, count_bytes: bool):
    """Assembler.feed recorded as "decode"; with count_bytes, a message's frame bytes by its type."""
    def wrapper(self, frame):
        start = time.perf_counter()
        msg = feed(self, frame)
        rec.add("decode", start, time.perf_counter())
        if count_bytes:
            pending = getattr(self, "_bench_pending", 0) + frame.ByteSize()
            self._bench_pending = 0 if msg is not None else pending
            if msg is not None:
                rec.count(type(msg).__name__, pending)
        return msg
    return wrapper


def instrument_edge(rec: Recorder) -> None:
    """Record the edge's encodes, decodes, waits on the route and step windows (this process only)."""
    from edgetune.runtime.train import loop as train
    from edgetune.runtime.train import remote
    from edgetune.runtime.wire import serde

    encode = rec.timed("encode", serde.down_frames, materialize=True)

    def down_frames(msg, *args, **kwargs):
        frames = encode(msg, *args, **kwargs)
        rec.count(type(msg).__name__, sum(f.ByteSize() for f in frames))
        return frames

    step = train.train_step

    def train_step(*args, **kwargs):
        start = time.perf_counter()
        record = step(*args, **kwargs)
        rec.end_step(start, time.perf_counter())
        return record

    serde.down_frames = down_frames  # RouteStream.send looks it up on the module at each call
    serde.Assembler.feed = _timed_feed(rec, serde.Assembler.feed, count_bytes=True)
    remote.RouteStream.recv = rec.timed("wait", remote.RouteStream.recv)
    train.train_step = train_step  # finetune looks it up on the module at each step


def instrument_node(rec: Recorder, events_file: Path) -> None:
    """Record a node's compute and (de)serialisation; flush them to `events_file` as each step ends."""
    from edgetune.nodes.shard import ShardSession
    from edgetune.runtime.wire import messages as wire
    from edgetune.runtime.wire import serde

    up = rec.timed("encode", serde.up_frames, materialize=True)

    def up_frames(msg, *args, **kwargs):
        frames = up(msg, *args, **kwargs)
        if isinstance(msg, wire.Gradients):  # this node's last work of the step: the edge reads after it
            rec.dump(events_file)
        return frames

    ShardSession.forward = rec.timed("compute", ShardSession.forward)
    ShardSession.backward = rec.timed("compute", ShardSession.backward)
    serde.down_frames = rec.timed("encode", serde.down_frames, materialize=True)
    serde.up_frames = up_frames
    serde.Assembler.feed = _timed_feed(rec, serde.Assembler.feed, count_bytes=False)


# ------------------------------------------------------------------ timeline arithmetic
Intervals = list[tuple[float, float]]


def _merge(intervals: Intervals) -> Intervals:
    merged: Intervals = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _length(intervals: Intervals) -> float:
    return sum(b - a for a, b in intervals)


def _clip(events, kinds: tuple[str, ...], lo: float, hi: float) -> Intervals:
    return [(max(a, lo), min(b, hi)) for k, a, b in events if k in kinds and b > lo and a < hi]


def _complement(intervals: Intervals, lo: float, hi: float) -> Intervals:
    gaps, at = [], lo
    for a, b in _merge(intervals):
        if a > at:
            gaps.append((at, a))
        at = max(at, b)
    return gaps + ([(at, hi)] if at < hi else [])


def step_breakdown(window: tuple[float, float], edge_events, node_events, stages: list[dict]) -> dict[str, float]:
    """Where one distributed step's wall time went (seconds).

    Stage compute comes from the nodes' own metrics; edge compute is the edge's main
    thread neither waiting on the route nor encoding; serialisation sums every
    encode and decode of the three processes (CPU seconds); wire is the time when
    no process computed or (de)serialised (frames in gRPC / loopback, relaying);
    pipeline idle is what remains: negative when processes worked at the same time.
    """
    lo, hi = window
    edge_compute = _complement(_clip(edge_events, ("wait", "encode"), lo, hi), lo, hi)
    node_compute = _clip(node_events, ("compute",), lo, hi)
    serde = _clip(edge_events + node_events, ("encode", "decode"), lo, hi)
    compute = _merge(edge_compute + node_compute)
    busy = _merge(compute + serde)
    out = {"step_s": hi - lo}
    for s in stages:
        out[f"compute {s['node']}_s"] = s["forward_s"] + s["backward_s"]
    out["edge compute_s"] = _length(edge_compute)
    out["serialisation_s"] = _length(serde)
    out["wire wait_s"] = (hi - lo) - _length(busy)
    out["pipeline idle_s"] = out["step_s"] - sum(v for k, v in out.items() if k != "step_s")
    # Not part of the sum, for reading it: how much ran concurrently, how much serde no compute hid.
    out["(info) compute overlap_s"] = _length(edge_compute) + _length(node_compute) - _length(compute)
    out["(info) exposed serialisation_s"] = _length(busy) - _length(compute)
    return out


# ------------------------------------------------------------------ node process
def run_node(args: argparse.Namespace) -> None:
    """Serve blocks [start, end) on 127.0.0.1 until the parent closes our stdin."""
    import torch

    from edgetune.nodes.service import serve
    from edgetune.nodes.shard import Shard
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.security.access import Trust
    from edgetune.runtime.wire import rpc

    torch.set_num_threads(args.threads)
    part = load_model(args.node_model, start=args.start, end=args.end, edge=False)
    shard = Shard(args.node, args.node_model, part, args.fingerprint)
    instrument_node(Recorder(), Path(args.events))
    trust = Trust.insecure(rpc.load_token(Path(args.token_file)))
    if args.ca_dir:
        from edgetune.runtime.security.authority import peer_host

        ca = _run_ca(args.ca_dir)
        cert, key = ca.issue_keypair(args.node, "node", ips=["127.0.0.1"], dns=[peer_host(args.node)], valid_s=86400)
        trust = Trust.mutual(ca.cert_pem, cert, key)
    server, port = serve(shard, trust, host="127.0.0.1", port=0, previous=args.previous or "")
    print(json.dumps({"port": port, "threads": torch.get_num_threads()}), flush=True)
    sys.stdin.read()  # EOF: the parent is done (or gone)
    server.stop(grace=None)


def _run_ca(folder: str):
    from edgetune.runtime.security.ca import Authority

    return Authority((Path(folder) / "ca.pem").read_bytes(), (Path(folder) / "ca.key").read_bytes())


# ------------------------------------------------------------------ edge / local worker
def _import_side(side: str) -> None:
    """What a side imports before its baseline RSS (torch._dynamo: every torch.optim optimizer imports it)."""
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401

    import edgetune.runtime.model.loader  # noqa: F401
    import edgetune.runtime.peft  # noqa: F401
    import edgetune.runtime.text.tokenizer  # noqa: F401
    import edgetune.runtime.train.data  # noqa: F401
    import edgetune.runtime.train.loop  # noqa: F401

    if side != "local":
        import edgetune.runtime.train.remote  # noqa: F401  (grpc, serde, the stubs)
        import edgetune.tests.node_harness  # noqa: F401


def _connect(route: RouteSpec, model: str) -> None:
    """finetune(coordinator=...) in this process gets `route` without asking a coordinator."""
    from types import SimpleNamespace

    from edgetune.runtime.wire import messages as wire
    from edgetune.runtime.wire import rpc
    from edgetune.tests.node_harness import LocalRoute, patch_connect

    hops = [wire.Hop(*h) for h in route.hops]
    local = LocalRoute(wire.Route(model, route.fingerprint, hops, hops[-1].end, []),
                       rpc.load_token(Path(route.token_file)), Path(route.token_file),
                       authority=_run_ca(route.ca_dir) if route.ca_dir else None)  # TLS: the edge's certificate
    patch_connect(SimpleNamespace(setattr=setattr), local)  # patch_connect only calls monkeypatch.setattr


def _train_config(cfg: BenchConfig, side: str, codec: str, out: str, token_file: str):
    from edgetune.runtime.train.loop import TrainConfig

    dist = side != "local"
    return TrainConfig(model=cfg.model, data=cfg.data, out=out, method="lora", rank=cfg.rank, alpha=cfg.alpha,
                       dropout=0.0, target_modules=("q_proj", "v_proj"), lr=cfg.lr, steps=cfg.steps,
                       batch_size=cfg.batch_size, micro_batches=cfg.micro_batches if dist else cfg.local_micro_batches,
                       max_seq_len=cfg.seq_len, seed=cfg.seed, eval_fraction=0.0, save_every=0, progress=False,
                       threads=cfg.threads if dist else cfg.local_threads, codec=codec,
                       coordinator="127.0.0.1:1" if dist else "", token_file=token_file if dist else "")


def _read_node_events(files) -> list[tuple[str, float, float]]:
    events = []
    for path in files:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            events.extend(tuple(e) for e in json.loads(line))
    return events


def run_worker(spec: dict) -> dict:
    """One training run in this process (side "local" or "dist"); returns a JSON-ready record."""
    side, codec, cfg = spec["side"], spec["codec"], BenchConfig(**spec["config"])
    _import_side(side)
    import torch

    from edgetune.runtime.train.loop import finetune

    torch.set_num_threads(cfg.threads if side != "local" else cfg.local_threads)
    rss_import = _max_rss_mb()
    rec = route = None
    if side != "local":
        route = RouteSpec(**{k: tuple(map(tuple, v)) if k == "hops" else v for k, v in spec["route"].items()})
        _connect(route, cfg.model)
        rec = Recorder()
        instrument_edge(rec)
    records: list[dict] = []
    finetune(_train_config(cfg, side, codec, spec["out"], route.token_file if route else ""), on_step=records.append)
    rss_peak = _max_rss_mb()
    bad = [r["tokens"] for r in records if r["tokens"] != cfg.batch_size * cfg.seq_len]
    if bad:
        raise ConfigError(f"steps saw {bad} tokens, not B*T = {cfg.batch_size * cfg.seq_len}: "
                          "the data records are too short for --seq")
    steps = [{k: r.get(k) for k in ("time_s", "loss", "bytes_sent", "bytes_received", "stages")} for r in records]
    if rec is not None:
        windows = [(a, b) for k, a, b in rec.events if k == "step"]
        node_events = _read_node_events(route.events)
        for s, window, nbytes in zip(steps, windows, rec.step_bytes):
            s["message_bytes"] = nbytes
            s["breakdown"] = step_breakdown(window, rec.events, node_events, s["stages"])
    return {"side": side, "codec": codec, "threads": torch.get_num_threads(), "steps": steps,
            "rss_import_mb": rss_import, "rss_peak_mb": rss_peak, "rss_increase_mb": rss_peak - rss_import}


# ------------------------------------------------------------------ parent: processes
def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore::FutureWarning"}


def start_nodes(cfg: BenchConfig, workdir: Path, tls: bool = False) -> tuple[list[subprocess.Popen], RouteSpec]:
    """Two node processes, blocks [0, L/2) and [L/2, L); returns them and the route to them. `tls`:
    they serve mutual TLS with certificates from a CA made here (in `workdir`/ca)."""
    from edgetune.runtime.model.config import ModelConfig
    from edgetune.runtime.model.manifest import checkpoint_manifest, fingerprint
    from edgetune.runtime.wire import rpc

    layers = ModelConfig.from_file(Path(cfg.model) / "config.json").num_layers
    fp = fingerprint(checkpoint_manifest(cfg.model))
    token_file = workdir / "token"
    rpc.write_token(token_file)
    ca_dir = ""
    if tls:
        from edgetune.runtime.security.ca import Authority

        ca = Authority.create("bench_distributed")
        (workdir / "ca").mkdir()
        (workdir / "ca" / "ca.pem").write_bytes(ca.cert_pem)
        (workdir / "ca" / "ca.key").write_bytes(ca.key_pem)
        ca_dir = str(workdir / "ca")
    procs, hops, events = [], [], []
    for i, (start, end) in enumerate([(0, layers // 2), (layers // 2, layers)]):
        name, events_file = f"node-{i}", workdir / f"node-{i}.events.jsonl"
        events_file.touch()
        cmd = [sys.executable, "-m", MODULE, "--node", name, "--start", str(start), "--end", str(end),
               "--node-model", cfg.model, "--fingerprint", fp, "--token-file", str(token_file),
               "--events", str(events_file), "--threads", str(cfg.threads), "--ca-dir", ca_dir,
               "--previous", f"node-{i - 1}" if i else ""]
        with (workdir / f"{name}.log").open("w") as log:
            procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                          env=_env(cfg.threads)))
        hops.append((name, start, end))
        events.append(str(events_file))
    route_hops = []
    for proc, (name, start, end) in zip(procs, hops):
        line = proc.stdout.readline()  # the node's {"port": ...} once it serves
        if not line:
            stop_nodes(procs)
            raise RuntimeError(f"{name} did not start:\n{(workdir / f'{name}.log').read_text()[-4000:]}")
        route_hops.append((name, f"127.0.0.1:{json.loads(line)['port']}", start, end))
    return procs, RouteSpec(fp, str(token_file), tuple(route_hops), tuple(events), ca_dir)


def stop_nodes(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.stdin is not None:
            proc.stdin.close()  # the node's sys.stdin.read() returns
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def spawn_worker(side: str, codec: str, cfg: BenchConfig, route: RouteSpec, workdir: Path) -> dict:
    """One run in a fresh interpreter; its last stdout line is the JSON record."""
    out = tempfile.mkdtemp(prefix=f"{side}-{codec}-", dir=workdir)
    spec = {"side": side, "codec": codec, "config": asdict(cfg), "route": asdict(route), "out": out}
    threads = cfg.threads if side != "local" else cfg.local_threads
    proc = subprocess.run([sys.executable, "-m", MODULE, "--worker-spec", json.dumps(spec)],
                          capture_output=True, text=True, env=_env(threads), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{side}/{codec} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def schedule(repeats: int) -> list[tuple[str, str]]:
    """Round 1 runs every codec; later rounds repeat the timed pair, alternating which goes first."""
    runs = [("local", "fp32"), ("dist", "fp32"), ("tls", "fp32"), ("dist", "bf16"), ("dist", "int8")]
    for i in range(1, repeats):
        trio = [("dist", "fp32"), ("tls", "fp32"), ("local", "fp32")]
        runs += trio[i % 3:] + trio[:i % 3]
    return runs


# ------------------------------------------------------------------ parent: report
def _timed_steps(runs: list[dict], cfg: BenchConfig) -> list[dict]:
    return [s for r in runs for s in r["steps"][cfg.warmup:]]


def _median(values) -> float:
    return statistics.median(list(values))


def summarize(cfg: BenchConfig, runs: list[dict]) -> dict:
    """Medians per measurement and the ratio behind each target."""
    by = {(r["side"], r["codec"]): [x for x in runs if (x["side"], x["codec"]) == (r["side"], r["codec"])] for r in runs}
    local, dist = by[("local", "fp32")], by[("dist", "fp32")]
    step_local = _median(s["time_s"] for s in _timed_steps(local, cfg))
    step_dist = _median(s["time_s"] for s in _timed_steps(dist, cfg))
    step_tls = _median(s["time_s"] for s in _timed_steps(by[("tls", "fp32")], cfg))
    timed = _timed_steps(dist, cfg)
    breakdown = {k: _median(s["breakdown"][k] for s in timed) for k in timed[0]["breakdown"]}
    rest = sum(v for k, v in breakdown.items() if k not in ("step_s", "pipeline idle_s") and not k.startswith("("))
    breakdown["pipeline idle_s"] = breakdown["step_s"] - rest  # medians of the parts, made to add up
    payload = {}
    for codec in CODECS:
        steps = _timed_steps(by[("dist", codec)], cfg)
        payload[codec] = {
            "activation_bytes": _median(sum(s["message_bytes"].get(m, 0) for m in ACTIVATION_MESSAGES) for s in steps),
            "adapter_bytes": _median(sum(s["message_bytes"].get(m, 0) for m in ADAPTER_MESSAGES) for s in steps),
            "total_bytes": _median(s["bytes_sent"] + s["bytes_received"] for s in steps),
            "step_s": _median(s["time_s"] for s in steps),
            "serde_wire_fraction": _median((s["breakdown"]["serialisation_s"] + s["breakdown"]["wire wait_s"])
                                           / s["breakdown"]["step_s"] for s in steps),
            "final_loss": by[("dist", codec)][0]["steps"][-1]["loss"],
        }
    fp32_loss, int8_loss = payload["fp32"]["final_loss"], payload["int8"]["final_loss"]
    rss = {key: _median(r["rss_increase_mb"] for r in group) for key, group in by.items()}
    ratios = {
        "step time distributed/local": step_dist / step_local,
        "(serialisation + wire)/step": (breakdown["serialisation_s"] + breakdown["wire wait_s"]) / breakdown["step_s"],
        "payload bf16/fp32": payload["bf16"]["activation_bytes"] / payload["fp32"]["activation_bytes"],
        "payload int8/fp32": payload["int8"]["activation_bytes"] / payload["fp32"]["activation_bytes"],
        "loss |int8 - fp32|/fp32": abs(int8_loss - fp32_loss) / abs(fp32_loss),
        "edge RSS increase/local": rss[("dist", "fp32")] / rss[("local", "fp32")],
        "step time TLS/plaintext": step_tls / step_dist,
    }
    return {"step_s": {"local": step_local, "dist": step_dist, "tls": step_tls}, "breakdown": breakdown, "payload": payload,
            "rss_increase_mb": {f"{s}/{c}": v for (s, c), v in rss.items()},
            "rss_peak_mb": {f"{s}/{c}": _median(r["rss_peak_mb"] for r in g) for (s, c), g in by.items()},
            "local_final_loss": local[0]["steps"][-1]["loss"], "ratios": ratios}


def _passes(name: str, value: float) -> bool:
    limit, op = TARGETS[name]
    return value <= limit if op == "<=" else value >= limit


def _section_time(cfg: BenchConfig, runs: list[dict], s: dict) -> list[str]:
    per_run = ", ".join(f"{r['side']}/{r['codec']}={_median(x['time_s'] for x in r['steps'][cfg.warmup:]):.3f}"
                        for r in runs)
    return ["1. step time (median over timed steps)",
            f"   local             {s['step_s']['local']:8.3f} s",
            f"   distributed fp32  {s['step_s']['dist']:8.3f} s",
            f"   ratio dist/local  {s['ratios']['step time distributed/local']:8.3f}   (target <= 1.3)",
            f"   distributed fp32 over mutual TLS {s['step_s']['tls']:8.3f} s: TLS / plaintext "
            f"{s['ratios']['step time TLS/plaintext']:.3f}   (target <= 1.05)",
            f"   per run, in run order (median step s): {per_run}"]


def _section_breakdown(s: dict) -> list[str]:
    b = s["breakdown"]
    lines = ["2. distributed fp32 step breakdown (median of each part over timed steps; idle = step - the rest,",
             "   negative when processes computed at the same time)"]
    for key, value in b.items():
        lines.append(f"   {key.removesuffix('_s'):<34}{value:8.3f} s {100 * value / b['step_s']:7.1f} %")
    lines.append(f"   serialisation + wire = {100 * s['ratios']['(serialisation + wire)/step']:.1f} % of the step "
                 "(target <= 10 %)")
    return lines


def _section_payload(cfg: BenchConfig, s: dict) -> list[str]:
    lines = [(f"3. bytes per step on the edge <-> node-0 link (B={cfg.batch_size}, T={cfg.seq_len}, "
              f"{cfg.micro_batches} micro-batches; int8 block {INT8_BLOCK}; frames as serialised)"),
             (f"   {'codec':<6}{'activations+grads':>18}{'ratio':>8}{'adapter push+grads':>20}{'total':>12}"
              f"{'step s':>9}{'serde+wire':>12}")]
    fp32_act = s["payload"]["fp32"]["activation_bytes"]
    for codec, p in s["payload"].items():
        lines.append(f"   {codec:<6}{p['activation_bytes'] / 2**20:>14.3f} MiB{p['activation_bytes'] / fp32_act:>8.3f}"
                     f"{p['adapter_bytes'] / 2**20:>16.3f} MiB{p['total_bytes'] / 2**20:>8.3f} MiB"
                     f"{p['step_s']:>9.3f}{100 * p['serde_wire_fraction']:>11.1f}%")
    lines.append("   activations+grads: the Forward (hidden + attention mask), ForwardResult, Backward and "
                 "BackwardResult frames;")
    lines.append("   total: the step's bytes_sent + bytes_received metrics. The node-0 <-> node-1 link carries "
                 "the same activation traffic.")
    return lines


def _section_loss_memory(cfg: BenchConfig, s: dict) -> list[str]:
    loss = {codec: p["final_loss"] for codec, p in s["payload"].items()}
    lines = [f"4. training loss after step {cfg.steps} (same seed and batches)",
             (f"   fp32 {loss['fp32']:.5f}   int8 {loss['int8']:.5f}   bf16 {loss['bf16']:.5f}   "
              f"local {s['local_final_loss']:.5f}"),
             f"   |int8 - fp32| / fp32 = {100 * s['ratios']['loss |int8 - fp32|/fp32']:.3f} % (target <= 1 %)",
             "", "5. memory (median over runs): peak RSS, and its increase over the RSS after imports"]
    for key in s["rss_peak_mb"]:
        lines.append(f"   {key:<12} peak {s['rss_peak_mb'][key]:7.0f} MB   increase {s['rss_increase_mb'][key]:7.0f} MB")
    lines.append(f"   edge (dist/fp32) / local increase = {s['ratios']['edge RSS increase/local']:.3f} (target <= 0.5)")
    return lines


def _summary_table(ratios: dict[str, float]) -> list[str]:
    lines = [f"{'target':<32}{'value':>10}{'limit':>10}  result", "-" * 60]
    for name, value in ratios.items():
        limit, op = TARGETS[name]
        lines.append(f"{name:<32}{value:>10.4f}{op + ' ' + str(limit):>10}  {'PASS' if _passes(name, value) else 'MISS'}")
    return lines


def format_report(cfg: BenchConfig, runs: list[dict], summary: dict, hops) -> str:
    header = [f"model={cfg.model} (fp32), LoRA r={cfg.rank} alpha={cfg.alpha} q_proj,v_proj, lr={cfg.lr}",
              (f"batch B={cfg.batch_size} x T={cfg.seq_len} tokens (no padding, loss on every token); "
               f"{cfg.steps} steps per run, first {cfg.warmup} not timed"),
              "route: " + " -> ".join(f"{h[0]}[{h[2]},{h[3]}) at {h[1]}" for h in hops) + " (one process each)",
              (f"threads: edge {cfg.threads}, each node {cfg.threads}, local {cfg.local_threads} (cores: "
               f"{os.cpu_count()}); micro-batches: distributed {cfg.micro_batches}, local {cfg.local_micro_batches}")]
    sections = [header, _section_time(cfg, runs, summary), _section_breakdown(summary),
                _section_payload(cfg, summary), _section_loss_memory(cfg, summary), _summary_table(summary["ratios"])]
    lines = [line for section in sections for line in [*section, ""]]
    if cfg.steps - cfg.warmup < 5:
        lines.append(f"(only {cfg.steps - cfg.warmup} timed steps per run: a smoke run, not a measurement)")
    return "\n".join(lines).rstrip()


def run_parent(cfg: BenchConfig, repeats: int, json_path: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_distributed-") as tmp:
        workdir = Path(tmp)
        data = workdir / "train.jsonl"
        write_dataset(data, cfg.seq_len, count=max(64, 2 * cfg.steps * cfg.batch_size))
        cfg = BenchConfig(**{**asdict(cfg), "data": str(data)})
        (workdir / "plain").mkdir()
        (workdir / "tls").mkdir()
        procs, route = start_nodes(cfg, workdir / "plain")
        routes = {"local": route, "dist": route}
        runs = []
        try:
            tls_procs, routes["tls"] = start_nodes(cfg, workdir / "tls", tls=True)
            procs += tls_procs
            for side, codec in schedule(repeats):
                started = time.perf_counter()
                runs.append(spawn_worker(side, codec, cfg, routes[side], workdir))
                r = runs[-1]
                print(f"{side}/{codec}: median step {_median(x['time_s'] for x in r['steps'][cfg.warmup:]):.3f} s, "
                      f"loss {r['steps'][-1]['loss']:.4f}, RSS +{r['rss_increase_mb']:.0f} MB "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        finally:
            stop_nodes(procs)
        summary = summarize(cfg, runs)
        print(format_report(cfg, runs, summary, route.hops))
    result = {"config": asdict(cfg), "repeats": repeats, "runs": runs, **summary}
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


# ------------------------------------------------------------------ CLI
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="Hugging Face folder (fp32); default: the embedded SmolLM2-135M")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (the loss is compared after the last)")
    p.add_argument("--warmup", type=int, default=1, help="first steps of each run not timed")
    p.add_argument("--repeats", type=int, default=2, help="rounds of (local, distributed fp32) timing runs")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step, distributed")
    p.add_argument("--local-micro-batches", type=int, default=1, help="micro-batches per step, --local")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the edge and of each node; 0 = cores / 3 processes (at least 1)")
    p.add_argument("--local-threads", type=int, default=0, help="torch threads of the --local run; 0 = cores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps, one round")
    p.add_argument("--json", default=None, help="write runs and summary to this file")
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    p.add_argument("--node", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, help=argparse.SUPPRESS)
    p.add_argument("--end", type=int, help=argparse.SUPPRESS)
    p.add_argument("--node-model", help=argparse.SUPPRESS)
    p.add_argument("--fingerprint", help=argparse.SUPPRESS)
    p.add_argument("--token-file", help=argparse.SUPPRESS)
    p.add_argument("--ca-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--previous", default="", help=argparse.SUPPRESS)
    p.add_argument("--events", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.node is not None:
        return run_node(args)
    if args.worker_spec is not None:
        print(json.dumps(run_worker(json.loads(args.worker_spec))))
        return
    try:
        _main(args)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def _main(args: argparse.Namespace) -> None:
    if args.repeats <= 0:
        raise ConfigError(f"bench_distributed: --repeats must be positive, got {args.repeats}")
    steps, repeats = (3, 1) if args.quick else (args.steps, args.repeats)
    model = args.model
    if model is None:
        from edgetune.runtime.model.embedded import embedded_model_path

        model = str(embedded_model_path())
    cfg = BenchConfig(model=model, data="", steps=steps, warmup=min(args.warmup, steps - 1), batch_size=args.batch,
                      seq_len=args.seq, micro_batches=args.micro_batches, local_micro_batches=args.local_micro_batches,
                      rank=args.rank, threads=args.threads or max(1, (os.cpu_count() or 1) // 3),  # edge + 2 nodes share the cores
                      local_threads=args.local_threads or (os.cpu_count() or 1), seed=args.seed)
    run_parent(cfg, repeats, args.json)


if __name__ == "__main__":
    main()
