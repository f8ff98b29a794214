"""`-L [BIND:]PORT:HOST:HOSTPORT`: valid ssh-style forms parse, junk only ever raises AddressError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.client import ForwardSpec, parse_forward
from agent.wire.addr import AddressError, split_host_port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080:example.org:80", ForwardSpec("127.0.0.1", 8080, "example.org:80")),
        ("1:h:1", ForwardSpec("127.0.0.1", 1, "h:1")),
        ("65535:h:65535", ForwardSpec("127.0.0.1", 65535, "h:65535")),
        ("0.0.0.0:2222:10.0.0.5:22", ForwardSpec("0.0.0.0", 2222, "10.0.0.5:22")),
        ("localhost:5432:db.internal:5432", ForwardSpec("localhost", 5432, "db.internal:5432")),
        (":8080:h:22", ForwardSpec("127.0.0.1", 8080, "h:22")),
        ("8080:[::1]:22", ForwardSpec("127.0.0.1", 8080, "[::1]:22")),
        ("8080:[2001:db8::5]:443", ForwardSpec("127.0.0.1", 8080, "[2001:db8::5]:443")),
        ("[::1]:8080:h:22", ForwardSpec("::1", 8080, "h:22")),
        ("[::]:8080:[fe80::1]:22", ForwardSpec("::", 8080, "[fe80::1]:22")),
        ("[::ffff:127.0.0.1]:8080:h:22", ForwardSpec("::ffff:127.0.0.1", 8080, "h:22")),
        ("127.0.0.1:8080:host_with-chars.x:1", ForwardSpec("127.0.0.1", 8080, "host_with-chars.x:1")),
    ],
)
def test_valid_forms(text: str, expected: ForwardSpec) -> None:
    spec = parse_forward(text)
    assert spec == expected
    split_host_port(spec.target)  # the target is a usable HOST:PORT for the agent


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":",
        ":::",
        "::::",
        "8080",
        "8080:h",
        "h:22",
        "8080:h:22:extra:more",
        "0:h:22",  # local port 0 is not a forward
        "70000:h:22",
        "-1:h:22",
        "abc:h:22",
        "8080:h:0",
        "8080:h:65536",
        "8080:h:",
        "8080::22",
        "8080:h:abc",
        "8080:h:٣",
        "\uff18\uff10\uff18\uff10:h:22",
        " 8080:h:22",
        "8080:bad host:22",
        "8080:[::1:22",
        "8080:::1]:22",
        "8080:[::1]]:22",
        "8080:[[::1]:22",
        "8080:[x]:22",
        "8080:[127.0.0.1]:22",
        "[::1:8080:h:22",
        "::1:8080:h:22",
        "[nope]:8080:h:22" + ":",
        "bad bind:8080:h:22",
        "8080:h\x00:22",
        "8080:é:22",
        "8080:" + "a" * 300 + ":22",
        pytest.param("9" * 100_000, id="huge-digits"),
        pytest.param(":" * 100_000, id="huge-colons"),
        pytest.param("[" * 50_000 + "]" * 50_000, id="huge-brackets"),
        pytest.param("1:h:1" * 20_000, id="huge-repeated"),
    ],
)
def test_invalid_forms(text: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_forward(text)
    assert str(info.value)


_alphabet = st.sampled_from(
    [*"[]:0123456789abcdef.-_% \x00\n\t", "é", "٣", "::1", "::", "65535", "65536", "0", "127.0.0.1", "localhost"]
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(_alphabet, max_size=14).map("".join)))
def test_junk_only_raises_address_error(text: str) -> None:
    try:
        spec = parse_forward(text)
    except AddressError:
        return
    # whatever was accepted is fully usable
    assert 1 <= spec.bind_port <= 0xFFFF
    split_host_port(spec.target)
    assert spec.bind_host and "[" not in spec.bind_host and "]" not in spec.bind_host


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(st.none(), st.ip_addresses().map(str), st.sampled_from(["localhost", "0.0.0.0", "bind.example"])),
    st.integers(1, 0xFFFF),
    st.one_of(st.ip_addresses().map(str), st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{2,5}){0,2}", fullmatch=True)),
    st.integers(1, 0xFFFF),
)
def test_generated_valid_specs_round_trip(bind: str | None, port: int, host: str, hostport: int) -> None:
    def bracket(h: str) -> str:
        return f"[{h}]" if ":" in h else h

    text = f"{port}:{bracket(host)}:{hostport}"
    if bind is not None:
        text = f"{bracket(bind)}:{text}"
    spec = parse_forward(text)
    assert spec.bind_port == port
    assert spec.bind_host == (bind if bind is not None else "127.0.0.1")
    assert spec.target == f"{bracket(host)}:{hostport}"
    assert split_host_port(spec.target) == (host, hostport)
