"""Log output: readable text by default, one JSON object per line with --log-format json."""
from __future__ import annotations

import io
import json
import logging
from datetime import datetime, timezone

import pytest

from edgetune.commands.logs import setup_logging
from edgetune.runtime.errors import ConfigError


@pytest.fixture
def restore_root():
    """setup_logging configures the root logger: put its handlers and level back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_fields(restore_root):
    stream = io.StringIO()
    setup_logging("DEBUG", "json", stream=stream)
    before = datetime.now(timezone.utc)
    logging.getLogger("edgetune.test").info("step %d of %s\nsecond line", 3, "ünïcode")
    logging.getLogger("edgetune.other").debug("quiet")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert set(first) == {"time", "level", "logger", "message"}
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "edgetune.test", "step 3 of ünïcode\nsecond line")
    when = datetime.fromisoformat(first["time"])
    assert when.tzinfo is not None and abs((when - before).total_seconds()) < 5
    assert json.loads(lines[1])["level"] == "DEBUG"


def test_json_includes_the_traceback(restore_root):
    stream = io.StringIO()
    setup_logging("INFO", "json", stream=stream)
    try:
        {}["missing-key"]
    except KeyError:
        logging.getLogger("edgetune.test").exception("it failed")
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["message"] == "it failed"
    assert entry["exception"].startswith("Traceback (most recent call last)")
    assert "KeyError: 'missing-key'" in entry["exception"] and "test_json_includes_the_traceback" in entry["exception"]


def test_text_is_readable_and_level_filters(restore_root):
    stream = io.StringIO()
    setup_logging("WARNING", "text", stream=stream)
    log = logging.getLogger("edgetune.test")
    log.info("hidden")
    try:
        raise ValueError("bad value")
    except ValueError:
        log.warning("careful %s", "now", exc_info=True)
    text = stream.getvalue()
    assert "hidden" not in text
    first = text.splitlines()[0]
    assert first.endswith("WARNING edgetune.test: careful now") and not first.startswith("{")
    assert "ValueError: bad value" in text


def test_setup_twice_replaces_its_handler(restore_root):
    first, second = io.StringIO(), io.StringIO()
    setup_logging("INFO", "text", stream=first)
    setup_logging("INFO", "json", stream=second)
    logging.getLogger("edgetune.test").info("once")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["message"] == "once"


def test_bad_values():
    with pytest.raises(ConfigError, match="log format 'xml'"):
        setup_logging("INFO", "xml")
    with pytest.raises(ConfigError, match="log level 'LOUD'"):
        setup_logging("LOUD", "text")


@pytest.mark.parametrize("flags", [[], ["--log-format", "json"]])
def test_cli_flag(tmp_path, capsys, restore_root, flags):
    """The global flag, as a user types it: a report on a run killed mid-write logs a warning."""
    from edgetune.cli import main

    run = tmp_path / "run"
    run.mkdir()
    step = {"step": 1, "loss": 2.0, "tokens": 5, "tokens_per_s": 9.0, "time_s": 0.5}
    (run / "metrics.jsonl").write_text(json.dumps(step) + "\n" + '{"step": 2, "lo')
    assert main([*flags, "--log-level", "WARNING", "report", str(run)]) == 0
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "unfinished last line" in ln]
    if flags:
        entry = json.loads(line)
        assert entry["level"] == "WARNING" and entry["logger"] == "edgetune.report" and "line 2" in entry["message"]
    else:
        assert "WARNING edgetune.report: " in line and "line 2" in line and not line.startswith("{")
