"""Log files stay within their cap however long the agent runs (agent/common/logfiles.py), and
`punchthrough-ops logs` says where they are and how big they may grow."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest

from agent.common import logfiles
from ops import cli as ops_cli


def test_a_component_log_rotates_at_its_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logfiles, "LOG_MAX_BYTES", 2000)
    path = tmp_path / "coordinator.log"
    handler = logfiles.component_handler(path)
    log = logging.getLogger("test-logfiles")
    log.propagate = False
    log.addHandler(handler)
    try:
        for i in range(500):
            log.warning("line %d %s", i, "x" * 40)
    finally:
        log.removeHandler(handler)
        handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["coordinator.log", "coordinator.log.1", "coordinator.log.2"]
    assert all((tmp_path / f).stat().st_size <= 2000 + 100 for f in files)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # peer IDs and keys: the owner's only
    assert "line 499" in path.read_text()


def test_a_full_supervisor_log_is_moved_aside_before_appending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logfiles, "LOG_MAX_BYTES", 10)
    log = tmp_path / "agent.log"
    logfiles.rotate_if_full(log)  # nothing there yet: nothing to do
    log.write_text("first run, long enough\n")
    logfiles.rotate_if_full(log)
    assert not log.exists() and (tmp_path / "agent.log.1").read_text() == "first run, long enough\n"
    log.write_text("second run, long enough\n")
    logfiles.rotate_if_full(log)
    log.write_text("short\n")
    logfiles.rotate_if_full(log)  # under the cap: stays
    assert (tmp_path / "agent.log.2").read_text().startswith("first")
    assert (tmp_path / "agent.log.1").read_text().startswith("second")
    assert log.read_text() == "short\n"


def test_ops_logs_lists_the_files_and_the_cap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ops_cli.main(["--state-dir", str(tmp_path), "logs"]) == 0
    out = capsys.readouterr().out
    assert "rotated at 10.0 MiB with 2 old files kept (at most 30.0 MiB per component)" in out
    assert out.rstrip().endswith("no logs yet")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "registrar.log").write_text("x" * 2048)
    assert ops_cli.main(["--state-dir", str(tmp_path), "logs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"file": str(tmp_path / "logs" / "registrar.log"), "bytes": 2048}]
