"""`edgetune report`: plots and summary of a run folder, checked against numbers computed here."""
from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetune.commands.report import write_report
from edgetune.runtime.errors import ConfigError, DataError

NODES = ("node-0", "node-1")


def _step_records(n: int, distributed: bool, seed: int = 0) -> list[dict]:
    """n training-step records shaped like train.py's (random numbers, so nothing lines up by chance)."""
    rng = random.Random(seed)
    records = []
    for step in range(1, n + 1):
        tokens = rng.randint(50, 400)
        time_s = rng.uniform(0.05, 2.0)
        record = {"step": step, "loss": 4.0 / step + rng.uniform(0, 0.1), "lr": 1e-3, "tokens": tokens,
                  "tokens_per_s": tokens / time_s, "grad_norm": rng.uniform(0.1, 3.0), "time_s": time_s}
        if distributed:
            record["bytes_sent"] = rng.randint(10**5, 10**7)
            record["bytes_received"] = rng.randint(10**5, 10**7)
            record["stages"] = [{"node": node, "forward_s": rng.uniform(0.01, 0.5), "backward_s": rng.uniform(0.02, 1.0),
                                 "bytes_in": 1, "bytes_out": 2} for node in NODES]
        records.append(record)
    return records


def _write_run(folder: Path, lines: list[dict], coordinator: str = "", text_tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model": "/models/tiny", "method": "lora",
                                                    "coordinator": coordinator, "steps": 6}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + text_tail)
    return folder


def _run_lines(distributed: bool) -> tuple[list[dict], list[dict]]:
    """(step records, all lines): eval before training, an eval_every record at step 3, the final eval."""
    steps = _step_records(6, distributed)
    steps[2] = {**steps[2], "eval_loss": 2.5}
    lines = [{"step": 0, "eval_loss": 4.25}, *steps, {"step": 6, "eval_loss": 1.75}]
    return steps, lines


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.is_file() and path.stat().st_size > 0
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert float(pixels[..., :3].std()) > 0.01  # something was drawn, not a blank canvas


def test_local_run(tmp_path):
    steps, lines = _run_lines(distributed=False)
    run = _write_run(tmp_path / "run", lines)
    report = write_report(run)
    for png in (report.loss_png, report.throughput_png):
        assert png.parent == run
        _assert_png(png)
    assert report.nodes_png is None and not (run / "nodes.png").exists()
    assert (run / "summary.txt").read_text() == report.summary

    s = report.stats
    losses = [r["loss"] for r in steps]
    median = float(np.median([r["tokens_per_s"] for r in steps]))
    assert (s.steps, s.first_step, s.last_step) == (6, 1, 6)
    assert (s.model, s.method, s.coordinator) == ("/models/tiny", "lora", "")
    assert s.first_loss == pytest.approx(losses[0]) and s.last_loss == pytest.approx(losses[-1])
    assert s.first_eval == (0, 4.25) and s.last_eval == (6, 1.75)
    assert s.median_tokens_per_s == pytest.approx(median)
    assert s.step_time_s == pytest.approx(sum(r["time_s"] for r in steps))
    assert s.mb_sent is None and s.mb_received is None and s.nodes == ()
    text = report.summary
    for expected in (f"{losses[0]:.4f}", f"{losses[-1]:.4f}", "4.2500 (before training)", "1.7500 (step 6)",
                     f"median {median:.1f}", "lora, local", "local run has no per-node timings"):
        assert expected in text
    assert "wire" not in text


