"""How one component calls another: directly in one process (tests), or through Ray.

The coordinator and the actors are written against `Ref.call(method, *args)`, so
the same classes run in-process under pytest and as supervised Ray actors.
Only control goes through here; session bytes never do.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol


class Ref(Protocol):
    async def call(self, method: str, *args: Any) -> Any: ...


class LocalRef:
    def __init__(self, obj: Any) -> None:
        self.obj = obj

    async def call(self, method: str, *args: Any) -> Any:
        result = getattr(self.obj, method)(*args)
        if inspect.isawaitable(result):
            result = await result
        return result


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
        import ray

        if self._handle is None:
            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        return await self._handle.call.remote(method, *args)
