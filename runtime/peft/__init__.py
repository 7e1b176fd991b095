"""PEFT methods: each a frozen config plus a rule; the Adapter holds their tensors.

| method | config class | merges exactly |
|---|---|---|
| LoRA / rsLoRA / DoRA | LoraConfig | yes |
| AdaLoRA | AdaLoraConfig | yes |
| LoKr | LoKrConfig | yes |
| (IA)^3 | IA3Config | yes |
| prefix tuning | PrefixTuningConfig | no |
| prompt tuning | PromptTuningConfig | no |
| LayerNorm tuning | LNTuningConfig | yes |
| serial (Houlsby) adapter | SerialAdapterConfig | no |
| parallel (He et al.) adapter | ParallelAdapterConfig | no |
| BitFit | BitFitConfig | yes |
| VeRA | VeraConfig | yes |
| SHiRA (sparse, r (in + out) entries) | ShiraConfig | yes |
| sparse fine-tuning (FishMask) | SparseConfig | yes |
| UniPELT (gated LoRA + prefix + adapter) | UniPeltConfig | no |
"""
from edgetune.runtime.peft.adalora import AdaLoraConfig
from edgetune.runtime.peft.adapter import Adapter, BlockAdapter, attach_adapter
from edgetune.runtime.peft.base import Method
from edgetune.runtime.peft.bitfit import BitFitConfig
from edgetune.runtime.peft.bottleneck import ParallelAdapterConfig, SerialAdapterConfig
from edgetune.runtime.peft.ia3 import IA3Config
from edgetune.runtime.peft.ln_tuning import LNTuningConfig
from edgetune.runtime.peft.lokr import LoKrConfig
from edgetune.runtime.peft.lora import LoraConfig
from edgetune.runtime.peft.prefix import PrefixTuningConfig
from edgetune.runtime.peft.prompt import PromptTuningConfig
from edgetune.runtime.peft.sparse import FisherProbeConfig, ShiraConfig, SparseConfig
from edgetune.runtime.peft.unipelt import UniPeltConfig
from edgetune.runtime.peft.vera import VeraConfig

# CLI / config-file names -> config class
METHODS: dict[str, type[Method]] = {
    "lora": LoraConfig,
    "dora": LoraConfig,  # LoraConfig(use_dora=True)
    "adalora": AdaLoraConfig,
    "lokr": LoKrConfig,
    "ia3": IA3Config,
    "prefix": PrefixTuningConfig,
    "prompt": PromptTuningConfig,
    "ln_tuning": LNTuningConfig,
    "serial_adapter": SerialAdapterConfig,
    "parallel_adapter": ParallelAdapterConfig,
    "bitfit": BitFitConfig,
    "vera": VeraConfig,
    "shira": ShiraConfig,
    "sparse": SparseConfig,
    "unipelt": UniPeltConfig,
    "fisher_probe": FisherProbeConfig,  # calibration only (not trainable); listed so methods_from_json finds it
}

__all__ = [
    "Adapter", "BlockAdapter", "attach_adapter", "Method", "METHODS",
    "LoraConfig", "IA3Config", "PrefixTuningConfig", "PromptTuningConfig", "LNTuningConfig",
    "SerialAdapterConfig", "ParallelAdapterConfig", "BitFitConfig", "LoKrConfig", "VeraConfig",
    "ShiraConfig", "SparseConfig", "FisherProbeConfig", "AdaLoraConfig",
    "UniPeltConfig",
]