def test_distributed_run(tmp_path):
    steps, lines = _run_lines(distributed=True)
    run = _write_run(tmp_path / "run", lines, coordinator="10.0.0.1:7700")
    out = tmp_path / "elsewhere" / "report"
    report = write_report(run, out=out)
    for png in (report.loss_png, report.throughput_png, report.nodes_png):
        assert png.parent == out
        _assert_png(png)
    assert not (run / "loss.png").exists()

    s = report.stats
    sent = sum(r["bytes_sent"] for r in steps) / 2**20
    received = sum(r["bytes_received"] for r in steps) / 2**20
    assert s.mb_sent == pytest.approx(sent) and s.mb_received == pytest.approx(received)
    assert [n.node for n in s.nodes] == list(NODES)
    for i, node in enumerate(s.nodes):
        forward = np.mean([r["stages"][i]["forward_s"] for r in steps])
        backward = np.mean([r["stages"][i]["backward_s"] for r in steps])
        assert (node.forward_s, node.backward_s, node.steps) == (pytest.approx(forward), pytest.approx(backward), 6)
        assert f"{node.node}: forward {forward:.4f} s, backward {backward:.4f} s" in report.summary
    assert f"sent {sent:.2f} MB, received {received:.2f} MB" in report.summary
    assert "distributed through 10.0.0.1:7700" in report.summary


def test_rerouted_node_and_resumed_steps(tmp_path):
    """A node that left the route after step 2 is averaged over its own steps; a step written twice
    (a resume from an earlier checkpoint replays it) counts once, with its last record."""
    steps = _step_records(4, distributed=True, seed=1)
    for r in steps[2:]:
        r["stages"] = r["stages"][:1]
    replayed = {**steps[1], "loss": 9.5, "tokens_per_s": 1.0}
    run = _write_run(tmp_path / "run", [*steps[:3], replayed, steps[3]])
    s = write_report(run).stats
    assert s.steps == 4
    kept = [steps[0], replayed, steps[2], steps[3]]
    assert s.median_tokens_per_s == pytest.approx(float(np.median([r["tokens_per_s"] for r in kept])))
    node0, node1 = s.nodes
    assert node1.steps == 2 and node1.forward_s == pytest.approx(np.mean([r["stages"][1]["forward_s"] for r in kept[:2]]))
    assert node0.steps == 4 and node0.backward_s == pytest.approx(np.mean([r["stages"][0]["backward_s"] for r in kept]))


def test_node_with_two_stages_of_a_route_counts_both(tmp_path):
    (step,) = _step_records(1, distributed=True, seed=2)
    step["stages"].append({**step["stages"][0], "forward_s": 0.125, "backward_s": 0.25})
    node0 = write_report(_write_run(tmp_path / "run", [step])).stats.nodes[0]
    assert node0.forward_s == pytest.approx(step["stages"][0]["forward_s"] + 0.125)
    assert node0.backward_s == pytest.approx(step["stages"][0]["backward_s"] + 0.25)


def test_run_without_eval_examples(tmp_path):
    steps = _step_records(3, distributed=False)
    run = _write_run(tmp_path / "run", [*steps, {"step": 3, "eval_loss": None}])
    report = write_report(run)
    assert report.stats.first_eval is None
    assert "eval loss    none" in report.summary


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    steps = _step_records(3, distributed=False)
    run = _write_run(tmp_path / "run", steps, text_tail='{"step": 4, "loss": 1.2, "tok')
    with caplog.at_level(logging.WARNING, logger="edgetune.report"):
        report = write_report(run)
    assert report.stats.steps == 3 and report.stats.last_loss == pytest.approx(steps[-1]["loss"])
    assert "line 4" in caplog.text and "unfinished last line" in caplog.text
    assert "line 4" in report.summary


