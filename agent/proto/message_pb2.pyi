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

class PeerAuth(_message.Message):
    __slots__ = ("id", "pk", "signature", "password_proof", "target")
    ID_FIELD_NUMBER: _ClassVar[int]
    PK_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_PROOF_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    id: str
    pk: bytes
    signature: bytes
    password_proof: bytes
    target: str
    def __init__(self, id: _Optional[str] = ..., pk: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., password_proof: _Optional[bytes] = ..., target: _Optional[str] = ...) -> None: ...

class AuthResult(_message.Message):
    __slots__ = ("ok", "reason")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("signed_id", "public_key", "peer_auth", "auth_result")
    SIGNED_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PEER_AUTH_FIELD_NUMBER: _ClassVar[int]
    AUTH_RESULT_FIELD_NUMBER: _ClassVar[int]
    signed_id: SignedId
    public_key: PublicKey
    peer_auth: PeerAuth
    auth_result: AuthResult
    def __init__(self, signed_id: _Optional[_Union[SignedId, _Mapping]] = ..., public_key: _Optional[_Union[PublicKey, _Mapping]] = ..., peer_auth: _Optional[_Union[PeerAuth, _Mapping]] = ..., auth_result: _Optional[_Union[AuthResult, _Mapping]] = ...) -> None: ...
