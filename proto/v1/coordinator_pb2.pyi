from edgetune.proto.v1 import node_pb2 as _node_pb2
from edgetune.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnrollRequest(_message.Message):
    __slots__ = ("token_id", "secret", "name", "csr_pem", "ips")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    secret: str
    name: str
    csr_pem: bytes
    ips: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, token_id: _Optional[str] = ..., secret: _Optional[str] = ..., name: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., ips: _Optional[_Iterable[str]] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("cert_pem", "ca_pem", "coordinator")
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    cert_pem: bytes
    ca_pem: bytes
    coordinator: str
    def __init__(self, cert_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., coordinator: _Optional[str] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr_pem", "ips")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    ips: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, csr_pem: _Optional[bytes] = ..., ips: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("ray_address", "ray_auth_token", "ray_auth_mode", "ray_tls_cert", "ray_tls_key", "ray_tls_ca")
    RAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RAY_AUTH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RAY_AUTH_MODE_FIELD_NUMBER: _ClassVar[int]
    RAY_TLS_CERT_FIELD_NUMBER: _ClassVar[int]
    RAY_TLS_KEY_FIELD_NUMBER: _ClassVar[int]
    RAY_TLS_CA_FIELD_NUMBER: _ClassVar[int]
    ray_address: str
    ray_auth_token: str
    ray_auth_mode: str
    ray_tls_cert: bytes
    ray_tls_key: bytes
    ray_tls_ca: bytes
    def __init__(self, ray_address: _Optional[str] = ..., ray_auth_token: _Optional[str] = ..., ray_auth_mode: _Optional[str] = ..., ray_tls_cert: _Optional[bytes] = ..., ray_tls_key: _Optional[bytes] = ..., ray_tls_ca: _Optional[bytes] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("model", "failed", "verify", "exclude")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_FIELD_NUMBER: _ClassVar[int]
    model: str
    failed: _containers.RepeatedScalarFieldContainer[str]
    verify: bool
    exclude: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., failed: _Optional[_Iterable[str]] = ..., verify: _Optional[bool] = ..., exclude: _Optional[_Iterable[str]] = ...) -> None: ...

class ManifestEntry(_message.Message):
    __slots__ = ("name", "dtype", "shape", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    sha256: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., sha256: _Optional[str] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("model", "fingerprint", "hops", "num_layers", "manifest", "verifiers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    VERIFIERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    fingerprint: str
    hops: _containers.RepeatedCompositeFieldContainer[_node_pb2.Hop]
    num_layers: int
    manifest: _containers.RepeatedCompositeFieldContainer[ManifestEntry]
    verifiers: _containers.RepeatedCompositeFieldContainer[_node_pb2.Hop]
    def __init__(self, model: _Optional[str] = ..., fingerprint: _Optional[str] = ..., hops: _Optional[_Iterable[_Union[_node_pb2.Hop, _Mapping]]] = ..., num_layers: _Optional[int] = ..., manifest: _Optional[_Iterable[_Union[ManifestEntry, _Mapping]]] = ..., verifiers: _Optional[_Iterable[_Union[_node_pb2.Hop, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("name", "ray_node_id", "host", "alive", "device", "gpu_name", "memory_bytes", "cpus", "threads", "block_time_s", "bandwidth_bytes_per_s", "stages", "info", "dtype", "quantize", "kernels", "banned_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RAY_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    GPU_NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TIME_S_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    BANNED_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    ray_node_id: str
    host: str
    alive: bool
    device: str
    gpu_name: str
    memory_bytes: int
    cpus: int
    threads: int
    block_time_s: float
    bandwidth_bytes_per_s: float
    stages: _containers.RepeatedCompositeFieldContainer[_node_pb2.Hop]
    info: _node_pb2.NodeInfo
    dtype: str
    quantize: str
    kernels: str
    banned_s: float
    def __init__(self, name: _Optional[str] = ..., ray_node_id: _Optional[str] = ..., host: _Optional[str] = ..., alive: _Optional[bool] = ..., device: _Optional[str] = ..., gpu_name: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., cpus: _Optional[int] = ..., threads: _Optional[int] = ..., block_time_s: _Optional[float] = ..., bandwidth_bytes_per_s: _Optional[float] = ..., stages: _Optional[_Iterable[_Union[_node_pb2.Hop, _Mapping]]] = ..., info: _Optional[_Union[_node_pb2.NodeInfo, _Mapping]] = ..., dtype: _Optional[str] = ..., quantize: _Optional[str] = ..., kernels: _Optional[str] = ..., banned_s: _Optional[float] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("ray_address", "nodes", "models")
    RAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ray_address: str
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ray_address: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class EdgePartRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class EdgePartFrame(_message.Message):
    __slots__ = ("file", "tensor", "chunk")
    FILE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    file: File
    tensor: _tensor_pb2.Tensor
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, file: _Optional[_Union[File, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class File(_message.Message):
    __slots__ = ("name", "content")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    content: bytes
    def __init__(self, name: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...
