"""Ray shells around the agent's components: named actors, each carrying one component or a group
(agent/placement.py).

Each actor rebuilds its components from the state directory in `__init__` (so a
restart brings them back with their servers), counts its boots in the runtime
directory (restarts = boots - 1), and announces its components to the coordinator.
The coordinator, when it restarts, asks every other actor to announce itself again.
Everything else is the plain asyncio component: bytes never pass through Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import ray

from actors import direct_calls
from agent import placement
from agent.common.files import private_dir
from agent.common.logfiles import component_handler
from agent.refs import Ref
from agent.runtime_paths import call_socket, runtime_dir
from agent.stack import ComponentHost, load_runtime

ACTOR_OPTIONS: dict[str, Any] = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1}


def _count_boot(state_dir: Path, kind: str) -> int:
    path = runtime_dir(state_dir) / "boots" / kind
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        boots = int(path.read_text()) + 1
    except (FileNotFoundError, ValueError):
        boots = 1
    path.write_text(str(boots))
    return boots - 1


def _setup_logging(state_dir: Path, kind: str) -> None:
    logs = private_dir(state_dir / "logs")
    handler = component_handler(logs / f"{kind}.log")  # peer IDs, keys and targets: for the owner's eyes only
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class RayRef:
    """A component carried by a named actor of the agent's namespace (HostActor).

    The handle survives the actor's restarts; every call goes through the actor's single
    `call(kind, method, *args)` entry point.
    """

    def __init__(self, actor: str, namespace: str, kind: str | None = None, direct: Path | None = None) -> None:
        self.actor = actor
        self.kind = kind or actor
        self.namespace = namespace
        self.direct = direct
        """The actor's socket for direct calls on this host (actors/direct_calls.py); Ray when it fails."""
        self._handle: Any = None

    async def call(self, method: str, *args: Any) -> Any:
        if self.direct is not None:
            with contextlib.suppress(direct_calls.Unreachable):
                return await direct_calls.call(self.direct, self.kind, method, args)
        if self._handle is None:
            self._handle = ray.get_actor(self.actor, namespace=self.namespace)
        return await self._handle.call.remote(self.kind, method, *args)


@ray.remote(**ACTOR_OPTIONS)
class HostActor:
    """One actor carrying some components (agent/placement.py): one in the isolated placement, a group
    when grouped. `where` maps every component of the agent to its actor, so calls to the others go
    to the right actor; Ray re-runs `__init__` with the same arguments after a crash."""

    def __init__(self, name: str, where: dict[str, str], state_dir: str, namespace: str) -> None:
        self.name = name
        self.where = where
        self.state_dir = Path(state_dir)
        self.namespace = namespace
        self.restarts = _count_boot(self.state_dir, name)
        _setup_logging(self.state_dir, name)
        kinds = [kind for kind, actor in where.items() if actor == name]
        self.host = ComponentHost(kinds, self._elsewhere)
        self.direct: direct_calls.DirectCallServer | None = None
        self._ready = asyncio.get_running_loop().create_task(self._boot())

    def _elsewhere(self, kind: str) -> Ref:
        actor = self.where.get(kind, kind)
        return RayRef(actor, self.namespace, kind, call_socket(self.state_dir, actor))

    async def _boot(self) -> None:
        await self.host.start(load_runtime(self.state_dir))
        self.direct = direct_calls.DirectCallServer(call_socket(self.state_dir, self.name), self.call)
        try:
            await self.direct.start()
        except OSError as exc:  # the others reach us through Ray alone: slower, not broken
            logging.getLogger(__name__).warning("no socket for direct calls: %s", exc)
        await self._announce()
        if "coordinator" in self.host.kinds:
            await self._collect_announcements()

    async def _announce(self) -> None:
        """Tell the coordinator our components are (back) up; it may not exist yet, so retry for a while."""
        coordinator = self.host.ref("coordinator")
        for kind in self.host.kinds:
            for _ in range(100):
                try:
                    await coordinator.call("register_actor", kind, os.getpid(), self.restarts, self.name)
                    break
                except Exception:
                    await asyncio.sleep(0.2)

    async def _collect_announcements(self) -> None:
        """A restarted coordinator has an empty actor table: ask every other actor to announce again."""
        for actor in {a for a in self.where.values() if a != self.name}:
            with contextlib.suppress(Exception):
                handle = ray.get_actor(actor, namespace=self.namespace)
                await asyncio.wait_for(handle.announce.remote(), 5)

    async def announce(self) -> bool:
        await self._ready
        await self._announce()
        return True

    async def call(self, kind: str, method: str, *args: Any) -> Any:
        """Run `method` of component `kind` (the one entry point RayRef uses), once it is built."""
        return await self.host.call(kind, method, *args)

    async def pid(self) -> int:
        return os.getpid()


def start_actors(where: dict[str, str], state_dir: Path, namespace: str) -> list[Any]:
    """Create the agent's detached actors (the running ones are kept: `get_if_exists`); their handles."""
    return [
        HostActor.options(  # type: ignore[attr-defined]
            name=name, namespace=namespace, lifetime="detached", get_if_exists=True
        ).remote(name, where, str(state_dir), namespace)
        for name in placement.actors(where)
    ]
