"""Local fine-tuning in one process: setup -> train -> save, as one explicit loop.

    >>> from edgetune.runtime.train.loop import TrainConfig, finetune
    >>> result = finetune(TrainConfig(model="embedded", data="examples/data/assistant.jsonl", out="runs/demo"))

The run folder (`out`) receives `config.json` (the resolved TrainConfig),
`metrics.jsonl` (one line per step and per eval), `checkpoints/step-N/`
(written atomically, see checkpoints.py) and the final `adapter/` in the
Hugging Face PEFT layout.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from edgetune.runtime.compute.executor import BlockExecutor
from edgetune.runtime.compute.kernels import resolve_kernels
from edgetune.runtime.compute.precision import resolve_head_dtype, torch_dtype
from edgetune.runtime.errors import ConfigError
from edgetune.runtime.peft.adapter import methods_to_json
from edgetune.runtime.peft.stats import Recorder, recording
from edgetune.runtime.train.loss import head_loss_sum
from edgetune.runtime.train.options import TrainConfig

__all__ = ["TrainConfig", "finetune", "train_step", "evaluate", "lr_lambda", "batch_loss_sum", "LocalEngine"]

log = logging.getLogger("edgetune.train")

def lr_lambda(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier: linear warmup from 0, then cosine decay to min_lr_ratio.

    The same curve as transformers' get_cosine_schedule_with_warmup when min_lr_ratio = 0.
    """
    if step < cfg.warmup_steps:
        return step / max(1, cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def batch_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor, dropout_key: tuple | None = None) -> torch.Tensor:
    """Summed next-token loss of one micro-batch (labels unshifted, -100 ignored).

    Right padding needs no attention mask: real tokens never attend to later
    positions, and padded positions carry no loss, so plain causal attention
    (the fast path) is exact. The LM head and loss run chunked (loss.py).
    """
    hidden = model.final_norm(model.last_hidden(input_ids, dropout_key=dropout_key))
    return head_loss_sum(hidden, model.loss_head_weight, labels)


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunResult:
    out: Path
    adapter_dir: Path
    losses: list[float]
    eval_loss: float | None
    steps: int
    eval_loss_before: float | None = None  # before the first step (a fresh run with eval examples)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    return torch.device(name)


class LocalEngine:
    """Forward and backward in this process: the whole model, with the adapter attached.

    The distributed counterpart (runtime/train/remote.py) has the same three methods, so
    finetune's loop is one loop for both.
    """

    def __init__(self, model, kernels: str = "eager", methods=()) -> None:
        self.model = model
        self.adapter = model.adapter
        self.kernels = kernels
        self._stats = Recorder()  # what methods record in the step's forwards (UniPELT's gates)
        if kernels != "eager":  # the blocks run through one executor (compute.executor)
            model.runner = BlockExecutor(kernels).runner(methods_to_json(methods) if methods else "")

    def loss_sum(self, batch) -> float:
        """Summed loss of one batch, no gradients (evaluation)."""
        with torch.no_grad():
            return float(batch_loss_sum(self.model, batch.input_ids, batch.labels))

    def accumulate(self, micros: list[tuple[tuple, Any]], total_tokens: int) -> float:
        """Backward of every (dropout_key, micro-batch); returns the step's mean loss."""
        loss_sum = 0.0
        for key, batch in micros:
            with recording(self._stats):
                loss = batch_loss_sum(self.model, batch.input_ids, batch.labels, key) / max(1, total_tokens)
            loss.backward()
            loss_sum += float(loss.detach())
        return loss_sum

    def step_metrics(self) -> dict[str, Any]:
        means, self._stats = self._stats.means(), Recorder()
        return {"recorded": means} if means else {}

    def prepare_next_step(self) -> None:
        pass

    def close(self) -> None:
        pass


def evaluate(engine, adapter, examples, batch_size: int, pad_id: int, device: torch.device) -> float | None:
    """Mean next-token loss over the supervised tokens of `examples`."""
    from edgetune.runtime.train.data import collate

    if not examples:
        return None
    adapter.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size], pad_id).to(device)
            total += engine.loss_sum(batch)
            count += batch.num_tokens
    finally:
        adapter.train()
    return total / max(1, count)


