"""The READMEs' commands cannot rot: every `edgetune ...` line in their bash blocks parses with
today's CLI, and every repository file they name exists. (What the commands do is run by the
demo and by the tests each README points to.)"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from edgetune.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted(ROOT.glob("examples/*/README.md"))]


def _bash_commands(path: Path) -> list[str]:
    """Commands of the ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _edgetune_commands():
    return [pytest.param(cmd, id=f"{path.relative_to(ROOT)}:{cmd[:60]}")
            for path in READMES for cmd in _bash_commands(path) if cmd.startswith("edgetune ")]


def test_the_readmes_have_commands_to_check():
    assert len(_edgetune_commands()) >= 20


@pytest.mark.parametrize("command", _edgetune_commands())
def test_every_edgetune_command_parses(command):
    args = build_parser().parse_args(shlex.split(command)[1:])  # SystemExit(2) on an unknown flag or bad value
    assert callable(args.func)


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_a_readme_names_exists(readme):
    text = readme.read_text()
    named = set(re.findall(r"\b((?:examples|scripts|benchmarks|tests|runtime|nodes|coordinator|proto|edgetune_pkg)/[\w./-]*\w)",
                           text))
    missing = [p for p in sorted(named) if not (ROOT / p).exists() and not (ROOT / (p + ".py")).exists()]
    assert not missing, f"{readme.name} names files that do not exist: {missing}"


@pytest.mark.slow
def test_the_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    """The Python API block of README.md, executed as written (in a scratch folder: it saves an adapter)."""
    [block] = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
               if "import edgetune" in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md (Python API)", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "my-adapter" / "adapter_config.json").exists()
    assert capsys.readouterr().out.strip()  # the generated answer was printed
