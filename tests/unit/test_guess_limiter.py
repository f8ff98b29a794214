"""agent/session/guess_limiter.py: back-off for password guesses, with fake time."""

from __future__ import annotations

from agent.session.guess_limiter import GuessLimiter, cost_of_guesses, guess_keys

KEYS = ["id:1", "ip:203.0.113.5"]


def test_three_free_then_locks_that_double_up_to_an_hour() -> None:
    g = GuessLimiter()
    now = 0.0
    for _ in range(3):
        assert g.check(KEYS, now) is None
        g.failed(KEYS, now)
    assert g.check(KEYS, now) is None  # the fourth try is still checked ...
    g.failed(KEYS, now)
    locks = []
    for _ in range(14):
        wait = g.wait(KEYS, now)
        locks.append(wait)
        assert g.check(KEYS, now + wait - 0.01) is not None  # ... then each waits its lock out
        now += wait
        g.failed(KEYS, now)
    assert locks[:5] == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert max(locks) == 3600.0 and locks[-1] == 3600.0
    assert "retry in" in (g.check(KEYS, now) or "")
    assert g.refused > 0 and g.locked(now) == 2


def test_other_ids_and_addresses_are_not_affected_but_the_whole_agent_is_capped() -> None:
    g = GuessLimiter()
    for _ in range(10):
        g.failed(KEYS, 0.0)
    assert g.check(["id:2", "ip:198.51.100.1"], 0.0) is None
    for i in range(20):  # many addresses and IDs: the global bucket (20) runs dry
        g.failed([f"id:x{i}", f"ip:10.0.0.{i}"], 1.0)
    assert "retry in" in (g.check(["id:new", "ip:192.0.2.1"], 1.0) or "")
    assert g.check(["id:new", "ip:192.0.2.1"], 1.0 + 6.1) is None  # 10 a minute refill


def test_a_right_password_and_time_clear_a_key() -> None:
    g = GuessLimiter()
    for _ in range(5):
        g.failed(KEYS, 0.0)
    g.succeeded(KEYS)
    assert g.wait(KEYS, 0.0) == 0.0  # five failures left 15 of the 20 global tokens
    g2 = GuessLimiter()
    for _ in range(5):
        g2.failed(KEYS, 0.0)
    g2.failed(KEYS, 4000.0)  # an hour without failures: counted from the start again
    assert g2.wait(KEYS, 4000.0) == 0.0


def test_memory_is_bounded() -> None:
    g = GuessLimiter(max_keys=50)
    for i in range(1000):
        g.failed([f"id:{i}"], float(i))
    assert len(g._records) == 50


def test_keys_count_an_ipv6_64_as_one_address() -> None:
    assert guess_keys("1", "2001:db8::1") == guess_keys("1", "2001:db8::ffff")
    assert guess_keys("1", "") == ["id:1"]


def test_what_1000_guesses_cost() -> None:
    one, everywhere = cost_of_guesses(1000)
    assert 40 < one / 86400 < 42  # about 41 days from one address and ID
    assert 97 < everywhere / 60 < 99  # at least 98 minutes from anywhere
