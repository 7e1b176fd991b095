"""Sparse fine-tuning (unstructured masking): train k chosen entries of each targeted weight.

For a targeted linear y = x W^T + b (W: (out, in)), a fixed set of k flat,
row-major positions `idx` into W and k trained values `v`:

    y + x delta^T,    delta = zeros(out * in).scatter(idx, v).view(out, in)

`v` starts at 0, so training starts at the base model; `idx` is frozen (see
`Method.is_frozen`: no gradient, no optimizer state, pushed to a node once per
session). It merges exactly: W.view(-1)[idx] += v.

Two sizes of the same rule:

- `ShiraConfig` (SHiRA, Bhardwaj et al. 2024; HF PEFT's SHIRA): k = r (in + out),
  as many numbers as a rank-r LoRA, capped at in * out. Saved in PEFT's layout.
- `SparseConfig` (FishMask, Sung et al. 2021): k = round(density * in * out), at
  least 1. Saved as edgetune's EDGETUNE_SPARSE.

Which entries (`mask`):

- "random": drawn once from a CPU generator seeded by (seed, layer, module), on
  any machine, from shapes alone -- SHiRA's default.
- "magnitude": the k largest |W|; "fisher": the k largest empirical-Fisher
  entries sum_seq (d loss_seq / d W)^2 (FishMask). Both need the base weights or
  calibration data, so `init_block` (which may see meta-device stand-ins) draws
  the random mask as a placeholder and `choose_masks` replaces it before training;
  runtime/train/calibrate.py computes the Fisher scores with `FisherProbeConfig`.

Block tensors per targeted module (names edgetune's, saved names in hf_format.py):
    "{module}.sparse_indices"  int64 (k,), sorted ascending, unique, in [0, out * in)
    "{module}.sparse_values"   float (k,)
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from edgetune.runtime.errors import AdapterError, ConfigError
from edgetune.runtime.model.config import ModelConfig
from edgetune.runtime.peft.base import Method, Tensors, matches_target
from edgetune.runtime.peft.rng import key_seed

if TYPE_CHECKING:  # pragma: no cover
    from edgetune.runtime.model.transformer import Block, CausalLM
    from edgetune.runtime.peft.adapter import Adapter

MASKS = ("fisher", "magnitude", "random")
INDICES, VALUES, PROBE = ".sparse_indices", ".sparse_values", ".fisher_probe"
SCORES = ".sparse_scores"  # what a calibrating node sends back beside the indices it keeps


# =============================================================== mask selection (pure)
def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The flat row-major positions of the k largest scores (out, in), sorted ascending, int64 (k,).

    Ties go to the lower flat index (a stable sort), so every machine picks the same mask."""
    flat = scores.detach().reshape(-1)  # (out * in,)
    if not 0 < k <= flat.numel():
        raise ValueError(f"k must be in [1, {flat.numel()}], got {k}")
    order = torch.sort(flat, descending=True, stable=True).indices  # (out * in,)
    return torch.sort(order[:k]).values.to(torch.int64)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| (out, in) in fp32: the magnitude mask keeps the largest base weights."""
    return weight.detach().abs().float()


def random_indices(d_out: int, d_in: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """k distinct flat positions into an (out, in) weight drawn uniformly, sorted ascending, int64 (k,).

    numpy's sampler without replacement takes O(k) for a sparse draw (a 70B model's weights are
    too many to permute each), is the same on every platform (PCG64), and works where torch would
    only make shapes (a meta-device or fake-tensor context)."""
    n = d_out * d_in
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    return torch.from_numpy(np.sort(rng.choice(n, k, replace=False, shuffle=False)).astype(np.int64))


def entries(method: SparseMethod, d_out: int, d_in: int) -> int:
    """k: how many entries of a (d_out, d_in) weight `method` trains."""
    return method.entries(d_out, d_in)


def mask_generator(seed: int, layer: int, module: str) -> np.random.Generator:
    """The generator of one module's random mask: a pure function of (seed, layer, module),
    independent of the adapter's own generator, so stacking methods never changes a mask."""
    return np.random.Generator(np.random.PCG64(key_seed(("sparse_mask", seed, layer, module))))


