"""Reading a JSON object from a file a user may have damaged, with an error that names the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, error: type[Exception], hint: str = "") -> dict[str, Any]:
    """The JSON object in `path`; `error("<path>: what is wrong[; hint]")` when the file is not
    valid JSON or holds something else than an object. A missing file raises FileNotFoundError."""
    suffix = f"; {hint}" if hint else ""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}){suffix}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}{suffix}")
    return value
