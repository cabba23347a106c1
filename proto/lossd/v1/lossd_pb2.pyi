from lossd.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListLossesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLossesResponse(_message.Message):
    __slots__ = ("losses",)
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    losses: _containers.RepeatedCompositeFieldContainer[LossInfo]
    def __init__(self, losses: _Optional[_Iterable[_Union[LossInfo, _Mapping]]] = ...) -> None: ...

class LossInfo(_message.Message):
    __slots__ = ("name", "defaults", "required", "args", "state", "returns", "doc")
    class DefaultsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RETURNS_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    name: str
    defaults: _containers.MessageMap[str, _tensor_pb2.Value]
    required: _containers.RepeatedScalarFieldContainer[str]
    args: _containers.RepeatedCompositeFieldContainer[ArgInfo]
    state: _containers.RepeatedScalarFieldContainer[str]
    returns: str
    doc: str
    def __init__(self, name: _Optional[str] = ..., defaults: _Optional[_Mapping[str, _tensor_pb2.Value]] = ..., required: _Optional[_Iterable[str]] = ..., args: _Optional[_Iterable[_Union[ArgInfo, _Mapping]]] = ..., state: _Optional[_Iterable[str]] = ..., returns: _Optional[str] = ..., doc: _Optional[str] = ...) -> None: ...

class ArgInfo(_message.Message):
    __slots__ = ("name", "kind", "batch", "grad", "dtype", "required", "default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    batch: str
    grad: _containers.RepeatedScalarFieldContainer[bool]
    dtype: str
    required: bool
    default: _tensor_pb2.Value
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., batch: _Optional[str] = ..., grad: _Optional[_Iterable[bool]] = ..., dtype: _Optional[str] = ..., required: _Optional[bool] = ..., default: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("loss", "config", "session_id", "seed", "device", "shared_bank", "shared_bank_dtype", "attach_only")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SHARED_BANK_FIELD_NUMBER: _ClassVar[int]
    SHARED_BANK_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ATTACH_ONLY_FIELD_NUMBER: _ClassVar[int]
    loss: str
    config: _containers.MessageMap[str, _tensor_pb2.Value]
    session_id: str
    seed: int
    device: str
    shared_bank: str
    shared_bank_dtype: _tensor_pb2.DType
    attach_only: bool
    def __init__(self, loss: _Optional[str] = ..., config: _Optional[_Mapping[str, _tensor_pb2.Value]] = ..., session_id: _Optional[str] = ..., seed: _Optional[int] = ..., device: _Optional[str] = ..., shared_bank: _Optional[str] = ..., shared_bank_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., attach_only: _Optional[bool] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "loss", "config", "device", "steps", "created_at", "last_used_at", "created", "state_bytes", "shared_bank")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_BANK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    loss: str
    config: _containers.MessageMap[str, _tensor_pb2.Value]
    device: str
    steps: int
    created_at: float
    last_used_at: float
    created: bool
    state_bytes: int
    shared_bank: str
    def __init__(self, session_id: _Optional[str] = ..., loss: _Optional[str] = ..., config: _Optional[_Mapping[str, _tensor_pb2.Value]] = ..., device: _Optional[str] = ..., steps: _Optional[int] = ..., created_at: _Optional[float] = ..., last_used_at: _Optional[float] = ..., created: _Optional[bool] = ..., state_bytes: _Optional[int] = ..., shared_bank: _Optional[str] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "args", "global_batch", "compute_dtype", "shared_region", "shared_output_offset", "shared_output_capacity")
    class ArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHARED_REGION_FIELD_NUMBER: _ClassVar[int]
    SHARED_OUTPUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHARED_OUTPUT_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: str
    args: _containers.MessageMap[str, _tensor_pb2.Value]
    global_batch: GlobalBatch
    compute_dtype: _tensor_pb2.DType
    shared_region: str
    shared_output_offset: int
    shared_output_capacity: int
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., args: _Optional[_Mapping[str, _tensor_pb2.Value]] = ..., global_batch: _Optional[_Union[GlobalBatch, _Mapping]] = ..., compute_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., shared_region: _Optional[str] = ..., shared_output_offset: _Optional[int] = ..., shared_output_capacity: _Optional[int] = ...) -> None: ...

