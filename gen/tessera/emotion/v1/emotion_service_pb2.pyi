from tessera.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InferFacesRequest(_message.Message):
    __slots__ = ("images", "models")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class MemberLogits(_message.Message):
    __slots__ = ("model", "logits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    model: str
    logits: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model: _Optional[str] = ..., logits: _Optional[_Iterable[float]] = ...) -> None: ...

class Face(_message.Message):
    __slots__ = ("box", "detection_score", "members")
    BOX_FIELD_NUMBER: _ClassVar[int]
    DETECTION_SCORE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    box: _common_pb2.BoundingBox
    detection_score: float
    members: _containers.RepeatedCompositeFieldContainer[MemberLogits]
    def __init__(self, box: _Optional[_Union[_common_pb2.BoundingBox, _Mapping]] = ..., detection_score: _Optional[float] = ..., members: _Optional[_Iterable[_Union[MemberLogits, _Mapping]]] = ...) -> None: ...

class ImageFaces(_message.Message):
    __slots__ = ("status", "faces")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    status: _common_pb2.ItemStatus
    faces: _containers.RepeatedCompositeFieldContainer[Face]
    def __init__(self, status: _Optional[_Union[_common_pb2.ItemStatus, _Mapping]] = ..., faces: _Optional[_Iterable[_Union[Face, _Mapping]]] = ...) -> None: ...

class InferFacesResponse(_message.Message):
    __slots__ = ("images", "models", "class_names")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageFaces]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, images: _Optional[_Iterable[_Union[ImageFaces, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ...) -> None: ...
