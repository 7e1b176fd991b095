"""Config files of a few public model shapes (no weights), for `edgetune plan`: shapes are all a
plan needs, and nothing may come from a model hub at run time."""
from __future__ import annotations

import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parent / "shape_configs"


def names() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.json"))


def load(name: str) -> dict:
    """The Hugging Face config dict of a shipped shape."""
    return json.loads((FOLDER / f"{name}.json").read_text())
