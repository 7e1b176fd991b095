"""ruff's lint and import order (the rules in pyproject.toml's [tool.ruff]) hold over the whole
checkout, and the check is real: a file that breaks them fails it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (REPO / "pyproject.toml").is_file(), reason="needs the source checkout")


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_the_checkout_passes_ruff():
    result = _ruff(".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_stubs_are_left_alone_but_everything_else_is_checked():
    listed = _ruff("--show-files", ".").stdout
    assert "runtime/wire/serde.py" in listed and "tests/test_lint.py" in listed and "examples/deploy_edge/app.py" in listed
    assert "_pb2" not in listed


@pytest.mark.parametrize("source, rule", [
    ("import os\nimport sys\n\nprint(sys.argv)\n", "F401"),  # unused import
    ("import sys\nimport os\n\nprint(os.sep, sys.argv)\n", "I001"),  # import order
    ("def f(x=[]):\n    return x\n", "B006"),  # mutable default
])
def test_a_planted_problem_fails_the_check(tmp_path, source, rule):
    bad = tmp_path / "planted.py"
    bad.write_text(source)
    result = _ruff("--config", str(REPO / "pyproject.toml"), str(bad))
    assert result.returncode == 1 and rule in result.stdout, result.stdout
