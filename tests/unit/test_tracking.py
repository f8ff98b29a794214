"""Tracked attempts: `cancel(session)` stops a strategy's running attempt at once."""

from __future__ import annotations

import asyncio

from agent.strategies.tracking import Tracked


async def test_cancel_stops_the_attempt_and_returns_the_cancelled_value() -> None:
    t = Tracked()
    stopped = asyncio.Event()

    async def slow() -> str:
        try:
            await asyncio.sleep(30)
            return "finished"
        finally:
            stopped.set()

    call = asyncio.ensure_future(t._track("s1", slow(), "cancelled"))
    await asyncio.sleep(0.01)
    assert t.cancel("s1") == 1
    assert await asyncio.wait_for(call, 0.5) == "cancelled"
    assert stopped.is_set()
    assert t.cancel("s1") == 0 and t.cancelled == 1


async def test_other_sessions_keep_running() -> None:
    t = Tracked()
    a = asyncio.ensure_future(t._track("a", asyncio.sleep(0.05, "a done"), "cancelled"))
    b = asyncio.ensure_future(t._track("b", asyncio.sleep(30, "b done"), "cancelled"))
    await asyncio.sleep(0)
    t.cancel("b")
    assert await a == "a done" and await b == "cancelled"


async def test_caller_cancellation_stops_the_work_too() -> None:
    t = Tracked()
    call = asyncio.ensure_future(t._track("s", asyncio.sleep(30), None))
    await asyncio.sleep(0.01)
    call.cancel()
    await asyncio.sleep(0.01)
    assert t._attempts == {}
