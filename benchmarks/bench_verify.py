"""What `finetune --verify FRACTION` costs a step: runs with and without it on the same nodes, side by side.

    python -m edgetune.benchmarks.bench_verify --steps 30 --repeats 2 --json bench_verify.json
    python -m edgetune.benchmarks.bench_verify --quick          # smoke run: 4 steps, one round

Two node processes on 127.0.0.1 serve the model's two halves (blocks [0, L/2) and [L/2, L)),
and each also serves a verifier replica of the *other* half in the same process (on a second
port), as the coordinator places them: a replica runs on another stage's node and competes
with that node's own work. Every measured run is a fresh edge subprocess calling `finetune()`
with the route (and its verifiers) handed to it as `tests/node_harness.patch_connect` does (no
coordinator, no Ray); runs with --verify FRACTION and without alternate, `--repeats` rounds.
Same data, seed, fp32 codec, LoRA r=8 on q_proj and v_proj; the model defaults to the
embedded SmolLM2-135M (fp32).

It reports the mean time of the timed steps (the first `--warmup` are not timed) with and
without --verify, and their ratio -- the mean, not the median, since only the steps that verify
something pay (a share P = min(1, FRACTION x micro-batches) of them, see
train/verify.verified_micro_batches). On a shared machine other processes' load moves whole runs
by more than that, so it also reports a verified step's time against the unverified steps of the
same runs (interleaved in time, so load drifts alike) and the ratio that implies,
1 + P x (verified / unverified - 1); and the edge's bytes per step both ways.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgetune.benchmarks.bench_distributed import _env, stop_nodes, write_dataset
from edgetune.runtime.errors import ConfigError

MODULE = "edgetune.benchmarks.bench_verify"


@dataclass(frozen=True)
class BenchConfig:
    model: str
    data: str
    steps: int = 30
    warmup: int = 2
    batch_size: int = 4
    seq_len: int = 128
    micro_batches: int = 2
    rank: int = 8
    threads: int = 1  # torch threads of the edge and of each node process
    verify: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.warmup < self.steps:
            raise ConfigError(f"bench_verify: warmup must be in [0, steps), got {self.warmup} with steps={self.steps}")
        if not 0 < self.verify <= 1:
            raise ConfigError(f"bench_verify: --verify must be in (0, 1], got {self.verify}")


# ------------------------------------------------------------------ node processes
def run_node(args: argparse.Namespace) -> None:
    """Serve each `--serve NAME:START:END` part on its own port until the parent closes our stdin."""
    import torch

    from edgetune.nodes.service import serve
    from edgetune.nodes.shard import Shard
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.security.access import Trust
    from edgetune.runtime.wire import rpc

    torch.set_num_threads(args.threads)
    trust = Trust.insecure(rpc.load_token(Path(args.token_file)))
    servers, ports = [], []
    for spec in args.serve:
        name, start, end = spec.split(":")
        part = load_model(args.node_model, start=int(start), end=int(end), edge=False)
        server, port = serve(Shard(name, args.node_model, part, args.fingerprint), trust, host="127.0.0.1", port=0)
        servers.append(server)
        ports.append(port)
    print(json.dumps({"ports": ports}), flush=True)
    sys.stdin.read()  # EOF: the parent is done (or gone)
    for server in servers:
        server.stop(grace=None)


def start_nodes(cfg: BenchConfig, workdir: Path) -> tuple[list[subprocess.Popen], dict]:
    """node-0 serves [0, L/2) and a replica of [L/2, L); node-1 serves [L/2, L) and a replica of [0, L/2)."""
    from edgetune.runtime.model.config import ModelConfig
    from edgetune.runtime.model.manifest import checkpoint_manifest, fingerprint
    from edgetune.runtime.wire import rpc

    layers = ModelConfig.from_file(Path(cfg.model) / "config.json").num_layers
    halves = [(0, layers // 2), (layers // 2, layers)]
    fp = fingerprint(checkpoint_manifest(cfg.model))
    token_file = workdir / "token"
    rpc.write_token(token_file)
    procs = []
    for i in range(2):
        own, other = halves[i], halves[1 - i]
        cmd = [sys.executable, "-m", MODULE, "--node-model", cfg.model, "--fingerprint", fp, "--token-file",
               str(token_file), "--threads", str(cfg.threads),
               "--serve", f"node-{i}:{own[0]}:{own[1]}", "--serve", f"node-{i}:{other[0]}:{other[1]}"]
        with (workdir / f"node-{i}.log").open("w") as log:
            procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                          env=_env(cfg.threads)))
    hops, verifiers = [], [None, None]
    for i, proc in enumerate(procs):
        line = proc.stdout.readline()
        if not line:
            stop_nodes(procs)
            raise RuntimeError(f"node-{i} did not start:\n{(workdir / f'node-{i}.log').read_text()[-4000:]}")
        own_port, other_port = json.loads(line)["ports"]
        hops.append((f"node-{i}", f"127.0.0.1:{own_port}", *halves[i]))
        verifiers[1 - i] = (f"node-{i}", f"127.0.0.1:{other_port}", *halves[1 - i])
    return procs, {"fingerprint": fp, "token_file": str(token_file), "hops": hops, "verifiers": verifiers,
                   "layers": layers}


# ------------------------------------------------------------------ edge worker
def run_worker(spec: dict) -> dict:
    """One training run in this process; returns each step's time, bytes and checks."""
    from types import SimpleNamespace

    import torch

    from edgetune.runtime.train.loop import TrainConfig, finetune
    from edgetune.runtime.wire import messages as wire
    from edgetune.runtime.wire import rpc
    from edgetune.tests.node_harness import LocalRoute, patch_connect

    cfg, route, verify = BenchConfig(**spec["config"]), spec["route"], spec["verify"]
    torch.set_num_threads(cfg.threads)
    token_file = Path(route["token_file"])
    local = LocalRoute(wire.Route(cfg.model, route["fingerprint"], [wire.Hop(*h) for h in route["hops"]],
                                  route["layers"], [], verifiers=[wire.Hop(*h) for h in route["verifiers"]]),
                       rpc.load_token(token_file), token_file)
    patch_connect(SimpleNamespace(setattr=setattr), local)  # patch_connect only calls monkeypatch.setattr
    records: list[dict] = []
    finetune(TrainConfig(model=cfg.model, data=cfg.data, out=spec["out"], method="lora", rank=cfg.rank,
                         alpha=2.0 * cfg.rank, dropout=0.0, target_modules=("q_proj", "v_proj"), lr=2e-4,
                         steps=cfg.steps, batch_size=cfg.batch_size, micro_batches=cfg.micro_batches,
                         max_seq_len=cfg.seq_len, seed=cfg.seed, eval_fraction=0.0, save_every=0, progress=False,
                         threads=cfg.threads, coordinator="127.0.0.1:1", token_file=str(token_file), verify=verify),
             on_step=records.append)
    return {"verify": verify, "steps": [{k: r.get(k, 0) for k in ("time_s", "loss", "bytes_sent", "bytes_received",
                                                                   "verified", "verify_error_ratio")}
                                        for r in records]}