def finetune(cfg: TrainConfig, on_step: Callable[[dict[str, Any]], None] | None = None, stop_after: int | None = None) -> RunResult:
    """Run (or resume) local fine-tuning; returns where the adapter landed and the losses.

    `stop_after` ends the run early after that step, as an interruption would
    (used by tests of --resume).
    """
    from edgetune.runtime.model.loader import load_model, resolve_model_folder
    from edgetune.runtime.peft import attach_adapter
    from edgetune.runtime.peft.hf_format import save_adapter
    from edgetune.runtime.text.tokenizer import load_tokenizer
    from edgetune.runtime.train import checkpoints as checkpointing
    from edgetune.runtime.train.data import (
        BatchStream,
        load_records,
        resolve_pad_id,
        split_train_eval,
        tokenize_records,
    )

    # -- setup --------------------------------------------------------------
    methods = cfg.methods()  # validates the method options before any long work starts
    if cfg.threads > 0 or cfg.distributed:
        from edgetune.runtime.threads import set_threads

        set_threads(cfg.threads)  # distributed default: the cores shared among edgetune processes here
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    remote = None
    if cfg.distributed:
        from edgetune.runtime.train.remote import RemoteTrainer

        remote = RemoteTrainer.connect(cfg)  # the route, and the edge's part of the model
        folder = remote.folder
    else:
        folder = resolve_model_folder(cfg.model)
    tokenizer = load_tokenizer(folder)
    examples = tokenize_records(load_records(cfg.data), tokenizer, cfg.max_seq_len,
                                special_tokens_in_text=cfg.special_tokens_in_text)
    if cfg.eval_data:
        train_examples = examples
        eval_examples = tokenize_records(load_records(cfg.eval_data), tokenizer, cfg.max_seq_len,
                                         special_tokens_in_text=cfg.special_tokens_in_text)
    else:
        train_examples, eval_examples = split_train_eval(examples, cfg.eval_fraction, cfg.seed)
    pad_id = resolve_pad_id(tokenizer)
    stream = BatchStream(train_examples, cfg.batch_size, cfg.seed, pad_id)
    cfg = _resolve_micro_batches(cfg, out, remote)
    if remote is not None:
        engine = remote.start(methods, device)
        model, adapter = engine.model, engine.adapter
        model.head_dtype = torch_dtype(resolve_head_dtype(cfg.head_dtype, str(device), model.config.vocab_size))
    else:
        model = load_model(folder, device=device)
        adapter = attach_adapter(model, methods, seed=cfg.seed)
        engine = LocalEngine(model, resolve_kernels(cfg.kernels, str(device)), methods)
        model.head_dtype = torch_dtype(resolve_head_dtype(cfg.head_dtype, str(device), model.config.vocab_size))
    adapter.train()
    params = list(adapter.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg))
    state = TrainState()
    checkpoints = checkpointing.CheckpointDir(out / "checkpoints", keep=cfg.keep_checkpoints)
    if cfg.resume:
        checkpoints.restore_latest(cfg, adapter, optimizer, scheduler, stream, state)  # masks included
    else:
        checkpoints.refuse_existing()
        from edgetune.runtime.train.calibrate import choose_sparse_masks

        choose_sparse_masks(engine, adapter, train_examples, cfg.calibration_examples, pad_id, device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "model_folder": str(folder)}, indent=2))
    metrics = _open_metrics(out / "metrics.jsonl")
    log.info("training %s (%d trainable parameters) on %d examples (%d eval), %d steps%s",
             cfg.method, adapter.num_parameters(), len(train_examples), len(eval_examples), cfg.steps,
             f" through {remote.client.address}" if remote is not None else "")

    # -- train ----------------------------------------------------------------
    eval_loss = eval_before = None
    bar = None
    try:
        if state.step == 0 and eval_examples:  # the baseline the run improves on
            eval_before = evaluate(engine, adapter, eval_examples, cfg.batch_size, pad_id, device)
            metrics.write(json.dumps({"step": 0, "eval_loss": eval_before}) + "\n")
            log.info("eval loss before training: %.4f", eval_before)
        bar = _progress(cfg, state.step)
        while state.step < cfg.steps:
            record = train_step(engine, params, optimizer, scheduler, stream, cfg, state, device)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
                record["eval_loss"] = evaluate(engine, adapter, eval_examples, cfg.batch_size, pad_id, device)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if on_step is not None:
                on_step(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(_postfix(record))
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.steps:
                checkpoints.save(cfg, adapter, optimizer, scheduler, stream, state)
            if stop_after is not None and state.step >= stop_after:
                break
        finished = state.step >= cfg.steps
        if finished:
            eval_loss = evaluate(engine, adapter, eval_examples, cfg.batch_size, pad_id, device)
            metrics.write(json.dumps({"step": state.step, "eval_loss": eval_loss}) + "\n")
        checkpoints.save(cfg, adapter, optimizer, scheduler, stream, state)
    finally:
        metrics.close()
        engine.close()
        if bar is not None:
            bar.close()

    # -- save -------------------------------------------------------------------
    adapter_dir = out / "adapter"
    save_adapter(adapter, adapter_dir, base_model_name_or_path=str(folder))
    tokenizer.save(adapter_dir)  # so the adapter folder is self-contained for chat templates
    return RunResult(out, adapter_dir, [h["loss"] for h in state.history], eval_loss, state.step, eval_before)


def _resolve_micro_batches(cfg: TrainConfig, out: Path, remote) -> TrainConfig:
    """`micro_batches` 0 (auto) made concrete before the first step, since dropout masks are keyed by
    micro-batch: 1 locally; on a cluster, what the run's config.json recorded (--resume), else chosen
    from the measured round trip to the route (RemoteTrainer.choose_micro_batches)."""
    if cfg.micro_batches:
        return cfg
    if remote is None:
        return replace(cfg, micro_batches=1)
    chosen = _recorded_micro_batches(out / "config.json") if cfg.resume else None
    if chosen is None:
        chosen = remote.choose_micro_batches(cfg.batch_size, cfg.max_seq_len)
    remote.cfg = cfg = replace(cfg, micro_batches=min(chosen, cfg.batch_size))
    return cfg


def _recorded_micro_batches(path: Path) -> int | None:
    from edgetune.runtime.errors import CheckpointError
    from edgetune.runtime.jsonfile import read_json_object

    if not path.exists():
        return None
    recorded = read_json_object(path, CheckpointError, "--resume reads the micro-batches chosen at the start from it")
    chosen = recorded.get("micro_batches")
    if not isinstance(chosen, int) or chosen <= 0:
        return None
    log.info("micro-batches: %d, as recorded in %s", chosen, path)
    return chosen


def train_step(engine, params, optimizer, scheduler, stream, cfg: TrainConfig, state: TrainState, device) -> dict[str, Any]:
    """One optimizer step over `grad_accum` batches, each split in `micro_batches`; the loss is
    the mean over all their supervised tokens. Dropout masks are keyed by (seed, step, micro)."""
    start = time.perf_counter()
    batches = [stream.next_batch().to(device) for _ in range(cfg.grad_accum)]
    total_tokens = sum(b.num_tokens for b in batches)
    micros = [((cfg.seed, state.step, a * cfg.micro_batches + m), mb)
              for a, batch in enumerate(batches) for m, mb in enumerate(batch.split(cfg.micro_batches))]
    optimizer.zero_grad(set_to_none=True)
    loss_sum = engine.accumulate(micros, total_tokens)
    extra: dict[str, Any] = {}
    penalty = engine.adapter.regularizer()  # from the edge's own tensors (AdaLoRA's orthogonality)
    if penalty is not None:
        penalty.backward()
        extra["regularizer"] = float(penalty.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    extra.update(engine.adapter.after_optimizer_step(state.step))  # before the new version leaves (AdaLoRA's ranks)
    engine.prepare_next_step()  # distributed: the new adapter version leaves now
    scheduler.step()
    state.step += 1
    seen = sum(int(b.attention_mask.sum()) for b in batches)
    state.tokens_seen += seen
    elapsed = time.perf_counter() - start
    record = {"step": state.step, "loss": loss_sum, "lr": lr, "tokens": seen, "tokens_per_s": seen / elapsed,
              "grad_norm": None if grad_norm is None else float(grad_norm), "time_s": elapsed, **extra,
              **engine.step_metrics()}
    state.history.append(record)
    return record


def _open_metrics(path: Path):
    """metrics.jsonl for appending; a line cut short by a killed run is dropped first, so the
    next record starts on a line of its own (records of replayed steps simply repeat)."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return path.open("a", encoding="utf-8")


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    shown = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tokens_per_s']:.0f}"}
    if "bytes_sent" in record:
        shown["MB_sent"] = f"{record['bytes_sent'] / 2**20:.1f}"
        shown["MB_recv"] = f"{record['bytes_received'] / 2**20:.1f}"
    return shown


def _progress(cfg: TrainConfig, initial: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=initial, desc="finetune", unit="step", dynamic_ncols=True)
