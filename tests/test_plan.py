"""`edgetune plan`: sizes from the runtime's own code, bytes against a real route's wire, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgetune.commands.plan import adapter_sizes, load_config, load_nodes
from edgetune.runtime.errors import ConfigError
from edgetune.runtime.model.config import ModelConfig
from edgetune.runtime.plan import shapes
from edgetune.runtime.plan.cost import block_params
from edgetune.runtime.plan.planner import TENSOR_HEADER_BYTES, EdgeSpec, Link, PlanNode, Workload, parse_link, plan
from edgetune.runtime.train.loop import TrainConfig, finetune
from edgetune.tests.node_harness import patch_connect, start_route
from edgetune.tests.tiny import make_tiny_folder

NODES_YAML = """\
nodes:
  - {name: gpu-a, memory: 40G, tflops: 400, dtype: bf16}
  - {name: gpu-b, memory: 40G, tflops: 400, dtype: bf16, link: "1gbit,5ms"}
edge: {tflops: 2, head_dtype: bf16}
"""


def test_links_parse_and_bad_ones_say_why():
    assert parse_link("100mbit,50ms") == Link(100e6, 0.05)
    assert parse_link(" 1Gbit , 0.5ms ") == Link(1e9, 0.0005)
    for bad, why in [("100mbit", "RATE,RTT"), ("fast,50ms", "rate 'fast'"), ("100mbit,soon", "round-trip"),
                     ("0mbit,1ms", "positive")]:
        with pytest.raises(ConfigError, match=why):
            parse_link(bad)


def test_shipped_shapes_have_the_public_parameter_counts():
    counts = {}
    for name in shapes.names():
        c = ModelConfig.from_hf_dict(shapes.load(name))
        counts[name] = c.num_layers * block_params(c) + c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) + c.hidden_size
    assert set(counts) >= {"llama-3-8b", "llama-3-70b", "qwen2-7b"}
    assert round(counts["llama-3-8b"] / 1e9, 2) == 8.03 and round(counts["llama-3-70b"] / 1e9, 2) == 70.55
    assert round(counts["qwen2-7b"] / 1e9, 2) == 7.62


def test_adapter_sizes_on_fake_tensors_equal_a_real_adapter(tmp_path):
    """The planner's per-block pushed values and trainable count, from fake tensors, equal those of
    a real adapter on real blocks, for every method family."""
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.peft import attach_adapter
    from edgetune.runtime.peft.adapter import split_block_key

    make_tiny_folder("llama", tmp_path, hidden_size=64, intermediate_size=128, num_hidden_layers=3)
    config = ModelConfig.from_file(tmp_path / "config.json")
    for options in [{}, {"method": "dora"}, {"method": "ia3"}, {"method": "prefix", "num_virtual_tokens": 3},
                    {"method": "prefix", "num_virtual_tokens": 3, "prefix_projection": True},
                    {"method": "prompt", "num_virtual_tokens": 3}, {"method": "ln_tuning"},
                    {"method": "serial_adapter", "bottleneck_size": 8}, {"method": "bitfit"},
                    {"target_modules": "all-linear", "layers_to_transform": (0, 2)}]:
        methods = TrainConfig(data="x", **options).methods()
        per_block, trainable, _ = adapter_sizes(config, methods)
        model = load_model(tmp_path)
        adapter = attach_adapter(model, methods)
        real = [0] * config.num_layers
        for key, t in adapter.block_tensor_views(range(config.num_layers)).items():
            real[split_block_key(key)[1]] += t.numel()
        assert per_block == real and trainable == adapter.num_parameters(), options
    # and by hand: LoRA r16 on every linear of Llama-3-8B is r * (in + out) summed
    c8 = ModelConfig.from_hf_dict(shapes.load("llama-3-8b"))
    per_block, trainable, tensors = adapter_sizes(c8, TrainConfig(data="x", rank=16, target_modules="all-linear").methods())
    assert tensors == [14] * 32  # A and B of 7 linears
    by_hand = 16 * sum(o + i for o, i in c8.linear_shapes().values())
    assert per_block == [by_hand] * 32 and trainable == 32 * by_hand == 41_943_040


@pytest.mark.parametrize("adapter_codec", ["raw", "int8"])
def test_predicted_bytes_match_a_real_route_within_5_percent(adapter_codec, tmp_path, monkeypatch):
    """A 2-node route on loopback: the edge link's bytes per step, sent and received, as the plan says."""
    folder = tmp_path / "tiny"
    make_tiny_folder("llama", folder, hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    data = tmp_path / "long.jsonl"  # every example longer than max_seq_len: every batch is 4 x 32 tokens
    data.write_text("".join(json.dumps({"text": "the library opens at nine and closes at six " * 8}) + "\n"
                            for _ in range(8)))
    route = start_route(folder, [2], tmp_path / "tok")
    try:
        patch_connect(monkeypatch, route)
        cfg = TrainConfig(model=str(folder), data=str(data), out=str(tmp_path / "run"), rank=4, target_modules="all-linear",
                          steps=2, batch_size=4, micro_batches=2, max_seq_len=32, eval_fraction=0.0, save_every=0,
                          progress=False, coordinator="fake:1", token_file=str(route.token_file), codec="bf16",
                          adapter_codec=adapter_codec)
        run = finetune(cfg)
    finally:
        route.stop()
    records = [r for r in map(json.loads, (run.out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    config = ModelConfig.from_file(folder / "config.json")
    per_block, trainable, tensors = adapter_sizes(config, cfg.methods())
    nodes = [PlanNode("node-0", 1 << 30, 1e9, "fp32"), PlanNode("node-1", 1 << 30, 1e9, "fp32")]
    report = plan(config, "tiny", nodes, EdgeSpec(1e9), Workload(4, 32, 2, "bf16", adapter_codec, tuple(per_block),
                                                                 trainable, tuple(tensors)), Link(1e9, 0.001))
    assert [(s.start, s.end) for s in report.stages] == [(0, 2), (2, 4)]
    edge_hop = report.hops[0]
    for record in records[1:]:  # the first step also carries the session's Open (and, lossy, the whole adapter)
        assert abs(record["bytes_sent"] - edge_hop.down_bytes) <= 0.05 * edge_hop.down_bytes, record
        assert abs(record["bytes_received"] - edge_hop.up_bytes) <= 0.05 * edge_hop.up_bytes, record


def test_plan_cli_prints_tables_and_json(tmp_path):
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(NODES_YAML)
    args = [sys.executable, "-m", "edgetune", "plan", "--model", "llama-3-8b", "--nodes", str(nodes), "--rank", "16",
            "--target-modules", "all-linear", "--batch-size", "4", "--max-seq-len", "2048", "--micro-batches", "4",
            "--codec", "bf16", "--link", "100mbit,50ms"]
    text = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "bound by bandwidth" in text.stdout and "edge -> gpu-a" in text.stdout and "gpu-a -> gpu-b" in text.stdout
    shown = json.loads(subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=120).stdout)
    assert shown["trainable_params"] == 41_943_040 and shown["bound"] == "bandwidth"
    (a, b) = shown["stages"]  # 48 GiB of blocks and activations: too much for one 40G node
    assert (a["name"], a["start"], b["name"], b["end"]) == ("gpu-a", 0, "gpu-b", 32) and a["end"] == b["start"]
    assert all(s["memory_bytes"] <= 40 << 30 for s in shown["stages"])
    c8 = ModelConfig.from_hf_dict(shapes.load("llama-3-8b"))
    assert sum(s["weight_bytes"] for s in shown["stages"]) == 32 * block_params(c8) * 2  # bf16
    # the edge's link carries every block's adapter (fp32, 14 tensors a block, each with its header) both
    # ways, plus 2 x 4 hidden states (bf16) each way
    hidden, header = 1 * 2048 * 4096 * 2, TENSOR_HEADER_BYTES
    assert shown["hops"][0]["down_bytes"] == 4 * 41_943_040 + 14 * 32 * header + 8 * hidden
    assert shown["hops"][1]["down_bytes"] == (4 * 41_943_040 // 32 + 14 * header) * (32 - b["start"]) + 8 * hidden
    assert shown["hops"][1]["link"].startswith("1 Gbit/s")
    # a faster link turns the same plan compute-bound
    fast = json.loads(subprocess.run([*args[:-1], "100gbit,0.1ms", "--json"], capture_output=True, text=True,
                                     timeout=120).stdout)
    assert fast["bound"] == "compute" and fast["step_s"] < shown["step_s"]


def test_plan_of_the_embedded_model_reads_its_gguf_header(tmp_path):
    config = load_config("embedded")
    assert (config.num_layers, config.hidden_size, config.vocab_size, config.num_kv_heads) == (30, 576, 49152, 3)


def test_bad_plan_inputs_are_named(tmp_path):
    bad = tmp_path / "nodes.yaml"
    for text, why in [("nodes: []\n", "non-empty list under 'nodes:'"),
                      ("nodes:\n  - {name: a, memory: lots, tflops: 1}\n", "node 1: memory"),
                      ("nodes:\n  - {name: a, memory: 1G, tflops: fast}\n", "tflops must be a number"),
                      ("nodes:\n  - {name: a, memory: 1G, tflops: 1, dtype: int4}\n", "dtype 'int4'"),
                      ("nodes:\n  - {name: a, memory: 1G, tflops: 1, speed: 3}\n", "unknown key")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=why):
            load_nodes(bad)
    with pytest.raises(ConfigError, match="not a shipped shape"):
        load_config(str(tmp_path / "missing.json"))
    shown = subprocess.run([sys.executable, "-m", "edgetune", "plan", "--model", "llama-3-8b", "--nodes", str(bad),
                            "--batch-size", "3", "--micro-batches", "2"], capture_output=True, text=True, timeout=120)
    assert shown.returncode != 0 and "unknown key" in shown.stderr


def test_micro_batches_hide_the_round_trip_behind_the_other_forwards():
    from edgetune.runtime.plan.planner import choose_micro_batches

    assert choose_micro_batches(8, 2, 0.0, None) == 2  # unprofiled: one per stage
    assert choose_micro_batches(1, 3, 0.5, None) == 1  # never more than rows
    assert choose_micro_batches(8, 2, 0.0, 1.0) == 2
    assert choose_micro_batches(8, 2, 0.5, 1.0) == 2  # 1/2 of a 1 s forward covers 0.5 s
    assert choose_micro_batches(8, 2, 0.6, 1.0) == 4  # 2 leaves 0.5 s: the next divisor of 8 leaves 0.75 s
    assert choose_micro_batches(8, 2, 0.8, 1.0) == 8  # 4 leaves 0.75 s
    assert choose_micro_batches(6, 2, 0.6, 1.0) == 3  # 2/3 s
    assert choose_micro_batches(5, 2, 0.1, 1.0) == 5  # no divisor between 1 and 5
    assert choose_micro_batches(8, 2, 0.95, 1.0) == 8  # would need 20: one row each
    with pytest.raises(ConfigError):
        choose_micro_batches(0, 2, 0.1, 1.0)


def test_plan_picks_micro_batches_as_finetune_would_when_none_are_given(tmp_path):
    from edgetune.runtime.plan.cost import block_flops
    from edgetune.runtime.plan.planner import auto_micro_batches

    config = ModelConfig.from_hf_dict(shapes.load("llama-3-8b"))
    nodes = [PlanNode("a", 20 << 30, 20e12, "bf16"), PlanNode("b", 20 << 30, 20e12, "bf16")]  # too small for one
    work = Workload(8, 512, 1)
    split = plan(config, "m", nodes, EdgeSpec(1e12), work, Link(1e9, 0.0)).stages
    assert len(split) == 2
    forward = max(s.end - s.start for s in split) * block_flops(config, 8, 512) / 20e12  # the slowest stage, whole batch
    chosen = {rtt: auto_micro_batches(config, "m", nodes, EdgeSpec(1e12), work, Link(1e9, rtt))
              for rtt in (0.0, 0.1 * forward, 0.3 * forward, 10 * forward)}
    assert chosen[0.0] == 2  # nothing to hide: one per stage
    assert list(chosen.values()) == sorted(chosen.values())  # a longer round trip never gets fewer
    assert chosen[10 * forward] == 8  # more than any split hides: one row each
    assert chosen[0.1 * forward] == 2  # half the forward covers both hops' 0.2 x forward of round trips
    assert chosen[0.3 * forward] == 4  # 0.6 x forward: half does not, three quarters do
    # the CLI's default is that choice, and says so
    (tmp_path / "nodes.yaml").write_text("nodes:\n  - {name: a, memory: 20G, tflops: 20, dtype: bf16}\n"
                                         "  - {name: b, memory: 20G, tflops: 20, dtype: bf16}\nedge: {tflops: 1}\n")
    out = subprocess.run([sys.executable, "-m", "edgetune", "plan", "--model", "llama-3-8b", "--nodes",
                          str(tmp_path / "nodes.yaml"), "--batch-size", "8", "--max-seq-len", "512", "--link",
                          f"1gbit,{0.3 * forward * 1e3:.3f}ms", "--json"], capture_output=True, text=True, timeout=120)
    shown = json.loads(out.stdout)
    assert shown["micro_batches"] == chosen[0.3 * forward] and "--micro-batches 0 would choose" in shown["notes"][-1]