def spawn_worker(verify: float, cfg: BenchConfig, route: dict, workdir: Path) -> dict:
    out = tempfile.mkdtemp(prefix=f"verify-{verify}-", dir=workdir)
    spec = {"config": asdict(cfg), "route": route, "verify": verify, "out": out}
    proc = subprocess.run([sys.executable, "-m", MODULE, "--worker-spec", json.dumps(spec)], capture_output=True,
                          text=True, env=_env(cfg.threads), check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker (verify {verify}) failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ parent
def summarize(cfg: BenchConfig, runs: list[dict]) -> dict:
    timed = {v: [s for r in runs if r["verify"] == v for s in r["steps"][cfg.warmup:]] for v in (0.0, cfg.verify)}
    mean = {v: statistics.fmean(s["time_s"] for s in steps) for v, steps in timed.items()}
    checked = [s for s in timed[cfg.verify] if s["verified"]]
    unchecked = [s for s in timed[cfg.verify] if not s["verified"]]
    micro = sum(s["verified"] for s in timed[cfg.verify])
    per_step = {v: statistics.fmean(s["bytes_sent"] + s["bytes_received"] for s in steps) for v, steps in timed.items()}
    share = min(1.0, cfg.verify * cfg.micro_batches)  # of the steps, those that verify a micro-batch
    verified_s = statistics.fmean(s["time_s"] for s in checked) if checked else None
    unverified_s = statistics.fmean(s["time_s"] for s in unchecked) if unchecked else None
    return {
        "mean_step_s": {str(v): t for v, t in mean.items()},
        "step_time_ratio": mean[cfg.verify] / mean[0.0],
        "verified_fraction": micro / (cfg.micro_batches * len(timed[cfg.verify])),
        "verified_steps": len(checked),
        "verified_step_s": verified_s,
        "unverified_step_s": unverified_s,
        "implied_step_time_ratio": 1 + share * (verified_s / unverified_s - 1) if checked and unchecked else None,
        # a verified step recomputes one micro-batch whatever the fraction while FRACTION x micro-batches < 1
        "implied_step_time_ratio_at_0.1": (1 + min(1.0, 0.1 * cfg.micro_batches) * (verified_s / unverified_s - 1)
                                           if checked and unchecked else None),
        "max_error_ratio": max((s["verify_error_ratio"] for s in checked), default=0.0),
        "edge_bytes_per_step": {str(v): b for v, b in per_step.items()},
        "edge_bytes_ratio": per_step[cfg.verify] / per_step[0.0],
    }


def format_report(cfg: BenchConfig, s: dict) -> str:
    v = str(cfg.verify)
    from edgetune.runtime.model.config import ModelConfig

    config = ModelConfig.from_file(Path(cfg.model) / "config.json")
    lines = [f"bench_verify: {config.num_layers} blocks of width {config.hidden_size} (fp32), B={cfg.batch_size} x T={cfg.seq_len}, {cfg.micro_batches} "
             f"micro-batches, 2 nodes + a replica of the other half on each, {cfg.threads} thread(s) a process, "
             f"{os.cpu_count()} cores",
             f"mean step (timed steps of all runs): without --verify {s['mean_step_s']['0.0']:.3f} s, "
             f"--verify {v} {s['mean_step_s'][v]:.3f} s: ratio {s['step_time_ratio']:.3f}",
             f"verified: {s['verified_fraction']:.3f} of the micro-batches, in {s['verified_steps']} steps; "
             f"worst error / tolerance {s['max_error_ratio']:.3g}"]
    if s["verified_step_s"] is not None and s["unverified_step_s"] is not None:
        lines.append(f"a verified step {s['verified_step_s']:.3f} s, an unverified one {s['unverified_step_s']:.3f} s "
                     f"(x{s['verified_step_s'] / s['unverified_step_s']:.3f}, same runs): implied step time ratio "
                     f"{s['implied_step_time_ratio']:.3f} at {min(1.0, cfg.verify * cfg.micro_batches):.2f} of the "
                     f"steps verifying (--verify {cfg.verify}), {s['implied_step_time_ratio_at_0.1']:.3f} at --verify 0.1")
    lines.append(f"edge link bytes a step: {s['edge_bytes_per_step']['0.0'] / 2**20:.2f} MiB without, "
                 f"{s['edge_bytes_per_step'][v] / 2**20:.2f} MiB with --verify {v} (x{s['edge_bytes_ratio']:.3f})")
    return "\n".join(lines)


def run_parent(cfg: BenchConfig, repeats: int, json_path: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_verify-") as tmp:
        workdir = Path(tmp)
        data = workdir / "train.jsonl"
        write_dataset(data, cfg.seq_len, count=max(64, 2 * cfg.steps * cfg.batch_size))
        cfg = BenchConfig(**{**asdict(cfg), "data": str(data)})
        procs, route = start_nodes(cfg, workdir)
        runs = []
        try:
            for i in range(repeats):
                for verify in ((0.0, cfg.verify) if i % 2 == 0 else (cfg.verify, 0.0)):
                    started = time.perf_counter()
                    runs.append(spawn_worker(verify, cfg, route, workdir))
                    steps = runs[-1]["steps"][cfg.warmup:]
                    print(f"verify {verify}: mean step {statistics.fmean(s['time_s'] for s in steps):.3f} s, "
                          f"{sum(s['verified'] for s in steps)} micro-batches verified "
                          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        finally:
            stop_nodes(procs)
    summary = summarize(cfg, runs)
    print(format_report(cfg, summary))
    if json_path:
        Path(json_path).write_text(json.dumps({"config": asdict(cfg), "runs": runs, **summary}, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="Hugging Face folder (fp32); default: the embedded SmolLM2-135M")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run not timed")
    p.add_argument("--repeats", type=int, default=2, help="rounds of (without, with --verify) runs")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--verify", type=float, default=0.1, help="the fraction to measure")
    p.add_argument("--threads", type=int, default=0, help="torch threads a process; 0 = cores / 3 (at least 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps, one round")
    p.add_argument("--json", default=None)
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    p.add_argument("--serve", action="append", help=argparse.SUPPRESS)
    p.add_argument("--node-model", help=argparse.SUPPRESS)
    p.add_argument("--fingerprint", help=argparse.SUPPRESS)
    p.add_argument("--token-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        return run_node(args)
    if args.worker_spec is not None:
        print(json.dumps(run_worker(json.loads(args.worker_spec))))
        return
    model = args.model
    if model is None:
        from edgetune.runtime.model.embedded import embedded_model_path

        model = str(embedded_model_path())
    steps, repeats = (4, 1) if args.quick else (args.steps, args.repeats)
    try:
        cfg = BenchConfig(model=model, data="", steps=steps, warmup=min(args.warmup, steps - 1), batch_size=args.batch,
                          seq_len=args.seq, micro_batches=args.micro_batches,
                          threads=args.threads or max(1, (os.cpu_count() or 1) // 3), verify=args.verify)
        run_parent(cfg, repeats, args.json)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
