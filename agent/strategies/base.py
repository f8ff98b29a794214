"""What a strategy is: a component that owns sockets in its own actor, reached through a typed remote.

Every strategy gets a connected transport socket to the peer and hands it to the session owner by
fd (`handover`); the session owner authenticates it. A strategy's component runs where its sockets
are (one actor per strategy by default); the coordinator reaches it through a `Ref` wrapped in the
strategy's `Remote`, whose methods carry dataclasses and return a `Result`, so mypy checks every
cross-actor call on both sides. Strategies are listed in `agent/strategies/registry.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.refs import Ref
from agent.strategies.birthday_core import Budget


@dataclass(frozen=True)
class Result:
    """How one attempt ended: `ok` once its transport is with the session owner."""

    ok: bool
    reason: str = ""
    elapsed_ms: float | None = None

    @classmethod
    def failed(cls, reason: str) -> Result:
        return cls(False, reason)


CANCELLED = Result(False, "cancelled: another path won")


@dataclass(frozen=True)
class Answer:
    """B's side of one push from the rendezvous server: answer it and get A's transport.

    `meta` goes to the session owner with the transport (who the server says asks, with which key)."""

    session: str
    push: Any
    my_id: str
    nat_type: int
    relay: str
    budget: float
    meta: dict[str, Any] = field(default_factory=dict)
    socket_addr_v6: bytes = b""
    nat_behavior: bytes = b""
    """Our NatBehavior, serialized, for PunchHoleSent (A plans with it)."""


@dataclass(frozen=True)
class StrategyEnv:
    """What a strategy's component is built from (in its own actor, from the state directory)."""

    state_dir: Path
    sessions_socket: Path
    server: tuple[str, int]
    """The rendezvous server."""
    relay_key: str = ""
    direct_port: int = 0
    bind: str = "0.0.0.0"
    version: str = "punchthrough"
    birthday: Budget = field(default_factory=Budget)
    birthday_interval: float = 30.0


class Component(Protocol):
    """What the stack and the coordinator need of every strategy's component."""

    def cancel(self, session: str) -> int: ...

    def status(self) -> dict[str, Any]: ...


class Remote:
    """A strategy's component as the coordinator reaches it. Subclasses add the strategy's own calls."""

    def __init__(self, ref: Ref) -> None:
        self.ref = ref

    async def cancel(self, session: str) -> int:
        """Stop the session's attempts there (a Ray call the caller stops awaiting keeps running)."""
        return int(await self.ref.call("cancel", session))

    async def status(self) -> dict[str, Any]:
        reply = await self.ref.call("status")
        return dict(reply) if isinstance(reply, dict) else {}

    async def _result(self, method: str, *args: Any) -> Result:
        reply = await self.ref.call(method, *args)
        if not isinstance(reply, Result):
            return Result.failed(f"{method}: unexpected reply {type(reply).__name__}")
        return reply


class RaceSteps(Protocol):
    """What a strategy's own step of A's race may use (built-in ones are steps of `Race` itself)."""

    peer: str
    session: str

    def remaining(self) -> float:
        """Seconds left of the session's budget."""
        ...

    def ref(self, name: str) -> Ref:
        """The named strategy's component."""
        ...

    def pinned_key(self) -> bytes | None:
        """The peer's key pinned by an earlier session, if any (checked against a named fingerprint)."""
        ...

    def use_key(self, strategy: str, peer_pk: bytes, source: str) -> None:
        """The key this strategy's transport is authenticated with (kept with the session)."""
        ...

    def running(self, strategy: str) -> None: ...

    def connected(self, strategy: str) -> None: ...

    def error(self, strategy: str, reason: str) -> None: ...

    def skipped(self, strategy: str, reason: str) -> None: ...
