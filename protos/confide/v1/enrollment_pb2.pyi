from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetCaCertificateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCaCertificateResponse(_message.Message):
    __slots__ = ("ca_certificate_pem",)
    CA_CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    ca_certificate_pem: bytes
    def __init__(self, ca_certificate_pem: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("token", "public_key_openssh")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_OPENSSH_FIELD_NUMBER: _ClassVar[int]
    token: str
    public_key_openssh: bytes
    def __init__(self, token: _Optional[str] = ..., public_key_openssh: _Optional[bytes] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("institution", "node_id", "superlink_address")
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SUPERLINK_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    institution: str
    node_id: int
    superlink_address: str
    def __init__(self, institution: _Optional[str] = ..., node_id: _Optional[int] = ..., superlink_address: _Optional[str] = ...) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ("institution", "new_public_key_openssh", "timestamp", "signature")
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    NEW_PUBLIC_KEY_OPENSSH_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    institution: str
    new_public_key_openssh: bytes
    timestamp: int
    signature: bytes
    def __init__(self, institution: _Optional[str] = ..., new_public_key_openssh: _Optional[bytes] = ..., timestamp: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RotateKeyResponse(_message.Message):
    __slots__ = ("institution", "node_id", "superlink_address")
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SUPERLINK_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    institution: str
    node_id: int
    superlink_address: str
    def __init__(self, institution: _Optional[str] = ..., node_id: _Optional[int] = ..., superlink_address: _Optional[str] = ...) -> None: ...
