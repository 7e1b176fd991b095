"""Unit tests of the cluster's small pieces, without Ray: manifests, node labels, profiles,
the coordinator's cost model, the status table, the edge-part cache, thread defaults and
the PEFT method configs that travel to the nodes as JSON.

References are computed here independently: SHA-256 over the bytes safetensors itself
stores (parsed from the file's header), Ray's label-value rule as a regex written here,
byte counts of real parameters, hand-computed sizes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

from edgetune.runtime.errors import AdapterError, ConfigError, EdgetuneError, ModelLoadError
from edgetune.runtime.wire import messages as wire
from edgetune.tests.tiny import make_tiny_folder, make_tiny_model

# safetensors' dtype codes -> torch dtype names (the format's spec, not edgetune's code)
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_folder("llama", folder)
    return folder


def _raw_tensors(file: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, bytes as stored), read straight from the safetensors layout:
    8-byte little-endian header size, JSON header, then the data buffer."""
    blob = file.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        out[name] = (ST_DTYPES[meta["dtype"]], tuple(meta["shape"]), data[begin:end])
    return out


def _copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder: Path, change) -> None:
    """Load model.safetensors, let `change(dict)` edit it, save it back."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------- manifest
def test_manifest_lists_every_tensor_with_stored_dtype_shape_and_sha256(tiny, tmp_path):
    from edgetune.runtime.model.manifest import checkpoint_manifest

    folder = _copy_folder(tiny, tmp_path / "mixed")
    # mixed stored dtypes, so "stored dtype" cannot be confused with the dtype edgetune computes in
    _rewrite(folder, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.bfloat16),
                                         "model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].half()}))
    raw = _raw_tensors(folder / "model.safetensors")
    entries = checkpoint_manifest(folder)
    assert [e.name for e in entries] == sorted(raw)
    for e in entries:
        dtype, shape, data = raw[e.name]
        assert (e.dtype, tuple(e.shape)) == (dtype, shape), e.name
        assert e.sha256 == hashlib.sha256(data).hexdigest(), e.name
    by_name = {e.name: e for e in entries}
    assert by_name["model.norm.weight"].dtype == "bfloat16"
    assert by_name["model.layers.0.mlp.up_proj.weight"].dtype == "float16"
    assert by_name["model.embed_tokens.weight"].shape == (96, 32)
    # a subset: exactly the asked-for names, sorted, same entries
    names = ["model.norm.weight", "lm_head.weight"]
    assert checkpoint_manifest(folder, names) == [by_name["lm_head.weight"], by_name["model.norm.weight"]]


def test_manifest_of_a_sharded_checkpoint_equals_the_single_file_one(tmp_path):
    from edgetune.runtime.model.manifest import checkpoint_manifest, fingerprint

    model = make_tiny_model("llama", tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    single, sharded = checkpoint_manifest(tmp_path / "single"), checkpoint_manifest(tmp_path / "sharded")
    assert single == sharded
    assert fingerprint(single) == fingerprint(sharded)


def test_fingerprint_is_order_independent_and_sees_one_ulp(tiny, tmp_path):
    from edgetune.runtime.model.manifest import checkpoint_manifest, fingerprint

    entries = checkpoint_manifest(tiny)
    shuffled = list(entries)
    random.Random(0).shuffle(shuffled)
    assert shuffled != entries
    assert fingerprint(shuffled) == fingerprint(entries) == fingerprint(reversed(entries))
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint(entries))

    folder = _copy_folder(tiny, tmp_path / "ulp")
    name = "model.layers.1.self_attn.k_proj.weight"

    def one_ulp(t):
        w = t[name].clone()
        w.view(-1)[7] = torch.nextafter(w.view(-1)[7], torch.tensor(float("inf")))
        assert not torch.equal(w, t[name]) and (w - t[name]).abs().max() < 1e-6
        t[name] = w

    _rewrite(folder, one_ulp)
    changed = checkpoint_manifest(folder)
    assert fingerprint(changed) != fingerprint(entries)
    assert [e.name for e in changed if e not in entries] == [name]


def test_verify_names_the_tensor_whose_weights_dtype_or_shape_differ(tiny, tmp_path):
    from edgetune.runtime.model.manifest import checkpoint_manifest, verify

    manifest = checkpoint_manifest(tiny)
    verify(manifest, manifest, who="node-a")  # same entries: passes
    verify(checkpoint_manifest(tiny, ["model.layers.1.mlp.down_proj.weight"]), manifest, who="node-a")  # a subset

    name = "model.layers.0.self_attn.v_proj.weight"
    folder = _copy_folder(tiny, tmp_path / "w")
    _rewrite(folder, lambda t: t[name].mul_(1.0001))
    with pytest.raises(ModelLoadError, match=re.escape(name)) as err:
        verify(checkpoint_manifest(folder), manifest, who="node-a")
    assert "node-a" in str(err.value) and "weights" in str(err.value)
    assert "q_proj" not in str(err.value)  # only the tensor that differs is named

    e = next(x for x in manifest if x.name == name)
    with pytest.raises(ModelLoadError, match=re.escape(name) + ".*float16"):
        verify([dataclasses.replace(e, dtype="float16")], manifest, who="edge")
    with pytest.raises(ModelLoadError, match=re.escape(name)):
        verify([dataclasses.replace(e, shape=(e.shape[1], e.shape[0]))], manifest, who="edge")
    with pytest.raises(ModelLoadError, match="model.layers.9.extra"):
        verify([dataclasses.replace(e, name="model.layers.9.extra")], manifest, who="edge")


# ----------------------------------------------------------------------------- node labels
# Ray's rule for a label value, written here: at most 63 characters, beginning and ending with
# an alphanumeric character, with dashes, underscores, dots and alphanumerics in between.
RAY_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")

NODE_OPTIONS = [
    dict(name="a"),
    dict(name="gpu-box_1.lab", device="cuda", threads=8, memory_limit_bytes=3 * 2**30, fetch_weights=True),
    dict(name="n" * 63, device="cuda:3", threads=1, memory_limit_bytes=2**62),
    dict(name="x9", device="cpu", threads=0, memory_limit_bytes=0, fetch_weights=False),
    dict(name="bf", device="cuda:1", dtype="bf16", quantize="nf4"), dict(name="h", dtype="fp16", quantize="int8"),
    dict(name="f", dtype="fp32", quantize="none"),
]


@pytest.mark.parametrize("kw", NODE_OPTIONS, ids=lambda kw: kw["name"][:12])
def test_node_options_round_trip_through_valid_ray_labels(kw):
    from edgetune.runtime.cluster.node_labels import NodeOptions

    options = NodeOptions(**kw)
    labels = options.labels()
    assert NodeOptions.from_labels(labels) == options
    for key, value in labels.items():
        assert isinstance(value, str) and RAY_LABEL_VALUE.fullmatch(value), (key, value)


@pytest.mark.parametrize("kw, field", [
    (dict(name=""), "name"), (dict(name="-a"), "name"), (dict(name="a_"), "name"), (dict(name="n" * 64), "name"),
    (dict(name="has space"), "name"), (dict(name="a/b"), "name"),
    (dict(name="a", device="gpu"), "device"), (dict(name="a", device="cuda:x"), "device"),
    (dict(name="a", device="cuda-1"), "device"),
    (dict(name="a", threads=-1), "threads"), (dict(name="a", memory_limit_bytes=-5), "memory"),
    (dict(name="a", dtype="int8"), "dtype"), (dict(name="a", dtype="float32"), "dtype"),
    (dict(name="a", quantize="int4"), "quantize"),
])
def test_invalid_node_options_name_the_field(kw, field):
    from edgetune.runtime.cluster.node_labels import NodeOptions

    with pytest.raises(ConfigError, match=field):
        NodeOptions(**kw)


def test_labels_that_are_not_an_edgetune_nodes_raise_config_error():
    from edgetune.runtime.cluster.node_labels import LABEL_THREADS, NodeOptions

    with pytest.raises(ConfigError):
        NodeOptions.from_labels({"zone": "eu-1"})
    good = NodeOptions("a").labels()
    with pytest.raises(ConfigError):
        NodeOptions.from_labels({**good, LABEL_THREADS: "many"})


# ----------------------------------------------------------------------------- profile
@pytest.mark.parametrize("text, expected", [
    ("512M", 512 * 1024 * 1024), ("2G", 2 * 1024 ** 3), ("1.5GiB", 1610612736), ("1000", 1000),
    ("64k", 65536), ("1T", 1024 ** 4), (" 3g ", 3 * 1024 ** 3), ("100MB", 104857600),
])
def test_parse_size(text, expected):
    from edgetune.nodes.profile import parse_size

    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1G", "0", "G", "1.2.3M", "12X", "nan", "inf", "1e400", "0.1"])
def test_parse_size_rejects(text):
    from edgetune.nodes.profile import parse_size

    with pytest.raises(ValueError):
        parse_size(text)


def _tiny_config_dict() -> dict:
    from edgetune.tests.tiny import tiny_hf_config

    return tiny_hf_config("llama").to_dict()


def test_time_block_is_a_positive_float():
    from edgetune.nodes.profile import time_block

    seconds = time_block(_tiny_config_dict(), "cpu", repeats=2)
    assert isinstance(seconds, float) and 0 < seconds < 10


def test_profile_memory_is_the_smaller_of_limit_and_available_ram(monkeypatch):
    import psutil

    from edgetune.nodes import profile

    ram = 8 * 2**30
    monkeypatch.setattr(profile, "hardware", lambda device: {"cpus": 4, "ram_bytes": ram, "gpu_name": "",
                                                             "gpu_memory_bytes": 0})
    monkeypatch.setattr(profile, "time_block", lambda config_dict, device, repeats=3, dtype="fp32", quantize="none", kernels="eager": 0.01)
    config = _tiny_config_dict()
    assert profile.profile_node("a", "cpu", 0, 2**30, config).memory_bytes == 2**30
    assert profile.profile_node("a", "cpu", 0, 64 * 2**30, config).memory_bytes == ram
    assert profile.profile_node("a", "cpu", 0, 0, config).memory_bytes == ram  # 0: no limit
    monkeypatch.undo()

    # the real thing, measured: a limit below free RAM wins; without one, about the free RAM
    p = profile.profile_node("a", "cpu", 0, 2**20, config)
    assert p.memory_bytes == 2**20 and p.block_time_s > 0 and p.cpus == os.cpu_count()
    free = psutil.virtual_memory().available
    p = profile.profile_node("a", "cpu", 0, 0, config)
    assert abs(p.memory_bytes - free) < 0.2 * free


# ----------------------------------------------------------------------------- cost model
@pytest.mark.parametrize("arch", ["llama", "llama_tied", "mistral"])
def test_model_cost_charges_one_blocks_real_fp32_bytes(arch, tmp_path):
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.plan.cost import REFERENCE_TOKENS, model_cost

    make_tiny_model(arch, tmp_path, intermediate_size=80)  # f != 2d, so d and f cannot be swapped unseen
    model = load_model(tmp_path)
    real = sum(p.numel() * 4 for p in model.block(1).parameters())
    assert real == sum(p.numel() * p.element_size() for p in model.block(1).parameters())  # fp32
    cost = model_cost(model.config)
    assert cost.block_bytes == real
    assert cost.num_layers == 2
    assert cost.activation_bytes == 4 * 128 * model.config.hidden_size == 4 * REFERENCE_TOKENS * 32


@pytest.mark.parametrize("arch, kw", [("llama", {"head_dim": 16}), ("qwen2", {}),
                                      ("llama", {"attention_bias": True, "mlp_bias": True})])
def test_model_cost_counts_q_dim_and_biases(arch, kw, tmp_path):
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.plan.cost import model_cost

    make_tiny_model(arch, tmp_path, **kw)
    model = load_model(tmp_path)
    assert model_cost(model.config).block_bytes == sum(p.numel() * 4 for p in model.block(0).parameters())


def test_block_of():
    from edgetune.coordinator.core import _block_of

    assert _block_of("model.layers.12.mlp.up_proj.weight") == 12
    assert _block_of("model.layers.0.input_layernorm.weight") == 0
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.x.a", "model.layers"):
        assert _block_of(name) is None


# ----------------------------------------------------------------------------- status table
def test_format_status_shows_names_health_layers_sessions_and_load():
    from edgetune.commands.status import format_status

    alive = wire.NodeStatus(name="gpu-a", ray_node_id="n1", host="10.0.0.5", alive=True, device="cuda",
                            gpu_name="H100", memory_bytes=3 * 2**30, cpus=16, threads=8, block_time_s=0.0123,
                            stages=[wire.Hop("embedded", "", 0, 15)], dtype="bf16", quantize="nf4",
                            info=wire.NodeInfo(name="gpu-a", sessions=3, busy_fraction=0.42))
    dead = wire.NodeStatus(name="cpu-b", ray_node_id="n2", host="10.0.0.6", alive=False)
    text = format_status(wire.ClusterStatus("10.0.0.1:6379", [alive, dead], ["embedded"]))
    lines = text.splitlines()
    assert "10.0.0.1:6379" in lines[0] and "embedded" in lines[0]
    header = lines[1].split()
    assert header[:2] == ["node", "health"] and "layers" in header and "sessions" in header and "busy" in header
    row_a = next(line for line in lines if line.startswith("gpu-a"))
    row_b = next(line for line in lines if line.startswith("cpu-b"))
    assert " alive " in row_a and "[0, 15)" in row_a and "H100" in row_a and "42%" in row_a
    assert re.search(r"\s3\s+42%$", row_a)  # sessions, then busy, at the end of the row
    assert "3.0 GiB" in row_a and "12.3 ms" in row_a
    assert row_a[lines[1].index("dtype"):].startswith("bf16") and "dtype" in header
    assert row_a[lines[1].index("weights"):].startswith("nf4")
    assert " dead " in row_b and "[" not in row_b and "alive" not in row_b
    assert len(lines) == 4
    # columns line up: every row starts its "health" cell where the header does
    col = lines[1].index("health")
    assert row_a[col:].startswith("alive") and row_b[col:].startswith("dead")


def test_format_status_shows_each_node_s_sessions_by_edge_identity():
    from edgetune.commands.status import format_status

    opened = [wire.SessionInfo("s1", "alice", 2**20), wire.SessionInfo("s2", "bob"), wire.SessionInfo("s3", "alice")]
    node = wire.NodeStatus(name="gpu-a", alive=True, stages=[wire.Hop("m", "", 0, 4)],
                           info=wire.NodeInfo(name="gpu-a", sessions=3, open_sessions=opened, busy_fraction=0.1))
    row = next(line for line in format_status(wire.ClusterStatus("h:1", [node], ["m"])).splitlines()
               if line.startswith("gpu-a"))
    assert "3: alice x2, bob" in row


def test_format_status_flags_a_placed_node_that_does_not_answer_and_an_empty_cluster():
    from edgetune.commands.status import format_status

    silent = wire.NodeStatus(name="c", alive=True, stages=[wire.Hop("m", "", 15, 30)], info=None)
    text = format_status(wire.ClusterStatus("h:1", [silent]))
    assert "unreachable" in text and "[15, 30)" in text and "none" in text.splitlines()[0]
    assert "no edgetune node has joined" in format_status(wire.ClusterStatus("h:1", []))


# ----------------------------------------------------------------------------- edge part
def _edge_part(folder: Path) -> wire.EdgePart:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys() if not n.startswith("model.layers.")}
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".json"}
    return wire.EdgePart(files, tensors)


def test_save_edge_part_writes_a_folder_load_model_reads(tiny, tmp_path):
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.text.tokenizer import load_tokenizer
    from edgetune.runtime.wire.coordinator_client import save_edge_part

    part = _edge_part(tiny)
    assert sorted(part.tensors) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(part.files)
    folder = save_edge_part(part, tmp_path / "cache" / "fp")
    assert folder == tmp_path / "cache" / "fp"
    for name, content in part.files.items():
        assert (folder / name).read_bytes() == content
    edge = load_model(folder, start=0, end=0, edge=True)
    assert len(list(edge.blocks())) == 0
    got = edge.hf_state_dict()
    assert got.keys() == part.tensors.keys()
    assert all(torch.equal(got[n], part.tensors[n]) for n in got)
    assert load_tokenizer(folder).encode("the quick brown fox") == load_tokenizer(tiny).encode("the quick brown fox")
    assert [p.name for p in folder.parent.iterdir()] == ["fp"]  # no temporary folder left behind

    # a second call is a no-op: the first copy stays as it was
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    other = wire.EdgePart({"config.json": b"{}", "extra.txt": b"x"}, {"x": torch.zeros(1)})
    assert save_edge_part(other, folder) == folder
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()} == before


@pytest.mark.parametrize("bad", ["../evil.json", "..", "a/b.json", "/etc/passwd", "dir\\x.json", ".hidden", ""])
def test_save_edge_part_refuses_paths_from_the_coordinator(bad, tiny, tmp_path):
    from edgetune.runtime.wire.coordinator_client import save_edge_part

    part = _edge_part(tiny)
    part.files[bad] = b"x"
    with pytest.raises(EdgetuneError, match=re.escape(repr(bad))):
        save_edge_part(part, tmp_path / "cache" / "fp")
    assert not (tmp_path / "cache" / "fp").exists()
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary folder is gone too
    assert not (tmp_path / "evil.json").exists()


# ----------------------------------------------------------------------------- threads
def test_default_threads_is_between_one_and_the_cores():
    from edgetune.runtime.threads import default_threads, edgetune_processes

    n = default_threads()
    assert isinstance(n, int) and 1 <= n <= (os.cpu_count() or 1)
    assert edgetune_processes() >= 1


# ----------------------------------------------------------------------------- PEFT method JSON
def _one_config_per_class():
    from edgetune.runtime import peft

    made = {
        peft.LoraConfig: peft.LoraConfig(r=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "down_proj"),
                                         layers_to_transform=(0, 3), use_rslora=True, use_dora=True),
        peft.IA3Config: peft.IA3Config(target_modules=("k_proj", "down_proj"), feedforward_modules=("down_proj",),
                                       layers_to_transform=(1,)),
        peft.PrefixTuningConfig: peft.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True,
                                                         encoder_hidden_size=16),
        peft.PromptTuningConfig: peft.PromptTuningConfig(num_virtual_tokens=4, init_token_ids=(5, 6)),
        peft.LNTuningConfig: peft.LNTuningConfig(target_modules=("input_layernorm",), layers_to_transform=(0,)),
        peft.SerialAdapterConfig: peft.SerialAdapterConfig(bottleneck_size=8, activation="relu"),
        peft.ParallelAdapterConfig: peft.ParallelAdapterConfig(bottleneck_size=8, scaling=2.0),
        peft.BitFitConfig: peft.BitFitConfig(target_modules="all-linear", layers_to_transform=(1, 2)),
        peft.LoKrConfig: peft.LoKrConfig(r=4, alpha=8.0, target_modules=("q_proj", "down_proj"), layers_to_transform=(0, 3),
                                         decompose_both=True, decompose_factor=4),
        peft.VeraConfig: peft.VeraConfig(r=16, target_modules=("q_proj", "up_proj"), projection_prng_key=9,
                                         d_initial=0.2, dropout=0.1),
        peft.AdaLoraConfig: peft.AdaLoraConfig(init_r=6, target_r=3, tinit=1, tfinal=1, deltaT=2, total_step=10,
                                               orth_reg_weight=0.25),
        peft.ShiraConfig: peft.ShiraConfig(r=2, mask="magnitude", seed=4, target_modules=("k_proj",)),
        peft.SparseConfig: peft.SparseConfig(density=0.02, mask="fisher", layers_to_transform=(1,)),
        peft.FisherProbeConfig: peft.FisherProbeConfig(target_modules=("v_proj",), score="magnitude", r=3),
        peft.UniPeltConfig: peft.UniPeltConfig(lora_r=4, lora_alpha=8.0, lora_targets=("q_proj",), num_virtual_tokens=2,
                                               bottleneck_size=8, activation="silu", layers_to_transform=(0,)),
    }
    assert set(made) == set(peft.METHODS.values())  # a new method class must be added here
    return list(made.values())


def test_methods_json_round_trips_every_method():
    from edgetune.runtime.peft.adapter import methods_from_json, methods_to_json

    methods = _one_config_per_class()
    for m in methods:
        text = methods_to_json([m])
        json.loads(text)  # plain JSON
        (back,) = methods_from_json(text)
        assert type(back) is type(m) and back == m
    stack = methods_from_json(methods_to_json(methods))  # a whole stack keeps its order
    assert stack == methods and [type(m) for m in stack] == [type(m) for m in methods]


@pytest.mark.parametrize("text", [
    "", "not json", "{}", "[]", "[1]", '{"type": "LoraConfig"}', '[{"type": "LoraConfig"}]',
    '[{"type": "NoSuchConfig", "fields": {}}]', '[{"fields": {"r": 4}}]',
    '[{"type": "LoraConfig", "fields": {"rank": 4}}]', '[{"type": "LoraConfig", "fields": {"r": 0}}]',
    '[{"type": "LoraConfig", "fields": {"dropout": 1.5}}]', '[{"type": "LoraConfig", "fields": [1, 2]}]',
    '[{"type": "SerialAdapterConfig", "fields": {"activation": "nope"}}]',
    '[{"type": "PrefixTuningConfig", "fields": {"num_virtual_tokens": -1}}]',
])
def test_malformed_method_json_raises_adapter_error(text):
    from edgetune.runtime.peft.adapter import methods_from_json

    with pytest.raises(AdapterError):
        methods_from_json(text)


@pytest.mark.parametrize("dtype, quantize", [("fp32", "none"), ("bf16", "none"), ("fp16", "none"), ("bf16", "nf4"),
                                             ("fp32", "int8")])
def test_time_block_runs_a_block_as_the_node_holds_it(dtype, quantize):
    from edgetune.nodes.profile import time_block

    assert time_block(_tiny_config_dict(), "cpu", repeats=1, dtype=dtype, quantize=quantize) > 0


def test_a_node_that_cannot_run_the_model_as_started_fails_the_route_at_once(monkeypatch):
    """A ConfigError from a node (here: profiling an nf4 block of shapes nf4 cannot split) is no
    transient placement failure: GetRoute answers FAILED_PRECONDITION, which the edge does not retry."""
    from types import SimpleNamespace

    from edgetune.coordinator import core, placement
    from edgetune.runtime.cluster.node_labels import NodeOptions
    from edgetune.runtime.errors import SessionError

    class RayTaskError(Exception):  # how ray.get raises a task's exception: the original as .cause
        def __init__(self, cause):
            super().__init__(str(cause))
            self.cause = cause

    def profile_task(*args, **kwargs):
        raise RayTaskError(ConfigError("nf4 needs weights whose size is a multiple of 64"))

    node = core.RayNode("ab" * 28, "10.0.0.2", True, NodeOptions("gpu-1", quantize="nf4"))  # a Ray node id: 28 bytes
    coordinator = core.Coordinator("token", "10.0.0.1:6379")
    monkeypatch.setattr(core.Coordinator, "nodes", lambda self: [node])
    monkeypatch.setattr(core.Coordinator, "model_info", lambda self, m: SimpleNamespace(name=m, config_dict={}))
    monkeypatch.setattr(placement.ray, "remote", lambda fn: SimpleNamespace(
        options=lambda **kw: SimpleNamespace(remote=lambda *a: ("ref", a))))
    monkeypatch.setattr(placement.ray, "put", lambda value: "probe")
    monkeypatch.setattr(placement.ray, "get", lambda ref, timeout=None: profile_task())
    with pytest.raises(SessionError, match="node gpu-1: nf4 needs weights") as e:
        coordinator.route("m")
    assert e.value.code == "FAILED_PRECONDITION"
    # anything else from a node stays a placement failure the edge may retry
    monkeypatch.setattr(placement.ray, "get", lambda ref, timeout=None: (_ for _ in ()).throw(RayTaskError(OSError("x"))))
    with pytest.raises(SessionError) as e:
        coordinator.route("m")
    assert e.value.code == "UNAVAILABLE"