class GlobalBatch(_message.Message):
    __slots__ = ("world_size", "rank", "step")
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    world_size: int
    rank: int
    step: int
    def __init__(self, world_size: _Optional[int] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("result", "grads", "steps")
    class GradsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ...) -> None: ...
    RESULT_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    result: _tensor_pb2.Value
    grads: _containers.MessageMap[str, _tensor_pb2.Value]
    steps: int
    def __init__(self, result: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ..., grads: _Optional[_Mapping[str, _tensor_pb2.Value]] = ..., steps: _Optional[int] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SetStateRequest(_message.Message):
    __slots__ = ("session_id", "tensors")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tensors: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, session_id: _Optional[str] = ..., tensors: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class State(_message.Message):
    __slots__ = ("tensors", "steps")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.MessageMap[str, _tensor_pb2.Tensor]
    steps: int
    def __init__(self, tensors: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ..., steps: _Optional[int] = ...) -> None: ...

class StreamMessage(_message.Message):
    __slots__ = ("request", "response", "chunk", "error")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request: ComputeRequest
    response: ComputeResponse
    chunk: Chunk
    error: StepError
    def __init__(self, request: _Optional[_Union[ComputeRequest, _Mapping]] = ..., response: _Optional[_Union[ComputeResponse, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("tensor", "offset", "data")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tensor: int
    offset: int
    data: bytes
    def __init__(self, tensor: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("request_id", "code", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: int
    message: str
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CreateBankRequest(_message.Message):
    __slots__ = ("name", "num_features", "dim", "dtype", "seed", "device")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_features: int
    dim: int
    dtype: _tensor_pb2.DType
    seed: int
    device: str
    def __init__(self, name: _Optional[str] = ..., num_features: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., seed: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class Bank(_message.Message):
    __slots__ = ("name", "num_features", "dim", "dtype", "device", "pointer", "rows_written", "sessions", "created_at", "created")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    POINTER_FIELD_NUMBER: _ClassVar[int]
    ROWS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_features: int
    dim: int
    dtype: _tensor_pb2.DType
    device: str
    pointer: int
    rows_written: int
    sessions: _containers.RepeatedScalarFieldContainer[str]
    created_at: float
    created: bool
    def __init__(self, name: _Optional[str] = ..., num_features: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., device: _Optional[str] = ..., pointer: _Optional[int] = ..., rows_written: _Optional[int] = ..., sessions: _Optional[_Iterable[str]] = ..., created_at: _Optional[float] = ..., created: _Optional[bool] = ...) -> None: ...

class GetBankRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListBanksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBanksResponse(_message.Message):
    __slots__ = ("banks",)
    BANKS_FIELD_NUMBER: _ClassVar[int]
    banks: _containers.RepeatedCompositeFieldContainer[Bank]
    def __init__(self, banks: _Optional[_Iterable[_Union[Bank, _Mapping]]] = ...) -> None: ...

class DeleteBankRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteBankResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetBankStateRequest(_message.Message):
    __slots__ = ("name", "tensors")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensors: _containers.MessageMap[str, _tensor_pb2.Tensor]
    def __init__(self, name: _Optional[str] = ..., tensors: _Optional[_Mapping[str, _tensor_pb2.Tensor]] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotResponse(_message.Message):
    __slots__ = ("sessions", "banks")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    BANKS_FIELD_NUMBER: _ClassVar[int]
    sessions: int
    banks: int
    def __init__(self, sessions: _Optional[int] = ..., banks: _Optional[int] = ...) -> None: ...

class MemoryLease(_message.Message):
    __slots__ = ("session_id", "path", "size")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    path: str
    size: int
    def __init__(self, session_id: _Optional[str] = ..., path: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...