# =============================================================== configs
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class _Targeted(Method):
    """Target fields shared by the sparse methods and the Fisher probe."""

    target_modules: str | tuple[str, ...] = ("q_proj", "v_proj")
    layers_to_transform: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = self._problems()
        if problems:
            raise ConfigError(f"{type(self).__name__}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if not self.target_modules:
            problems.append("target_modules is empty")
        if self.layers_to_transform is not None and not all(_is_int(l) for l in self.layers_to_transform):
            problems.append(f"layers_to_transform must be ints, got {self.layers_to_transform!r}")
        return problems

    def targeted(self, block: Block) -> Iterator[tuple[str, torch.nn.Linear]]:
        """(module name, linear) of every linear of `block` this method targets."""
        if self.layers_to_transform is not None and block.layer_idx not in self.layers_to_transform:
            return
        for name, linear in block.linears().items():
            if matches_target(self.target_modules, block.layer_idx, name):
                yield name, linear


@dataclass(frozen=True)
class SparseMethod(_Targeted):
    """k trained entries per targeted linear; subclasses say how many (`entries`)."""

    mask: str = "fisher"  # fisher | magnitude | random
    seed: int = 0  # of the random mask (and the placeholder of the others)

    survey_branch = "selective"  # unstructured masking
    mergeable = True

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.mask not in MASKS:
            problems.append(f"mask must be one of {', '.join(MASKS)}, got {self.mask!r}")
        if not _is_int(self.seed):
            problems.append(f"seed must be an int, got {self.seed!r}")
        return problems

    def entries(self, d_out: int, d_in: int) -> int:
        raise NotImplementedError

    def is_frozen(self, name: str) -> bool:
        return name.endswith(INDICES)

    def probe(self) -> FisherProbeConfig:
        """The calibration method that scores this method's entries where the weights are (a node)."""
        r, density = (self.r, 0.0) if isinstance(self, ShiraConfig) else (0, self.density)
        return FisherProbeConfig(target_modules=self.target_modules, layers_to_transform=self.layers_to_transform,
                                 score=self.mask, r=r, density=density)

    # -- tensors ------------------------------------------------------------
    def init_block(self, config, block, generator: torch.Generator) -> Tensors:
        """Zero values and the random mask (the final one for mask="random", else a placeholder
        choose_masks replaces). Reads only shapes, so meta-device blocks do; `generator` is unused."""
        out: Tensors = {}
        for name, linear in self.targeted(block):
            d_out, d_in = linear.weight.shape
            k = self.entries(d_out, d_in)
            out[name + INDICES] = random_indices(d_out, d_in, k, mask_generator(self.seed, block.layer_idx, name))
            out[name + VALUES] = torch.zeros(k)  # (k,)
        return out

    # -- rule -----------------------------------------------------------------
    def post_linear(self, t: Tensors, name: str, x, y, weight, bias, dropout_key) -> torch.Tensor:
        idx = t.get(name + INDICES)
        if idx is None:
            return y
        d_out, d_in = y.shape[-1], x.shape[-1]
        return y + F.linear(x, _dense_delta(idx, t[name + VALUES], d_out, d_in))  # (..., out)

    # -- merging --------------------------------------------------------------
    def _deltas(self, t: Tensors, block: Block) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for name, linear in block.linears().items():
            if name + INDICES in t:
                W = linear.weight
                yield W.view(-1), t[name + INDICES].to(W.device), t[name + VALUES].to(W.dtype)  # (out*in,), (k,), (k,)

    def merge(self, t: Tensors, block: Block) -> Tensors:
        for flat, idx, values in self._deltas(t, block):
            flat.index_add_(0, idx, values)
        return {}

    def unmerge(self, t: Tensors, block: Block, undo: Tensors) -> None:
        for flat, idx, values in self._deltas(t, block):
            flat.index_add_(0, idx, values, alpha=-1)


def _dense_delta(idx: torch.Tensor, values: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """The (out, in) update holding `values` at the flat positions `idx` (differentiable in values)."""
    return values.new_zeros(d_out * d_in).scatter(0, idx, values).view(d_out, d_in)  # (out, in)


@dataclass(frozen=True)
class ShiraConfig(SparseMethod):
    """SHiRA: r (in + out) entries per targeted linear, as many numbers as a rank-r LoRA."""

    r: int = 32

    peft_type = "SHIRA"

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if not _is_int(self.r) or self.r <= 0:
            problems.append(f"r must be a positive int, got {self.r!r}")
        return problems

    def entries(self, d_out: int, d_in: int) -> int:
        # PEFT refuses r (in + out) > in * out; edgetune trains the whole weight then (see shira_to_hf)
        return min(self.r * (d_in + d_out), d_in * d_out)


@dataclass(frozen=True)
class SparseConfig(SparseMethod):
    """FishMask-style sparse fine-tuning: a fraction `density` of each targeted weight's entries."""

    density: float = 0.01

    peft_type = "EDGETUNE_SPARSE"

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not 0 < self.density <= 1:
            problems.append(f"density must be in (0, 1], got {self.density!r}")
        return problems

    def entries(self, d_out: int, d_in: int) -> int:
        return max(1, round(self.density * d_in * d_out))


# =============================================================== Fisher probe
@dataclass(frozen=True)
class FisherProbeConfig(_Targeted):
    """Not a trainable method: a zero (out, in) probe D beside each targeted weight, so that
    y + x D^T leaves the forward unchanged while d loss / d D = d loss / d W -- the gradient of a
    frozen weight, without making the weight itself require grad. `init_block` gives nothing;
    whoever calibrates creates the probes (`probe_tensors`) and reads their gradients
    (runtime/train/calibrate.py locally; a node for its own blocks)."""

    score: str = "fisher"  # what choose() ranks by: fisher (the probes' squared gradients) or magnitude (|W|)
    r: int = 0  # entries kept per weight: r * (in + out) (SHiRA) ...
    density: float = 0.01  # ... or this fraction of in * out (when r is 0)

    peft_type = "EDGETUNE_FISHER_PROBE"  # never saved

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.score not in ("fisher", "magnitude"):
            problems.append(f"score must be fisher or magnitude, got {self.score!r}")
        if not _is_int(self.r) or isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            problems.append(f"r must be an int and density a number, got r={self.r!r}, density={self.density!r}")
        elif self.r < 0 or (self.r == 0 and not 0 < self.density <= 1):
            problems.append(f"r must be positive, or density in (0, 1]; got r={self.r!r}, density={self.density!r}")
        return problems

    def kept(self) -> SparseMethod:
        """The sparse method whose entries this probe chooses (for its entry count)."""
        if self.r > 0:
            return ShiraConfig(r=self.r, target_modules=self.target_modules, layers_to_transform=self.layers_to_transform)
        return SparseConfig(density=self.density, target_modules=self.target_modules,
                            layers_to_transform=self.layers_to_transform)

    def choose(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, their scores): the kept entries of one weight by `scores` (out, in), as choose_masks keeps them."""
        idx = top_k_indices(scores, self.kept().entries(*scores.shape))  # (k,)
        return idx, scores.reshape(-1)[idx]

    def probe_tensors(self, block: Block) -> Tensors:
        """{"{module}.fisher_probe": zeros (out, in), requires grad} for the targeted linears of a real block."""
        return {name + PROBE: torch.zeros(linear.weight.shape, dtype=linear.weight.dtype, device=linear.weight.device,
                                          requires_grad=True)
                for name, linear in self.targeted(block)}

    def post_linear(self, t: Tensors, name: str, x, y, weight, bias, dropout_key) -> torch.Tensor:
        probe = t.get(name + PROBE)
        return y if probe is None else y + F.linear(x, probe)  # (..., out), equal to y (probe = 0)


# =============================================================== choosing the masks
def choose_masks(adapter: Adapter, k: int, scores: Mapping[tuple[int, str], torch.Tensor] | None = None,
                 model: CausalLM | None = None) -> None:
    """Fill method k's `sparse_indices` in place with its final masks, before training.

    mask="fisher" takes the top entries of `scores` ({(layer, module): (out, in)}, from
    calibrate.fisher_scores); "magnitude" of `scores` when given, else of |W| of `model`'s
    blocks; "random" keeps the mask init_block drew. Refuses an adapter whose values have
    already moved (a new mask would reassign trained values to other weights).
    """
    method = adapter.methods[k]
    if not isinstance(method, SparseMethod):
        raise AdapterError(f"choose_masks: method {k} is {type(method).__name__}, not a sparse method")
    if method.mask == "random":
        return
    if scores is None and (method.mask == "fisher" or model is None):
        need = "Fisher scores (calibrate.fisher_scores)" if method.mask == "fisher" else "scores or the model"
        raise AdapterError(f"choose_masks: mask={method.mask!r} needs {need}")
    shapes = adapter.model_config.linear_shapes() if adapter.model_config is not None else {}
    chosen = {}  # every new mask first: a refusal leaves the adapter as it was
    for layer, ts in adapter.block_tensors[k].items():
        for name in [n for n in ts if n.endswith(INDICES)]:
            module = name.removesuffix(INDICES)
            values = ts[module + VALUES]
            _untrained(values, layer, module)
            if scores is not None:
                if (layer, module) not in scores:
                    raise AdapterError(f"choose_masks: no scores for layer {layer} {module}")
                s = scores[(layer, module)]
            else:
                s = magnitude_scores(model.block(layer).linears()[module].weight)
            if module in shapes and tuple(s.shape) != shapes[module]:
                raise AdapterError(f"choose_masks: scores of layer {layer} {module} have shape {tuple(s.shape)}, "
                                   f"the weight {shapes[module]}")
            if not bool(torch.isfinite(s).all()):
                raise AdapterError(f"choose_masks: the scores of layer {layer} {module} are not all finite")
            chosen[(layer, module)] = top_k_indices(s, values.numel())
    set_masks(adapter, k, chosen)


def _untrained(values: torch.Tensor, layer: int, module: str) -> None:
    if bool(values.count_nonzero()):
        raise AdapterError(f"choose_masks: layer {layer} {module} has trained values; choose masks before training")


def set_masks(adapter: Adapter, k: int, chosen: Mapping[tuple[int, str], torch.Tensor]) -> None:
    """Write method k's masks, {(layer, module): sorted unique int64 (k,) flat indices}, before training
    (choose_masks' result, or what a cluster's nodes chose for their blocks). Every targeted module
    needs one; all are checked before any is written."""
    checked = []
    for layer, ts in adapter.block_tensors[k].items():
        for name in [n for n in ts if n.endswith(INDICES)]:
            module = name.removesuffix(INDICES)
            values, new = ts[module + VALUES], chosen.get((layer, module))
            _untrained(values, layer, module)
            if new is None:
                raise AdapterError(f"no mask was chosen for layer {layer} {module}")
            shape = adapter.model_config.linear_shapes().get(module) if adapter.model_config is not None else None
            size = shape[0] * shape[1] if shape else None  # entries of the weight
            ordered = new.numel() < 2 or bool((new[1:] > new[:-1]).all())
            inside = new.numel() == 0 or (int(new[0]) >= 0 and (size is None or int(new[-1]) < size))
            if new.dtype != torch.int64 or tuple(new.shape) != tuple(values.shape) or not ordered or not inside:
                raise AdapterError(f"the mask chosen for layer {layer} {module} is not {values.numel()} sorted, unique "
                                   f"int64 positions inside the weight (got {new.dtype} {tuple(new.shape)})")
            checked.append((ts[name], new))
    with torch.no_grad():
        for idx, new in checked:
            idx.copy_(new.to(idx.device))


# =============================================================== HF PEFT's SHIRA format
# (hf_format imports this module, so its helpers are imported where they are used)
def shira_to_hf(m: ShiraConfig, mc: ModelConfig | None) -> dict[str, Any]:
    """PEFT's ShiraConfig fields for `m`. PEFT has no layers_to_transform: the targeted modules are
    named then. mask_type records how the mask was chosen; PEFT only rebuilds "random" masks, and
    the saved indices replace any mask it builds. PEFT refuses a module with r (in + out) > in * out,
    which edgetune trains whole: such a folder loads in edgetune only."""
    from edgetune.runtime.model.transformer import LINEAR_NAMES
    from edgetune.runtime.peft import hf_format as hf

    targets = hf._json_targets(m.target_modules)
    if m.layers_to_transform is not None:
        pairs = hf._targeted(m.target_modules, m.layers_to_transform, hf._need(mc, m).num_layers, LINEAR_NAMES)
        targets = [hf._full(l, n) for l, n in pairs]
    return {"r": m.r, "mask_type": m.mask, "random_seed": m.seed, "target_modules": targets,
            "fan_in_fan_out": False, "init_weights": True, "modules_to_save": None}


def shira_from_hf(cfg: dict[str, Any], source: str) -> ShiraConfig:
    """The ShiraConfig of a PEFT `adapter_config.json` dict. A mask_type edgetune does not know (a
    custom mask_fn) reads as "random": the saved indices are the mask either way."""
    from edgetune.runtime.peft import hf_format as hf

    hf._refuse_unknown(cfg, {"r", "mask_type", "random_seed", "target_modules", "init_weights"}, source)
    seed = cfg.get("random_seed")
    mask = cfg.get("mask_type")
    return ShiraConfig(r=cfg.get("r", 32), target_modules=hf._targets_from(cfg, "target_modules", source),
                       mask=mask if mask in MASKS else "random", seed=0 if seed is None else seed)


def _module_shape(mc: ModelConfig, name: str) -> tuple[int, int] | None:
    """(out, in) of the linear a tensor name ('self_attn.q_proj.sparse_indices') belongs to, or None."""
    return mc.linear_shapes().get(name.rsplit(".", 1)[0])


def shira_tensors_to_hf(method: Method, saved: dict[str, torch.Tensor], mc: ModelConfig | None) -> dict[str, torch.Tensor]:
    """Saved tensors with SHiRA's indices in PEFT's form: int32 (2, k), rows then columns."""
    from edgetune.runtime.peft import hf_format as hf

    out = dict(saved)
    for key, idx in saved.items():
        if key.endswith(".shira_indices"):
            d_in = _module_shape(hf._need(mc, method), key.rsplit(".layers.", 1)[1].split(".", 1)[1])[1]
            out[key] = torch.stack([idx // d_in, idx % d_in]).to(torch.int32)  # (2, k)
    return out


def sparse_tensors_from_hf(method: Method, loaded: dict[str, torch.Tensor], mc: ModelConfig,
                           source: str) -> dict[str, torch.Tensor]:
    """Loaded 'layers.{i}.{tensor}' tensors with each module's indices checked and made edgetune's:
    int64 (k,) flat, sorted ascending, with the values permuted alongside.

    SHiRA folders hold PEFT's (2, k) rows / columns (float32 where PEFT saved on Windows, exact
    integers accepted), EDGETUNE_SPARSE folders the flat form. A wrong dtype, shape, count, an
    index out of the weight or a repeated one raise AdapterError naming layer and module."""
    out = dict(loaded)
    for key, idx in loaded.items():
        if not key.endswith(INDICES):
            continue
        layer, name = key.split(".", 2)[1:]
        shape = _module_shape(mc, name)
        if shape is None:
            continue  # a module no block has: reported as unexpected when the adapter is filled
        where = f"{source}: layer {layer} {name.removesuffix(INDICES)}"
        flat = _flat_indices(idx, shape, method.entries(*shape), isinstance(method, ShiraConfig), where)
        order = torch.argsort(flat)
        out[key] = flat[order]
        values = loaded.get(key.removesuffix(INDICES) + VALUES)
        if values is not None:
            if tuple(values.shape) != (flat.numel(),):
                raise AdapterError(f"{where}: {flat.numel()} indices but values of shape {tuple(values.shape)}")
            out[key.removesuffix(INDICES) + VALUES] = values[order]
    return out


def _flat_indices(idx: torch.Tensor, shape: tuple[int, int], k: int, rows_cols: bool, where: str) -> torch.Tensor:
    """Validated flat int64 (k,) positions from a saved index tensor (see sparse_tensors_from_hf)."""
    d_out, d_in = shape
    integral = not idx.is_floating_point() or bool((torch.isfinite(idx) & (idx == idx.round())).all())
    if idx.dtype == torch.bool or idx.is_complex() or not integral or (idx.is_floating_point() and not rows_cols):
        raise AdapterError(f"{where}: indices must be integers, got {idx.dtype}")
    want = (2, k) if rows_cols else (k,)
    if tuple(idx.shape) != want:
        raise AdapterError(f"{where}: indices of shape {tuple(idx.shape)}, but this method trains {k} entries of "
                           f"the ({d_out}, {d_in}) weight: expected {want}")
    idx = idx.to(torch.int64)
    if rows_cols:
        rows, cols = idx[0], idx[1]
        if bool(((rows < 0) | (rows >= d_out) | (cols < 0) | (cols >= d_in)).any()):
            raise AdapterError(f"{where}: an index lies outside the ({d_out}, {d_in}) weight")
        idx = rows * d_in + cols
    elif bool(((idx < 0) | (idx >= d_out * d_in)).any()):
        raise AdapterError(f"{where}: an index lies outside [0, {d_out * d_in}) of the ({d_out}, {d_in}) weight")
    if torch.unique(idx).numel() != k:
        raise AdapterError(f"{where}: indices repeat; each entry of the weight may appear once")
    return idx
