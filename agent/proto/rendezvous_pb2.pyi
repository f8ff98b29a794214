from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConnType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEFAULT_CONN: _ClassVar[ConnType]
    FILE_TRANSFER: _ClassVar[ConnType]
    PORT_FORWARD: _ClassVar[ConnType]
    RDP: _ClassVar[ConnType]
    VIEW_CAMERA: _ClassVar[ConnType]
    TERMINAL: _ClassVar[ConnType]

class NatType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNKNOWN_NAT: _ClassVar[NatType]
    ASYMMETRIC: _ClassVar[NatType]
    SYMMETRIC: _ClassVar[NatType]
DEFAULT_CONN: ConnType
FILE_TRANSFER: ConnType
PORT_FORWARD: ConnType
RDP: ConnType
VIEW_CAMERA: ConnType
TERMINAL: ConnType
UNKNOWN_NAT: NatType
ASYMMETRIC: NatType
SYMMETRIC: NatType

class NatBehavior(_message.Message):
    __slots__ = ("mapping", "allocation", "step", "filtering", "udp_blocked")
    class Mapping(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MAPPING_UNKNOWN: _ClassVar[NatBehavior.Mapping]
        ENDPOINT_INDEPENDENT: _ClassVar[NatBehavior.Mapping]
        ENDPOINT_DEPENDENT: _ClassVar[NatBehavior.Mapping]
    MAPPING_UNKNOWN: NatBehavior.Mapping
    ENDPOINT_INDEPENDENT: NatBehavior.Mapping
    ENDPOINT_DEPENDENT: NatBehavior.Mapping
    class Allocation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ALLOCATION_UNKNOWN: _ClassVar[NatBehavior.Allocation]
        PRESERVING: _ClassVar[NatBehavior.Allocation]
        SEQUENTIAL: _ClassVar[NatBehavior.Allocation]
        RANDOM: _ClassVar[NatBehavior.Allocation]
    ALLOCATION_UNKNOWN: NatBehavior.Allocation
    PRESERVING: NatBehavior.Allocation
    SEQUENTIAL: NatBehavior.Allocation
    RANDOM: NatBehavior.Allocation
    class Filtering(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FILTERING_UNKNOWN: _ClassVar[NatBehavior.Filtering]
        OPEN: _ClassVar[NatBehavior.Filtering]
        PORT_DEPENDENT: _ClassVar[NatBehavior.Filtering]
    FILTERING_UNKNOWN: NatBehavior.Filtering
    OPEN: NatBehavior.Filtering
    PORT_DEPENDENT: NatBehavior.Filtering
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    FILTERING_FIELD_NUMBER: _ClassVar[int]
    UDP_BLOCKED_FIELD_NUMBER: _ClassVar[int]
    mapping: NatBehavior.Mapping
    allocation: NatBehavior.Allocation
    step: int
    filtering: NatBehavior.Filtering
    udp_blocked: bool
    def __init__(self, mapping: _Optional[_Union[NatBehavior.Mapping, str]] = ..., allocation: _Optional[_Union[NatBehavior.Allocation, str]] = ..., step: _Optional[int] = ..., filtering: _Optional[_Union[NatBehavior.Filtering, str]] = ..., udp_blocked: _Optional[bool] = ...) -> None: ...

class RegisterPeer(_message.Message):
    __slots__ = ("id", "serial", "nat_type", "nat_behavior")
    ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    NAT_TYPE_FIELD_NUMBER: _ClassVar[int]
    NAT_BEHAVIOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    serial: int
    nat_type: NatType
    nat_behavior: NatBehavior
    def __init__(self, id: _Optional[str] = ..., serial: _Optional[int] = ..., nat_type: _Optional[_Union[NatType, str]] = ..., nat_behavior: _Optional[_Union[NatBehavior, _Mapping]] = ...) -> None: ...

class RegisterPeerResponse(_message.Message):
    __slots__ = ("request_pk",)
    REQUEST_PK_FIELD_NUMBER: _ClassVar[int]
    request_pk: bool
    def __init__(self, request_pk: _Optional[bool] = ...) -> None: ...

class ControlPermissions(_message.Message):
    __slots__ = ("permissions",)
    class Permission(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        keyboard: _ClassVar[ControlPermissions.Permission]
        remote_printer: _ClassVar[ControlPermissions.Permission]
        clipboard: _ClassVar[ControlPermissions.Permission]
        file: _ClassVar[ControlPermissions.Permission]
        audio: _ClassVar[ControlPermissions.Permission]
        camera: _ClassVar[ControlPermissions.Permission]
        terminal: _ClassVar[ControlPermissions.Permission]
        tunnel: _ClassVar[ControlPermissions.Permission]
        restart: _ClassVar[ControlPermissions.Permission]
        recording: _ClassVar[ControlPermissions.Permission]
        block_input: _ClassVar[ControlPermissions.Permission]
        remote_modify: _ClassVar[ControlPermissions.Permission]
        privacy_mode: _ClassVar[ControlPermissions.Permission]
    keyboard: ControlPermissions.Permission
    remote_printer: ControlPermissions.Permission
    clipboard: ControlPermissions.Permission
    file: ControlPermissions.Permission
    audio: ControlPermissions.Permission
    camera: ControlPermissions.Permission
    terminal: ControlPermissions.Permission
    tunnel: ControlPermissions.Permission
    restart: ControlPermissions.Permission
    recording: ControlPermissions.Permission
    block_input: ControlPermissions.Permission
    remote_modify: ControlPermissions.Permission
    privacy_mode: ControlPermissions.Permission
    PERMISSIONS_FIELD_NUMBER: _ClassVar[int]
    permissions: int
    def __init__(self, permissions: _Optional[int] = ...) -> None: ...

class ControlledContext(_message.Message):
    __slots__ = ("conn_audit_ref",)
    CONN_AUDIT_REF_FIELD_NUMBER: _ClassVar[int]
    conn_audit_ref: str
    def __init__(self, conn_audit_ref: _Optional[str] = ...) -> None: ...

class PunchHoleRequest(_message.Message):
    __slots__ = ("id", "nat_type", "licence_key", "conn_type", "token", "version", "udp_port", "force_relay", "upnp_port", "socket_addr_v6", "switch_code", "requester_id", "request_time_ms", "request_nonce", "requester_pk", "requester_salt", "nat_behavior", "direct_only")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAT_TYPE_FIELD_NUMBER: _ClassVar[int]
    LICENCE_KEY_FIELD_NUMBER: _ClassVar[int]
    CONN_TYPE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UDP_PORT_FIELD_NUMBER: _ClassVar[int]
    FORCE_RELAY_FIELD_NUMBER: _ClassVar[int]
    UPNP_PORT_FIELD_NUMBER: _ClassVar[int]
    SOCKET_ADDR_V6_FIELD_NUMBER: _ClassVar[int]
    SWITCH_CODE_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_NONCE_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_PK_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_SALT_FIELD_NUMBER: _ClassVar[int]
    NAT_BEHAVIOR_FIELD_NUMBER: _ClassVar[int]
    DIRECT_ONLY_FIELD_NUMBER: _ClassVar[int]
    id: str
    nat_type: NatType
    licence_key: str
    conn_type: ConnType
    token: str
    version: str
    udp_port: int
    force_relay: bool
    upnp_port: int
    socket_addr_v6: bytes
    switch_code: str
    requester_id: str
    request_time_ms: int
    request_nonce: bytes
    requester_pk: bytes
    requester_salt: int
    nat_behavior: NatBehavior
    direct_only: bool
    def __init__(self, id: _Optional[str] = ..., nat_type: _Optional[_Union[NatType, str]] = ..., licence_key: _Optional[str] = ..., conn_type: _Optional[_Union[ConnType, str]] = ..., token: _Optional[str] = ..., version: _Optional[str] = ..., udp_port: _Optional[int] = ..., force_relay: _Optional[bool] = ..., upnp_port: _Optional[int] = ..., socket_addr_v6: _Optional[bytes] = ..., switch_code: _Optional[str] = ..., requester_id: _Optional[str] = ..., request_time_ms: _Optional[int] = ..., request_nonce: _Optional[bytes] = ..., requester_pk: _Optional[bytes] = ..., requester_salt: _Optional[int] = ..., nat_behavior: _Optional[_Union[NatBehavior, _Mapping]] = ..., direct_only: _Optional[bool] = ...) -> None: ...

class PunchHole(_message.Message):
    __slots__ = ("socket_addr", "relay_server", "nat_type", "udp_port", "force_relay", "upnp_port", "socket_addr_v6", "control_permissions", "controlled_context", "requester_id", "requester_pk", "answer_token", "nat_behavior", "birthday")
    SOCKET_ADDR_FIELD_NUMBER: _ClassVar[int]
    RELAY_SERVER_FIELD_NUMBER: _ClassVar[int]
    NAT_TYPE_FIELD_NUMBER: _ClassVar[int]
    UDP_PORT_FIELD_NUMBER: _ClassVar[int]
    FORCE_RELAY_FIELD_NUMBER: _ClassVar[int]
    UPNP_PORT_FIELD_NUMBER: _ClassVar[int]
    SOCKET_ADDR_V6_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PERMISSIONS_FIELD_NUMBER: _ClassVar[int]
    CONTROLLED_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_PK_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAT_BEHAVIOR_FIELD_NUMBER: _ClassVar[int]
    BIRTHDAY_FIELD_NUMBER: _ClassVar[int]
    socket_addr: bytes
    relay_server: str
    nat_type: NatType
    udp_port: int
    force_relay: bool
    upnp_port: int
    socket_addr_v6: bytes
    control_permissions: ControlPermissions
    controlled_context: ControlledContext
    requester_id: str
    requester_pk: bytes
    answer_token: bytes
    nat_behavior: NatBehavior
    birthday: bool
    def __init__(self, socket_addr: _Optional[bytes] = ..., relay_server: _Optional[str] = ..., nat_type: _Optional[_Union[NatType, str]] = ..., udp_port: _Optional[int] = ..., force_relay: _Optional[bool] = ..., upnp_port: _Optional[int] = ..., socket_addr_v6: _Optional[bytes] = ..., control_permissions: _Optional[_Union[ControlPermissions, _Mapping]] = ..., controlled_context: _Optional[_Union[ControlledContext, _Mapping]] = ..., requester_id: _Optional[str] = ..., requester_pk: _Optional[bytes] = ..., answer_token: _Optional[bytes] = ..., nat_behavior: _Optional[_Union[NatBehavior, _Mapping]] = ..., birthday: _Optional[bool] = ...) -> None: ...

class TestNatRequest(_message.Message):
    __slots__ = ("serial", "padding", "answer_from_other_port")
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FROM_OTHER_PORT_FIELD_NUMBER: _ClassVar[int]
    serial: int
    padding: bytes
    answer_from_other_port: bool
    def __init__(self, serial: _Optional[int] = ..., padding: _Optional[bytes] = ..., answer_from_other_port: _Optional[bool] = ...) -> None: ...

class TestNatResponse(_message.Message):
    __slots__ = ("port", "cu", "observed_ip")
    PORT_FIELD_NUMBER: _ClassVar[int]
    CU_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_IP_FIELD_NUMBER: _ClassVar[int]
    port: int
    cu: ConfigUpdate
    observed_ip: str
    def __init__(self, port: _Optional[int] = ..., cu: _Optional[_Union[ConfigUpdate, _Mapping]] = ..., observed_ip: _Optional[str] = ...) -> None: ...

class PunchHoleSent(_message.Message):
    __slots__ = ("socket_addr", "id", "relay_server", "nat_type", "version", "upnp_port", "socket_addr_v6", "answer_token", "nat_behavior")
    SOCKET_ADDR_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    RELAY_SERVER_FIELD_NUMBER: _ClassVar[int]
    NAT_TYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPNP_PORT_FIELD_NUMBER: _ClassVar[int]
    SOCKET_ADDR_V6_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAT_BEHAVIOR_FIELD_NUMBER: _ClassVar[int]
    socket_addr: bytes
    id: str
    relay_server: str
    nat_type: NatType
    version: str
    upnp_port: int
    socket_addr_v6: bytes
    answer_token: bytes
    nat_behavior: NatBehavior
    def __init__(self, socket_addr: _Optional[bytes] = ..., id: _Optional[str] = ..., relay_server: _Optional[str] = ..., nat_type: _Optional[_Union[NatType, str]] = ..., version: _Optional[str] = ..., upnp_port: _Optional[int] = ..., socket_addr_v6: _Optional[bytes] = ..., answer_token: _Optional[bytes] = ..., nat_behavior: _Optional[_Union[NatBehavior, _Mapping]] = ...) -> None: ...

class RegisterPk(_message.Message):
    __slots__ = ("id", "uuid", "pk", "old_id", "no_register_device", "id_salt", "nonce", "challenge", "padding")
    ID_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    PK_FIELD_NUMBER: _ClassVar[int]
    OLD_ID_FIELD_NUMBER: _ClassVar[int]
    NO_REGISTER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    ID_SALT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    id: str
    uuid: bytes
    pk: bytes
    old_id: str
    no_register_device: bool
    id_salt: int
    nonce: bytes
    challenge: bytes
    padding: bytes
    def __init__(self, id: _Optional[str] = ..., uuid: _Optional[bytes] = ..., pk: _Optional[bytes] = ..., old_id: _Optional[str] = ..., no_register_device: _Optional[bool] = ..., id_salt: _Optional[int] = ..., nonce: _Optional[bytes] = ..., challenge: _Optional[bytes] = ..., padding: _Optional[bytes] = ...) -> None: ...

class RegisterPkResponse(_message.Message):
    __slots__ = ("result", "keep_alive", "challenge", "server_key")
    class Result(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[RegisterPkResponse.Result]
        UUID_MISMATCH: _ClassVar[RegisterPkResponse.Result]
        ID_EXISTS: _ClassVar[RegisterPkResponse.Result]
        TOO_FREQUENT: _ClassVar[RegisterPkResponse.Result]
        INVALID_ID_FORMAT: _ClassVar[RegisterPkResponse.Result]
        NOT_SUPPORT: _ClassVar[RegisterPkResponse.Result]
        SERVER_ERROR: _ClassVar[RegisterPkResponse.Result]
        NOT_DEPLOYED: _ClassVar[RegisterPkResponse.Result]
        CHALLENGE: _ClassVar[RegisterPkResponse.Result]
        KEY_MISMATCH: _ClassVar[RegisterPkResponse.Result]
        BAD_SIGNATURE: _ClassVar[RegisterPkResponse.Result]
        ID_NOT_DERIVED: _ClassVar[RegisterPkResponse.Result]
    OK: RegisterPkResponse.Result
    UUID_MISMATCH: RegisterPkResponse.Result
    ID_EXISTS: RegisterPkResponse.Result
    TOO_FREQUENT: RegisterPkResponse.Result
    INVALID_ID_FORMAT: RegisterPkResponse.Result
    NOT_SUPPORT: RegisterPkResponse.Result
    SERVER_ERROR: RegisterPkResponse.Result
    NOT_DEPLOYED: RegisterPkResponse.Result
    CHALLENGE: RegisterPkResponse.Result
    KEY_MISMATCH: RegisterPkResponse.Result
    BAD_SIGNATURE: RegisterPkResponse.Result
    ID_NOT_DERIVED: RegisterPkResponse.Result
    RESULT_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    SERVER_KEY_FIELD_NUMBER: _ClassVar[int]
    result: RegisterPkResponse.Result
    keep_alive: int
    challenge: bytes
    server_key: bytes
    def __init__(self, result: _Optional[_Union[RegisterPkResponse.Result, str]] = ..., keep_alive: _Optional[int] = ..., challenge: _Optional[bytes] = ..., server_key: _Optional[bytes] = ...) -> None: ...

class PunchHoleResponse(_message.Message):
    __slots__ = ("socket_addr", "pk", "failure", "relay_server", "nat_type", "is_local", "other_failure", "feedback", "is_udp", "upnp_port", "socket_addr_v6", "nat_behavior", "birthday")
    class Failure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ID_NOT_EXIST: _ClassVar[PunchHoleResponse.Failure]
        OFFLINE: _ClassVar[PunchHoleResponse.Failure]
        LICENSE_MISMATCH: _ClassVar[PunchHoleResponse.Failure]
        LICENSE_OVERUSE: _ClassVar[PunchHoleResponse.Failure]
    ID_NOT_EXIST: PunchHoleResponse.Failure
    OFFLINE: PunchHoleResponse.Failure
    LICENSE_MISMATCH: PunchHoleResponse.Failure
    LICENSE_OVERUSE: PunchHoleResponse.Failure
    SOCKET_ADDR_FIELD_NUMBER: _ClassVar[int]
    PK_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    RELAY_SERVER_FIELD_NUMBER: _ClassVar[int]
    NAT_TYPE_FIELD_NUMBER: _ClassVar[int]
    IS_LOCAL_FIELD_NUMBER: _ClassVar[int]
    OTHER_FAILURE_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    IS_UDP_FIELD_NUMBER: _ClassVar[int]
    UPNP_PORT_FIELD_NUMBER: _ClassVar[int]
    SOCKET_ADDR_V6_FIELD_NUMBER: _ClassVar[int]
    NAT_BEHAVIOR_FIELD_NUMBER: _ClassVar[int]
    BIRTHDAY_FIELD_NUMBER: _ClassVar[int]
    socket_addr: bytes
    pk: bytes
    failure: PunchHoleResponse.Failure
    relay_server: str
    nat_type: NatType
    is_local: bool
    other_failure: str
    feedback: int
    is_udp: bool
    upnp_port: int
    socket_addr_v6: bytes
    nat_behavior: NatBehavior
    birthday: bool
    def __init__(self, socket_addr: _Optional[bytes] = ..., pk: _Optional[bytes] = ..., failure: _Optional[_Union[PunchHoleResponse.Failure, str]] = ..., relay_server: _Optional[str] = ..., nat_type: _Optional[_Union[NatType, str]] = ..., is_local: _Optional[bool] = ..., other_failure: _Optional[str] = ..., feedback: _Optional[int] = ..., is_udp: _Optional[bool] = ..., upnp_port: _Optional[int] = ..., socket_addr_v6: _Optional[bytes] = ..., nat_behavior: _Optional[_Union[NatBehavior, _Mapping]] = ..., birthday: _Optional[bool] = ...) -> None: ...

class ConfigUpdate(_message.Message):
    __slots__ = ("serial", "rendezvous_servers")
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_SERVERS_FIELD_NUMBER: _ClassVar[int]
    serial: int
    rendezvous_servers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, serial: _Optional[int] = ..., rendezvous_servers: _Optional[_Iterable[str]] = ...) -> None: ...

class RequestRelay(_message.Message):
    __slots__ = ("id", "uuid", "socket_addr", "relay_server", "secure", "licence_key", "conn_type", "token", "control_permissions", "controlled_context", "switch_code", "requester_id", "request_time_ms", "request_nonce", "ticket", "requester_pk", "answer_token", "requester_salt")
    ID_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    SOCKET_ADDR_FIELD_NUMBER: _ClassVar[int]
    RELAY_SERVER_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    LICENCE_KEY_FIELD_NUMBER: _ClassVar[int]
    CONN_TYPE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PERMISSIONS_FIELD_NUMBER: _ClassVar[int]
    CONTROLLED_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SWITCH_CODE_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_NONCE_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_PK_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_SALT_FIELD_NUMBER: _ClassVar[int]
    id: str
    uuid: str
    socket_addr: bytes
    relay_server: str
    secure: bool
    licence_key: str
    conn_type: ConnType
    token: str
    control_permissions: ControlPermissions
    controlled_context: ControlledContext
    switch_code: str
    requester_id: str
    request_time_ms: int
    request_nonce: bytes
    ticket: bytes
    requester_pk: bytes
    answer_token: bytes
    requester_salt: int
    def __init__(self, id: _Optional[str] = ..., uuid: _Optional[str] = ..., socket_addr: _Optional[bytes] = ..., relay_server: _Optional[str] = ..., secure: _Optional[bool] = ..., licence_key: _Optional[str] = ..., conn_type: _Optional[_Union[ConnType, str]] = ..., token: _Optional[str] = ..., control_permissions: _Optional[_Union[ControlPermissions, _Mapping]] = ..., controlled_context: _Optional[_Union[ControlledContext, _Mapping]] = ..., switch_code: _Optional[str] = ..., requester_id: _Optional[str] = ..., request_time_ms: _Optional[int] = ..., request_nonce: _Optional[bytes] = ..., ticket: _Optional[bytes] = ..., requester_pk: _Optional[bytes] = ..., answer_token: _Optional[bytes] = ..., requester_salt: _Optional[int] = ...) -> None: ...

class RelayResponse(_message.Message):
    __slots__ = ("socket_addr", "uuid", "relay_server", "id", "pk", "refuse_reason", "version", "feedback", "socket_addr_v6", "upnp_port", "ticket", "answer_token")
    SOCKET_ADDR_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    RELAY_SERVER_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PK_FIELD_NUMBER: _ClassVar[int]
    REFUSE_REASON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    SOCKET_ADDR_V6_FIELD_NUMBER: _ClassVar[int]
    UPNP_PORT_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    socket_addr: bytes
    uuid: str
    relay_server: str
    id: str
    pk: bytes
    refuse_reason: str
    version: str
    feedback: int
    socket_addr_v6: bytes
    upnp_port: int
    ticket: bytes
    answer_token: bytes
    def __init__(self, socket_addr: _Optional[bytes] = ..., uuid: _Optional[str] = ..., relay_server: _Optional[str] = ..., id: _Optional[str] = ..., pk: _Optional[bytes] = ..., refuse_reason: _Optional[str] = ..., version: _Optional[str] = ..., feedback: _Optional[int] = ..., socket_addr_v6: _Optional[bytes] = ..., upnp_port: _Optional[int] = ..., ticket: _Optional[bytes] = ..., answer_token: _Optional[bytes] = ...) -> None: ...

class SoftwareUpdate(_message.Message):
    __slots__ = ("url",)
    URL_FIELD_NUMBER: _ClassVar[int]
    url: str
    def __init__(self, url: _Optional[str] = ...) -> None: ...

class FetchLocalAddr(_message.Message):
    __slots__ = ("socket_addr", "relay_server", "socket_addr_v6", "control_permissions", "controlled_context", "requester_id", "requester_pk", "answer_token")
    SOCKET_ADDR_FIELD_NUMBER: _ClassVar[int]
    RELAY_SERVER_FIELD_NUMBER: _ClassVar[int]
    SOCKET_ADDR_V6_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PERMISSIONS_FIELD_NUMBER: _ClassVar[int]
    CONTROLLED_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_PK_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    socket_addr: bytes
    relay_server: str
    socket_addr_v6: bytes
    control_permissions: ControlPermissions
    controlled_context: ControlledContext
    requester_id: str
    requester_pk: bytes
    answer_token: bytes
    def __init__(self, socket_addr: _Optional[bytes] = ..., relay_server: _Optional[str] = ..., socket_addr_v6: _Optional[bytes] = ..., control_permissions: _Optional[_Union[ControlPermissions, _Mapping]] = ..., controlled_context: _Optional[_Union[ControlledContext, _Mapping]] = ..., requester_id: _Optional[str] = ..., requester_pk: _Optional[bytes] = ..., answer_token: _Optional[bytes] = ...) -> None: ...

class LocalAddr(_message.Message):
    __slots__ = ("socket_addr", "local_addr", "relay_server", "id", "version", "socket_addr_v6", "answer_token")
    SOCKET_ADDR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ADDR_FIELD_NUMBER: _ClassVar[int]
    RELAY_SERVER_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOCKET_ADDR_V6_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    socket_addr: bytes
    local_addr: bytes
    relay_server: str
    id: str
    version: str
    socket_addr_v6: bytes
    answer_token: bytes
    def __init__(self, socket_addr: _Optional[bytes] = ..., local_addr: _Optional[bytes] = ..., relay_server: _Optional[str] = ..., id: _Optional[str] = ..., version: _Optional[str] = ..., socket_addr_v6: _Optional[bytes] = ..., answer_token: _Optional[bytes] = ...) -> None: ...

class PeerDiscovery(_message.Message):
    __slots__ = ("cmd", "mac", "id", "username", "hostname", "platform", "misc")
    CMD_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    MISC_FIELD_NUMBER: _ClassVar[int]
    cmd: str
    mac: str
    id: str
    username: str
    hostname: str
    platform: str
    misc: str
    def __init__(self, cmd: _Optional[str] = ..., mac: _Optional[str] = ..., id: _Optional[str] = ..., username: _Optional[str] = ..., hostname: _Optional[str] = ..., platform: _Optional[str] = ..., misc: _Optional[str] = ...) -> None: ...

class OnlineRequest(_message.Message):
    __slots__ = ("id", "peers")
    ID_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    id: str
    peers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., peers: _Optional[_Iterable[str]] = ...) -> None: ...

class OnlineResponse(_message.Message):
    __slots__ = ("states",)
    STATES_FIELD_NUMBER: _ClassVar[int]
    states: bytes
    def __init__(self, states: _Optional[bytes] = ...) -> None: ...

class KeyExchange(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class HealthCheck(_message.Message):
    __slots__ = ("token", "pairs_active", "waiting", "bytes_relayed")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAIRS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    BYTES_RELAYED_FIELD_NUMBER: _ClassVar[int]
    token: str
    pairs_active: int
    waiting: int
    bytes_relayed: int
    def __init__(self, token: _Optional[str] = ..., pairs_active: _Optional[int] = ..., waiting: _Optional[int] = ..., bytes_relayed: _Optional[int] = ...) -> None: ...

class HeaderEntry(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class HttpProxyRequest(_message.Message):
    __slots__ = ("method", "path", "headers", "body")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    method: str
    path: str
    headers: _containers.RepeatedCompositeFieldContainer[HeaderEntry]
    body: bytes
    def __init__(self, method: _Optional[str] = ..., path: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[HeaderEntry, _Mapping]]] = ..., body: _Optional[bytes] = ...) -> None: ...

class HttpProxyResponse(_message.Message):
    __slots__ = ("status", "headers", "body", "error")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    status: int
    headers: _containers.RepeatedCompositeFieldContainer[HeaderEntry]
    body: bytes
    error: str
    def __init__(self, status: _Optional[int] = ..., headers: _Optional[_Iterable[_Union[HeaderEntry, _Mapping]]] = ..., body: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...

class RendezvousMessage(_message.Message):
    __slots__ = ("register_peer", "register_peer_response", "punch_hole_request", "punch_hole", "punch_hole_sent", "punch_hole_response", "fetch_local_addr", "local_addr", "configure_update", "register_pk", "register_pk_response", "software_update", "request_relay", "relay_response", "test_nat_request", "test_nat_response", "peer_discovery", "online_request", "online_response", "key_exchange", "hc", "http_proxy_request", "http_proxy_response", "signature")
    REGISTER_PEER_FIELD_NUMBER: _ClassVar[int]
    REGISTER_PEER_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    PUNCH_HOLE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    PUNCH_HOLE_FIELD_NUMBER: _ClassVar[int]
    PUNCH_HOLE_SENT_FIELD_NUMBER: _ClassVar[int]
    PUNCH_HOLE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    FETCH_LOCAL_ADDR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ADDR_FIELD_NUMBER: _ClassVar[int]
    CONFIGURE_UPDATE_FIELD_NUMBER: _ClassVar[int]
    REGISTER_PK_FIELD_NUMBER: _ClassVar[int]
    REGISTER_PK_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_UPDATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_RELAY_FIELD_NUMBER: _ClassVar[int]
    RELAY_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    TEST_NAT_REQUEST_FIELD_NUMBER: _ClassVar[int]
    TEST_NAT_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    PEER_DISCOVERY_FIELD_NUMBER: _ClassVar[int]
    ONLINE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    ONLINE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    KEY_EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    HC_FIELD_NUMBER: _ClassVar[int]
    HTTP_PROXY_REQUEST_FIELD_NUMBER: _ClassVar[int]
    HTTP_PROXY_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    register_peer: RegisterPeer
    register_peer_response: RegisterPeerResponse
    punch_hole_request: PunchHoleRequest
    punch_hole: PunchHole
    punch_hole_sent: PunchHoleSent
    punch_hole_response: PunchHoleResponse
    fetch_local_addr: FetchLocalAddr
    local_addr: LocalAddr
    configure_update: ConfigUpdate
    register_pk: RegisterPk
    register_pk_response: RegisterPkResponse
    software_update: SoftwareUpdate
    request_relay: RequestRelay
    relay_response: RelayResponse
    test_nat_request: TestNatRequest
    test_nat_response: TestNatResponse
    peer_discovery: PeerDiscovery
    online_request: OnlineRequest
    online_response: OnlineResponse
    key_exchange: KeyExchange
    hc: HealthCheck
    http_proxy_request: HttpProxyRequest
    http_proxy_response: HttpProxyResponse
    signature: bytes
    def __init__(self, register_peer: _Optional[_Union[RegisterPeer, _Mapping]] = ..., register_peer_response: _Optional[_Union[RegisterPeerResponse, _Mapping]] = ..., punch_hole_request: _Optional[_Union[PunchHoleRequest, _Mapping]] = ..., punch_hole: _Optional[_Union[PunchHole, _Mapping]] = ..., punch_hole_sent: _Optional[_Union[PunchHoleSent, _Mapping]] = ..., punch_hole_response: _Optional[_Union[PunchHoleResponse, _Mapping]] = ..., fetch_local_addr: _Optional[_Union[FetchLocalAddr, _Mapping]] = ..., local_addr: _Optional[_Union[LocalAddr, _Mapping]] = ..., configure_update: _Optional[_Union[ConfigUpdate, _Mapping]] = ..., register_pk: _Optional[_Union[RegisterPk, _Mapping]] = ..., register_pk_response: _Optional[_Union[RegisterPkResponse, _Mapping]] = ..., software_update: _Optional[_Union[SoftwareUpdate, _Mapping]] = ..., request_relay: _Optional[_Union[RequestRelay, _Mapping]] = ..., relay_response: _Optional[_Union[RelayResponse, _Mapping]] = ..., test_nat_request: _Optional[_Union[TestNatRequest, _Mapping]] = ..., test_nat_response: _Optional[_Union[TestNatResponse, _Mapping]] = ..., peer_discovery: _Optional[_Union[PeerDiscovery, _Mapping]] = ..., online_request: _Optional[_Union[OnlineRequest, _Mapping]] = ..., online_response: _Optional[_Union[OnlineResponse, _Mapping]] = ..., key_exchange: _Optional[_Union[KeyExchange, _Mapping]] = ..., hc: _Optional[_Union[HealthCheck, _Mapping]] = ..., http_proxy_request: _Optional[_Union[HttpProxyRequest, _Mapping]] = ..., http_proxy_response: _Optional[_Union[HttpProxyResponse, _Mapping]] = ..., signature: _Optional[bytes] = ...) -> None: ...
