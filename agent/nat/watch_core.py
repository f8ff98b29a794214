"""Noticing that this host's network changed, sans-IO.

A laptop that joins another Wi-Fi, a DHCP lease that renumbers the host, a router that comes back
with a new public address: each leaves the agent registered at an address that no longer reaches
it, and holding a NAT verdict that may no longer hold (a stale SYMMETRIC sends every session to the
relay; a stale cone verdict wastes the punch budget). Tailscale re-binds and re-runs netcheck on
every link change; this module decides *when* that is due, from two signals:

* local: the shell polls a `NetView` (the source address the kernel picks towards the rendezvous
  server, and the host's usable interface addresses); any difference from the previous view is a
  change of our own network, so sockets must be re-bound, not just re-used;
* remote: the server asks for our key again (RegisterPeerResponse.request_pk) while we were
  registered. RustDesk's server does that when our registration arrives from a new IP (our NAT's
  public address changed: nothing local shows it) and after it restarted. The two cannot be told
  apart on the wire, so the shell spreads the re-measurement over a random delay: after a server
  restart every agent gets this signal within seconds, and they must not all probe at once.

A NAT that changes its mapping behaviour without any address changing is caught only by the
periodic re-measurement (agent/nat/probe.py, every 5 minutes).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

REMOTE_JITTER = 10.0
"""Seconds over which agents spread the NAT re-measurement after the server asked for their key again."""


def usable_addresses(raw: Iterable[str]) -> frozenset[str]:
    """The addresses a peer could reach us on: no loopback, link-local, multicast or unparseable entries.

    Zone suffixes ("fe80::1%eth0") are dropped before parsing; v4-mapped v6 is written as v4.
    """
    out: set[str] = set()
    for text in raw:
        try:
            ip = ipaddress.ip_address(str(text).split("%", 1)[0])
        except ValueError:
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            continue
        out.add(str(ip))
    return frozenset(out)


@dataclass(frozen=True)
class NetView:
    """What the host looks like from inside: `route` is "" when there is no route to the server."""

    route: str
    addresses: frozenset[str]

    def as_dict(self) -> dict[str, Any]:
        return {"route": self.route or None, "addresses": sorted(self.addresses)}


@dataclass(frozen=True)
class NetworkChanged:
    """A change the agent must act on; `local` means our own addresses changed (re-bind sockets)."""

    reason: str
    local: bool


def describe_change(old: NetView, new: NetView) -> str:
    """One line naming what changed, e.g. "route 10.0.2.2 -> 198.51.100.22; gone 10.0.2.2; new 198.51.100.22"."""
    parts: list[str] = []
    if old.route != new.route:
        parts.append(f"route {old.route or 'none'} -> {new.route or 'none'}")
    gone = sorted(old.addresses - new.addresses)
    added = sorted(new.addresses - old.addresses)
    if gone:
        parts.append("gone " + ", ".join(gone))
    if added:
        parts.append("new " + ", ".join(added))
    return "; ".join(parts)


class NetWatchCore:
    """Compares successive views and server hints; times are seconds on any monotonic clock."""

    def __init__(self) -> None:
        self.view: NetView | None = None
        self.changes = 0
        self.local_changes = 0
        self.remote_hints = 0
        self.last_reason = ""
        self.last_local_reason = ""
        """What last changed on this host (a server's hint that follows it does not hide it)."""
        self._last_at: float | None = None

    def observe(self, view: NetView, now: float) -> NetworkChanged | None:
        """Feed the current view; a change is reported once, the first view is the baseline."""
        old, self.view = self.view, view
        if old is None or old == view:
            return None
        self.local_changes += 1
        return self._changed(describe_change(old, view), True, now)

    def server_asked_for_key(self, now: float) -> NetworkChanged:
        """The server asked for our key while we were registered: it saw us at a new IP, or restarted."""
        self.remote_hints += 1
        return self._changed("the server asked for our key again (our public address changed, or it restarted)",
                             False, now)

    def _changed(self, reason: str, local: bool, now: float) -> NetworkChanged:
        self.changes += 1
        self.last_reason = reason
        if local:
            self.last_local_reason = reason
        self._last_at = now
        return NetworkChanged(reason, local)

    def status(self, now: float) -> dict[str, Any]:
        return {
            "view": self.view.as_dict() if self.view is not None else None,
            "changes": self.changes,
            "local_changes": self.local_changes,
            "server_hints": self.remote_hints,
            "last_change": self.last_reason or None,
            "last_local_change": self.last_local_reason or None,
            "last_change_age": None if self._last_at is None else round(now - self._last_at, 3),
        }
