"""examples/laptop_finetune: the config file, read the way `edgetune finetune --config` reads it,
then used against a real cluster (`edgetune coordinator` + two `edgetune node` processes) with a
tiny model given on the command line, as a user overrides a config: a run, and a run killed
after a checkpoint and continued with --resume, which must end with the same adapter."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgetune.cli import build_parser
from edgetune.runtime.train.options import TRAIN_DEFAULTS, TrainConfig, train_config_from
from edgetune.tests.cli_cluster import CliCluster
from edgetune.tests.procs import stop_process
from edgetune.tests.tiny import SAMPLE_TEXTS, make_tiny_folder

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "laptop_finetune"
CONFIG = EXAMPLE / "config.yaml"
REPO = EXAMPLE.parents[1]
STEPS = 8  # the run killed after step 2 has 6 more to go: room for the kill to land mid-run
EDGETUNE = [sys.executable, "-m", "edgetune.cli"]


def _parse(*flags: str) -> TrainConfig:
    """What `edgetune finetune --config CONFIG FLAGS` resolves to."""
    return train_config_from(build_parser().parse_args(["finetune", "--config", str(CONFIG), *flags]))


# ---------------------------------------------------------------- the file itself
def test_every_key_is_a_commented_finetune_option_and_flags_override_it():
    raw = yaml.safe_load(CONFIG.read_text())
    assert set(raw) <= set(TRAIN_DEFAULTS), sorted(set(raw) - set(TRAIN_DEFAULTS))
    cfg = _parse("--coordinator", "127.0.0.1:7700")
    for key, value in raw.items():
        want = tuple(value) if isinstance(value, list) else value
        assert getattr(cfg, key) == want and type(getattr(cfg, key)) is type(TRAIN_DEFAULTS[key]), key
        # ... and each key is a flag too, which gives the same value
        flag = ",".join(value) if isinstance(value, list) else str(value)
        args = build_parser().parse_args(["finetune", "--coordinator", "h:1", "--data", "d.jsonl",
                                          f"--{key.replace('_', '-')}", flag])
        assert getattr(train_config_from(args), key) == want, key
    assert (cfg.model, cfg.method, cfg.codec, cfg.coordinator) == ("embedded", "lora", "bf16", "127.0.0.1:7700")
    assert (REPO / cfg.data).is_file()  # the data path works from the repository root
    for line in CONFIG.read_text().splitlines():  # every key says what it does
        if line and not line.startswith("#"):
            assert "#" in line, f"uncommented key: {line}"

    overridden = _parse("--coordinator", "h:1", "--steps", "3", "--warmup-steps", "1", "--rank", "4")
    assert (overridden.steps, overridden.warmup_steps, overridden.rank, overridden.codec) == (3, 1, 4, "bf16")


# ---------------------------------------------------------------- against a real cluster
@pytest.fixture(scope="module")
def cluster():
    with CliCluster.start([["--threads", "1"], ["--threads", "1"]]) as c:
        yield c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("laptop")
    make_tiny_folder("llama", root / "model", hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS))
    return root / "model", data


def _finetune_args(cluster, tiny, out: Path) -> list[str]:
    """The README's command, with the tiny model, data and a short run given as flags."""
    model, data = tiny
    return ["finetune", "--config", str(CONFIG), *cluster.edge_args("laptop"), "--model", str(model), "--data", str(data), "--out", str(out),
            "--steps", str(STEPS), "--warmup-steps", "1", "--save-every", "1", "--no-progress"]


def _steps(run: Path) -> list[int]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def _adapter(run: Path):
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    done = cluster.edgetune(*_finetune_args(cluster, tiny, out))
    assert done.returncode == 0, done.stderr + cluster.log_text()
    return out, done


@pytest.mark.slow
def test_finetune_with_the_config_on_a_cluster(uninterrupted):
    out, done = uninterrupted
    assert f"adapter saved to {out / 'adapter'}" in done.stdout
    assert "route open:" in done.stderr  # the nodes the blocks run on
    assert _steps(out) == list(range(1, STEPS + 1))
    resolved = json.loads((out / "config.json").read_text())
    assert (resolved["codec"], resolved["rank"], resolved["micro_batches"], resolved["steps"]) == ("bf16", 16, 2, STEPS)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["bytes_sent"] > 0 and {s["node"] for s in r["stages"]} <= {"node-0", "node-1"} and r["stages"]
               for r in records if "loss" in r)  # the blocks ran on the nodes, not here
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 16


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_with_the_same_adapter(cluster, tiny, uninterrupted,
                                                                              tmp_path):
    out = tmp_path / "resumed"
    args = _finetune_args(cluster, tiny, out)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "RAY_USAGE_STATS_ENABLED": "0"}
    first = subprocess.Popen([*EDGETUNE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                             start_new_session=True)
    checkpoint = out / "checkpoints" / "step-000002" / "meta.json"
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)  # as a laptop that loses power: nothing is cleaned up
    finally:  # nothing of its session outlives the test, also where the loop above was interrupted
        stopped = stop_process(first, timeout_s=30, settle_s=0)
    stderr = (stopped.stderr or b"").decode(errors="replace")
    assert checkpoint.exists(), stderr + cluster.log_text()
    assert not (out / "adapter").exists(), "the run finished before it was killed; nothing was resumed"
    # --resume takes the newest complete checkpoint (the kill may come before `latest` names it)
    restored = max(int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*/meta.json"))
    before = _steps(out)

    done = cluster.edgetune(*args, "--resume")
    assert done.returncode == 0, done.stderr + cluster.log_text()
    assert f"resumed from {out / 'checkpoints' / f'step-{restored:06d}'}" in done.stderr
    # metrics.jsonl keeps the killed run's lines and goes on from the checkpoint's step
    assert restored >= 2 and before == list(range(1, len(before) + 1))
    assert _steps(out) == before + list(range(restored + 1, STEPS + 1))
    want, got = _adapter(uninterrupted[0]), _adapter(out)
    assert want.keys() == got.keys()
    for key in want:
        assert (want[key] - got[key]).abs().max().item() <= 1e-5, key
