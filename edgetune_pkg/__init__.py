"""edgetune: fine-tune LLMs from a weak device by borrowing remote GPUs.

Importing this package is cheap and never imports PyTorch: the training API
(`load_model`, `load_adapter`, ...) is resolved lazily on first attribute
access, so an edge device that only runs ONNX exports needs no torch.

    >>> import edgetune
    >>> model = edgetune.load_model("path/to/hf_folder_or.gguf")   # imports torch here
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute); resolved on first access.
_LAZY = {
    "load_model": ("edgetune.runtime.model.loader", "load_model"),
    "load_adapter": ("edgetune.runtime.peft.hf_format", "load_adapter"),
    "save_adapter": ("edgetune.runtime.peft.hf_format", "save_adapter"),
    "attach_adapter": ("edgetune.runtime.peft.adapter", "attach_adapter"),
    "load_tokenizer": ("edgetune.runtime.text.tokenizer", "load_tokenizer"),
    "embedded_model_path": ("edgetune.runtime.model.embedded", "embedded_model_path"),
    "EdgetuneError": ("edgetune.runtime.errors", "EdgetuneError"),
    "finetune": ("edgetune.runtime.train.loop", "finetune"),
    "TrainConfig": ("edgetune.runtime.train.options", "TrainConfig"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'edgetune' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
