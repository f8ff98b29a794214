"""Back-off for password guesses, in the spirit of sshd's MaxAuthTries and fail2ban, sans-IO.

Failures are counted per key (the peer ID a guesser claims, and the address it comes
from: an IPv6 /64 counts as one) and in one bucket for the whole agent. A key gets
`free` failures; after that each further failure locks it for a time that doubles,
up to `max_lock`, and a key that fails nothing for `forget_after` starts afresh.
The global bucket caps guesses from everywhere together (many addresses, fresh IDs):
while it is empty no password is checked at all. A right password clears its keys.

What 1,000 guesses cost with the defaults (README, "Security model"): from one
address, 3 free, then locks of 2, 4, ... 2048 s and then an hour each, about 41 days;
from any number of addresses and IDs, the bucket (20, then 10 a minute) makes it at
least 98 minutes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from agent.common.ip_caps import source_key


@dataclass(slots=True)
class _Record:
    failures: int = 0
    last: float = 0.0
    locked_until: float = 0.0


@dataclass
class GuessLimiter:
    free: int = 3
    first_lock: float = 2.0
    max_lock: float = 3600.0
    forget_after: float = 3600.0
    global_burst: float = 20.0
    global_rate: float = 10.0 / 60.0
    """Password failures per second the whole agent absorbs in the long run."""
    max_keys: int = 4096
    _records: OrderedDict[str, _Record] = field(default_factory=OrderedDict)
    _tokens: float = -1.0
    _tokens_at: float = 0.0
    failures: int = 0
    refused: int = 0

    def _refill(self, now: float) -> None:
        if self._tokens < 0:
            self._tokens, self._tokens_at = self.global_burst, now
        elapsed = max(0.0, now - self._tokens_at)
        self._tokens = min(self.global_burst, self._tokens + elapsed * self.global_rate)
        self._tokens_at = now

    def wait(self, keys: list[str], now: float) -> float:
        """Seconds until a guess for these keys may be checked (0: now)."""
        self._refill(now)
        longest = 0.0
        for key in keys:
            rec = self._records.get(key)
            if rec is not None:
                longest = max(longest, rec.locked_until - now)
        if self._tokens < 1.0:
            longest = max(longest, (1.0 - self._tokens) / self.global_rate)
        return max(0.0, longest)

    def check(self, keys: list[str], now: float) -> str | None:
        """A reason to refuse this guess unchecked, or None."""
        wait = self.wait(keys, now)
        if wait <= 0:
            return None
        self.refused += 1
        return f"too many failed password attempts; retry in {wait:.0f} s"

    def failed(self, keys: list[str], now: float) -> None:
        self.failures += 1
        self._refill(now)
        self._tokens = max(0.0, self._tokens - 1.0)
        for key in keys:
            rec = self._records.get(key)
            if rec is None or now - rec.last > self.forget_after:
                rec = _Record()
            rec.failures += 1
            rec.last = now
            if rec.failures > self.free:
                lock = min(self.max_lock, self.first_lock * 2 ** (rec.failures - self.free - 1))
                rec.locked_until = now + lock
            self._records[key] = rec
            self._records.move_to_end(key)
        while len(self._records) > self.max_keys:
            self._records.popitem(last=False)

    def succeeded(self, keys: list[str]) -> None:
        for key in keys:
            self._records.pop(key, None)

    def locked(self, now: float) -> int:
        """Keys locked right now (for status)."""
        return sum(1 for rec in self._records.values() if rec.locked_until > now)


def guess_keys(claimed_id: str, source_ip: str) -> list[str]:
    """The keys a guess counts against: the ID it claims and the address it comes from (/64 for v6)."""
    keys = [f"id:{claimed_id}"]
    if source_ip:
        keys.append(f"ip:{source_key(source_ip)}")
    return keys


def cost_of_guesses(n: int, limiter: GuessLimiter | None = None) -> tuple[float, float]:
    """Seconds `n` guesses take at the least (from one address and ID; from everywhere at once)."""
    lim = limiter or GuessLimiter()
    one = 0.0
    for failures in range(lim.free + 1, n):
        one += min(lim.max_lock, lim.first_lock * 2 ** (failures - lim.free - 1))
    everywhere = max(0.0, (n - lim.global_burst) / lim.global_rate)
    return one, everywhere
