"""Hostile input, fuzzed: everything a node, an edge or the coordinator parses from the wire.

Each target (tests/fuzz/targets.py) runs a fixed number of atheris inputs from a fixed seed and the
seed corpus made at start, in a subprocess (atheris hands the process to libFuzzer, which may abort
it): no input may raise anything but edgetune's own errors. Then a real node server gets fuzzed
sessions over gRPC and must end each with a status of its own and keep serving. The long runs are
benchmarks/bench_fuzz.py's.
"""
from __future__ import annotations

import pytest

pytest.importorskip("atheris", reason="atheris has wheels for CPython 3.11-3.13 on Linux x86_64 only")

from edgetune.tests.fuzz.live import live_check  # noqa: E402
from edgetune.tests.fuzz.run import fuzz  # noqa: E402

# Inputs per target (2-8 s of fuzzing each on this 2-core machine, after ~3 s of start-up),
# and what each must at least reach: libFuzzer's coverage of edgetune's instrumented code.
RUNS = {"unary": 4000, "up": 4000, "down": 2000}
MIN_COVERAGE = {"unary": 120, "up": 100, "down": 600}
SEED = 1
LIVE_SESSIONS = 400  # about 8 s


@pytest.mark.slow
@pytest.mark.parametrize("target", list(RUNS))
def test_fuzzing_finds_nothing(target, tmp_path):
    summary = fuzz(target, tmp_path / "corpus", runs=RUNS[target], seed=SEED, out=tmp_path / "out")
    crashes = [{k: c[k] for k in ("signature", "message", "input", "traceback")} for c in summary["crashes"]]
    assert not crashes, f"fuzz target {target} found bugs (rerun one: python -m edgetune.tests.fuzz.run " \
                        f"--target {target} --repro INPUT): {crashes}"
    assert summary["exit"] == 0, summary
    assert summary["runs"] == RUNS[target]  # every input was tried
    assert summary["coverage"] >= MIN_COVERAGE[target], summary  # the code under test was instrumented
    if target == "down":  # mutated sessions got as far as the node's compute and back
        counts = summary["counts"]
        assert counts["sessions"] >= RUNS[target] // 10 and counts["replies"] >= RUNS[target] // 5, counts


@pytest.mark.slow
def test_a_node_keeps_serving_fuzzed_sessions():
    result = live_check(LIVE_SESSIONS, seed=SEED)
    assert result["bad"] == [], result["bad"]  # no UNKNOWN / INTERNAL, no stream that never ended
    assert result["unhealthy"] == 0 and result["left_open"] == [], result
    assert sum(result["statuses"].values()) == LIVE_SESSIONS
    # both kinds were exercised: sessions the node served to their end, and ones it refused
    assert result["statuses"].get("OK", 0) >= 10 and result["statuses"].get("INVALID_ARGUMENT", 0) >= 10, result
