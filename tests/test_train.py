"""Local fine-tuning: parity with transformers + peft, resume, checkpoints, dropout determinism."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from edgetune.runtime.errors import CheckpointError, ConfigError
from edgetune.runtime.train.loop import TrainConfig, finetune
from edgetune.tests.tiny import SAMPLE_TEXTS, make_tiny_folder

TEXTS = SAMPLE_TEXTS[:6]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_folder("llama", folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def _cfg(tiny_folder, data_file, out, **kw):
    base = dict(model=str(tiny_folder), data=str(data_file), out=str(out), method="lora", rank=4, alpha=8.0,
                target_modules=("q_proj", "v_proj", "down_proj"), lr=5e-2, steps=5, batch_size=2, grad_accum=2,
                warmup_steps=1, max_seq_len=32, eval_fraction=0.0, save_every=0, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _adapter_tensors(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_lora_losses_match_transformers_and_peft(tiny_folder, data_file, tmp_path):
    """Five steps of edgetune LoRA training == the same steps written with transformers + peft."""
    import peft
    import transformers

    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.peft import attach_adapter
    from edgetune.runtime.peft.hf_format import save_adapter
    from edgetune.runtime.text.tokenizer import load_tokenizer
    from edgetune.runtime.train.data import (
        BatchStream,
        load_records,
        resolve_pad_id,
        split_train_eval,
        tokenize_records,
    )

    cfg = _cfg(tiny_folder, data_file, tmp_path / "run")
    losses = finetune(cfg).losses
    assert len(losses) == 5

    # the same initial adapter (same seed), handed to peft through the HF PEFT format
    init = load_model(tiny_folder)
    save_adapter(attach_adapter(init, cfg.methods(), seed=cfg.seed), tmp_path / "init")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "init", is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = transformers.get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)

    tok = load_tokenizer(tiny_folder)
    examples = tokenize_records(load_records(data_file), tok, cfg.max_seq_len)
    train, _ = split_train_eval(examples, cfg.eval_fraction, cfg.seed)
    stream = BatchStream(train, cfg.batch_size, cfg.seed, resolve_pad_id(tok))
    ref_losses = []
    for _ in range(cfg.steps):
        batches = [stream.next_batch() for _ in range(cfg.grad_accum)]
        n = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
        opt.zero_grad()
        total = 0.0
        for b in batches:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), b.labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum") / n
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        ref_losses.append(total)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1e-4, (losses, ref_losses)
    assert ref_losses[-1] < ref_losses[0]  # it did learn something, so the comparison is not vacuous


def test_resume_after_crash_gives_the_uninterrupted_result(tiny_folder, data_file, tmp_path):
    kw = dict(steps=6, save_every=2)
    whole = finetune(_cfg(tiny_folder, data_file, tmp_path / "whole", **kw))

    def crash(record):
        if record["step"] == 3:
            raise KeyboardInterrupt  # as if the user hit Ctrl-C after step 3 (last checkpoint: step 2)

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(tiny_folder, data_file, out, **kw), on_step=crash)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    resumed = finetune(_cfg(tiny_folder, data_file, out, resume=True, **kw))
    assert resumed.losses == whole.losses[2:]  # steps 3..6 replayed identically
    a, b = _adapter_tensors(tmp_path / "whole"), _adapter_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_clean_stop_and_resume(tiny_folder, data_file, tmp_path):
    whole = finetune(_cfg(tiny_folder, data_file, tmp_path / "whole", dropout=0.1))
    out = tmp_path / "stopped"
    finetune(_cfg(tiny_folder, data_file, out, dropout=0.1), stop_after=2)
    resumed = finetune(_cfg(tiny_folder, data_file, out, dropout=0.1, resume=True))
    assert resumed.losses == whole.losses[2:]


def test_dropout_masks_follow_the_seed(tiny_folder, data_file, tmp_path):
    a = finetune(_cfg(tiny_folder, data_file, tmp_path / "a", dropout=0.3, steps=3)).losses
    b = finetune(_cfg(tiny_folder, data_file, tmp_path / "b", dropout=0.3, steps=3)).losses
    c = finetune(_cfg(tiny_folder, data_file, tmp_path / "c", dropout=0.0, steps=3)).losses
    assert a == b
    assert a[1:] != c[1:]  # dropout is really applied


def test_existing_run_is_not_overwritten(tiny_folder, data_file, tmp_path):
    finetune(_cfg(tiny_folder, data_file, tmp_path / "run", steps=1))
    with pytest.raises(CheckpointError, match="--resume"):
        finetune(_cfg(tiny_folder, data_file, tmp_path / "run", steps=1))


def test_resume_with_other_options_is_refused(tiny_folder, data_file, tmp_path):
    finetune(_cfg(tiny_folder, data_file, tmp_path / "run", steps=2), stop_after=1)
    with pytest.raises(CheckpointError, match=r"lr: 0\.05 -> 0\.1"):
        finetune(_cfg(tiny_folder, data_file, tmp_path / "run", steps=2, lr=0.1, resume=True))


def test_unreadable_latest_checkpoint_falls_back(tiny_folder, data_file, tmp_path):
    whole = finetune(_cfg(tiny_folder, data_file, tmp_path / "whole", steps=4))
    out = tmp_path / "run"
    finetune(_cfg(tiny_folder, data_file, out, steps=4, save_every=1, keep_checkpoints=3), stop_after=3)
    (out / "checkpoints" / "step-000003" / "trainer.pt").write_bytes(b"damaged")
    resumed = finetune(_cfg(tiny_folder, data_file, out, steps=4, save_every=1, keep_checkpoints=3, resume=True))
    assert resumed.losses == whole.losses[2:]


def test_run_folder_contents(tiny_folder, data_file, tmp_path):
    out = tmp_path / "run"
    result = finetune(_cfg(tiny_folder, data_file, out, steps=2, eval_fraction=0.3))
    assert json.loads((out / "config.json").read_text())["method"] == "lora"
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [1, 2]
    assert lines[0] == {"step": 0, "eval_loss": result.eval_loss_before}  # before training
    assert all(k in lines[1] for k in ("loss", "lr", "tokens_per_s", "grad_norm"))
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)
    assert (out / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("method", ["dora", "ia3", "prefix", "prompt", "ln_tuning", "serial_adapter", "parallel_adapter", "bitfit"])
def test_every_method_trains_and_saves(tiny_folder, data_file, tmp_path, method):
    from edgetune.runtime.model.loader import load_model
    from edgetune.runtime.peft import attach_adapter
    from edgetune.runtime.peft.hf_format import load_adapter
    from edgetune.runtime.text.tokenizer import load_tokenizer
    from edgetune.runtime.train.data import load_records, resolve_pad_id, tokenize_records
    from edgetune.runtime.train.loop import LocalEngine, evaluate

    cfg = _cfg(tiny_folder, data_file, tmp_path / "run", method=method, steps=8, lr=1e-1, num_virtual_tokens=4,
               bottleneck_size=8, grad_accum=1, batch_size=3, target_modules="all-linear")
    result = finetune(cfg)
    tok = load_tokenizer(tiny_folder)
    examples = tokenize_records(load_records(data_file), tok, cfg.max_seq_len)

    def data_loss(model):
        return evaluate(LocalEngine(model), model.adapter, examples, 8, resolve_pad_id(tok), torch.device("cpu"))

    initial = load_model(tiny_folder)
    attach_adapter(initial, cfg.methods(), seed=cfg.seed)  # the run's starting point
    trained = load_model(tiny_folder)
    load_adapter(trained, result.adapter_dir)  # the saved adapter, read back
    assert data_loss(trained) < data_loss(initial) - 1e-3  # (IA)^3 and LN scales move a random tiny model slowly


def test_bad_options_are_reported_together():
    with pytest.raises(ConfigError) as e:
        TrainConfig(data="", steps=0, method="nope")
    assert all(s in str(e.value) for s in ("data", "steps", "method 'nope'"))


def test_config_is_frozen_and_serialisable(tiny_folder, data_file, tmp_path):
    cfg = _cfg(tiny_folder, data_file, tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_eval_data_file_and_the_eval_loss_before_training(tiny_folder, data_file, tmp_path):
    """--eval-data holds out a file of its own; the eval loss before step 1 is the base model's (LoRA
    starts as the identity), checked against transformers on the same tokens."""
    import transformers

    from edgetune.runtime.text.tokenizer import load_tokenizer
    from edgetune.runtime.train.data import load_records, tokenize_records

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": t.upper()}) + "\n" for t in SAMPLE_TEXTS[:3]))
    out = tmp_path / "run"
    result = finetune(_cfg(tiny_folder, data_file, out, steps=2, eval_data=str(eval_file), eval_fraction=0.5))
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
    assert [e["step"] for e in evals] == [0, 2]
    assert evals[0]["eval_loss"] == result.eval_loss_before and evals[1]["eval_loss"] == result.eval_loss

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    total, count = 0.0, 0
    for ex in tokenize_records(load_records(eval_file), load_tokenizer(tiny_folder), 32):  # _cfg's max_seq_len
        with torch.no_grad():
            logits = hf(torch.tensor([ex.input_ids])).logits[0, :-1]
        labels = torch.tensor(ex.labels[1:])
        total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    assert result.eval_loss_before == pytest.approx(total / count, rel=1e-5)
    assert json.loads((out / "config.json").read_text())["eval_data"] == str(eval_file)


def test_resume_after_a_line_cut_short_keeps_metrics_readable(tiny_folder, data_file, tmp_path):
    """A run killed while writing metrics.jsonl leaves half a line; the resumed run starts a new one."""
    out = tmp_path / "run"
    finetune(_cfg(tiny_folder, data_file, out, steps=3, save_every=1), stop_after=2)
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 1.2')  # killed mid-write
    finetune(_cfg(tiny_folder, data_file, out, steps=3, save_every=1, resume=True))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line parses
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


def test_the_top_level_api_names_the_training_entry_points():
    import edgetune
    from edgetune.runtime.train import loop, options

    assert edgetune.finetune is loop.finetune and edgetune.TrainConfig is options.TrainConfig
    assert {"finetune", "TrainConfig"} <= set(dir(edgetune))


def test_local_compiled_kernels_train_like_eager_kernels(tiny_folder, data_file, tmp_path):
    """`finetune --local --kernels compiled`: the blocks run through torch.compile, the losses and the
    trained adapter are eager's (rounding aside); eager is what `auto` picks on a CPU."""
    eager = finetune(_cfg(tiny_folder, data_file, tmp_path / "eager", steps=3, kernels="auto"))
    compiled = finetune(_cfg(tiny_folder, data_file, tmp_path / "compiled", steps=3, kernels="compiled"))
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    ours, ref = _adapter_tensors(compiled.out), _adapter_tensors(eager.out)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert (ours[k] - ref[k]).norm() <= 1e-4 * ref[k].norm(), k
    with pytest.raises(ConfigError, match="kernels 'triton' not in auto, eager, compiled, fused"):
        _cfg(tiny_folder, data_file, tmp_path / "x", kernels="triton")


def test_a_bf16_edge_head_trains_close_to_fp32(tiny_folder, data_file, tmp_path):
    fp32 = finetune(_cfg(tiny_folder, data_file, tmp_path / "fp32", steps=3))
    bf16 = finetune(_cfg(tiny_folder, data_file, tmp_path / "bf16", steps=3, head_dtype="bf16"))
    assert bf16.losses == pytest.approx(fp32.losses, rel=2e-2) and bf16.losses != fp32.losses


@pytest.mark.parametrize("spelled", [False, True])
def test_the_special_tokens_option_reaches_the_data_s_tokenization(tiny_folder, data_file, tmp_path, monkeypatch, spelled):
    from edgetune.runtime.train import data

    seen = []
    original = data.tokenize_records

    def spy(records, tokenizer, max_seq_len, **kw):
        seen.append(kw.get("special_tokens_in_text"))
        return original(records, tokenizer, max_seq_len, **kw)

    monkeypatch.setattr(data, "tokenize_records", spy)
    finetune(_cfg(tiny_folder, data_file, tmp_path / "o", steps=1, special_tokens_in_text=spelled))
    assert seen == [spelled]
