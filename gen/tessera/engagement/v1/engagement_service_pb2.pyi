from tessera.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClipHeader(_message.Message):
    __slots__ = ("clip_id", "fps")
    CLIP_ID_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    clip_id: str
    fps: float
    def __init__(self, clip_id: _Optional[str] = ..., fps: _Optional[float] = ...) -> None: ...

class ScoreClipRequest(_message.Message):
    __slots__ = ("header", "frame")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    header: ClipHeader
    frame: _common_pb2.VideoFrame
    def __init__(self, header: _Optional[_Union[ClipHeader, _Mapping]] = ..., frame: _Optional[_Union[_common_pb2.VideoFrame, _Mapping]] = ...) -> None: ...

class AffectProbabilities(_message.Message):
    __slots__ = ("affect", "probabilities")
    AFFECT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    affect: _common_pb2.Affect
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, affect: _Optional[_Union[_common_pb2.Affect, str]] = ..., probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class ModelOutput(_message.Message):
    __slots__ = ("model", "affects")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AFFECTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    affects: _containers.RepeatedCompositeFieldContainer[AffectProbabilities]
    def __init__(self, model: _Optional[str] = ..., affects: _Optional[_Iterable[_Union[AffectProbabilities, _Mapping]]] = ...) -> None: ...

class ScoreClipResponse(_message.Message):
    __slots__ = ("clip_id", "outputs", "frames_received", "frames_with_face", "models")
    CLIP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_WITH_FACE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    clip_id: str
    outputs: _containers.RepeatedCompositeFieldContainer[ModelOutput]
    frames_received: int
    frames_with_face: int
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    def __init__(self, clip_id: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[ModelOutput, _Mapping]]] = ..., frames_received: _Optional[int] = ..., frames_with_face: _Optional[int] = ..., models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ...) -> None: ...

class StreamVideoRequest(_message.Message):
    __slots__ = ("header", "frame")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    header: ClipHeader
    frame: _common_pb2.VideoFrame
    def __init__(self, header: _Optional[_Union[ClipHeader, _Mapping]] = ..., frame: _Optional[_Union[_common_pb2.VideoFrame, _Mapping]] = ...) -> None: ...

class StreamVideoResponse(_message.Message):
    __slots__ = ("timestamp_us", "face", "has_face", "outputs", "status")
    TIMESTAMP_US_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    HAS_FACE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    timestamp_us: int
    face: _common_pb2.BoundingBox
    has_face: bool
    outputs: _containers.RepeatedCompositeFieldContainer[ModelOutput]
    status: _common_pb2.ItemStatus
    def __init__(self, timestamp_us: _Optional[int] = ..., face: _Optional[_Union[_common_pb2.BoundingBox, _Mapping]] = ..., has_face: _Optional[bool] = ..., outputs: _Optional[_Iterable[_Union[ModelOutput, _Mapping]]] = ..., status: _Optional[_Union[_common_pb2.ItemStatus, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ...) -> None: ...
