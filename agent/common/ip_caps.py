"""Per-source-IP caps on connections that are not useful yet, sans-IO.

Both servers bound their total of connections that hold a slot without doing anything
useful (rendezvous: connected but no frame yet; relay: no RequestRelay yet, or parked
waiting for a partner). A total alone lets one host fill it and keep evicting everyone
else; `PerIpCap` adds a bound per source IP.

"IP" is an IPv4 address or an IPv6 /64 (`source_key`). When an IP is at its cap and opens
one more, its own *oldest* idle entry makes room (the newcomer is admitted). Refusing the
newcomer instead would let whoever got there first hold the IP's slots for the whole idle
timeout: behind a shared NAT (or CGNAT) one misbehaving host would lock every other host
behind that address out. Evicting the oldest means a real client, which speaks within a
round trip of connecting, is always among the newest and survives unless its own IP opens
`cap` more in that round trip. The other IPs are never touched.

`busy(key)` lets the shell say "this one has its request waiting in the kernel, it is
not idle, we just have not read it yet" (an accept burst is handled before any of its
connections is read). Busy entries are skipped; if every entry is busy the newcomer is
admitted over the cap (the servers' total caps still hold). Busy cannot be sustained by
an attacker: once read, the bytes either complete a request (the entry leaves) or sit in
our buffer, and the socket is idle again.
"""

from __future__ import annotations

import fcntl
import ipaddress
import struct
import termios
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class PerIpCap(Generic[K]):
    """Entries (connection keys) grouped by source IP, oldest first; `cap` = 0 means no cap.

    Memory is one dict entry per tracked key plus one per IP that has any (an IP is
    forgotten with its last entry), so it is bounded by what the caller tracks.
    """

    __slots__ = ("_by_ip", "_ip_of", "cap")

    def __init__(self, cap: int) -> None:
        if cap < 0:
            raise ValueError("cap must be >= 0 (0 = no cap)")
        self.cap = cap
        self._by_ip: dict[str, OrderedDict[K, None]] = {}
        self._ip_of: dict[K, str] = {}

    def __len__(self) -> int:
        return len(self._ip_of)

    def __contains__(self, key: object) -> bool:
        return key in self._ip_of

    def count(self, ip: str) -> int:
        entries = self._by_ip.get(ip)
        return 0 if entries is None else len(entries)

    @property
    def ips(self) -> int:
        return len(self._by_ip)

    def max_count(self) -> int:
        """The largest number of entries any one IP holds (0 when empty); O(IPs), for stats."""
        return max((len(e) for e in self._by_ip.values()), default=0)

    def add(self, ip: str, key: K) -> None:
        """Track `key` under `ip` as the newest entry (no cap check: see `admit`)."""
        self.discard(key)
        self._by_ip.setdefault(ip, OrderedDict())[key] = None
        self._ip_of[key] = ip

    def discard(self, key: K) -> bool:
        """Forget `key` (it spoke, paired or went away); False if it was not tracked."""
        ip = self._ip_of.pop(key, None)
        if ip is None:
            return False
        entries = self._by_ip[ip]
        del entries[key]
        if not entries:
            del self._by_ip[ip]
        return True

    def victims(self, ip: str, busy: Callable[[K], bool] | None = None) -> list[K]:
        """What must go before `ip` may hold one more: its oldest entries that are not busy, enough
        to bring it below the cap (fewer, or none, when the rest are busy). Nothing is removed."""
        entries = self._by_ip.get(ip)
        if self.cap == 0 or entries is None or len(entries) < self.cap:
            return []
        need = len(entries) - self.cap + 1
        out: list[K] = []
        for key in entries:  # oldest first
            if busy is None or not busy(key):
                out.append(key)
                if len(out) == need:
                    break
        return out

    def admit(self, ip: str, key: K, busy: Callable[[K], bool] | None = None) -> list[K]:
        """Track `key` under `ip`; return the entries of the same IP the caller must close to stay
        within the cap (already forgotten here), oldest first."""
        out = self.victims(ip, busy)
        for victim in out:
            self.discard(victim)
        self.add(ip, key)
        return out


V6_PREFIX = 64
"""IPv6 sources are grouped by /64: one host usually holds a whole /64, so per-address caps would not bind."""


def source_key(host: str) -> str:
    """What a per-IP cap counts under: the IPv4 address, or the /64 of an IPv6 one.

    `host` may carry brackets ("[::1]", as the relay prints peers); an IPv4-mapped IPv6
    address counts as its IPv4 address; anything unparsable is its own key.
    """
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, V6_PREFIX), strict=False))
    return str(ip)


def unread_bytes(fd: int) -> int:
    """Bytes in a TCP socket's receive queue (FIONREAD); 0 when the socket is gone or the call fails.

    The one system call the shells use to tell "idle" from "sent its request, not read yet".
    """
    if fd < 0:
        return 0
    try:
        raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])
