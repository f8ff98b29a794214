"""AddrMangle: how RustDesk writes socket addresses into protobuf bytes fields.

IPv4 is obfuscated with a microsecond timestamp (so NAT ALGs do not rewrite it);
IPv6 is the 16 address bytes plus a little-endian port. The timestamp is an
argument, never read from a clock here, so the codec stays pure and testable.
Also home of the HOST:PORT parsing every CLI flag and config field uses.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class SockAddr(NamedTuple):
    """An IP address and port; `str()` gives Rust's SocketAddr text form."""

    ip: IPAddress
    port: int

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"

    @property
    def host(self) -> str:
        return str(self.ip)

    def as_tuple(self) -> tuple[str, int]:
        """What asyncio/socket calls take."""
        return (str(self.ip), self.port)

    @classmethod
    def of(cls, host: str, port: int) -> SockAddr:
        """From a socket API tuple (host may carry a %scope, ignored)."""
        return cls(ipaddress.ip_address(host.split("%", 1)[0]), port)


UNSPECIFIED_V4 = SockAddr(ipaddress.IPv4Address(0), 0)
UNSPECIFIED_V6 = SockAddr(ipaddress.IPv6Address(0), 0)


def to_v4_if_mapped(addr: SockAddr) -> SockAddr:
    """RustDesk's try_into_v4: ::a.b.c.d and ::ffff:a.b.c.d become IPv4 (::1 stays v6)."""
    ip = addr.ip
    if ip.version == 6 and not ip.is_loopback:
        packed = ip.packed
        if packed[:10] == bytes(10) and packed[10:12] in (b"\x00\x00", b"\xff\xff"):
            return SockAddr(ipaddress.IPv4Address(packed[12:]), addr.port)
    return addr


def encode(addr: SockAddr, tm: int) -> bytes:
    """Mangle `addr`; `tm` is the current time in microseconds (only its low 32 bits count)."""
    addr = to_v4_if_mapped(addr)
    if not 0 <= addr.port <= 0xFFFF:
        raise ValueError(f"port {addr.port} out of range")
    if addr.ip.version == 6:
        return addr.ip.packed + addr.port.to_bytes(2, "little")
    tm &= 0xFFFFFFFF
    ip = int.from_bytes(addr.ip.packed, "little")
    v = ((ip + tm) << 49) | (tm << 17) | (addr.port + (tm & 0xFFFF))
    return v.to_bytes(16, "little").rstrip(b"\x00")


def decode(data: bytes) -> SockAddr:
    """Inverse of `encode`; never raises: bad lengths decode to an unspecified address, as upstream."""
    n = len(data)
    if n > 16:
        if n != 18:
            return UNSPECIFIED_V6
        return SockAddr(ipaddress.IPv6Address(data[:16]), int.from_bytes(data[16:], "little"))
    v = int.from_bytes(data.ljust(16, b"\x00"), "little")
    tm = (v >> 17) & 0xFFFFFFFF
    ip = ((v >> 49) - tm) & 0xFFFFFFFF
    port = ((v & 0xFFFFFF) - (tm & 0xFFFF)) & 0xFFFF
    return SockAddr(ipaddress.IPv4Address(ip.to_bytes(4, "little")), port)


def global_unicast_v6(mangled: bytes) -> bool:
    """An AddrMangle'd IPv6 address worth connecting to: global unicast with a port, by RustDesk's test
    (2000::/3, the same one agents use to pick the address they offer). A peer's message must never
    aim us at loopback, link-local, unique-local, multicast or v4-mapped addresses."""
    if len(mangled) != 18:
        return False
    a = decode(mangled)
    return a.ip.version == 6 and a.port != 0 and (int(a.ip) >> 125) == 0b001


def join_host_port(host: str, port: int) -> str:
    """HOST:PORT, with an IPv6 literal in brackets (what split_host_port reads back)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AddressError(ValueError):
    """A HOST:PORT string that cannot be used; the message is fit for a CLI's one-line error."""


def shown(text: str, limit: int = 80) -> str:
    """`text` as it goes into a one-line error: repr'd (no raw newlines) and cut, so a megabyte
    of junk cannot become a megabyte of stderr."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} chars)"


def parse_port(text: str, what: str = "port", allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not text.isascii() or not text.isdigit() or len(text) > 5 or not low <= int(text) <= 0xFFFF:
        raise AddressError(f"{what} must be a number within {low}-65535, got {shown(text)}")
    return int(text)


def split_host_port(text: str, default_port: int | None = None, allow_zero: bool = False) -> tuple[str, int]:
    """Parse HOST[:PORT] or [V6]:PORT into (host, port). Hostnames are allowed; no DNS here."""
    text = text.strip()
    if not text or len(text) > 260:
        raise AddressError(f"not an address: {shown(text)}")
    host: str
    port_text: str | None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise AddressError(f"missing ']' in {shown(text)}")
        host, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise AddressError(f"junk after ']' in {shown(text)}")
        port_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"not an IPv6 address: {shown(host)}") from None
    elif text.count(":") > 1:
        host, port_text = text, None  # bare IPv6 without port
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"not an address: {shown(text)} (write IPv6 as [addr]:port)") from None
    else:
        host, _, port_text = text.partition(":")
        if not _:
            port_text = None
    if not host:
        raise AddressError(f"missing host in {shown(text)}")
    if not host.isascii() or not all(c.isalnum() or c in ".-_:" for c in host):
        raise AddressError(f"bad host name {shown(host)}")
    if port_text is None:
        if default_port is None:
            raise AddressError(f"missing port in {shown(text)}")
        return host, default_port
    return host, parse_port(port_text, allow_zero=allow_zero)


def parse_sockaddr(text: str, allow_zero: bool = False) -> SockAddr:
    """Parse an IP:PORT / [IPv6]:PORT literal (no host names)."""
    host, port = split_host_port(text, allow_zero=allow_zero)
    try:
        return SockAddr.of(host, port)
    except ValueError:
        raise AddressError(f"not an IP address: {shown(host)}") from None
