from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IdPk(_message.Message):
    __slots__ = ("id", "pk")
    ID_FIELD_NUMBER: _ClassVar[int]
    PK_FIELD_NUMBER: _ClassVar[int]
    id: str
    pk: bytes
    def __init__(self, id: _Optional[str] = ..., pk: _Optional[bytes] = ...) -> None: ...

class SignedId(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    def __init__(self, id: _Optional[bytes] = ...) -> None: ...

class PublicKey(_message.Message):
    __slots__ = ("asymmetric_value", "symmetric_value")
    ASYMMETRIC_VALUE_FIELD_NUMBER: _ClassVar[int]
    SYMMETRIC_VALUE_FIELD_NUMBER: _ClassVar[int]
    asymmetric_value: bytes
    symmetric_value: bytes
    def __init__(self, asymmetric_value: _Optional[bytes] = ..., symmetric_value: _Optional[bytes] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("signed_id", "public_key")
    SIGNED_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    signed_id: SignedId
    public_key: PublicKey
    def __init__(self, signed_id: _Optional[_Union[SignedId, _Mapping]] = ..., public_key: _Optional[_Union[PublicKey, _Mapping]] = ...) -> None: ...
