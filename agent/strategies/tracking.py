"""Per-session attempt tracking, so the coordinator can stop the losers of a race at once.

A Ray call that the caller stops awaiting keeps running in the actor; `cancel(session)`
ends it there (the attempt's sockets are closed by its own cleanup).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class Tracked:
    def __init__(self) -> None:
        self._attempts: dict[str, set[asyncio.Task[Any]]] = {}
        self.cancelled = 0

    async def _track(self, session: str, work: Awaitable[T], cancelled: T) -> T:
        """Run `work` as a task that `cancel(session)` can stop; then return `cancelled`."""
        task = asyncio.ensure_future(work)
        self._attempts.setdefault(session, set()).add(task)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                return cancelled
            task.cancel()
            raise
        finally:
            tasks = self._attempts.get(session)
            if tasks is not None:
                tasks.discard(task)
                if not tasks:
                    del self._attempts[session]

    def cancel(self, session: str) -> int:
        """Stop every attempt of `session`; returns how many were running."""
        tasks = self._attempts.pop(session, set())
        for task in tasks:
            task.cancel()
        self.cancelled += len(tasks)
        return len(tasks)
