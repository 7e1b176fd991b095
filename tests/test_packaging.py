"""Packaging: the import package's layout in the wheel, and the promise that the base
install -- `import edgetune`, `edgetune --help` -- never imports PyTorch.

Every check runs in a subprocess: this pytest process may already hold torch (other
tests import it), so `sys.modules` here proves nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IN_CHECKOUT = (REPO / "pyproject.toml").is_file() and (REPO / "edgetune_pkg").is_dir()
needs_checkout = pytest.mark.skipif(not IN_CHECKOUT, reason="needs the source checkout (pyproject.toml)")

# Folders of a checkout that are never part of a build: VCS data, build outputs, caches, runs.
_NOT_SOURCE = {".git", "build", "dist", "runs", "__pycache__", ".pytest_cache"}
# Repository root folders that must only ever appear inside `edgetune/` in the wheel.
_ROOT_FOLDERS = ("runtime", "proto", "nodes", "coordinator", "tests", "examples", "benchmarks")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that would change what Python imports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=_clean_env(**extra_env), capture_output=True, text=True, timeout=300)


def _imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` output.

    Lines look like `import time:       412 |       1310 |   edgetune.cli`; the first such
    line is the column header.
    """
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "imported package" not in line:
            names.add(line.rsplit("|", 1)[-1].strip())
    return names


def _torch_modules(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m == "torch" or m.startswith("torch."))


# --- (a) the installed package in this environment --------------------------------------


def test_import_edgetune_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys, edgetune, edgetune.cli, edgetune.runtime, edgetune.proto\n"
        "edgetune.__version__, dir(edgetune)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    proc = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"`import edgetune` imported PyTorch: {proc.stdout.strip()}"


def _console_script() -> Path:
    script = Path(sysconfig.get_path("scripts")) / "edgetune"
    if not script.exists():
        pytest.fail(f"console script {script} missing: install the project (`pip install -e .`)")
    return script


@pytest.mark.parametrize("how", ["python -m edgetune", "console script"])
def test_help_does_not_import_torch(how: str, tmp_path: Path) -> None:
    if how == "console script":
        cmd = [str(_console_script()), "--help"]
    else:
        cmd = [sys.executable, "-m", "edgetune", "--help"]
    proc = _run(cmd, cwd=tmp_path, PYTHONPROFILEIMPORTTIME="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: edgetune" in proc.stdout
    modules = _imported_modules(proc.stderr)
    # Proves the import log was read at all: the CLI module itself must be in it.
    assert "edgetune.cli" in modules, proc.stderr[-3000:]
    assert not _torch_modules(modules), f"`{how} --help` imported {_torch_modules(modules)[:5]}"


# --- (b) the wheel ------------------------------------------------------------------------


def _copy_source(dst: Path) -> Path:
    """Copy the checkout without build outputs or venvs, so stale `build/` never leaks in."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {
            n
            for n in names
            if n in _NOT_SOURCE
            or n.endswith(".egg-info")
            or (Path(folder, n) / "pyvenv.cfg").exists()  # any virtual environment
        }

    return Path(shutil.copytree(REPO, dst / "src", ignore=ignore))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = _copy_source(work)
    out = work / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    proc = _run(cmd, cwd=work)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("edgetune-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@needs_checkout
def test_wheel_holds_only_the_edgetune_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {name.split("/", 1)[0] for name in names}
    strays = sorted(t for t in tops if t != "edgetune" and not (t.startswith("edgetune-") and t.endswith(".dist-info")))
    assert not strays, f"wheel has top-level entries outside edgetune/: {strays}"
    for required in ("edgetune/__init__.py", "edgetune/cli.py", "edgetune/runtime/__init__.py", "edgetune/proto/__init__.py"):
        assert required in names, f"{required} missing from {wheel.name}"
    for folder in _ROOT_FOLDERS:
        assert f"edgetune/{folder}/__init__.py" in names, f"edgetune.{folder} missing from {wheel.name}"
        assert folder not in tops


# --- (c) the wheel in a fresh venv: no torch, no third-party packages at all ------------------


@needs_checkout
def test_wheel_in_fresh_venv_imports_and_runs_help_without_torch(wheel: Path, tmp_path: Path) -> None:
    """The fresh venv holds only the wheel (`--no-deps`), so this also proves the base import and
    `--help` need nothing beyond the standard library -- in particular no torch."""
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, env=_clean_env(), timeout=300)
    py = env_dir / "bin" / "python"
    proc = _run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr

    code = (
        "import importlib.util, sys, edgetune, edgetune.runtime, edgetune.proto\n"
        "assert importlib.util.find_spec('torch') is None, 'torch is importable: the check proves nothing'\n"
        "print(edgetune.__file__); print(edgetune.runtime.__file__)\n"
        "print('torch' in sys.modules)\n"
    )
    proc = _run([str(py), "-c", code], cwd=tmp_path)  # a temp cwd: the checkout must not shadow
    assert proc.returncode == 0, proc.stderr
    init_file, runtime_file, torch_loaded = proc.stdout.split()
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path).stdout.strip())
    assert Path(init_file) == site / "edgetune" / "__init__.py", f"imported {init_file}, not the venv's copy"
    assert Path(runtime_file) == site / "edgetune" / "runtime" / "__init__.py"
    assert torch_loaded == "False"

    proc = _run([str(env_dir / "bin" / "edgetune"), "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage: edgetune" in proc.stdout
