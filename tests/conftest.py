"""Session-wide test setup: GPU tests skip cleanly where CUDA is absent."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Callable[[str], Path]:
    """arch -> folder of a tiny random HF checkpoint (made once per session)."""
    from edgetune.tests.tiny import make_tiny_model

    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = tmp_path_factory.mktemp(f"tiny_{arch}")
            make_tiny_model(arch, made[arch])
        return made[arch]

    return get
