"""The same model and training code on a CUDA device (skipped without one)."""
from __future__ import annotations

import json

import pytest
import torch

from edgetune.runtime.model.loader import load_model
from edgetune.tests.tiny import make_tiny_folder

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def exact_fp32_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_tiny")
    ref = make_tiny_folder("llama", folder)
    return folder, ref


def test_cuda_logits_match_transformers(tiny):
    folder, ref = tiny
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(0))
    model = load_model(folder, device="cuda")
    with torch.no_grad():
        ours = model(ids.cuda()).cpu()
        theirs = ref.cuda()(ids.cuda()).logits.cpu()
    ref.cpu()
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_bf16_on_cuda_stays_close_to_fp32(tiny):
    folder, _ = tiny
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        full = load_model(folder, device="cuda")(ids).float()
        half = load_model(folder, device="cuda", dtype=torch.bfloat16)(ids).float()
    assert (full - half).abs().max().item() <= 0.1


def test_cuda_training_matches_cpu_training(tiny, tmp_path):
    from edgetune.runtime.train.loop import TrainConfig, finetune

    folder, _ = tiny
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["hello world, the fox.", "the lazy dog is fine."] * 3))
    common = dict(model=str(folder), data=str(data), rank=4, steps=4, batch_size=2, lr=1e-2, max_seq_len=32,
                  eval_fraction=0.0, save_every=0, progress=False, dropout=0.1)
    cpu = finetune(TrainConfig(out=str(tmp_path / "cpu"), device="cpu", **common)).losses
    gpu = finetune(TrainConfig(out=str(tmp_path / "gpu"), device="cuda", **common)).losses
    # dropout masks are keyed, not device-RNG dependent; the rest is fp32 rounding
    assert max(abs(a - b) for a, b in zip(cpu, gpu)) <= 1e-3


def test_cuda_nodes_train_like_a_cpu_local_run(tiny, tmp_path, monkeypatch):
    """Edge on the CPU, both nodes' blocks on the GPU: the adapter matches --local on the CPU."""
    from edgetune.runtime.train.loop import TrainConfig, finetune
    from edgetune.tests.node_harness import patch_connect, start_route

    folder, _ = tiny
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["the quick brown fox.", "hello world!",
                                                                    "adapters on the edge.", "nodes on gpus."]))
    base = dict(model=str(folder), data=str(data), method="lora", rank=4, alpha=8.0, dropout=0.1, lr=5e-2, steps=3,
                batch_size=4, micro_batches=2, max_seq_len=32, eval_fraction=0.0, save_every=0, progress=False)
    local = finetune(TrainConfig(out=str(tmp_path / "local"), **base))
    route = start_route(folder, [1], tmp_path, device="cuda")
    try:
        assert route.shards[0].part.device.type == "cuda"
        patch_connect(monkeypatch, route)
        remote = finetune(TrainConfig(out=str(tmp_path / "remote"), coordinator="fake:1",
                                      token_file=str(route.token_file), **base))
    finally:
        route.stop()
    for a, b in zip(local.losses, remote.losses):
        assert abs(a - b) <= 1e-4
    from safetensors.torch import load_file

    ours, ref = (load_file(str(r.out / "adapter" / "adapter_model.safetensors")) for r in (remote, local))
    assert ours.keys() == ref.keys() and all((ours[k] - ref[k]).abs().max() <= 1e-4 for k in ref)


def test_profile_reports_the_gpu_and_times_a_block_on_it(tiny):
    from edgetune.nodes.profile import profile_node
    from edgetune.runtime.model.config import ModelConfig

    folder, _ = tiny
    config = ModelConfig.from_file(folder / "config.json").to_hf_dict()
    p = profile_node("gpu-node", "cuda", 2, 0, config)
    assert p.gpu_name == torch.cuda.get_device_name(0)
    assert p.memory_bytes == p.gpu_memory_bytes == torch.cuda.get_device_properties(0).total_memory
    assert p.block_time_s > 0
