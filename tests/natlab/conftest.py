"""Fixtures that build NAT lab scenarios and always tear them down.

`natlab("both-cone")` builds a scenario for one test; `natlab_module` shares labs across a module.
Both skip the test with the reason when this machine cannot build labs (not root, no `ip netns`).
Teardown runs in `finally`, so a failing or interrupted test leaves nothing behind; `Lab` also
registers an atexit hook, and labs left by a crashed earlier session (owner pid gone) are removed
once per session before the first lab is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from ops.natlab import Lab, available, is_stale, lab_prefixes, remove_lab

LabFactory = Callable[..., Lab]


@pytest.fixture(scope="session")
def natlab_ready() -> None:
    ok, why = available()
    if not ok:
        pytest.skip(why)
    for prefix in lab_prefixes():
        if is_stale(prefix):
            with contextlib.suppress(Exception):
                remove_lab(prefix)


def _factory() -> Iterator[LabFactory]:
    labs: list[Lab] = []

    def make(scenario: str, prefix: str | None = None) -> Lab:
        lab = Lab(scenario, prefix)
        labs.append(lab)
        return lab.up()

    try:
        yield make
    finally:
        for lab in reversed(labs):
            lab.down()


@pytest.fixture
def natlab(natlab_ready: None) -> Iterator[LabFactory]:
    yield from _factory()


@pytest.fixture(scope="module")
def natlab_module(natlab_ready: None) -> Iterator[LabFactory]:
    yield from _factory()
