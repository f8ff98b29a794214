"""Real programs (sshd, iperf3, http.server) on lab hosts, and `punchthrough connect -L` in front of them.

Every process is started with `lab.popen`, so `Lab.down()` ends whatever a failing test left running.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ops.natlab import Lab
from tests.natlab.agents import PT, LabAgents

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


class ClientSetupError(Exception):
    """A program the test needs did not start; the message says which and why."""


def wait_listening(lab: Lab, host: str, port: int, proc: subprocess.Popen[Any] | None = None,
                   timeout: float = 20.0) -> None:
    """Until something in the host's namespace listens on TCP `port` (asked of the kernel, no connect)."""
    deadline = time.monotonic() + timeout
    while True:
        out = lab.run(host, ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
        if out.stdout.strip():
            return
        if proc is not None and proc.poll() is not None:
            raise ClientSetupError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        if time.monotonic() > deadline:
            raise ClientSetupError(f"nothing listens on port {port} in {host} after {timeout:.0f}s")
        time.sleep(0.05)


def start_sshd(lab: Lab, host: str, workdir: Path, port: int = 2222) -> Path:
    """sshd on 127.0.0.1:port with a throwaway host key, pubkey-only root login; returns the client key."""
    if not Path(SSHD).exists():
        raise ClientSetupError("sshd is missing: apt-get install -y openssh-server")
    workdir.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # the privilege-separation directory sshd insists on
    host_key, client_key = workdir / "host_ed25519", workdir / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (workdir / "authorized_keys").write_bytes(client_key.with_suffix(".pub").read_bytes())
    config = workdir / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}\nPidFile {workdir / 'sshd.pid'}\n"
        "UsePAM no\nStrictModes no\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowUsers root\n"
        "Subsystem sftp internal-sftp\nLogLevel VERBOSE\n"
    )
    log = (workdir / "sshd.log").open("wb")
    proc = lab.popen(host, [SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    wait_listening(lab, host, port, proc)
    return client_key


def ssh_argv(agents: LabAgents, host: str, key: Path, peer: str, target: str, *command: str) -> list[str]:
    """ssh to `peer` with `punchthrough pipe` as the ProxyCommand.

    `%n`, not `%h`: ssh canonicalises an all-digit host name the way inet_aton does, so `%h` for the ID
    1760108852 expands to 104.233.33.52 (any ID below 2**32, i.e. every 9-digit RustDesk ID).
    """
    proxy = " ".join([*PT, "--state-dir", str(agents.state(host)), "pipe", "%n", target])
    return ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", f"ProxyCommand={proxy}", "-l", "root", peer, *command]


def start_forward(agents: LabAgents, host: str, peer: str, spec: str, path: str = "") -> subprocess.Popen[bytes]:
    """`punchthrough connect PEER -L spec` in the host's namespace, returned once it listens."""
    argv = [*PT, "--state-dir", str(agents.state(host)), "connect", peer, "-L", spec]
    if path:
        argv += ["--path", path]
    proc = agents.lab.popen(host, argv, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    if not line.startswith("forwarding "):
        proc.kill()
        raise ClientSetupError(f"connect -L {spec} did not start: {line!r}")
    return proc


def start_http(lab: Lab, host: str, root: Path, port: int) -> subprocess.Popen[bytes]:
    proc = lab.popen(host, [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                            "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(lab, host, port, proc)
    return proc
