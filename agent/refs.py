"""How one component calls another: directly in one process (tests), or through Ray
(`actors.agent_actors.RayRef`).

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
