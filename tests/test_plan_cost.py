"""The cost model (runtime/plan/cost.py) against what torch measures on transformers' models."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from edgetune.runtime.model.config import ModelConfig
from edgetune.runtime.plan.cost import block_flops, block_params
from edgetune.tests.tiny import make_tiny_model


def _forward_flops(model, ids: torch.Tensor) -> int:
    # eager attention: its two matmuls are aten ops the counter sees (it skips CPU SDPA kernels)
    model.set_attn_implementation("eager")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids)
    return counter.get_total_flops()


@pytest.mark.parametrize("arch, kw", [("llama", {}), ("llama", {"head_dim": 16}), ("qwen2", {}), ("mistral", {}),
                                      ("llama", {"attention_bias": True, "mlp_bias": True, "intermediate_size": 80})])
@pytest.mark.parametrize("batch, tokens", [(1, 7), (3, 16)])
def test_block_flops_match_torchs_count_of_a_transformers_block(arch, kw, batch, tokens, tmp_path):
    # transformers' model with 2 blocks minus the same with 1 block: one block's matmuls (the
    # embedding lookup and LM head cancel out)
    two = make_tiny_model(arch, tmp_path / "two", num_hidden_layers=2, **kw)
    one = make_tiny_model(arch, tmp_path / "one", num_hidden_layers=1, **kw)
    ids = torch.randint(3, 96, (batch, tokens), generator=torch.Generator().manual_seed(0))
    measured = _forward_flops(two, ids) - _forward_flops(one, ids)
    config = ModelConfig.from_file(tmp_path / "two" / "config.json")
    assert measured > 0
    assert block_flops(config, batch, tokens) == measured


@pytest.mark.parametrize("arch, kw", [("llama", {}), ("qwen2", {}), ("llama", {"attention_bias": True, "mlp_bias": True})])
def test_block_params_count_a_transformers_block(arch, kw, tmp_path):
    hf = make_tiny_model(arch, tmp_path, **kw)
    config = ModelConfig.from_file(tmp_path / "config.json")
    assert block_params(config) == sum(p.numel() for p in hf.model.layers[0].parameters())
