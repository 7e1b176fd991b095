"""The `edgetune` command: finetune (flags and config files), generate, errors."""
from __future__ import annotations

import json

import pytest

from edgetune.cli import build_parser, main
from edgetune.runtime.train.options import TRAIN_DEFAULTS, train_config_from
from edgetune.tests.tiny import make_tiny_folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_cli")
    make_tiny_folder("qwen2", folder)
    return folder


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": f"the fox {i}"}]}
            for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parse(argv):
    return train_config_from(build_parser().parse_args(["finetune", "--local", *argv]))


def test_every_train_option_has_a_flag_with_its_default_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    hidden = {"progress", "resume", "data", "out"}  # progress: --no-progress; the rest shown without a dash-twin
    for name, default in TRAIN_DEFAULTS.items():
        if name in ("progress",):
            continue
        assert "--" + name.replace("_", "-") in text, name
        if name not in hidden and not isinstance(default, bool) and default is not None:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
            assert f"(default: {shown})" in " ".join(text.split()), name


def _subcommands():
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_option_of_every_command_says_its_default_in_help(command, capsys):
    """`edgetune COMMAND --help` names each option's default (or says it is required)."""
    import argparse

    parser = _subcommands()[command]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert capsys.readouterr().out.startswith(f"usage: edgetune {command}")
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or (not action.option_strings and action.required):
            continue
        shown = parser._get_formatter()._expand_help(action)  # the text --help prints for it
        assert "default" in shown or "required" in shown, (command, action.dest, shown)


@pytest.mark.parametrize("suffix, body", [
    (".yaml", "model: M\ndata: D\nrank: 4\ntarget_modules: [q_proj, k_proj]\nlr: 0.01\nsteps: 7\n"),
    (".toml", 'model = "M"\ndata = "D"\nrank = 4\ntarget-modules = ["q_proj", "k_proj"]\nlr = 0.01\nsteps = 7\n'),
])
def test_config_file_and_flag_override(tmp_path, suffix, body):
    path = tmp_path / f"run{suffix}"
    path.write_text(body)
    cfg = _parse(["--config", str(path), "--steps", "9"])
    assert (cfg.model, cfg.data, cfg.rank, cfg.lr, cfg.steps) == ("M", "D", 4, 0.01, 9)
    assert cfg.target_modules == ("q_proj", "k_proj")


def test_target_modules_forms():
    assert _parse(["--data", "d", "--target-modules", "q_proj,v_proj"]).target_modules == ("q_proj", "v_proj")
    assert _parse(["--data", "d", "--target-modules", "o_proj"]).target_modules == ("o_proj",)
    assert _parse(["--data", "d", "--target-modules", "all-linear"]).target_modules == "all-linear"
    assert _parse(["--data", "d", "--layers-to-transform", "0,2"]).layers_to_transform == (0, 2)


def test_unknown_config_key_is_named(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data: d\nlearning_rate: 0.1\n")
    assert main(["finetune", "--local", "--config", str(path)]) == 1
    assert "unknown option(s) ['learning_rate']" in capsys.readouterr().err


def test_finetune_then_generate(tiny_folder, chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["finetune", "--local", "--model", str(tiny_folder), "--data", str(chat_file), "--out", str(out),
                 "--steps", "2", "--batch-size", "2", "--rank", "2", "--no-progress", "--eval-fraction", "0"])
    assert code == 0
    assert f"adapter saved to {out / 'adapter'}" in capsys.readouterr().out
    assert main(["generate", "--model", str(tiny_folder), "--adapter", str(out / "adapter"), "--chat",
                 "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "hello", "--max-new-tokens", "5",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"]) == 0


def test_malformed_data_points_at_the_line(tiny_folder, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": 3}\n')
    code = main(["finetune", "--local", "--model", str(tiny_folder), "--data", str(data), "--out", str(tmp_path / "o")])
    assert code == 1
    assert f"{data}:2:" in capsys.readouterr().err


def test_wrong_model_path_is_a_clear_error(tmp_path, chat_file, capsys):
    code = main(["finetune", "--local", "--model", str(tmp_path / "missing"), "--data", str(chat_file),
                 "--out", str(tmp_path / "o")])
    assert code == 1
    assert "missing: does not exist" in capsys.readouterr().err


def test_missing_adapter_is_a_clear_error(tiny_folder, tmp_path, capsys):
    code = main(["generate", "--model", str(tiny_folder), "--adapter", str(tmp_path / "nope"), "--prompt", "hi"])
    assert code == 1
    assert "nope" in capsys.readouterr().err


def test_distributed_finetune_is_not_silently_local(capsys):
    assert main(["finetune", "--data", "d"]) == 2
    assert "--local" in capsys.readouterr().err


def test_prepare_model_prints_the_folder(tiny_folder, tmp_path, capsys):
    assert main(["prepare-model", str(tiny_folder)]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_folder)
    assert main(["prepare-model", str(tmp_path / "absent.gguf")]) == 1
    assert "absent.gguf" in capsys.readouterr().err


def test_local_and_coordinator_together_are_refused(capsys):
    assert main(["finetune", "--local", "--coordinator", "127.0.0.1:1", "--data", "d"]) == 2
    assert "either" in capsys.readouterr().err


def test_unreachable_coordinator_and_missing_credentials_are_clear_errors(tiny_folder, chat_file, tmp_path, capsys):
    from edgetune.runtime.wire import rpc
    from edgetune.runtime.wire.ports import free_port

    base = ["finetune", "--model", str(tiny_folder), "--data", str(chat_file), "--out", str(tmp_path / "o")]
    assert main([*base, "--coordinator", "127.0.0.1:1", "--credentials", str(tmp_path / "nobody")]) == 1
    err = capsys.readouterr().err
    assert "nobody" in err and "no edge credentials" in err and "--join" in err
    assert main([*base, "--coordinator", "127.0.0.1:1", "--insecure", "--token-file", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert "none" in err and "token" in err
    assert main([*base, "--join", "edgetune-join:nonsense"]) == 1
    assert "not a join string" in capsys.readouterr().err
    token = tmp_path / "token"
    rpc.write_token(token)
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    assert main([*base, "--coordinator", address, "--insecure", "--token-file", str(token)]) == 1
    err = capsys.readouterr().err
    assert address in err and "UNAVAILABLE" in err and "edgetune coordinator" in err


def test_the_demos_default_data_files_exist():
    # the demo finds its data through the edgetune.examples package, wherever the command's module lives
    from dataclasses import fields
    from pathlib import Path

    from edgetune.commands.demo import DemoOptions

    for f in fields(DemoOptions):
        if f.name in ("data", "eval_data"):
            assert Path(f.default).is_file(), f.default
