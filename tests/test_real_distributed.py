"""Distributed training of the real SmolLM2-135M (the embedded model) without Ray.

Its 30 blocks are served by two in-process nodes on loopback gRPC (blocks [0, 15) and
[15, 30), real Shard + NodeServicer); the edge runs finetune(coordinator=...) through
them. Two LoRA steps must match --local training on the same data and seed: the
losses, the gradient norms before clipping (the sharpest view of the gradients: Adam's
first steps hide their size in the adapter) and the adapter itself.

Thread counts: both runs use one torch thread. Torch's thread count is process-wide,
the in-process nodes share it, and on a busy 2-core machine one thread is several
times faster than two competing ones; the previous count is restored afterwards.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from edgetune.runtime.train.loop import TrainConfig, finetune
from edgetune.tests.node_harness import patch_connect, start_route

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "assistant.jsonl"
LOSS_RTOL = 1e-4
ADAPTER_ATOL = 1e-5


@pytest.fixture(scope="module")
def folder() -> Path:
    from edgetune.runtime.model.embedded import embedded_model_path

    return embedded_model_path()  # converted once from the GGUF, then cached


@pytest.fixture(scope="module")
def route(folder, tmp_path_factory):
    local = start_route(folder, [15], tmp_path_factory.mktemp("token"))
    yield local
    local.stop()


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cfg(folder: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(model=str(folder), data=str(DATA), out=str(out), method="lora", rank=8,
                       target_modules=("q_proj", "v_proj"), dropout=0.1, lr=1e-3, steps=2, batch_size=2,
                       micro_batches=2, max_seq_len=64, eval_fraction=0.0, save_every=0, progress=False, seed=0,
                       threads=1, **kw)


def _adapter(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run.adapter_dir / "adapter_model.safetensors"))


def _grad_norms(run) -> list[float]:
    records = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in records if "loss" in r]


def test_two_lora_steps_through_two_nodes_equal_local_training(folder, route, tmp_path, monkeypatch):
    local = finetune(_cfg(folder, tmp_path / "local"))
    patch_connect(monkeypatch, route)
    remote = finetune(_cfg(folder, tmp_path / "remote", coordinator="fake:1", token_file=str(route.token_file)))

    assert len(local.losses) == len(remote.losses) == 2
    for a, b in zip(local.losses, remote.losses):
        assert abs(a - b) <= LOSS_RTOL * abs(a), (local.losses, remote.losses)
    for a, b in zip(_grad_norms(local), _grad_norms(remote)):
        assert a > 0 and abs(a - b) <= LOSS_RTOL * a, (_grad_norms(local), _grad_norms(remote))

    ours, theirs = _adapter(local), _adapter(remote)
    assert ours.keys() == theirs.keys()
    assert len(ours) == 30 * 2 * 2  # 30 blocks x (q_proj, v_proj) x (lora_A, lora_B)
    diffs = {k: (ours[k] - theirs[k]).abs().max().item() for k in ours}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= ADAPTER_ATOL, f"{worst}: max |diff| {diffs[worst]}"
    # the adapter really trained: LoRA's B starts at zero, so equal zeros would prove nothing
    trained = [k for k in ours if "lora_B" in k]
    assert all(ours[k].abs().max() > 1e-4 for k in trained)
    # the route really served the blocks: each node's stage timing is in the step's metrics
    record = next(r for r in map(json.loads, (remote.out / "metrics.jsonl").read_text().splitlines()) if "loss" in r)
    assert [s["node"] for s in record["stages"]] == ["node-0", "node-1"]
    assert record["bytes_sent"] > 0 and record["bytes_received"] > 0


def _checkpoint_edge_bytes(file: Path) -> dict[str, int]:
    """Stored byte size of every non-block tensor, from the safetensors header itself."""
    blob = file.open("rb")
    (n,) = struct.unpack("<Q", blob.read(8))
    header = json.loads(blob.read(n))
    blob.close()
    return {name: meta["data_offsets"][1] - meta["data_offsets"][0] for name, meta in header.items()
            if name != "__metadata__" and not name.startswith("model.layers.")}


def test_the_edge_holds_only_the_embedding_and_final_norm(folder, route, tmp_path, monkeypatch):
    from safetensors import safe_open

    from edgetune.runtime.train.remote import RemoteTrainer

    patch_connect(monkeypatch, route)
    cfg = _cfg(folder, tmp_path / "r", coordinator="fake:1", token_file=str(route.token_file))
    engine = RemoteTrainer.connect(cfg).start(cfg.methods(), torch.device("cpu"))
    try:
        params = dict(engine.model.named_parameters())
        stored = _checkpoint_edge_bytes(folder / "model.safetensors")
        # SmolLM2 ties its embeddings: no lm_head in the checkpoint, none on the edge
        assert sorted(stored) == ["model.embed_tokens.weight", "model.norm.weight"]
        assert sorted(params) == ["embed_tokens.weight", "norm.weight"]
        assert engine.model.lm_head is None and engine.model.head_weight is params["embed_tokens.weight"]
        assert len(list(engine.model.blocks())) == 0
        assert sum(p.numel() * p.element_size() for p in params.values()) == sum(stored.values())
        assert params["embed_tokens.weight"].shape == (49152, 576)
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            for name, p in params.items():
                assert torch.equal(p.detach(), f.get_tensor(f"model.{name}")), name
    finally:
        engine.close()
