"""The design's dependency rules (pyproject.toml's [tool.importlinter] contracts) hold, and the
check is real: it sees edgetune's subpackages and fails when a rule is broken.

import-linter cannot follow the package-dir mapping of an editable install, so it lints a copy
installed with `pip install --no-deps --target DIR .`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
pytestmark = pytest.mark.skipif(not PYPROJECT.is_file(), reason="needs the source checkout (pyproject.toml)")


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site)}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The package installed (not editable) into a folder of its own."""
    target = tmp_path_factory.mktemp("lint") / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-compile", "--target", str(target), str(REPO)], check=True, capture_output=True, timeout=300)
    return target


def _lint(site: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    args = [a for c in contracts for a in ("--contract", c)]
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo", *args, str(PYPROJECT)], cwd=site,
                          env=_env(site), capture_output=True, text=True, timeout=300)


def test_the_linted_graph_is_the_installed_copy_with_every_subpackage(site):
    probe = ("import grimp, edgetune; g = grimp.build_graph('edgetune');"
             "print(edgetune.__file__); print(len(g.modules));"
             "print(sorted(m for m in g.modules if m.count('.') == 2 and m.startswith('edgetune.runtime.')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=site, env=_env(site), capture_output=True, text=True,
                         check=True, timeout=300).stdout.splitlines()
    assert Path(out[0]).is_relative_to(site)
    assert int(out[1]) > 100
    for sub in ("model", "text", "peft", "train", "wire", "onnx", "cluster", "plan"):
        assert f"'edgetune.runtime.{sub}'" in out[2]
    graph = subprocess.run([sys.executable, "-c", "import grimp; g = grimp.build_graph('edgetune');"
                            "print(g.find_modules_directly_imported_by('edgetune.runtime.wire.serde'))"],
                           cwd=site, env=_env(site), capture_output=True, text=True, check=True, timeout=300).stdout
    assert "edgetune.proto.v1.node_pb2" in graph


def test_every_contract_is_kept(site):
    result = _lint(site)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and "BROKEN" not in result.stdout


# one planted module per contract: (contract id, file under the installed edgetune/, its source)
PLANTED = [
    ("nodes-coordinator", "nodes/_planted.py", "import edgetune.coordinator.core\n"),
    ("runtime-is-a-library", "runtime/wire/_planted.py", "from edgetune.commands import demo\n"),
    ("roles-below-the-cli", "coordinator/_planted.py", "import edgetune.cli\n"),
    ("runtime-layers", "runtime/model/_planted.py", "from edgetune.runtime.train import loop\n"),
    ("runtime-layers", "runtime/errors_planted.py", "x = 1\n"),  # a module with no layer: exhaustive
    ("serde-owns-messages", "runtime/train/_planted.py", "from edgetune.proto.v1 import node_pb2\n"),
    ("grpc-stubs", "coordinator/_planted.py", "from edgetune.proto.v1 import node_pb2_grpc\n"),
    ("light-modules", "runtime/plan/_planted.py", "import torch\n"),
]


@pytest.mark.parametrize("contract, path, source", PLANTED, ids=[f"{c}:{p}" for c, p, _ in PLANTED])
def test_a_planted_violation_breaks_its_contract(site, tmp_path, contract, path, source):
    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    (copy / "edgetune" / path).write_text(source)
    result = _lint(copy, contract)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout and "_planted" in result.stdout, result.stdout
