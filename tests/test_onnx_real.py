"""The real SmolLM2-135M with a trained LoRA adapter, exported once per session (merged and
adapter-inputs): ONNX logits vs edgetune's PyTorch logits, and greedy generation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune.tests.test_onnx_export import _compare_with_cache, _session

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data" / "assistant.jsonl"


@pytest.fixture(scope="session")
def real_export(tmp_path_factory):
    from edgetune.runtime.model.embedded import embedded_model_path
    from edgetune.runtime.onnx.export import ExportOptions, export
    from edgetune.runtime.train.loop import TrainConfig, finetune

    root = tmp_path_factory.mktemp("onnx_real")
    folder = embedded_model_path()
    run = finetune(TrainConfig(model=str(folder), data=str(EXAMPLES), out=str(root / "run"), method="lora", rank=8,
                               alpha=16, target_modules=("q_proj", "v_proj"), lr=3e-3, steps=4, batch_size=2,
                               max_seq_len=64, eval_fraction=0.0, save_every=0, progress=False, threads=2))
    outs = {mode: export(ExportOptions(model=str(folder), adapter=str(run.adapter_dir), out=str(root / mode),
                                       mode=mode, context_length=512))
            for mode in ("merged", "adapter-inputs")}
    return folder, run.adapter_dir, outs


def _trained(folder, adapter_dir):
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.peft.hf_format import load_adapter

    model = load_model(folder)
    load_adapter(model, adapter_dir)
    return model


def _prompt_ids(folder):
    from edgetune.runtime.text.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "What is edgetune?"}], add_generation_prompt=True)
    return torch.tensor([tok.encode(text, add_special_tokens=False)])


def test_real_onnx_logits_match_pytorch_prompt_and_16_cached_steps(real_export):
    import onnxruntime as ort

    folder, adapter_dir, outs = real_export
    model = _trained(folder, adapter_dir)
    ids = _prompt_ids(folder)
    assert _compare_with_cache(_session(outs["merged"]), model, ids, steps=16) <= 2e-3
    options = ort.RunOptions()
    lora = ort.LoraAdapter()
    lora.Load(str(outs["adapter-inputs"] / "adapter.onnx_adapter"))
    options.add_active_adapter(lora)
    assert _compare_with_cache(_session(outs["adapter-inputs"]), model, ids, steps=16, run_options=options) <= 2e-3


def test_real_onnx_greedy_equals_pytorch_greedy(real_export):
    folder, adapter_dir, outs = real_export
    model = _trained(folder, adapter_dir)
    ids = _prompt_ids(folder)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=32)[0, ids.shape[1]:].tolist()
    sess = _session(outs["merged"])
    c = model.config
    T = ids.shape[1]
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, T), np.int64), "position_ids": np.arange(T)[None],
             **{f"past_key_values.{i}.{k}": np.zeros((1, c.num_kv_heads, 0, c.head_dim), np.float32)
                for i in range(c.num_layers) for k in ("key", "value")}}
    names = [o.name for o in sess.get_outputs()]
    got = []
    for _ in range(32):
        out = dict(zip(names, sess.run(None, feeds)))
        last = out["logits"][0, -1]
        top2 = np.sort(last)[-2:]
        tok = int(last.argmax())
        if tok != want[len(got)]:
            assert top2[1] - top2[0] < 1e-2, f"token {len(got)}: {tok} vs {want[len(got)]}, not a near-tie"
            break
        got.append(tok)
        T += 1
        feeds = {"input_ids": np.array([[tok]]), "attention_mask": np.ones((1, T), np.int64),
                 "position_ids": np.array([[T - 1]]),
                 **{k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")}}
    assert got == want[:len(got)] and len(got) >= 16