@pytest.mark.parametrize("content, expected", [
    ("", "no records"),
    ("\n\n", "no records"),
    ('{"step": 0, "eval_loss": 3.0}\n', "only 1 evaluation line"),
    (('{"step": 1, "loss": 2.0, "tokens": 5, "tokens_per_s": 9.0, "time_s": 0.5}\n{"step": 2, "loss": 1.\n'
      '{"step": 3, "loss": 2.0, "tokens": 5, "tokens_per_s": 9.0, "time_s": 0.5}\n'), "line 2: not valid JSON"),
    ('{"step": 1, "loss": 2.0, "tokens": 5, "time_s": 0.5}\n', "line 1: 'tokens_per_s' missing"),
    ('{"step": 1, "loss": "low", "tokens": 5, "tokens_per_s": 9.0, "time_s": 0.5}\n',
     "line 1: 'loss' 'low' is not a number"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ('{"step": -1, "loss": 2.0}\n', "non-negative integer 'step'"),
    ('{"step": 1, "lr": 0.1}\n', "line 1: neither 'loss'"),
    (('{"step": 1, "loss": 2.0, "tokens": 5, "tokens_per_s": 9.0, "time_s": 0.5, "bytes_sent": 1, '
      '"bytes_received": 2, "stages": [{"forward_s": 1}]}\n'), "'stages' must be a list"),
])
def test_malformed_metrics(tmp_path, content, expected):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(content)
    with pytest.raises(DataError, match="metrics.jsonl") as info:
        write_report(run)
    assert expected in str(info.value)


def test_missing_run_folder_and_metrics(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        write_report(tmp_path / "empty")
    run = _write_run(tmp_path / "run", _step_records(2, distributed=False))
    (run / "config.json").write_text("{not json")
    with pytest.raises(DataError, match="config.json"):
        write_report(run)


def test_cli(tmp_path, capsys):
    from edgetune.cli import main

    steps, lines = _run_lines(distributed=True)
    run = _write_run(tmp_path / "run", lines, coordinator="h:1")
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "out" / "summary.txt").read_text() in printed
    assert "loss.png, throughput.png, nodes.png, summary.txt" in printed
    assert f"first {steps[0]['loss']:.4f}" in printed

    assert main(["report", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "edgetune report: error:" in err and "missing" in err


def test_imports_without_matplotlib_and_says_what_to_install(tmp_path, monkeypatch):
    code = ("import sys; import edgetune.cli, edgetune.commands.report; "
            "assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    run = _write_run(tmp_path / "run", _step_records(2, distributed=False))
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match="pip install"):
        write_report(run)


def test_report_of_a_real_finetune(tmp_path):
    """A real tiny local run, then its report: the report reads exactly what train.py writes."""
    from edgetune.runtime.train.loop import TrainConfig, finetune
    from edgetune.tests.tiny import SAMPLE_TEXTS, make_tiny_folder

    make_tiny_folder("llama", tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS))
    cfg = TrainConfig(model=str(tmp_path / "model"), data=str(data), out=str(tmp_path / "run"), method="lora", rank=2,
                      steps=3, batch_size=2, max_seq_len=24, eval_fraction=0.25, eval_every=2, save_every=0,
                      progress=False, seed=1)
    result = finetune(cfg)
    report = write_report(result.out)
    _assert_png(report.loss_png)
    _assert_png(report.throughput_png)
    s = report.stats
    assert (s.steps, s.last_step, s.method, s.model) == (3, 3, "lora", cfg.model)
    assert (s.first_loss, s.last_loss) == (pytest.approx(result.losses[0]), pytest.approx(result.losses[-1]))
    assert s.last_eval == (3, pytest.approx(result.eval_loss))
    assert result.eval_loss_before is not None  # train.py evaluates before the first step, as step 0
    assert s.first_eval == (0, pytest.approx(result.eval_loss_before))
    assert "(before training)" in report.summary


def test_gate_values_are_plotted_and_parsed(tmp_path):
    steps, lines = _run_lines(distributed=True)
    rng = random.Random(3)
    gates = {}
    for record in steps:
        record["recorded"] = {f"gate.{kind}.{layer}": rng.uniform(0, 1) for kind in ("lora", "prefix") for layer in (0, 1)}
        gates[record["step"]] = record["recorded"]
    report = write_report(_write_run(tmp_path / "run", lines))
    assert report.gates_png == tmp_path / "run" / "gates.png"
    _assert_png(report.gates_png)
    from edgetune.commands.report import read_metrics

    parsed = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {s.step: dict(s.recorded) for s in parsed.steps} == gates

    plain = write_report(_write_run(tmp_path / "plain", _run_lines(distributed=False)[1]))
    assert plain.gates_png is None and not (tmp_path / "plain" / "gates.png").exists()


def test_malformed_recorded_values_name_the_line(tmp_path):
    steps, lines = _run_lines(distributed=False)
    steps[1]["recorded"] = ["not", "a", "mapping"]
    with pytest.raises(DataError, match="line 3: 'recorded' must be an object"):
        write_report(_write_run(tmp_path / "run", lines))
