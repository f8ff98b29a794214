"""Every strategy the agent can race, in one list: the stack builds their components from it, and the
coordinator reaches them, cancels them and races them by it.

A new strategy is one module (its component, its `Remote`, and its own step of A's race) plus one
entry here; an in-process agent (the tests) can `register()` one instead. The built-in ones are
raced by steps of `agent.control.race.Race` (one rendezvous exchange serves lan, tcp_punch and
ipv6), so their entries carry no `race` step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from agent.strategies.base import Component, RaceSteps, Remote, StrategyEnv
from agent.strategies.direct import DirectServer
from agent.strategies.ipv6 import Ipv6Remote, Ipv6Strategy
from agent.strategies.relay import RelayRemote, RelayStrategy
from agent.strategies.tcp_direct import TcpDirectRemote, TcpDirectStrategy
from agent.strategies.udp_punch import UdpPunchRemote, UdpPunchStrategy


@dataclass(frozen=True)
class StrategyEntry:
    name: str
    build: Callable[[StrategyEnv], Component]
    """The component, in its actor (every restart builds it again)."""
    remote: type[Remote] = Remote
    race: Callable[[RaceSteps], Awaitable[None]] | None = None
    """A's own step in the race (a plug-in's); it starts with the direct paths, before the relay."""
    runs: Callable[[StrategyEnv], bool] = lambda env: True
    """Whether this agent runs the component at all (the direct port only when configured)."""


BUILTIN: tuple[StrategyEntry, ...] = (
    StrategyEntry("relay", lambda env: RelayStrategy(env.sessions_socket, env.relay_key), RelayRemote),
    StrategyEntry("lan", lambda env: TcpDirectStrategy("lan", env.sessions_socket, env.server), TcpDirectRemote),
    StrategyEntry(
        "tcp_punch", lambda env: TcpDirectStrategy("tcp_punch", env.sessions_socket, env.server), TcpDirectRemote
    ),
    StrategyEntry(
        "udp_punch",
        lambda env: UdpPunchStrategy(
            env.sessions_socket, env.server, birthday_budget=env.birthday, birthday_interval=env.birthday_interval
        ),
        UdpPunchRemote,
    ),
    StrategyEntry("ipv6", lambda env: Ipv6Strategy(env.sessions_socket), Ipv6Remote),
    StrategyEntry(
        "direct",
        lambda env: DirectServer(env.sessions_socket, env.direct_port, env.bind),
        runs=lambda env: bool(env.direct_port),
    ),
)

_extra: list[StrategyEntry] = []


def entries() -> tuple[StrategyEntry, ...]:
    return BUILTIN + tuple(_extra)


def names() -> tuple[str, ...]:
    return tuple(e.name for e in entries())


def entry(name: str) -> StrategyEntry:
    for e in entries():
        if e.name == name:
            return e
    raise KeyError(f"no strategy {name!r}")


def register(new: StrategyEntry) -> None:
    """Add a strategy to this process's agents (components built in this process only: a Ray actor
    sees only the entries above)."""
    if new.name in names():
        raise ValueError(f"a strategy named {new.name!r} exists already")
    _extra.append(new)


def unregister(name: str) -> None:
    _extra[:] = [e for e in _extra if e.name != name]
