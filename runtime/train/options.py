"""Options of a fine-tuning run: one frozen dataclass, filled from CLI flags and config files.

Torch-free, so `edgetune finetune --help` can show every default without
importing torch. Config files are YAML (.yaml/.yml) or TOML (.toml) with the
same option names as the flags (underscores or dashes); flags override them.

    # finetune.yaml
    model: embedded
    data: examples/data/assistant.jsonl
    method: lora
    rank: 8
    target_modules: [q_proj, v_proj]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgetune.runtime.compute.kernels import KERNELS
from edgetune.runtime.errors import ConfigError

METHOD_NAMES = ("lora", "dora", "ia3", "prefix", "prompt", "ln_tuning", "serial_adapter", "parallel_adapter", "bitfit",
                "sparse", "adalora", "vera", "lokr", "mam", "unipelt")
MASKS = ("fisher", "magnitude", "random")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a local fine-tuning run; CLI flags and config files fill it."""

    data: str = ""
    out: str = "runs/finetune"
    model: str = "embedded"
    # method
    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    layers_to_transform: tuple[int, ...] | None = None
    use_rslora: bool = False
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    bottleneck_size: int = 64
    adapter_scaling: float = 4.0
    mask: str = "fisher"  # sparse: how the trained entries are chosen (fisher, magnitude, random)
    density: float = 0.01  # sparse: fraction of each targeted weight trained (edgetune's own saved type)
    shira_rank: int = 0  # sparse: instead, exactly r * (in + out) entries per weight, saved in peft's SHIRA layout
    calibration_examples: int = 16  # sparse --mask fisher: training examples the Fisher is estimated on
    init_rank: int = 0  # adalora: every module's rank at the start; 0: 1.5 x --rank (peft's 12 for 8); --rank: the end
    tinit: int = 0  # adalora: steps before the first rank reduction
    tfinal: int = 0  # adalora: steps at the final budget at the end
    orth_reg_weight: float = 0.5  # adalora: weight of the orthogonality regularizer
    projection_seed: int = 0  # vera: seed of the shared random projections (rebuilt on every node)
    # optimisation
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    micro_batches: int = 0  # each batch is split in this many (pipelined when distributed); 0: auto (see loop)
    max_grad_norm: float = 1.0
    max_seq_len: int = 512
    special_tokens_in_text: bool = False  # the data's text may spell control tokens (<|im_end|>); off: plain text
    seed: int = 0
    # evaluation / checkpoints
    eval_fraction: float = 0.1
    eval_data: str = ""  # a held-out JSONL file for the eval loss (then eval_fraction is not used)
    eval_every: int = 0  # 0: only at the end
    save_every: int = 50  # 0: only at the end
    keep_checkpoints: int = 2
    resume: bool = False
    # hardware
    device: str = "cpu"
    threads: int = 0  # 0: torch's default (distributed: cores / edgetune processes on the host)
    head_dtype: str = "auto"  # the edge's LM-head matmuls in the loss: fp32, bf16, auto (bf16 for big heads where native)
    kernels: str = "auto"  # --local: eager, compiled, fused or auto (fused on CUDA, else eager); nodes pick their own
    progress: bool = True
    # distributed (empty coordinator: train in this process)
    coordinator: str = ""
    codec: str = "fp32"  # activations and their gradients on the wire: fp32, fp16, bf16, int8
    adapter_codec: str = "raw"  # adapter deltas and gradients on the wire: raw (exact), bf16, int8 (error feedback)
    token_file: str = ""  # --insecure only; default: ~/.config/edgetune/token
    insecure: bool = False  # plaintext with the shared token (loopback development), instead of mutual TLS
    credentials: str = ""  # the edge's credentials folder (default: ~/.config/edgetune/edge)
    join: str = field(default="", repr=False)  # a join string to redeem first (a secret: never recorded)
    identity: str = ""  # the edge's name when joining (default: edge-<host>)
    max_step_retries: int = 5  # replays of one step after node failures before giving up
    route_timeout_s: float = 300.0  # how long to wait for the coordinator to reassign blocks
    reply_timeout_s: float = 600.0  # longest silence from the route within one step
    verify: float = 0.0  # fraction of micro-batches recomputed on verifier replicas (train/verify.py); 0: none

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.layers_to_transform, list):
            object.__setattr__(self, "layers_to_transform", tuple(self.layers_to_transform))
        problems = []
        if not self.data:
            problems.append("data: a JSONL file is required")
        if self.method not in METHOD_NAMES:
            problems.append(f"method {self.method!r} not in {', '.join(METHOD_NAMES)}")
        if self.method == "sparse":
            if self.shira_rank < 0 or (not self.shira_rank and not 0 < self.density <= 1):
                problems.append(f"sparse: --density must be in (0, 1] (or --shira-rank positive), got density "
                                f"{self.density}, shira_rank {self.shira_rank}")
            if self.mask not in MASKS:
                problems.append(f"mask {self.mask!r} not in {', '.join(MASKS)}")
            if self.calibration_examples <= 0:
                problems.append(f"calibration_examples must be positive, got {self.calibration_examples}")
        if self.method == "adalora":
            if not 0 < self.rank <= self.adalora_init_rank:
                problems.append(f"adalora: --rank (the average rank it ends at, {self.rank}) must be in "
                                f"[1, --init-rank = {self.adalora_init_rank}]")
            if self.steps <= self.tinit + self.tfinal:
                problems.append(f"adalora: --steps ({self.steps}) must exceed --tinit + --tfinal "
                                f"({self.tinit} + {self.tfinal}): the ranks are pruned in between")
        if self.method == "unipelt":
            targets = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
            if not set(targets) <= {"q_proj", "k_proj", "v_proj"}:
                problems.append(f"unipelt: --target-modules (its gated LoRA) must be among q_proj, k_proj, v_proj, "
                                f"got {','.join(targets)}")
        if self.method == "mam" and self.layers_to_transform is not None:
            problems.append("mam: --layers-to-transform would restrict its parallel adapter but not its prefix, "
                            "which attends in every block; leave it out")
        for name in ("steps", "batch_size", "grad_accum", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.micro_batches < 0:
            problems.append(f"micro_batches must be positive, or 0 to choose them automatically; got {self.micro_batches}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not 0 <= self.eval_fraction < 1:
            problems.append(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            problems.append(f"warmup_steps must be in [0, steps], got {self.warmup_steps}")
        if self.micro_batches > self.batch_size:
            problems.append(f"micro_batches ({self.micro_batches}) cannot exceed batch_size ({self.batch_size})")
        if self.codec not in ("fp32", "fp16", "bf16", "int8"):
            problems.append(f"codec {self.codec!r} not in fp32, fp16, bf16, int8")
        if self.adapter_codec not in ("raw", "bf16", "int8"):
            problems.append(f"adapter_codec {self.adapter_codec!r} not in raw, bf16, int8")
        if self.insecure and self.join:
            problems.append("join: --insecure uses the shared token file; a join string is for mutual TLS")
        if self.coordinator and ":" not in self.coordinator:
            problems.append(f"coordinator {self.coordinator!r} must be HOST:PORT")
        if self.head_dtype not in ("auto", "fp32", "bf16"):
            problems.append(f"head_dtype {self.head_dtype!r} not in auto, fp32, bf16")
        if self.kernels not in KERNELS:
            problems.append(f"kernels {self.kernels!r} not in {', '.join(KERNELS)}")
        if not 0 <= self.verify <= 1:
            problems.append(f"verify must be a fraction of micro-batches in [0, 1], got {self.verify}")
        elif self.verify and not self.distributed:
            problems.append("verify checks a cluster's nodes on replicas: it needs --coordinator (or --join)")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            problems.append(f"device {self.device!r} not in cpu, cuda, cuda:N, auto")
        if problems:
            raise ConfigError("finetune config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @property
    def distributed(self) -> bool:
        """Train on a cluster: a coordinator is named, or a join string / credentials say which."""
        return bool(self.coordinator or self.join or self.credentials)

    @property
    def adalora_init_rank(self) -> int:
        """AdaLoRA's starting rank: --init-rank, or half as much again as the --rank it ends at."""
        return self.init_rank or max(1, (3 * self.rank) // 2)

    def to_dict(self) -> dict[str, Any]:
        """The options as recorded in the run folder: everything but the join string's secret."""
        return {k: v for k, v in asdict(self).items() if k != "join"}

    def methods(self) -> list:
        """The PEFT method configs this run trains."""
        from edgetune.runtime import peft

        targets = self.target_modules
        if self.method in ("lora", "dora"):
            return [peft.LoraConfig(r=self.rank, alpha=self.alpha, dropout=self.dropout, target_modules=targets,
                                    layers_to_transform=self.layers_to_transform, use_rslora=self.use_rslora,
                                    use_dora=self.method == "dora")]
        if self.method == "ia3":
            return [peft.IA3Config(layers_to_transform=self.layers_to_transform)]
        if self.method == "prefix":
            return [peft.PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens, prefix_projection=self.prefix_projection)]
        if self.method == "prompt":
            return [peft.PromptTuningConfig(num_virtual_tokens=self.num_virtual_tokens)]
        if self.method == "ln_tuning":
            return [peft.LNTuningConfig(layers_to_transform=self.layers_to_transform)]
        if self.method == "serial_adapter":
            return [peft.SerialAdapterConfig(bottleneck_size=self.bottleneck_size, layers_to_transform=self.layers_to_transform)]
        if self.method == "parallel_adapter":
            return [peft.ParallelAdapterConfig(bottleneck_size=self.bottleneck_size, scaling=self.adapter_scaling,
                                               layers_to_transform=self.layers_to_transform)]
        if self.method == "bitfit":
            return [peft.BitFitConfig(layers_to_transform=self.layers_to_transform)]
        return self._new_methods()

    def _new_methods(self) -> list:
        from edgetune.runtime import peft

        targets, layers = self.target_modules, self.layers_to_transform
        if self.method == "sparse":
            if self.shira_rank:
                return [peft.ShiraConfig(r=self.shira_rank, mask=self.mask, seed=self.seed, target_modules=targets,
                                         layers_to_transform=layers)]
            return [peft.SparseConfig(density=self.density, mask=self.mask, seed=self.seed, target_modules=targets,
                                      layers_to_transform=layers)]
        if self.method == "adalora":
            return [peft.AdaLoraConfig(init_r=self.adalora_init_rank, target_r=self.rank, alpha=self.alpha, dropout=self.dropout,
                                       target_modules=targets, layers_to_transform=layers, tinit=self.tinit,
                                       tfinal=self.tfinal, orth_reg_weight=self.orth_reg_weight, total_step=self.steps)]
        if self.method == "vera":
            return [peft.VeraConfig(r=self.rank, target_modules=targets, layers_to_transform=layers,
                                    projection_prng_key=self.projection_seed, dropout=self.dropout)]
        if self.method == "lokr":
            return [peft.LoKrConfig(r=self.rank, alpha=self.alpha, target_modules=targets, layers_to_transform=layers)]
        if self.method == "mam":  # He et al. 2022: prefix tuning at attention + a scaled parallel adapter at the FFN
            return [peft.PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens),
                    peft.ParallelAdapterConfig(bottleneck_size=self.bottleneck_size, scaling=self.adapter_scaling,
                                               layers_to_transform=layers)]
        return [peft.UniPeltConfig(lora_r=self.rank, lora_alpha=self.alpha, lora_targets=targets,
                                   num_virtual_tokens=self.num_virtual_tokens, bottleneck_size=self.bottleneck_size,
                                   layers_to_transform=layers)]


TRAIN_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TrainConfig)}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML or TOML file, keys normalised to underscores."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable config file ({e})") from None
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
            import tomli as tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML ({e})") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from None
    else:
        raise ConfigError(f"{path}: config files must end in .yaml, .yml or .toml")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(raw).__name__}")
    raw = raw.get("finetune", raw) if isinstance(raw.get("finetune"), dict) else raw
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def _split_csv(value: Any) -> Any:
    if isinstance(value, str) and "," in value:
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return value


