"""What security costs a whole local cluster: start it, join an edge, place a model, stop it -- with
mutual TLS (a CA, join strings, Ray's TLS) and with --insecure, alternating, in one run.

    python -m edgetune.benchmarks.bench_trust --repeats 2

Each round starts `LocalCluster` (an `edgetune coordinator` and two `edgetune node` processes, as
`edgetune demo` and examples/cluster/local_cluster.sh do), asks for a route to a tiny model (the
coordinator profiles the nodes and places both shards), and stops everything. It prints each
phase's seconds per mode and the difference TLS - insecure of the medians.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

MODULE = "edgetune.benchmarks.bench_trust"


def one_round(model: str, insecure: bool) -> dict[str, float]:
    from edgetune.runtime.cluster.local_cluster import LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster.start([["--threads", "1"], ["--threads", "1"]], insecure=insecure)
    t1 = time.perf_counter()
    try:
        client = cluster.client(edge="edge")  # joins the edge (TLS) first
        t2 = time.perf_counter()
        try:
            client.get_route(model)
        finally:
            client.close()
        t3 = time.perf_counter()
    finally:
        cluster.stop()
    t4 = time.perf_counter()
    return {"start + nodes joined": t1 - t0, "edge joined": t2 - t1, "route placed": t3 - t2, "stop": t4 - t3,
            "total": t4 - t0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="rounds of (TLS, insecure), alternating which goes first")
    args = p.parse_args(argv)
    from edgetune.tests.tiny import make_tiny_folder

    with tempfile.TemporaryDirectory(prefix="bench_trust-") as tmp:
        model = Path(tmp) / "tiny"
        make_tiny_folder("llama", model, hidden_size=64, intermediate_size=128, num_hidden_layers=4)
        runs: dict[str, list[dict[str, float]]] = {"tls": [], "insecure": []}
        for i in range(args.repeats):
            for mode in (("tls", "insecure") if i % 2 == 0 else ("insecure", "tls")):
                runs[mode].append(one_round(str(model), insecure=mode == "insecure"))
                print(f"round {i + 1} {mode}: " + ", ".join(f"{k} {v:.2f} s" for k, v in runs[mode][-1].items()),
                      flush=True)
    phases = list(runs["tls"][0])
    print(f"\n{'phase (median s)':<24}{'TLS':>8}{'insecure':>10}{'TLS - insecure':>16}")
    for phase in phases:
        tls, plain = (statistics.median(r[phase] for r in runs[m]) for m in ("tls", "insecure"))
        print(f"{phase:<24}{tls:>8.2f}{plain:>10.2f}{tls - plain:>+16.2f}")


if __name__ == "__main__":
    main()
