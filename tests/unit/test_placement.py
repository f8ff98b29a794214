"""Placement (agent/placement.py) and the host that carries components (agent/stack.ComponentHost)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agent import config, placement
from agent.stack import ComponentHost, NotRunning, components

KINDS = list(components())


def test_isolated_is_one_actor_per_component() -> None:
    where = placement.layout(KINDS, "isolated")
    assert where == {k: k for k in KINDS}
    assert placement.actors(where) == {k: [k] for k in KINDS}


def test_grouped_is_control_and_data() -> None:
    groups = placement.actors(placement.layout(KINDS, "grouped"))
    assert set(groups) == {"control", "data"}
    assert groups["control"] == ["nat_probe", "registrar", "coordinator"]
    # everything bytes cross goes together: the servers (relayed pairs), the session owner and every
    # strategy (the sockets they hand over stay in one process); control never carries a byte
    assert groups["data"][:2] == ["servers", "sessions"]
    assert set(groups["data"]) == set(KINDS) - {"nat_probe", "registrar", "coordinator"}


def test_an_agent_without_servers_has_the_same_two_actors() -> None:
    kinds = [k for k in KINDS if k != "servers"]
    assert set(placement.actors(placement.layout(kinds, "grouped"))) == {"control", "data"}


def test_unknown_placement() -> None:
    with pytest.raises(ValueError, match="unknown placement 'packed'"):
        placement.actor_of("sessions", "packed")


@pytest.mark.parametrize("value", ["", "Grouped", "packed", "isolated "])
def test_config_rejects_other_placements(tmp_path: Path, value: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[ray]\nplacement = "{value}"\n')
    with pytest.raises(config.ConfigError, match=r"^ray\.placement must be isolated or grouped, got"):
        config.load(path)


def test_config_placement_round_trips(tmp_path: Path) -> None:
    cfg = config.Config()
    assert cfg.ray.placement == "isolated"
    cfg.ray.placement = "grouped"
    path = tmp_path / "c.toml"
    path.write_text(config.dump(cfg))
    assert config.load(path).ray.placement == "grouped"


class _Echo:
    def __init__(self, name: str) -> None:
        self.name = name

    async def hello(self, who: str) -> str:
        return f"{self.name} greets {who}"


async def test_a_call_waits_until_its_component_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = asyncio.Event()

    async def build(kind: str, rt: Any, refs: Any) -> Any:
        if kind == "second":
            await gate.wait()
        return _Echo(kind)

    monkeypatch.setattr("agent.stack.build_component", build)
    host = ComponentHost(["first", "second"])
    started = asyncio.ensure_future(host.start(None))  # type: ignore[arg-type]
    call = asyncio.ensure_future(host.ref("second").call("hello", "you"))
    await asyncio.sleep(0.01)
    assert not call.done()
    assert await host.ref("first").call("hello", "me") == "first greets me"
    gate.set()
    assert await call == "second greets you"
    await started


async def test_calls_to_a_failed_or_absent_component_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    async def build(kind: str, rt: Any, refs: Any) -> Any:
        if kind == "broken":
            raise OSError("port taken")
        return _Echo(kind)

    monkeypatch.setattr("agent.stack.build_component", build)
    host = ComponentHost(["ok", "broken", "later"])
    waiting = asyncio.ensure_future(host.call("later", "hello", "x"))
    with pytest.raises(OSError):
        await host.start(None)  # type: ignore[arg-type]
    with pytest.raises(NotRunning, match="'broken' failed to start: OSError"):
        await waiting
    with pytest.raises(NotRunning, match="does not run"):
        await host.ref("elsewhere").call("hello", "x")
    with pytest.raises(AttributeError, match="private"):
        await host.call("ok", "_secret")
