"""Calibration before training: the empirical Fisher of the base weights (FishMask, Sung et al. 2021).

For every targeted (out, in) weight W,

    F(W) = sum over calibration sequences s of (d loss_s / d W)^2        (elementwise)

with loss_s the training loss (`loop.batch_loss_sum`) summed over sequence s's supervised
tokens. Each sequence has its own backward: squaring a batch's summed gradient would
mix sequences (FishMask squares per-example gradients). The gradients come from
`FisherProbeConfig`'s zero probes D beside the frozen weights (d loss / d D = d loss / d W),
so the base weights never require grad. The scores feed `peft.sparse.choose_masks`.

This is the local path: the whole model in this process. A distributed edge has its
nodes compute their blocks' scores with the same probes.

    >>> scores = fisher_scores(model, FisherProbeConfig(target_modules=("q_proj", "v_proj")), batches)
    >>> choose_masks(model.adapter, 0, scores)
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from edgetune.runtime.errors import ConfigError
from edgetune.runtime.peft.adapter import Adapter
from edgetune.runtime.peft.sparse import PROBE, FisherProbeConfig
from edgetune.runtime.train.data import IGNORE_INDEX, Batch
from edgetune.runtime.train.loop import batch_loss_sum

if TYPE_CHECKING:  # pragma: no cover
    from edgetune.runtime.model.transformer import CausalLM


def fisher_scores(model: CausalLM, probe_method: FisherProbeConfig,
                  micro_batches: Iterable[Batch]) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, module): sum of squared per-sequence gradients (out, in), fp32} of the base model.

    The model runs without its adapter (and without a compiled runner) meanwhile: the mask
    is chosen at the pretrained weights, as FishMask does. Sequences without a supervised
    token are skipped.
    """
    probes = {block.layer_idx: probe_method.probe_tensors(block) for block in model.blocks()}
    probes = {layer: t for layer, t in probes.items() if t}
    if not probes:
        raise ConfigError("Fisher calibration: the probe targets no module of this model; "
                          "check target_modules / layers_to_transform")
    keys = [(layer, name) for layer in sorted(probes) for name in probes[layer]]
    leaves = [probes[layer][name] for layer, name in keys]
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in leaves]  # (out, in) each
    saved = model.adapter, model.runner
    model.adapter, model.runner = Adapter([probe_method], [probes], [{}]), None
    try:
        for batch in micro_batches:
            for row in range(batch.input_ids.shape[0]):
                labels = batch.labels[row:row + 1]  # (1, T)
                supervised = (labels[0] != IGNORE_INDEX).nonzero()
                if supervised.numel() == 0:
                    continue
                end = int(supervised[-1]) + 1  # causal: later (padding) tokens change nothing
                loss = batch_loss_sum(model, batch.input_ids[row:row + 1, :end], labels[:, :end])
                for total, grad in zip(sums, torch.autograd.grad(loss, leaves, allow_unused=True)):
                    if grad is not None:  # None: the module does not reach this loss
                        total.add_(grad.float().square())
    finally:
        model.adapter, model.runner = saved
    return {(layer, name.removesuffix(PROBE)): total for (layer, name), total in zip(keys, sums)}


def calibration_sequences(examples, count: int, pad_id: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `count` examples with a supervised token, each as (input_ids, labels) (1, T) cut after
    its last supervised token: what the Fisher is summed over, locally and on a cluster alike."""
    from edgetune.runtime.train.data import collate

    out = []
    for example in examples:
        if len(out) == count:
            break
        batch = collate([example], pad_id).to(device)
        supervised = (batch.labels[0] != IGNORE_INDEX).nonzero()
        if supervised.numel():
            end = int(supervised[-1]) + 1
            out.append((batch.input_ids[:, :end], batch.labels[:, :end]))
    return out


def choose_sparse_masks(engine, adapter: Adapter, examples, count: int, pad_id: int, device) -> None:
    """Before the first step of a fresh run: the final mask of every sparse method whose mask is
    chosen from the weights (fisher, magnitude; a random mask is drawn at creation). Locally from
    the model here; on a cluster by the nodes, which hold the weights: the edge sends the
    calibration sequences through a probe session and gets back only each weight's kept
    indices (see RemoteEngine.calibrate)."""
    import logging
    import time

    from edgetune.runtime.peft.adapter import split_block_key
    from edgetune.runtime.peft.sparse import INDICES, SparseMethod, choose_masks, set_masks

    log = logging.getLogger("edgetune.train")
    for k, method in enumerate(adapter.methods):
        if not isinstance(method, SparseMethod) or method.mask == "random":
            continue
        started = time.perf_counter()
        sequences = calibration_sequences(examples, count, pad_id, device) if method.mask == "fisher" else []
        if method.mask == "fisher" and not sequences:
            raise ConfigError("sparse --mask fisher: no training example has a supervised token to estimate the "
                              "Fisher on")
        probe = method.probe()
        if hasattr(engine, "calibrate"):  # a cluster: the nodes score and choose
            kept = engine.calibrate(probe, sequences)
            chosen = {}
            for key, t in kept.items():
                if key.endswith(INDICES):
                    _, layer, name = split_block_key(key)
                    chosen[(layer, name.removesuffix(INDICES))] = t  # set_masks checks dtype, order and range
            set_masks(adapter, k, chosen)
        elif method.mask == "fisher":
            batches = [Batch(ids, labels, torch.ones_like(ids), int((labels != IGNORE_INDEX).sum()))
                       for ids, labels in sequences]
            choose_masks(adapter, k, fisher_scores(engine.model, probe, batches))
        else:
            choose_masks(adapter, k, model=engine.model)
        log.info("sparse masks chosen by %s%s in %.1f s", method.mask,
                 f" on {len(sequences)} calibration sequences" if sequences else "", time.perf_counter() - started)