def coerce_options(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    if "target_modules" in out:
        tm = _split_csv(out["target_modules"])
        # a single plain module name is a one-element list; "all-linear" and regexes stay strings
        if isinstance(tm, str) and tm != "all-linear" and tm.replace("_", "").isalnum():
            tm = (tm,)
        out["target_modules"] = tuple(tm) if isinstance(tm, list) else tm
    if out.get("layers_to_transform") is not None:
        ltt = _split_csv(out["layers_to_transform"])
        if isinstance(ltt, (str, int)):
            ltt = (ltt,)
        try:
            out["layers_to_transform"] = tuple(int(v) for v in ltt)
        except (TypeError, ValueError):
            raise ConfigError(f"layers_to_transform must be block indices, got {out['layers_to_transform']!r}") from None
    return out


def train_config_from(args: Any) -> TrainConfig:
    """TrainConfig from parsed CLI args: config file first, then every flag that was given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        values.update(load_config_file(args.config))
    for name in TRAIN_DEFAULTS:
        flag = getattr(args, name, None)
        if flag is not None and name != "resume":
            values[name] = flag
    if getattr(args, "resume", False):
        values["resume"] = True
    if getattr(args, "no_progress", False):
        values["progress"] = False
    return TrainConfig.from_dict(coerce_options(values), source=str(getattr(args, "config", None) or "command line"))
