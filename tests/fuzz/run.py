"""Fuzz one target in a subprocess and print what happened as JSON.

    python -m edgetune.tests.fuzz.run --target down --runs 2000 --seed 1 --corpus /tmp/corpus-down
    python -m edgetune.tests.fuzz.run --target up --seconds 600 --corpus /tmp/corpus-up
    python -m edgetune.tests.fuzz.run --target down --repro crash-1a2b3c   # rerun one input, with its traceback

The corpus folder gets the target's seeds when it holds none (made from real frames at start,
see corpus.py), and libFuzzer adds the inputs that reach new code to it. The work happens in a
worker process (`--worker`) because atheris hands control to libFuzzer, which ends the process
when done and may abort it (a deadly signal, a timeout, its RSS limit); this process always
prints one JSON object:

    target, runs        inputs tried (libFuzzer's executed units)
    seconds             wall time of the worker, start-up included
    exec_per_s          libFuzzer's inputs per second of fuzzing
    coverage, features  libFuzzer's `cov` (edges of edgetune's instrumented code) and `ft` at the end
    corpus              inputs in the corpus at the end
    counts              the target's own counters (down: messages assembled, sessions opened, ...)
    crashes             distinct findings: {type, message, where, count, input (a file), traceback}
    times, slowest      inputs by how long they took, and the 5 slowest (files slow-N, for --repro)

A finding is any exception other than edgetune's own (see targets.py); the worker records it
with the input that raised it and goes on fuzzing, so one run reports every distinct finding.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("down", "up", "unary")
MUTATORS = ("frames", "bytes")
MAX_LEN = 65536  # bytes of one input: the seeds are a few KB, a session of tiny tensors fits many times
INPUT_TIMEOUT_S = 30  # libFuzzer's per-input limit: the harness reports a hang after 10 s itself
RSS_LIMIT_MB = 4096  # torch and the tiny model take ~0.5 GB; a declared size that allocates gigabytes is a finding
# Instrumented for coverage: the code that parses and acts on remote input (not torch, not the harness).
INSTRUMENT = ["edgetune.runtime", "edgetune.nodes", "edgetune.coordinator"]


# -- the parent: run the worker, read what it left ---------------------------------------
def fuzz(target: str, corpus: Path, *, runs: int = -1, seconds: float = 0, seed: int = 1, out: Path | None = None,
         max_len: int = MAX_LEN, mutator: str = "frames") -> dict:
    """Fuzz `target` in a worker process; the summary this module's docstring describes.

    `mutator`: "frames" (mutator.py's structure-aware one) or "bytes" (libFuzzer's byte mutations alone,
    the baseline bench_fuzz compares it with)."""
    if mutator not in MUTATORS:
        raise ValueError(f"unknown mutator {mutator!r}: one of {MUTATORS}")
    if target not in TARGETS:
        raise ValueError(f"unknown fuzz target {target!r}: one of {TARGETS}")
    if runs < 0 and seconds <= 0:
        raise ValueError("give a number of runs or of seconds")
    out = Path(out or tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(corpus)
    cmd = [sys.executable, "-m", "edgetune.tests.fuzz.run", "--worker", str(out), "--target", target,
           "--runs", str(runs), "--seconds", str(seconds), "--seed", str(seed), "--corpus", str(corpus),
           "--max-len", str(max_len), "--mutator", mutator]
    started = time.monotonic()
    log = out / "libfuzzer.log"
    with open(log, "w") as f:
        # libFuzzer stops itself at -runs / -max_total_time; the margin covers start-up and a last hang
        limit = (seconds + 300) if seconds > 0 else 900
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit,
                                  env={**os.environ, "PYTHONHASHSEED": "0"}).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return _summary(target, out, log, code, time.monotonic() - started, corpus)


_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", re.M)


def _summary(target: str, out: Path, log: Path, code, seconds: float, corpus: Path) -> dict:
    text = log.read_text(errors="replace")
    stats = json.loads((out / "stats.json").read_text()) if (out / "stats.json").exists() else {}
    status = _STATUS.findall(text)
    executed = re.findall(r"stat::number_of_executed_units: (\d+)", text)
    per_s = re.findall(r"stat::average_exec_per_sec: +(\d+)", text)
    crashes = [json.loads(line) for line in (out / "findings.jsonl").read_text().splitlines()] \
        if (out / "findings.jsonl").exists() else []
    for count in stats.get("finding_counts", {}).items():
        for c in crashes:
            if c["signature"] == count[0]:
                c["count"] = count[1]
    # libFuzzer's own verdicts: a deadly signal, a timeout, its RSS limit (the worker is gone then)
    for kind, path in re.findall(r"ERROR: libFuzzer: (\S+).*?Test unit written to (\S+)", text, re.S):
        crashes.append({"signature": f"libFuzzer {kind}", "type": f"libFuzzer: {kind}", "message": kind,
                        "where": "?", "count": 1, "input": path, "traceback": _tail(text)})
    if code not in (0, "timeout") and not crashes:
        crashes.append({"signature": f"worker exit {code}", "type": "worker died", "message": f"exit code {code}",
                        "where": "?", "count": 1, "input": None, "traceback": _tail(text)})
    return {
        "target": target,
        "runs": int(executed[-1]) if executed else stats.get("runs", 0),
        "seconds": round(seconds, 1),
        "exec_per_s": int(per_s[-1]) if per_s else None,
        "coverage": int(status[-1][1]) if status else None,
        "features": int(status[-1][2]) if status else None,
        "corpus": sum(1 for p in corpus.iterdir() if p.is_file()) if corpus.is_dir() else 0,
        "counts": stats.get("counts", {}),
        "crashes": crashes,
        "times": stats.get("times", {}),
        "slowest": stats.get("slowest", []),
        "exit": code,
        "log": str(log),
    }


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


# -- the worker: atheris and the target --------------------------------------------------
def _worker(args) -> None:
    import atheris

    with atheris.instrument_imports(include=INSTRUMENT):
        import edgetune.nodes.service  # noqa: F401
        import edgetune.nodes.shard  # noqa: F401
        import edgetune.runtime.compute.executor  # noqa: F401
        import edgetune.runtime.peft  # noqa: F401
        import edgetune.runtime.plan.cost  # noqa: F401
        import edgetune.runtime.wire.serde  # noqa: F401
    import torch

    from edgetune.tests.fuzz import corpus as corpus_mod
    from edgetune.tests.fuzz.mutator import FrameMutator

    # Tiny tensors: one thread computes them fastest, and each session's worker thread would otherwise
    # spin up a pool of its own on a machine whose cores are shared.
    torch.set_num_threads(1)

    out, corpus = Path(args.worker), Path(args.corpus)
    target, frame_type, counts, facts = _make_target(args.target, out)
    if not corpus.is_dir() or not any(corpus.iterdir()):
        corpus_mod.write_seeds(args.target, corpus, facts)
    pool = [r for data in corpus_mod.seeds(args.target, facts)
            for r in corpus_mod.unpack(data)[(1 if args.target == "unary" else 0):]]
    # looked up at each call: atheris.Setup swaps in the Mutate of the libFuzzer it loads
    mutator = FrameMutator(frame_type, pool, lambda data, max_size: atheris.Mutate(data, max_size))
    recorder = _Recorder(out, args.target, counts, args.runs)

    def test_one(data: bytes) -> None:
        recorder.run(target, data)

    flags = [f"-seed={args.seed}", f"-max_len={args.max_len}", f"-timeout={INPUT_TIMEOUT_S}",
             f"-rss_limit_mb={RSS_LIMIT_MB}", f"-artifact_prefix={out}/", "-print_final_stats=1"]
    if args.runs >= 0:
        flags.append(f"-runs={args.runs}")
    if args.seconds > 0:
        flags.append(f"-max_total_time={int(args.seconds)}")
    custom = {"custom_mutator": mutator.mutate} if args.mutator == "frames" else {}  # "bytes": libFuzzer's own
    atheris.Setup([sys.argv[0], *flags, str(corpus)], test_one, **custom)
    atheris.Fuzz()


def _make_target(target: str, out: Path):
    """(the function one input runs, the frame type, its counters, the node facts seeds need)."""
    from edgetune.proto.v1 import node_pb2
    from edgetune.tests.fuzz import targets
    from edgetune.tests.fuzz.corpus import NodeFacts

    if target == "down":
        from edgetune.tests.fuzz.model import tiny_shard, write_tiny_folder

        shard = tiny_shard(write_tiny_folder(out / "model"))
        node = targets.NodeTarget(shard)
        return node, node_pb2.Down, node.counts, NodeFacts(shard)
    if target == "up":
        return targets.run_up, node_pb2.Up, {}, None
    return targets.run_unary, None, {}, None


class _Recorder:
    """Runs inputs, records each distinct finding with its input, keeps stats.json current."""

    def __init__(self, out: Path, target: str, counts: dict, total: int) -> None:
        self.out, self.target, self.counts = out, target, counts
        self.total = total  # the -runs libFuzzer stops after (-1: none)
        self.runs = 0
        self.findings: dict[str, int] = {}
        self.times: dict[str, int] = {}  # inputs by how long they took
        self.slowest: list[tuple[float, int]] = []  # (seconds, run number), slowest first
        self._last_dump = 0.0

    def run(self, target, data: bytes) -> None:
        from edgetune.runtime.errors import EdgetuneError
        from edgetune.tests.fuzz.targets import where

        self.runs += 1
        started = time.perf_counter()
        try:
            target(data)
        except EdgetuneError:
            pass
        except Exception as e:
            self._record(e, data, where(e))
        self._time(time.perf_counter() - started, data)
        if self.runs == self.total or time.monotonic() - self._last_dump > 0.25:  # libFuzzer exits after the last
            self.dump()

    def _time(self, seconds: float, data: bytes) -> None:
        """Count inputs by how long they took; keep the 5 slowest as files slow-N (for --repro)."""
        bucket = next(b for b in ("<0.01s", "<0.1s", "<1s", "<10s", ">=10s") if b[0] == ">" or seconds < float(b[1:-1]))
        self.times[bucket] = self.times.get(bucket, 0) + 1
        if len(self.slowest) == 5 and seconds <= self.slowest[-1][0]:
            return
        if len(self.slowest) == 5:
            (self.out / f"slow-{self.slowest.pop()[1]}").unlink(missing_ok=True)
        (self.out / f"slow-{self.runs}").write_bytes(data)
        self.slowest = sorted(self.slowest + [(seconds, self.runs)], reverse=True)

    def _record(self, e: Exception, data: bytes, at: str) -> None:
        import traceback

        signature = f"{type(e).__name__} at {at}"
        first = signature not in self.findings
        self.findings[signature] = self.findings.get(signature, 0) + 1
        if first:
            name = f"crash-{hashlib.sha1(signature.encode()).hexdigest()[:12]}"
            (self.out / name).write_bytes(data)
            record = {"signature": signature, "type": type(e).__name__, "message": str(e)[:400], "where": at,
                      "count": 1, "input": str(self.out / name),
                      "input_b64": base64.b64encode(data).decode() if len(data) <= 4096 else None,
                      "traceback": "".join(traceback.format_exception(e)[-12:])}
            with open(self.out / "findings.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"FINDING {signature}: {str(e)[:200]}", file=sys.stderr, flush=True)
        self.dump()

    def dump(self) -> None:
        self._last_dump = time.monotonic()
        stats = {"runs": self.runs, "counts": self.counts, "finding_counts": self.findings,
                 "times": self.times, "slowest": [[round(t, 3), str(self.out / f"slow-{n}")] for t, n in self.slowest]}
        tmp = self.out / "stats.json.tmp"
        tmp.write_text(json.dumps(stats))
        tmp.replace(self.out / "stats.json")


# -- reproducing one input -----------------------------------------------------------------
def repro(target: str, path: Path) -> str:
    """Run one input without atheris; the traceback of what it raised ("" if nothing but EdgetuneError)."""
    import traceback

    from edgetune.runtime.errors import EdgetuneError

    run, _, _, _ = _make_target(target, Path(tempfile.mkdtemp(prefix="fuzz-repro-")))
    try:
        run(Path(path).read_bytes())
    except EdgetuneError:
        return ""
    except Exception as e:
        return "".join(traceback.format_exception(e))
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgetune.tests.fuzz.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=TARGETS, required=True)
    p.add_argument("--runs", type=int, default=-1, help="inputs to try (-1: until --seconds)")
    p.add_argument("--seconds", type=float, default=0, help="fuzz this long (0: until --runs)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--corpus", type=Path, help="corpus folder (default: a new temporary one, seeded)")
    p.add_argument("--out", type=Path, help="where the log, stats and crash inputs go (default: a temporary folder)")
    p.add_argument("--max-len", type=int, default=MAX_LEN)
    p.add_argument("--mutator", choices=MUTATORS, default="frames",
                   help="frames: structure-aware (default); bytes: libFuzzer's byte mutations alone (a baseline)")
    p.add_argument("--repro", type=Path, help="run this one input and print its traceback, if any")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.repro:
        tb = repro(args.target, args.repro)
        print(tb or "no finding: the input raised nothing but edgetune's own errors")
        return 1 if tb else 0
    corpus = args.corpus or Path(tempfile.mkdtemp(prefix=f"fuzz-corpus-{args.target}-"))
    summary = fuzz(args.target, corpus, runs=args.runs, seconds=args.seconds, seed=args.seed, out=args.out,
                   max_len=args.max_len, mutator=args.mutator)
    print(json.dumps(summary, indent=1))
    return 1 if summary["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
