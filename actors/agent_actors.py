"""Ray shells around the agent's components: one named actor per component.

Each actor rebuilds its component from the state directory in `__init__` (so a
restart brings it back with its servers), counts its boots in the runtime
directory (restarts = boots - 1), and announces itself to the coordinator. The
coordinator, when it restarts, asks every other actor to announce itself again.
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

from agent.common.files import private_append, private_dir
from agent.refs import LocalRef, Ref
from agent.runtime_paths import runtime_dir
from agent.stack import build_component, components, load_runtime

ACTOR_OPTIONS: dict[str, Any] = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1}


def namespace_for(state_dir: Path) -> str:
    """One Ray namespace per agent, so names never clash between agents sharing a cluster."""
    import hashlib

    return "punchthrough-" + hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]


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
    os.close(private_append(logs / f"{kind}.log"))  # peer IDs, keys and targets: for the owner's eyes only
    handler = logging.FileHandler(logs / f"{kind}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class RayRef:
    """A named actor in the agent's namespace (actors.agent_actors.ComponentActor).

    The handle survives the actor's restarts; every call goes through the actor's
    single `call(method, *args)` entry point.
    """

    def __init__(self, name: str, namespace: str) -> None:
        self.name = name
        self.namespace = namespace
        self._handle: Any = None

    async def call(self, method: str, *args: Any) -> Any:
        if self._handle is None:
            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        return await self._handle.call.remote(method, *args)


@ray.remote(**ACTOR_OPTIONS)
class ComponentActor:
    def __init__(self, kind: str, state_dir: str, namespace: str) -> None:
        self.kind = kind
        self.state_dir = Path(state_dir)
        self.namespace = namespace
        self.restarts = _count_boot(self.state_dir, kind)
        _setup_logging(self.state_dir, kind)
        self.component: Any = None
        self._ready = asyncio.get_running_loop().create_task(self._boot())

    def _refs(self) -> dict[str, Ref]:
        return {k: RayRef(k, self.namespace) for k in components()}

    async def _boot(self) -> None:
        rt = load_runtime(self.state_dir)
        self.component = await build_component(self.kind, rt, self._refs())
        if self.kind == "coordinator":
            self.component.register_actor("coordinator", os.getpid(), self.restarts)
            asyncio.get_running_loop().create_task(self._collect_announcements())
        else:
            await self._announce()

    async def _announce(self) -> None:
        """Tell the coordinator we are (back) up; it may not exist yet, so retry for a while."""
        for _ in range(100):
            with contextlib.suppress(Exception):
                await RayRef("coordinator", self.namespace).call(
                    "register_actor", self.kind, os.getpid(), self.restarts
                )
                return
            await asyncio.sleep(0.2)

    async def _collect_announcements(self) -> None:
        for kind in components():
            if kind != "coordinator":
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(RayRef(kind, self.namespace).call("__announce__"), 5)

    async def call(self, method: str, *args: Any) -> Any:
        """Run `method` of the component (the one entry point RayRef uses)."""
        await self._ready
        if method == "__announce__":
            await self._announce()
            return True
        if method.startswith("_"):
            raise AttributeError(f"{method} is private")
        return await LocalRef(self.component).call(method, *args)

    async def pid(self) -> int:
        return os.getpid()
