"""`punchthrough service`: systemd units for the agent and for the servers, so they start at boot.

The units are text built here (pure) and written by `install`. Both run under a dynamic system user
(`DynamicUser=yes`: no account to create or remove; systemd allocates one and owns the state
directory for it) with a private state directory in /var/lib, a read-only view of the rest of the
file system, no new privileges and restart on failure: what `systemd-analyze security` asks of a
network daemon that needs no root. Their logs go to the journal (`journalctl -u NAME`); the agent's
components also keep their size-capped files in STATE_DIR/logs (`punchthrough-ops logs`).

Commands that talk to the service's agent run as root with its state directory:
`sudo punchthrough --state-dir /var/lib/punchthrough status` (the control socket is the service
user's, mode 0600, and root may open it).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from agent.wire.ports import RENDEZVOUS_PORT

UNIT_DIR = Path("/etc/systemd/system")
STATE_NAME = "punchthrough"
"""StateDirectory= names: /var/lib/punchthrough (agent) and /var/lib/punchthrough-servers."""

HARDENING = """\
DynamicUser=yes
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
UMask=0077
"""
"""Shared by both units. Not set, on purpose: MemoryDenyWriteExecute (libffi, which PyNaCl and Ray
load, needs writable executable memory) and PrivateDevices (Ray's object store lives in /dev/shm)."""


def _hardening(exe: str) -> str:
    """ProtectHome=yes hides /home, /root and /run/user: an installation there (a venv in a home
    directory) must stay readable, so it gets read-only instead."""
    in_home = any(exe.startswith(p) for p in ("/home/", "/root/", "/run/user/"))
    return HARDENING.format(protect_home="read-only" if in_home else "yes")


@dataclass(frozen=True)
class Unit:
    name: str
    text: str


def _exe() -> str:
    """The `punchthrough` command of this installation (the venv's, not whatever is first on PATH)."""
    here = Path(sys.executable).parent / "punchthrough"
    if here.exists():
        return str(here)
    found = shutil.which("punchthrough")
    return found or str(here)


def agent_unit(exe: str, state_name: str = STATE_NAME) -> Unit:
    """The agent with its embedded servers unless its config names a server (STATE_DIR/config.toml)."""
    state = f"/var/lib/{state_name}"
    text = f"""\
[Unit]
Description=punchthrough agent (peer-to-peer connections by ID)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={shlex.quote(exe)} --state-dir {state} up --foreground
Restart=on-failure
RestartSec=2
TimeoutStopSec=30
StateDirectory={state_name}
StateDirectoryMode=0700
Environment=HOME={state}
{_hardening(exe)}
[Install]
WantedBy=multi-user.target
"""
    return Unit(f"{state_name}-agent.service", text)


def servers_unit(exe: str, port: int = RENDEZVOUS_PORT, state_name: str = f"{STATE_NAME}-servers") -> Unit:
    """A rendezvous and a relay server (`serve`: ports PORT-1 .. PORT+1), the key in the state directory."""
    state = f"/var/lib/{state_name}"
    text = f"""\
[Unit]
Description=punchthrough rendezvous and relay servers (hbbs + hbbr roles)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={shlex.quote(exe)} --state-dir {state} serve --port {port}
Restart=on-failure
RestartSec=2
StateDirectory={state_name}
StateDirectoryMode=0700
{_hardening(exe)}
[Install]
WantedBy=multi-user.target
"""
    return Unit(f"{state_name}.service", text)


def units(which: str, exe: str | None = None, port: int = RENDEZVOUS_PORT) -> list[Unit]:
    exe = exe or _exe()
    if which == "agent":
        return [agent_unit(exe)]
    if which == "servers":
        return [servers_unit(exe, port)]
    return [agent_unit(exe), servers_unit(exe, port)]


def install(which: str, unit_dir: Path = UNIT_DIR, port: int = RENDEZVOUS_PORT) -> list[str]:
    """Write the units; the lines to print (what was written, how to start it)."""
    lines = []
    unit_dir.mkdir(parents=True, exist_ok=True)
    for unit in units(which, port=port):
        path = unit_dir / unit.name
        path.write_text(unit.text)
        path.chmod(0o644)
        lines.append(f"wrote {path}")
    if unit_dir == UNIT_DIR and shutil.which("systemctl"):
        subprocess.run(["systemctl", "daemon-reload"], check=False, capture_output=True)
    names = " ".join(u.name for u in units(which, port=port))
    lines.append(f"start now and at boot: systemctl enable --now {names}")
    lines.append(f"logs: journalctl -u {names.split()[0]}")
    return lines


def uninstall(which: str, unit_dir: Path = UNIT_DIR) -> list[str]:
    lines = []
    for unit in units(which):
        path = unit_dir / unit.name
        if path.exists():
            if unit_dir == UNIT_DIR and shutil.which("systemctl"):
                subprocess.run(["systemctl", "disable", "--now", unit.name], check=False, capture_output=True)
            path.unlink()
            lines.append(f"removed {path}")
        else:
            lines.append(f"{path}: not installed")
    if unit_dir == UNIT_DIR and shutil.which("systemctl"):
        subprocess.run(["systemctl", "daemon-reload"], check=False, capture_output=True)
    return lines
