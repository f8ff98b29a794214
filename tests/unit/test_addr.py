"""AddrMangle vectors, round trips and address-text parsing with hostile input."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.wire import addr
from agent.wire.addr import AddressError, SockAddr, parse_sockaddr, split_host_port
from tests.conftest import load_vectors

VECTORS = load_vectors("addr_mangle_vectors.json")


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v.get("addr", v["hex"] or "empty"))
def test_vector(v: dict) -> None:
    assert str(addr.decode(bytes.fromhex(v["hex"]))) == v["decodes_to"]
    if not v.get("decode_only"):
        encoded = addr.encode(parse_sockaddr(v["addr"], allow_zero=True), v["tm"])
        assert encoded.hex() == v["hex"]


def test_vectors_cover_decode_only_cases() -> None:
    assert sum(bool(v.get("decode_only")) for v in VECTORS) == 2


@given(st.ip_addresses(v=4), st.integers(0, 0xFFFF), st.integers(0, 2**40))
def test_v4_roundtrip(ip: ipaddress.IPv4Address, port: int, tm: int) -> None:
    a = SockAddr(ip, port)
    data = addr.encode(a, tm)
    assert len(data) <= 16
    assert addr.decode(data) == a


@given(st.ip_addresses(v=6), st.integers(0, 0xFFFF))
def test_v6_roundtrip(ip: ipaddress.IPv6Address, port: int) -> None:
    a = SockAddr(ip, port)
    decoded = addr.decode(addr.encode(a, 0))
    assert decoded == addr.to_v4_if_mapped(a)


@given(st.binary(max_size=40))
def test_decode_never_raises(data: bytes) -> None:
    got = addr.decode(data)
    assert 0 <= got.port <= 0xFFFF


def test_port_out_of_range_refused() -> None:
    with pytest.raises(ValueError):
        addr.encode(SockAddr(ipaddress.IPv4Address("1.2.3.4"), 70000), 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4:80", ("1.2.3.4", 80)),
        ("example.com:21117", ("example.com", 21117)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        (" host:1 ", ("host", 1)),
    ],
)
def test_split_host_port(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text) == expected


def test_default_port() -> None:
    assert split_host_port("relay.example.com", 21117) == ("relay.example.com", 21117)
    assert split_host_port("2001:db8::1", 5) == ("2001:db8::1", 5)


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":80",
        "host:",
        "host:0",
        "host:65536",
        "host:-1",
        "host:8o",
        "[::1",
        "[::1]x",
        "[nothost]:1",
        "a b:1",
        "host:١٢",
        "x" * 300 + ":1",
        "host:99999999999",
        "1:2:3",
        "hōst:1",
        "host:+80",
    ],
)
def test_split_host_port_refuses(text: str) -> None:
    with pytest.raises(AddressError):
        split_host_port(text)


def test_parse_sockaddr_refuses_names() -> None:
    with pytest.raises(AddressError, match="not an IP"):
        parse_sockaddr("example.com:1")


@given(st.text(max_size=80))
def test_parse_never_raises_anything_else(text: str) -> None:
    with contextlib.suppress(AddressError):
        split_host_port(text, 1)
