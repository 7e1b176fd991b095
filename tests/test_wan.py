"""The emulated WAN (benchmarks/wan.py), short: one shaped hop with latency, a tiny model, a few steps.

Each namespace test builds its own lab and must leave nothing behind (`leftovers()`; `.ci/run`
checks again after the suite). Skipped, with the reason, only where network namespaces cannot be made.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from edgetune.benchmarks import wan
from edgetune.runtime.train.loop import TrainConfig, finetune
from edgetune.tests.tiny import make_tiny_folder

REASON = wan.available()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"cannot create network namespaces here: {REASON}")


@pytest.fixture()
def no_leftovers():
    before = set(wan.leftovers())
    yield
    assert set(wan.leftovers()) - before == set()


async def _proxied_echo(delay_s: float) -> tuple[list[float], float]:
    import asyncio

    async def echo(reader, writer):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = wan.DelayProxy(("127.0.0.1", 0), ("127.0.0.1", port), delay_s)
    pserver = await asyncio.start_server(proxy._client, "127.0.0.1", 0)
    pport = pserver.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", pport)
    loop = asyncio.get_running_loop()
    rtts = []
    for _ in range(5):
        start = loop.time()
        writer.write(b"x")
        await reader.readexactly(1)
        rtts.append(loop.time() - start)
    # a burst of 50 chunks sent at once comes back after one round trip, not 50 (pipelined)
    start = loop.time()
    for _ in range(50):
        writer.write(b"y" * 1000)
    await writer.drain()
    await reader.readexactly(50_000)
    burst = loop.time() - start
    writer.close()
    server.close()
    pserver.close()
    return rtts, burst


def test_the_delay_proxy_delays_each_direction_and_stays_pipelined():
    import asyncio

    rtts, burst = asyncio.run(_proxied_echo(0.02))
    assert all(0.039 <= r <= 0.05 for r in rtts), rtts  # 2 x 20 ms
    assert burst < 0.08  # ~one round trip for the whole burst; a sleep per chunk would take 50 x 40 ms


def test_links_name_their_namespaces_within_15_characters():
    lab = wan.Lab(nodes=3, rate_bits=1e6, rtt_s=0.01)
    names = [lab.edge] + [lab.node(i) for i in range(3)] + [f"{wan.PREFIX}{lab.run}{i}a" for i in range(3)]
    assert all(len(n) <= 15 and n.startswith(wan.PREFIX) for n in names) and len(set(names)) == len(names)


@needs_netns
def test_the_self_check_measures_the_configured_link(no_leftovers):
    with wan.Lab(nodes=1, rate_bits=20e6, rtt_s=0.03) as lab:
        rtt, rate, late = wan.self_check(lab, lab.hops[0], seconds=2.0)
        # the harness's own tolerance (1.5 ms at 30 ms): a fresh-clone CI run measured 31.03 ms once
        assert abs(rtt - 0.03) <= wan.rtt_tolerance_s(0.03) and rate >= 0.95 * 20e6 and late <= 0.002


@needs_netns
def test_one_grpc_stream_fills_a_long_fat_link(no_leftovers):
    """edgetune's channel options over 100 Mbit/s with 50 ms RTT: one stream moves >= 90% of the rate
    (gRPC's flow-control windows grow to the bandwidth-delay product by its BDP probing)."""
    with wan.Lab(nodes=1, rate_bits=100e6, rtt_s=0.05) as lab:
        wan.self_check(lab, lab.hops[0], seconds=1.0)
        bits = wan.grpc_throughput(lab, lab.hops[0], seconds=6.0)
    assert bits >= 0.9 * 100e6, bits


@needs_netns
def test_a_lab_is_removed_on_sigterm(no_leftovers, tmp_path):
    code = ("import time; from edgetune.benchmarks import wan\n"
            "with wan.Lab(nodes=2, rate_bits=1e7, rtt_s=0.01) as lab:\n"
            "    print(lab.edge, flush=True)\n"
            "    lab.spawn(lab.node(0), ['sleep', '600'])\n"
            "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    edge = proc.stdout.readline().strip()
    assert edge in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(0.2)
    assert not [n for n in wan.leftovers() if n.startswith(edge[:-1])]


@needs_netns
def test_training_through_a_shaped_hop_equals_local_training(no_leftovers, tmp_path):
    """Edge and one node in their own namespaces, 20 Mbit/s and 40 ms RTT between them through the
    delay proxy: the adapter equals --local's (fp32 codec), and each step pays at least its round trips."""
    folder = tmp_path / "tiny"
    make_tiny_folder("llama", folder, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"fact {i}: the library opens at nine and closes at six"}) + "\n"
                            for i in range(8)))
    train = dict(model=str(folder), data=str(data), rank=4, target_modules="all-linear", steps=3, batch_size=4,
                 micro_batches=2, max_seq_len=24, eval_fraction=0.0, save_every=0, progress=False, seed=1,
                 codec="fp32", lr=1e-2)
    with wan.Lab(nodes=1, rate_bits=20e6, rtt_s=0.04) as lab:
        wan.self_check(lab, lab.hops[0], seconds=1.0)
        result = wan.train_through(lab, str(folder), [], {**train, "out": str(tmp_path / "wan")}, str(tmp_path / "lab"), 2)
    local = finetune(TrainConfig(**train, out=str(tmp_path / "local")))
    assert result["losses"] == pytest.approx(local.losses, rel=1e-5)
    # the proxy reports its lateness (a run over 2 ms is invalid; on this shared 2-core runner the check
    # belongs to the benchmark, the self-check above asserts it on an idle link)
    assert all(0 <= late < 0.05 for late in result["proxy_p99_lateness_s"]), result["proxy_p99_lateness_s"]
    for step in result["steps"]:
        assert step["time_s"] >= 3 * 0.04  # forward, backward and end of step: one round trip each at least
    assert os.path.exists(tmp_path / "wan" / "adapter")


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (this test's folder: every lab process does)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended meanwhile
        if text in argv and int(pid) != os.getpid():
            found.append(f"{pid}: {argv}")
    return found


@pytest.mark.slow
@needs_netns
@pytest.mark.parametrize("hop", [0, 1], ids=["edge-link", "node-link"])
def test_a_link_cut_mid_step_replays_the_step_and_ends_with_the_undisturbed_adapter(no_leftovers, tmp_path, tiny64,
                                                                                   data_file, hop):
    """Edge -- node-0 -- node-1, 8 steps; as step 4 starts, one link goes silent both ways (Lab.cut: no reset,
    no ICMP) and comes back. The cut outlasts the connection's TCP_USER_TIMEOUT, which gRPC sets to
    rpc.KEEPALIVE_TIMEOUT_MS: the socket with unacknowledged data then fails (the edge's own, or node-0's
    towards node-1, which ends the edge's session), and the edge replays step 4 on a new session. A cut
    shorter than that is ridden out by TCP's retransmissions, with no replay.

    The lab runs no Ray: its route client always answers with the same route, as a coordinator does
    while Ray has not declared a node dead, so the replay goes through the same nodes (a cut of the
    edge's own link never reaches Ray's health checks, whatever its length)."""
    from safetensors.torch import load_file

    from edgetune.runtime.wire import rpc

    train = dict(model=str(tiny64), data=str(data_file), rank=4, target_modules="all-linear", steps=8, batch_size=4,
                 micro_batches=2, max_seq_len=24, eval_fraction=0.0, save_every=0, progress=False, seed=1,
                 codec="fp32", adapter_codec="raw", lr=1e-2)
    from edgetune.coordinator.ray_head import RayHeadConfig

    cut = wan.LinkCut(hop=hop, after_step=3, seconds=rpc.KEEPALIVE_TIMEOUT_MS / 1e3 + 0.5)
    ray = RayHeadConfig()
    assert cut.seconds < ray.health_check_period_ms * ray.health_check_failure_threshold / 1e3  # Ray: still alive
    with wan.Lab(nodes=2, rate_bits=20e6, rtt_s=0.02) as lab:
        result = wan.train_through(lab, str(tiny64), [1], {**train, "out": str(tmp_path / "wan")},
                                   str(tmp_path / "lab"), 2, cut=cut)
    assert not _processes_mentioning(str(tmp_path))
    undisturbed = finetune(TrainConfig(**train, out=str(tmp_path / "local")))

    log = (tmp_path / "lab" / "edge.log").read_text()
    assert "replaying on a new route" in log, log  # the replay path ran: the cut was noticed, not ridden out
    assert result["mended_at"] - result["cut_at"] >= cut.seconds - 0.1
    # every step once, in order: a replayed step is recorded (and stepped) once
    assert [r["step"] for r in result["steps"]] == list(range(1, 9))
    assert result["losses"] == pytest.approx(undisturbed.losses, abs=1e-5)
    trainer = torch.load(tmp_path / "wan" / "checkpoints" / "step-000008" / "trainer.pt", weights_only=True)
    assert {int(s["step"]) for s in trainer["optimizer"]["state"].values()} == {8}  # AdamW counts its own steps
    ours = load_file(tmp_path / "wan" / "adapter" / "adapter_model.safetensors")
    theirs = load_file(undisturbed.adapter_dir / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-5
