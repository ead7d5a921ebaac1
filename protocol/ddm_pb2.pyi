from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("token", "name")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    token: str
    name: str
    def __init__(self, token: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("island_id", "credential", "role", "coordinator_public_key", "key_fingerprint")
    ISLAND_ID_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    island_id: str
    credential: str
    role: str
    coordinator_public_key: bytes
    key_fingerprint: str
    def __init__(self, island_id: _Optional[str] = ..., credential: _Optional[str] = ..., role: _Optional[str] = ..., coordinator_public_key: _Optional[bytes] = ..., key_fingerprint: _Optional[str] = ...) -> None: ...

class AcquireLeaseRequest(_message.Message):
    __slots__ = ("local_dataset",)
    LOCAL_DATASET_FIELD_NUMBER: _ClassVar[int]
    local_dataset: str
    def __init__(self, local_dataset: _Optional[str] = ...) -> None: ...

class Shard(_message.Message):
    __slots__ = ("sha256", "size")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class IndexList(_message.Message):
    __slots__ = ("dataset", "dataset_fingerprint", "ids")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATASET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    dataset_fingerprint: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dataset: _Optional[str] = ..., dataset_fingerprint: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "expert_id", "cluster_id", "model_config_json", "train_config_json", "deadline_unix_ms", "heartbeat_interval_s", "shard", "index_list", "shard_fingerprint", "autoencoder", "require_dp_epsilon")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TRAIN_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    INDEX_LIST_FIELD_NUMBER: _ClassVar[int]
    SHARD_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    AUTOENCODER_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    expert_id: int
    cluster_id: int
    model_config_json: str
    train_config_json: str
    deadline_unix_ms: int
    heartbeat_interval_s: int
    shard: Shard
    index_list: IndexList
    shard_fingerprint: str
    autoencoder: Shard
    require_dp_epsilon: float
    def __init__(self, lease_id: _Optional[str] = ..., expert_id: _Optional[int] = ..., cluster_id: _Optional[int] = ..., model_config_json: _Optional[str] = ..., train_config_json: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ..., heartbeat_interval_s: _Optional[int] = ..., shard: _Optional[_Union[Shard, _Mapping]] = ..., index_list: _Optional[_Union[IndexList, _Mapping]] = ..., shard_fingerprint: _Optional[str] = ..., autoencoder: _Optional[_Union[Shard, _Mapping]] = ..., require_dp_epsilon: _Optional[float] = ...) -> None: ...

class AcquireLeaseReply(_message.Message):
    __slots__ = ("lease", "no_work")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    NO_WORK_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    no_work: NoWork
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., no_work: _Optional[_Union[NoWork, _Mapping]] = ...) -> None: ...

class NoWork(_message.Message):
    __slots__ = ("reason", "finished", "retry_after_s")
    REASON_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    reason: str
    finished: bool
    retry_after_s: int
    def __init__(self, reason: _Optional[str] = ..., finished: bool = ..., retry_after_s: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("lease_id", "step", "loss", "images_per_second")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    step: int
    loss: float
    images_per_second: float
    def __init__(self, lease_id: _Optional[str] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., images_per_second: _Optional[float] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("deadline_unix_ms",)
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    deadline_unix_ms: int
    def __init__(self, deadline_unix_ms: _Optional[int] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "reason")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    reason: str
    def __init__(self, lease_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseLeaseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BeginUploadRequest(_message.Message):
    __slots__ = ("lease_id", "size", "sha256")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    size: int
    sha256: str
    def __init__(self, lease_id: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadState(_message.Message):
    __slots__ = ("upload_id", "committed_offset", "size", "sha256", "state")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    committed_offset: int
    size: int
    sha256: str
    state: str
    def __init__(self, upload_id: _Optional[str] = ..., committed_offset: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("upload_id", "offset", "data", "sha256")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    offset: int
    data: bytes
    sha256: str
    def __init__(self, upload_id: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class QueryUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class CompleteUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class CompleteUploadReply(_message.Message):
    __slots__ = ("sha256", "entry_json", "signature")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ENTRY_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    entry_json: bytes
    signature: bytes
    def __init__(self, sha256: _Optional[str] = ..., entry_json: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SignedManifest(_message.Message):
    __slots__ = ("manifest_json", "signature", "coordinator_public_key")
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    manifest_json: bytes
    signature: bytes
    coordinator_public_key: bytes
    def __init__(self, manifest_json: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., coordinator_public_key: _Optional[bytes] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("sha256", "offset")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class DownloadChunk(_message.Message):
    __slots__ = ("offset", "data", "size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
