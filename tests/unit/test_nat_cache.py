"""The coordinator's cache of the NAT probe's status (agent/control/coordinator.py nat_cache_use)."""

from __future__ import annotations

import pytest

from agent.control.coordinator import NAT_STATUS_STALE, NAT_STATUS_TTL, nat_cache_use


@pytest.mark.parametrize(
    ("age", "measured", "use"),
    [
        (0.0, True, "fresh"),
        (NAT_STATUS_TTL, False, "fresh"),  # within a second: as it is, measured or not
        (NAT_STATUS_TTL + 0.01, True, "stale"),  # served at once; the probe's actor is asked beside
        (NAT_STATUS_STALE, True, "stale"),
        (NAT_STATUS_STALE + 0.01, True, "ask"),  # a session after a long quiet waits for a fresh answer
        (NAT_STATUS_TTL + 0.01, False, "ask"),  # cached before the first measurement: never planned with
    ],
)
def test_nat_cache_use(age: float, measured: bool, use: str) -> None:
    assert nat_cache_use(age, measured) == use
