"""The sweep of private Ray heads' temp dirs that SIGKILLed supervisors left behind.

Every test works in its own base dir (never the real /tmp); dead owners are the pids of
children that already finished and were reaped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from actors import ray_runtime
from actors.ray_runtime import OWNER_FILE, RayHandle, sweep_stale_temp_dirs, write_owner

LATER = 3600.0
"""Seconds to look ahead (`now=`), so dirs just made count as old without touching their times."""


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
    return proc.pid


def head_dir(base: Path, name: str, owner: str | None = None) -> Path:
    """What a head leaves: auth_token, head.log, ray/..., and maybe the owner file."""
    d = base / name
    (d / "ray" / "session_latest").mkdir(parents=True)
    (d / "auth_token").write_text("x" * 64)
    (d / "head.log").write_text("Ray runtime started\n")
    if owner is not None:
        (d / OWNER_FILE).write_text(owner)
    return d


@pytest.fixture
def naming() -> Iterator[Any]:
    """Start a live process whose command line mentions a path, as a Ray head's processes do."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(arg: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", arg])
        procs.append(proc)
        deadline = time.monotonic() + 10
        while arg not in psutil.Process(proc.pid).cmdline():  # until exec has happened
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def sweep(base: Path, **kw: Any) -> set[str]:
    return {p.name for p in sweep_stale_temp_dirs(base, **kw)}


def test_dead_owner_removed_live_owner_kept(tmp_path: Path) -> None:
    dead = head_dir(tmp_path, "ptray-dead", f"{dead_pid()}\n")
    mine = tmp_path / "ptray-mine"
    mine.mkdir()
    write_owner(mine)
    assert sweep(tmp_path) == {"ptray-dead"}
    assert not dead.exists()
    assert (mine / OWNER_FILE).exists()
    assert sweep(tmp_path, now=time.time() + LATER) == set()  # a live owner's dir is never old


def test_reused_pid_is_not_the_owner(tmp_path: Path) -> None:
    """Our pid, but a start time that is not ours: the owner died and the number was reused."""
    started = psutil.Process().create_time()
    head_dir(tmp_path, "ptray-reused", f"{os.getpid()} {started - 100:.2f}\n")
    head_dir(tmp_path, "ptray-same", f"{os.getpid()} {started:.2f}\n")
    assert sweep(tmp_path) == {"ptray-reused"}


def test_dir_without_owner_file_goes_only_when_old(tmp_path: Path) -> None:
    old = head_dir(tmp_path, "ptray-old")
    garbage = head_dir(tmp_path, "ptray-garbage", "not a pid\n")
    assert sweep(tmp_path) == set()  # just made: its creator may not have written the owner yet
    assert sweep(tmp_path, now=time.time() + 30) == set()
    assert sweep(tmp_path, now=time.time() + LATER) == {"ptray-old", "ptray-garbage"}
    assert not old.exists() and not garbage.exists()


@pytest.mark.parametrize("owner", [None, "dead"])
def test_dir_a_live_process_names_is_kept(tmp_path: Path, naming: Any, owner: str | None) -> None:
    d = head_dir(tmp_path, "ptray-running", None if owner is None else f"{dead_pid()}\n")
    proc = naming(f"--temp-dir={d / 'ray'}")
    assert sweep(tmp_path, now=time.time() + LATER) == set()
    assert d.exists()
    proc.kill()
    proc.wait()
    assert sweep(tmp_path, now=time.time() + LATER) == {"ptray-running"}


def test_a_longer_name_on_a_command_line_does_not_protect_a_prefix(tmp_path: Path, naming: Any) -> None:
    head_dir(tmp_path, "ptray-abc", f"{dead_pid()}\n")
    kept = head_dir(tmp_path, "ptray-abcd", f"{dead_pid()}\n")
    naming(str(kept))  # the exact path, at the end of an argument
    assert sweep(tmp_path) == {"ptray-abc"}
    assert kept.exists()


def test_nothing_else_is_touched(tmp_path: Path) -> None:
    pid = f"{dead_pid()}\n"
    others = [
        head_dir(tmp_path, "other-dir", pid),
        head_dir(tmp_path, "ptray", pid),  # no dash: not ours
        head_dir(tmp_path, "xptray-1", pid),
        head_dir(tmp_path / "nested", "ptray-deep", pid),  # only direct children of the base
    ]
    target = head_dir(tmp_path / "elsewhere", "ptray-target", pid)
    (tmp_path / "ptray-link").symlink_to(target)
    (tmp_path / "ptray-file").write_text(pid)
    assert sweep(tmp_path, now=time.time() + LATER) == set()
    assert all(d.exists() for d in others)
    assert target.exists() and (tmp_path / "ptray-link").is_symlink() and (tmp_path / "ptray-file").exists()


def test_other_users_dirs_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = head_dir(tmp_path, "ptray-theirs", f"{dead_pid()}\n")
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    assert sweep(tmp_path, now=time.time() + LATER) == set()
    assert d.exists()


def test_missing_base_is_nothing_to_do(tmp_path: Path) -> None:
    assert sweep_stale_temp_dirs(tmp_path / "nope") == []


def test_starting_a_head_sweeps_then_names_its_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """start_private_head (the supervisor's call) sweeps first and writes owner.pid into its new dir."""
    stale = head_dir(tmp_path, "ptray-stale", f"{dead_pid()}\n")
    launched: list[Path] = []

    def fake_launch(tdir: Path, env: dict[str, str], *_: Any) -> RayHandle:
        launched.append(tdir)
        return RayHandle("127.0.0.1:1", -1, tdir, env, False, None)

    monkeypatch.setattr(ray_runtime, "TEMP_BASE", tmp_path)
    monkeypatch.setattr(ray_runtime, "_launch", fake_launch)
    handle = ray_runtime.start_private_head()
    assert not stale.exists()
    assert launched == [handle.temp_dir] and handle.temp_dir.parent == tmp_path
    assert handle.temp_dir.name.startswith("ptray-") and handle.owns_temp_dir
    pid, started = (handle.temp_dir / OWNER_FILE).read_text().split()
    assert int(pid) == os.getpid()
    assert abs(float(started) - psutil.Process().create_time()) < 1
    assert sweep(tmp_path, now=time.time() + LATER) == set()  # its owner (we) is alive
