"""What every harness shares: coverage instrumentation of `agent`, seed corpora, the libFuzzer entry point.

A harness module imports the code under test inside `with instrumented():` so that atheris
sees its branches, defines `TestOneInput(data)` and `seeds()`, and ends with
`main = entry(...)`. `python -m fuzz.NAME [libFuzzer flags] [corpus dirs]` then fuzzes it;
with no input files named, the seeds are written to `<tmp>/punchthrough-fuzz/corpus/NAME/`
and handed over with -seed_inputs, so nothing big ever lands in the repository.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import atheris

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO / "tests" / "vectors"


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """Instrument the project's modules imported in this block (generated protobuf code excluded)."""
    with atheris.instrument_imports(
        include=["agent"], exclude=["agent.proto", "agent.proto.rendezvous_pb2", "agent.proto.message_pb2"]
    ):
        yield


def load_vectors(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def write_seeds(target: str, seeds: Iterable[bytes]) -> list[Path]:
    """Write the seed corpus to the temp dir (atomically, so parallel runs do not tear files)."""
    folder = Path(tempfile.gettempdir()) / "punchthrough-fuzz" / "corpus" / target
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, seed in enumerate(seeds):
        path = folder / f"seed-{i:04d}"
        tmp = folder / f".seed-{i:04d}.{os.getpid()}"
        tmp.write_bytes(seed)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def libfuzzer_argv(target: str, argv: Sequence[str], seeds: Callable[[], Iterable[bytes]], max_len: int) -> list[str]:
    """argv for atheris.Setup: the user's flags, our seeds unless files are being replayed, a default -max_len."""
    args = list(argv)
    flags = [a for a in args[1:] if a.startswith("-")]
    inputs = [a for a in args[1:] if not a.startswith("-")]
    replaying = any(Path(a).is_file() for a in inputs)
    if not replaying and not any(f.startswith("-seed_inputs=") for f in flags):
        paths = write_seeds(target, seeds())
        if paths:
            args.append("-seed_inputs=" + ",".join(str(p) for p in paths))
    if not any(f.startswith("-max_len=") for f in flags):
        args.append(f"-max_len={max_len}")
    return args


def entry(
    target: str, test_one_input: Callable[[bytes], None], seeds: Callable[[], Iterable[bytes]], max_len: int = 4096
) -> Callable[[], None]:
    """The harness's `main()`: hand argv to libFuzzer and fuzz until it stops (it exits the process)."""

    def main() -> None:
        atheris.Setup(libfuzzer_argv(target, sys.argv, seeds, max_len), test_one_input)
        atheris.Fuzz()

    return main


class Reader:
    """A tiny cursor over the fuzz input for record-structured harnesses (seed-friendly, unlike
    FuzzedDataProvider, whose integers come off the end): every read past the end yields zeros/empty."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def __bool__(self) -> bool:
        return self.pos < len(self.data)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.byte() | self.byte() << 8

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)


def record(head: bytes, payload: bytes = b"") -> bytes:
    """Seed helper: one [head...][len u16][payload] record, as Reader-based harnesses parse them."""
    return head + len(payload).to_bytes(2, "little") + payload
