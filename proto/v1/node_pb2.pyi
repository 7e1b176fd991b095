from edgetune.proto.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hop(_message.Message):
    __slots__ = ("name", "address", "start", "end", "dtype", "quantize")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    start: int
    end: int
    dtype: str
    quantize: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., dtype: _Optional[str] = ..., quantize: _Optional[str] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("session_id", "model", "fingerprint", "route", "codec", "methods_json", "adapter_codec", "owner", "micro_batch_size", "seq_len", "micro_batches", "constants_digest")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    METHODS_JSON_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CODEC_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    CONSTANTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    fingerprint: str
    route: _containers.RepeatedCompositeFieldContainer[Hop]
    codec: _tensor_pb2.Codec
    methods_json: str
    adapter_codec: _tensor_pb2.Codec
    owner: str
    micro_batch_size: int
    seq_len: int
    micro_batches: int
    constants_digest: str
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., fingerprint: _Optional[str] = ..., route: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., codec: _Optional[_Union[_tensor_pb2.Codec, str]] = ..., methods_json: _Optional[str] = ..., adapter_codec: _Optional[_Union[_tensor_pb2.Codec, str]] = ..., owner: _Optional[str] = ..., micro_batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., micro_batches: _Optional[int] = ..., constants_digest: _Optional[str] = ...) -> None: ...

class AdapterPush(_message.Message):
    __slots__ = ("version", "tensors", "delta", "hops_ahead")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    HOPS_AHEAD_FIELD_NUMBER: _ClassVar[int]
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    delta: bool
    hops_ahead: int
    def __init__(self, version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., delta: _Optional[bool] = ..., hops_ahead: _Optional[int] = ...) -> None: ...

class Forward(_message.Message):
    __slots__ = ("step", "micro", "version", "train", "dropout_key", "tensors", "echo", "recompute")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_KEY_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ECHO_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro: int
    version: int
    train: bool
    dropout_key: _containers.RepeatedScalarFieldContainer[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    echo: bool
    recompute: bool
    def __init__(self, step: _Optional[int] = ..., micro: _Optional[int] = ..., version: _Optional[int] = ..., train: _Optional[bool] = ..., dropout_key: _Optional[_Iterable[int]] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., echo: _Optional[bool] = ..., recompute: _Optional[bool] = ...) -> None: ...

class Backward(_message.Message):
    __slots__ = ("step", "micro", "tensors", "no_input_grad")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NO_INPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro: int
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    no_input_grad: bool
    def __init__(self, step: _Optional[int] = ..., micro: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., no_input_grad: _Optional[bool] = ...) -> None: ...

class EndStep(_message.Message):
    __slots__ = ("step", "version")
    STEP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    step: int
    version: int
    def __init__(self, step: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class Down(_message.Message):
    __slots__ = ("open", "adapter", "forward", "backward", "end_step", "chunk")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    END_STEP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    open: Open
    adapter: AdapterPush
    forward: Forward
    backward: Backward
    end_step: EndStep
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., adapter: _Optional[_Union[AdapterPush, _Mapping]] = ..., forward: _Optional[_Union[Forward, _Mapping]] = ..., backward: _Optional[_Union[Backward, _Mapping]] = ..., end_step: _Optional[_Union[EndStep, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("route",)
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    route: _containers.RepeatedCompositeFieldContainer[Hop]
    def __init__(self, route: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ...) -> None: ...

class ForwardResult(_message.Message):
    __slots__ = ("step", "micro", "tensors")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro: int
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    def __init__(self, step: _Optional[int] = ..., micro: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class BackwardResult(_message.Message):
    __slots__ = ("step", "micro", "tensors")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro: int
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    def __init__(self, step: _Optional[int] = ..., micro: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("name", "forward_s", "backward_s", "bytes_in", "bytes_out")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORWARD_S_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    forward_s: float
    backward_s: float
    bytes_in: int
    bytes_out: int
    def __init__(self, name: _Optional[str] = ..., forward_s: _Optional[float] = ..., backward_s: _Optional[float] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ...) -> None: ...

class Gradients(_message.Message):
    __slots__ = ("step", "version", "tensors", "timings")
    STEP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    step: int
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    def __init__(self, step: _Optional[int] = ..., version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message", "node", "step", "micro")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    node: str
    step: int
    micro: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., node: _Optional[str] = ..., step: _Optional[int] = ..., micro: _Optional[int] = ...) -> None: ...

class StageOutput(_message.Message):
    __slots__ = ("step", "micro", "node", "tensors")
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    step: int
    micro: int
    node: str
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    def __init__(self, step: _Optional[int] = ..., micro: _Optional[int] = ..., node: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class Up(_message.Message):
    __slots__ = ("opened", "forward", "backward", "gradients", "error", "chunk", "stage_output")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    STAGE_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    forward: ForwardResult
    backward: BackwardResult
    gradients: Gradients
    error: ItemError
    chunk: _tensor_pb2.TensorChunk
    stage_output: StageOutput
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., forward: _Optional[_Union[ForwardResult, _Mapping]] = ..., backward: _Optional[_Union[BackwardResult, _Mapping]] = ..., gradients: _Optional[_Union[Gradients, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., stage_output: _Optional[_Union[StageOutput, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("name", "model", "fingerprint", "start", "end", "device", "sessions", "cached_activations", "loaded_bytes", "busy_fraction", "open_sessions", "free_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHED_ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUSY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    fingerprint: str
    start: int
    end: int
    device: str
    sessions: int
    cached_activations: int
    loaded_bytes: int
    busy_fraction: float
    open_sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    free_bytes: int
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., fingerprint: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., device: _Optional[str] = ..., sessions: _Optional[int] = ..., cached_activations: _Optional[int] = ..., loaded_bytes: _Optional[int] = ..., busy_fraction: _Optional[float] = ..., open_sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ..., free_bytes: _Optional[int] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "owner", "reserved_bytes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    owner: str
    reserved_bytes: int
    def __init__(self, session_id: _Optional[str] = ..., owner: _Optional[str] = ..., reserved_bytes: _Optional[int] = ...) -> None: ...
