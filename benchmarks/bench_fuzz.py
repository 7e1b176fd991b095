"""Long fuzzing runs of everything edgetune parses from the wire (tests/fuzz), and a live node under fuzzed sessions.

    python -m edgetune.benchmarks.bench_fuzz --seconds 600                 # each target 10 minutes
    python -m edgetune.benchmarks.bench_fuzz --seconds 120 --baseline      # ... beside libFuzzer's byte mutator
    python -m edgetune.benchmarks.bench_fuzz --targets down --seconds 60 --corpus-root fuzz-corpus --json out.json

Per target: inputs tried, inputs per second, libFuzzer's coverage (`cov`: edges of edgetune's
instrumented code reached; `ft`: its finer features), the corpus at the end, findings (distinct;
each with the input that raised it) and the slowest input's seconds. `--baseline`
runs libFuzzer's own byte mutations for as long on the same seed corpus and prints the coverage
ratio: what decoding, changing and re-encoding the frames buys. `--live N` (default 1000) then
sends N fuzzed sessions to a real node server over gRPC (see tests/fuzz/live.py).

`--corpus-root` keeps each target's corpus (corpus-root/<target>) between runs, so a later run
starts from where an earlier one got; by default each run starts from the seeds.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from edgetune.tests.fuzz.live import live_check
from edgetune.tests.fuzz.run import TARGETS, fuzz


def run(targets: list[str], seconds: float, seed: int, corpus_root: Path, baseline: bool, live: int) -> dict:
    results: dict = {"seconds_per_target": seconds, "seed": seed, "targets": {}}
    for target in targets:
        sides = [("frames", corpus_root / target)]
        if baseline:  # its own corpus: the two must not feed each other
            sides.append(("bytes", corpus_root / f"{target}-bytes"))
        for mutator, corpus in sides:
            out = Path(tempfile.mkdtemp(prefix=f"bench-fuzz-{target}-{mutator}-"))
            summary = fuzz(target, corpus, seconds=seconds, seed=seed, out=out, mutator=mutator)
            results["targets"].setdefault(target, {})[mutator] = summary
    if live:
        results["live"] = live_check(live, seed=seed)
    return results


def _row(name: str, s: dict) -> str:
    return (f"{name:<16} {s['runs']:>10} {s['exec_per_s'] or 0:>8} {s['coverage'] or 0:>6} {s['features'] or 0:>7} "
            f"{s['corpus']:>7} {len(s['crashes']):>8} {s['slowest'][0][0] if s['slowest'] else 0:>8.2f}")


def report(results: dict) -> str:
    lines = [f"fuzzing, {results['seconds_per_target']:.0f} s per target, seed {results['seed']}", "",
             f"{'target':<16} {'inputs':>10} {'per s':>8} {'cov':>6} {'ft':>7} {'corpus':>7} {'findings':>8} {'slowest':>8}"]
    for target, sides in results["targets"].items():
        for mutator, s in sides.items():
            lines.append(_row(target if mutator == "frames" else f"{target} (bytes)", s))
        if "bytes" in sides and sides["bytes"]["coverage"]:
            ratio = (sides["frames"]["coverage"] or 0) / sides["bytes"]["coverage"]
            lines.append(f"{'':<16} coverage, structure-aware / byte mutator: {ratio:.2f}")
    for target, sides in results["targets"].items():
        for s in sides.values():
            for c in s["crashes"]:
                lines.append(f"FINDING {target}: {c['signature']}: {c['message'][:160]} (input {c['input']})")
        for mutator, s in sides.items():
            if s["counts"]:
                name = target if mutator == "frames" else f"{target} (bytes)"
                lines.append(f"{name} reached: " + ", ".join(f"{k} {v}" for k, v in s["counts"].items()))
    live = results.get("live")
    if live:
        lines += ["", f"live node: {live['sequences']} fuzzed sessions ({live['frames']} frames) in {live['seconds']} s; "
                  f"ended with {live['statuses']}; bad {len(live['bad'])}, "
                  f"unhealthy after {live['unhealthy']}, left open {len(live['left_open'])}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    p.add_argument("--seconds", type=float, default=600, help="fuzzing time per target (and per side with --baseline)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--corpus-root", type=Path, help="keep corpora here (default: fresh ones from the seeds)")
    p.add_argument("--baseline", action="store_true", help="also run libFuzzer's byte mutator alone, as long")
    p.add_argument("--live", type=int, default=1000, help="fuzzed sessions for a live node (0: none)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    corpus_root = args.corpus_root or Path(tempfile.mkdtemp(prefix="bench-fuzz-corpus-"))
    results = run(args.targets, args.seconds, args.seed, corpus_root, args.baseline, args.live)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    findings = sum(len(s["crashes"]) for sides in results["targets"].values() for s in sides.values())
    return 1 if findings or (results.get("live") or {}).get("bad") else 0


if __name__ == "__main__":
    raise SystemExit(main())
