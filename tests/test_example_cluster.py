"""examples/cluster/local_cluster.sh as a user runs it: the cluster comes up with its nodes,
`edgetune status` and `edgetune finetune` work against the address it prints, and Ctrl-C
leaves no process behind."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from edgetune.runtime.cluster.local_cluster import child_env
from edgetune.tests.procs import default_sigint, stop_process
from edgetune.tests.tiny import SAMPLE_TEXTS, make_tiny_folder

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "cluster" / "local_cluster.sh"


def _read_until_ready(proc: subprocess.Popen, timeout_s: float = 180) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the script exited ({proc.wait()}) before it was ready:\n{''.join(lines)}")
        lines.append(line)
        if "[cluster] ready:" in line:
            return lines
    raise AssertionError("the script was not ready in time:\n" + "".join(lines))


def test_local_cluster_script_serves_finetune_and_stops_cleanly(tmp_path):
    model = tmp_path / "tiny"
    make_tiny_folder("llama", model, hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS))
    env = {**child_env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "EDGETUNE_MODEL": str(model),
           "EDGETUNE_NODES": "node-a node-b"}
    # SIGINT at its default, as in a terminal: a suite started in the background (`bash scripts/test.sh &`)
    # ignores it, and the script could not trap it
    proc = subprocess.Popen(["bash", str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True, preexec_fn=default_sigint)
    sessions: set[int] = set()
    try:
        out = "".join(_read_until_ready(proc))
        join = re.search(r"ready: --join (\S+)", out).group(1)
        sessions = {os.getsid(c.pid) for c in psutil.Process(proc.pid).children(recursive=True)}
        # the status table the script printed has both nodes alive, each with its blocks assigned later
        assert re.search(r"^node-a\s+alive", out, re.M) and re.search(r"^node-b\s+alive", out, re.M), out
        run = subprocess.run([sys.executable, "-m", "edgetune.cli", "finetune", "--join", join,
                              "--credentials", str(tmp_path / "edge"), "--model", str(model), "--data", str(data), "--steps", "2",
                              "--batch-size", "2", "--max-seq-len", "32", "--out", str(tmp_path / "run"),
                              "--no-progress"], capture_output=True, text=True, env=child_env(), timeout=300)
        assert run.returncode == 0, run.stderr
        records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        stages = [r["stages"] for r in records if "loss" in r]
        assert len(stages) == 2 and {s["node"] for s in stages[0]} <= {"node-a", "node-b"}
    finally:
        # Ctrl-C in the script's terminal (SIGINT to its process group); what is still running 30 s after
        # the script exited, or everything when it did not exit within 120 s, is SIGKILLed
        stopped = stop_process(proc, signal.SIGINT, timeout_s=120, settle_s=30, sessions=sessions)
    tail = stopped.stdout or ""
    assert proc.returncode == 130 and "[cluster] stopped" in tail, tail
    assert not stopped.killed, f"processes survived the script: {stopped.killed}"
