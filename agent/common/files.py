"""Crash-safe private files: a reader sees the old content or the new, never half of either."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def write_private(path: Path, data: bytes) -> None:
    """Atomic replace with mode 0600, file and directory fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner can enter: created 0700, or tightened if it was looser
    (state written by an older version, or by hand with the default umask)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def private_append(path: Path) -> int:
    """An fd appending to `path`, which is created 0600 (and made 0600 if it was not)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def one_line(exc: BaseException, limit: int = 120) -> str:
    """An exception as it goes into a one-line message (json errors can quote the file's text)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


def read_json_state(
    path: Path,
    what: str,
    parse: Callable[[Any], T],
    error: type[Exception] = ValueError,
    hint: str = "",
    passthrough: tuple[type[Exception], ...] = (),
) -> T | None:
    """`parse` of the JSON in `path`, or None when there is no such file. Anything else that goes wrong
    (a directory, no permission, not JSON, the wrong shape, nested too deeply) becomes `error` with one
    line naming the file and `what` it holds, then `hint`; `passthrough` errors of `parse` stay as they are."""
    try:
        return parse(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except passthrough:
        raise
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except RecursionError:
        raise error(f"{path}: unreadable {what} (nested too deeply){hint}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise error(f"{path}: unreadable {what} ({one_line(exc)}){hint}") from None
