"""`punchthrough service`: the systemd units verify with systemd's own checker and are hardened.

`systemd-analyze verify` parses each unit as systemd would (unknown keys, a command that is not
executable, bad values are errors or warnings); CI installs systemd for it (scripts/install.sh)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent import cli, service

MUST = ("DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "Restart=on-failure",
        "UMask=0077", "WantedBy=multi-user.target")


def test_the_units_are_hardened_and_run_what_they_say() -> None:
    agent, servers = service.units("both", exe="/opt/pt/bin/punchthrough", port=21200)
    assert agent.name == "punchthrough-agent.service" and servers.name == "punchthrough-servers.service"
    for unit in (agent, servers):
        for line in MUST:
            assert line in unit.text.splitlines(), (unit.name, line)
        assert "ProtectHome=yes" in unit.text
    assert "ExecStart=/opt/pt/bin/punchthrough --state-dir /var/lib/punchthrough up --foreground" in agent.text
    assert "StateDirectory=punchthrough\n" in agent.text
    assert "ExecStart=/opt/pt/bin/punchthrough --state-dir /var/lib/punchthrough-servers serve --port 21200" in (
        servers.text
    )
    home = service.agent_unit("/home/me/.venv/bin/punchthrough")
    assert "ProtectHome=read-only" in home.text  # an installation in a home directory stays readable


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_the_installed_units(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["service", "install", "both", "--unit-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'punchthrough-agent.service'}" in out
    assert "systemctl enable --now punchthrough-agent.service punchthrough-servers.service" in out
    units = sorted(tmp_path.glob("*.service"))
    assert len(units) == 2
    check = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True)
    assert (check.returncode, check.stderr.strip()) == (0, ""), check.stderr
    # the checker is not a formality: a misspelt key and a missing program are reported
    bad = tmp_path / "bad.service"
    bad.write_text(units[0].read_text().replace("ProtectSystem=", "ProtectSytem=").replace(
        str(Path(units[0].read_text().split("ExecStart=")[1].split()[0])), "/nonexistent/punchthrough"))
    check = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True)
    assert check.returncode != 0 and "ProtectSytem" in check.stderr and "not executable" in check.stderr
    assert cli.main(["service", "uninstall", "both", "--unit-dir", str(tmp_path)]) == 0
    assert not (tmp_path / "punchthrough-agent.service").exists()


def test_unit_prints_without_writing(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["service", "unit", "servers", "--port", "21300"]) == 0
    assert "serve --port 21300" in capsys.readouterr().out


def test_install_where_it_cannot_write_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["service", "install", "--unit-dir", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("punchthrough: service install:") and "\n" not in err
