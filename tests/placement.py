"""Which placement (agent/placement.py) the agents of a test run in.

Each module that starts real agents picks its placement(s) (`for_module`); CI thus runs both
placements without running every slow test twice (a placement a module leaves to `-m slow` is
one another module's default run covers). PUNCHTHROUGH_TEST_PLACEMENT=isolated|grouped
forces one placement on every module (run the ray and natlab suites once per placement by hand).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

ENV = "PUNCHTHROUGH_TEST_PLACEMENT"


def forced() -> str | None:
    return os.environ.get(ENV) or None


def for_module(*placements: str, slow: tuple[str, ...] = ()) -> list[Any]:
    """The placements a module runs its agents in: its own choice, unless the environment forces one.
    Those in `slow` run only with `-m slow` (a placement the default run covers in another module)."""
    if forced():
        return [forced()]
    return [pytest.param(p, marks=pytest.mark.slow) if p in slow else p for p in placements]


def flags(placement: str | None = None) -> list[str]:
    """`up` flags for `placement` (or the one the environment forces); none at all (the default flags)
    when neither names one."""
    chosen = forced() or placement
    return ["--placement", chosen] if chosen else []


def kill_plan(rows: list[dict[str, Any]], spare: set[str]) -> list[tuple[str, int, list[str]]]:
    """The actors to SIGKILL so that no component in `spare` dies: (actor, pid, its components), the
    coordinator's actor last (its restart re-collects the others). In the isolated placement that is
    every component but `spare`; grouped, only the groups that carry none of them."""
    carried: dict[str, list[str]] = {}
    pids: dict[str, int] = {}
    for row in rows:
        actor = row.get("actor") or row["name"]
        carried.setdefault(actor, []).append(row["name"])
        pids[actor] = int(row["pid"])
    plan = [(actor, pids[actor], kinds) for actor, kinds in carried.items() if not spare & set(kinds)]
    return sorted(plan, key=lambda p: "coordinator" in p[2])
