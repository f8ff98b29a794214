"""Runs every atheris harness in fuzz/ (coverage-guided, libFuzzer) in its own process.

Default: a short deterministic run per harness (fixed -seed, fixed hash seed), two at a time,
so the whole file stays well under 30 s on two cores. `-m slow` runs each far longer with a
random seed; PUNCHTHROUGH_SOAK=1 multiplies that by ten. A harness that finds a crash exits
non-zero: the test fails with libFuzzer's report and the crashing input in hex, which
`python -m fuzz.NAME FILE` replays.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from fuzz import TARGETS

try:
    import atheris  # noqa: F401
except ImportError:  # pragma: no cover - platforms without a wheel
    pytest.skip(
        "atheris is not importable (no wheel for this platform or Python; it is in the dev extra "
        "for Linux x86_64, Python < 3.13): the fuzz harnesses cannot run",
        allow_module_level=True,
    )

REPO = Path(__file__).resolve().parents[2]
SOAK = 10 if os.environ.get("PUNCHTHROUGH_SOAK") == "1" else 1


@dataclass(frozen=True)
class Budget:
    runs: int
    seconds: int
    seed: int  # 0: libFuzzer picks one


QUICK = Budget(runs=20_000, seconds=10, seed=1)
LONG = Budget(runs=500_000 * SOAK, seconds=240 * SOAK, seed=0)


@dataclass
class Result:
    target: str
    returncode: int
    output: str
    artifacts: list[Path]

    def stat(self, name: str) -> int:
        m = re.search(rf"^stat::{name}:\s*(\d+)", self.output, re.M)
        return int(m.group(1)) if m else -1

    @property
    def coverage(self) -> tuple[int, int]:
        """(cov, ft) from libFuzzer's last status line."""
        found = re.findall(r"cov: (\d+) ft: (\d+)", self.output)
        return (int(found[-1][0]), int(found[-1][1])) if found else (-1, -1)


def run_harness(target: str, budget: Budget, workdir: Path) -> Result:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        f"fuzz.{target}",
        f"-runs={budget.runs}",
        f"-max_total_time={budget.seconds}",
        f"-seed={budget.seed}",
        "-timeout=30",
        "-print_final_stats=1",
        f"-artifact_prefix={workdir}/",
    ]
    env = dict(os.environ)
    if budget.seed:
        env["PYTHONHASHSEED"] = "0"
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=budget.seconds + 120,
        check=False,
    )
    artifacts = sorted(p for p in workdir.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    return Result(target, proc.returncode, proc.stdout + proc.stderr, artifacts)


REPORT: dict[str, Result] = {}


def _runner(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, marker: str
) -> Iterator[dict[str, Future[Result]]]:
    """Start every selected harness of this kind at once, two at a time (one per core)."""
    budget = LONG if marker == "slow" else QUICK
    wanted = [
        str(item.callspec.params["target"])
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.module is request.module
        and hasattr(item, "callspec")
        and (item.get_closest_marker("slow") is not None) == (marker == "slow")
    ]
    base = tmp_path_factory.mktemp(f"atheris-{marker}")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {t: pool.submit(run_harness, t, budget, base / t) for t in dict.fromkeys(wanted)}
        yield futures
        for f in futures.values():
            f.cancel()


@pytest.fixture(scope="module")
def quick_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[Result]]]:
    yield from _runner(request, tmp_path_factory, "quick")


@pytest.fixture(scope="module")
def long_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[Result]]]:
    yield from _runner(request, tmp_path_factory, "slow")


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    if REPORT:
        print("\natheris executions per harness:")
        for name, r in sorted(REPORT.items()):
            cov, ft = r.coverage
            print(
                f"  {name:14s} {r.stat('number_of_executed_units'):9d} runs "
                f"{r.stat('average_exec_per_sec'):7d}/s  cov {cov} ft {ft}  new units {r.stat('new_units_added')}"
            )


def check(result: Result) -> None:
    REPORT[result.target] = result
    detail = "\n".join(result.output.splitlines()[-60:])
    for art in result.artifacts:
        data = art.read_bytes()
        detail += f"\n{art.name} ({len(data)} bytes): {data[:2048].hex()}"
    assert result.returncode == 0, f"fuzz.{result.target} exited {result.returncode}:\n{detail}"
    executed = result.stat("number_of_executed_units")
    assert executed > 0, f"no final stats from fuzz.{result.target}:\n{detail}"
    cov, _ = result.coverage
    assert cov > 0, f"fuzz.{result.target} reports no coverage: is agent/ instrumented?\n{detail}"


@pytest.mark.parametrize("target", TARGETS)
def test_harness(target: str, quick_runs: dict[str, Future[Result]]) -> None:
    check(quick_runs[target].result())


@pytest.mark.slow
@pytest.mark.timeout(LONG.seconds * (len(TARGETS) + 1) // 2 + 300)  # may wait for the runs queued before it
@pytest.mark.parametrize("target", TARGETS)
def test_harness_long(target: str, long_runs: dict[str, Future[Result]]) -> None:
    check(long_runs[target].result())
