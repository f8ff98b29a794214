"""RendezvousMessage: every golden vector byte for byte, Rust field order, hostile payloads."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st

from agent.proto import rendezvous_pb2 as pb
from agent.wire import messages
from agent.wire.messages import MessageError
from tests.conftest import load_vectors

VECTORS = load_vectors("rendezvous_vectors.json")


def from_json(msg: Message, data: dict) -> Message:
    """Fill `msg` from the vector JSON form (hex bytes, enum names, lists)."""
    for name, value in data.items():
        field = msg.DESCRIPTOR.fields_by_name[name]
        values = value if field.is_repeated else [value]
        converted = []
        for item in values:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                sub = getattr(msg, name).add() if field.is_repeated else getattr(msg, name)
                from_json(sub, item)
                sub.SetInParent()
                continue
            if field.type == FieldDescriptor.TYPE_BYTES:
                item = bytes.fromhex(item)
            elif field.type == FieldDescriptor.TYPE_ENUM:
                assert field.enum_type is not None
                item = field.enum_type.values_by_name[item].number
            converted.append(item)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.is_repeated:
            getattr(msg, name).extend(converted)
        else:
            setattr(msg, name, converted[0])
    return msg


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["name"])
def test_vector_builds_byte_for_byte(v: dict) -> None:
    msg = from_json(pb.RendezvousMessage(), v["message"])
    assert msg.SerializeToString().hex() == v["hex"]


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["name"])
def test_vector_parses_and_reserializes(v: dict) -> None:
    data = bytes.fromhex(v["hex"])
    kind, sub = messages.parse(data)
    assert kind == next(iter(v["message"]))
    assert messages.build(**{kind: sub}).hex() == v["hex"]


@pytest.mark.parametrize("v", [v for v in VECTORS if "hex_rust_order" in v], ids=lambda v: v["name"])
def test_rust_field_order_parses_to_same_message(v: dict) -> None:
    rust = pb.RendezvousMessage.FromString(bytes.fromhex(v["hex_rust_order"]))
    assert rust == pb.RendezvousMessage.FromString(bytes.fromhex(v["hex"]))
    assert rust.SerializeToString().hex() == v["hex"]


def test_all_oneof_members_covered() -> None:
    members = {f.name for f in pb.RendezvousMessage.DESCRIPTOR.oneofs_by_name["union"].fields}
    assert len(members) == 23
    assert {next(iter(v["message"])) for v in VECTORS} == members


def test_empty_envelope_is_an_error() -> None:
    with pytest.raises(MessageError) as exc:
        messages.parse(b"")
    assert exc.value.reason == "empty"


def test_oversized_is_refused_before_parsing() -> None:
    with pytest.raises(MessageError) as exc:
        messages.parse(b"\x00" * (messages.MAX_UDP_MESSAGE + 1))
    assert exc.value.reason == "oversized"


@pytest.mark.parametrize(
    "data",
    [
        b"\xff",
        b"\x32",
        b"\x32\x05\x0a",
        b"\x32\xff\xff\xff\xff\x0f",
        bytes.fromhex("320b0a093132333435363738"),
        b"\x0a" * 50,
        b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80",
    ],
)
def test_malformed_and_truncated(data: bytes) -> None:
    with pytest.raises(MessageError):
        messages.parse(data)


def test_wrong_wire_type_for_member_is_malformed() -> None:
    # field 6 (register_peer) sent as a varint instead of a length-delimited message
    with pytest.raises(MessageError):
        messages.parse(b"\x30\x01")


def test_unknown_fields_are_kept_not_rejected() -> None:
    data = bytes.fromhex("320b0a09313233343536373839") + b"\xa0\x06\x01"  # + field 100 varint
    kind, sub = messages.parse(data)
    assert kind == "register_peer" and sub.id == "123456789"


@given(st.binary(max_size=600))
def test_random_bytes_parse_or_raise_message_error(data: bytes) -> None:
    try:
        kind, _ = messages.parse(data)
    except MessageError:
        return
    assert kind in {f.name for f in pb.RendezvousMessage.DESCRIPTOR.oneofs_by_name["union"].fields}


def test_build_needs_exactly_one_member() -> None:
    with pytest.raises(TypeError):
        messages.build()
