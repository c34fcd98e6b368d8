from tessera.common.v1 import common_pb2 as _common_pb2
from tessera.engagement.v1 import engagement_service_pb2 as _engagement_service_pb2
from tessera.proxylabel.v1 import proxylabel_service_pb2 as _proxylabel_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmotionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMOTION_MODE_UNSPECIFIED: _ClassVar[EmotionMode]
    EMOTION_MODE_ENSEMBLE: _ClassVar[EmotionMode]
    EMOTION_MODE_STUDENT: _ClassVar[EmotionMode]
EMOTION_MODE_UNSPECIFIED: EmotionMode
EMOTION_MODE_ENSEMBLE: EmotionMode
EMOTION_MODE_STUDENT: EmotionMode

class ClassifyEmotionRequest(_message.Message):
    __slots__ = ("images", "mode", "return_member_logits", "ensemble")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RETURN_MEMBER_LOGITS_FIELD_NUMBER: _ClassVar[int]
    ENSEMBLE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    mode: EmotionMode
    return_member_logits: bool
    ensemble: str
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., mode: _Optional[_Union[EmotionMode, str]] = ..., return_member_logits: _Optional[bool] = ..., ensemble: _Optional[str] = ...) -> None: ...

class MemberLogits(_message.Message):
    __slots__ = ("model", "logits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    model: str
    logits: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, model: _Optional[str] = ..., logits: _Optional[_Iterable[float]] = ...) -> None: ...

class FaceEmotion(_message.Message):
    __slots__ = ("box", "detection_score", "probabilities", "label", "members")
    BOX_FIELD_NUMBER: _ClassVar[int]
    DETECTION_SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    box: _common_pb2.BoundingBox
    detection_score: float
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    label: str
    members: _containers.RepeatedCompositeFieldContainer[MemberLogits]
    def __init__(self, box: _Optional[_Union[_common_pb2.BoundingBox, _Mapping]] = ..., detection_score: _Optional[float] = ..., probabilities: _Optional[_Iterable[float]] = ..., label: _Optional[str] = ..., members: _Optional[_Iterable[_Union[MemberLogits, _Mapping]]] = ...) -> None: ...

class ImageEmotions(_message.Message):
    __slots__ = ("status", "faces")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    status: _common_pb2.ItemStatus
    faces: _containers.RepeatedCompositeFieldContainer[FaceEmotion]
    def __init__(self, status: _Optional[_Union[_common_pb2.ItemStatus, _Mapping]] = ..., faces: _Optional[_Iterable[_Union[FaceEmotion, _Mapping]]] = ...) -> None: ...

class ClassifyEmotionResponse(_message.Message):
    __slots__ = ("images", "class_names", "mode", "models", "rules_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageEmotions]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    mode: EmotionMode
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    rules_version: str
    def __init__(self, images: _Optional[_Iterable[_Union[ImageEmotions, _Mapping]]] = ..., class_names: _Optional[_Iterable[str]] = ..., mode: _Optional[_Union[EmotionMode, str]] = ..., models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ..., rules_version: _Optional[str] = ...) -> None: ...

class ClipOptions(_message.Message):
    __slots__ = ("return_member_outputs",)
    RETURN_MEMBER_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    return_member_outputs: bool
    def __init__(self, return_member_outputs: _Optional[bool] = ...) -> None: ...

class ClipHeader(_message.Message):
    __slots__ = ("clip_id", "fps", "options")
    CLIP_ID_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    clip_id: str
    fps: float
    options: ClipOptions
    def __init__(self, clip_id: _Optional[str] = ..., fps: _Optional[float] = ..., options: _Optional[_Union[ClipOptions, _Mapping]] = ...) -> None: ...

class ScoreClipRequest(_message.Message):
    __slots__ = ("header", "frame")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    header: ClipHeader
    frame: _common_pb2.VideoFrame
    def __init__(self, header: _Optional[_Union[ClipHeader, _Mapping]] = ..., frame: _Optional[_Union[_common_pb2.VideoFrame, _Mapping]] = ...) -> None: ...

class AffectLevel(_message.Message):
    __slots__ = ("affect", "level", "probabilities", "decided_by", "confidence")
    AFFECT_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    affect: _common_pb2.Affect
    level: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    decided_by: str
    confidence: float
    def __init__(self, affect: _Optional[_Union[_common_pb2.Affect, str]] = ..., level: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ..., decided_by: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class ScoreClipResponse(_message.Message):
    __slots__ = ("clip_id", "affects", "frames_received", "frames_with_face", "models", "rules_version", "members")
    CLIP_ID_FIELD_NUMBER: _ClassVar[int]
    AFFECTS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_WITH_FACE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    clip_id: str
    affects: _containers.RepeatedCompositeFieldContainer[AffectLevel]
    frames_received: int
    frames_with_face: int
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    rules_version: str
    members: _containers.RepeatedCompositeFieldContainer[_engagement_service_pb2.ModelOutput]
    def __init__(self, clip_id: _Optional[str] = ..., affects: _Optional[_Iterable[_Union[AffectLevel, _Mapping]]] = ..., frames_received: _Optional[int] = ..., frames_with_face: _Optional[int] = ..., models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ..., rules_version: _Optional[str] = ..., members: _Optional[_Iterable[_Union[_engagement_service_pb2.ModelOutput, _Mapping]]] = ...) -> None: ...

class StreamVideoRequest(_message.Message):
    __slots__ = ("header", "frame")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    header: ClipHeader
    frame: _common_pb2.VideoFrame
    def __init__(self, header: _Optional[_Union[ClipHeader, _Mapping]] = ..., frame: _Optional[_Union[_common_pb2.VideoFrame, _Mapping]] = ...) -> None: ...

class StreamVideoResponse(_message.Message):
    __slots__ = ("timestamp_us", "faces", "engagement", "rules_version", "status", "face")
    TIMESTAMP_US_FIELD_NUMBER: _ClassVar[int]
    FACES_FIELD_NUMBER: _ClassVar[int]
    ENGAGEMENT_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    timestamp_us: int
    faces: _containers.RepeatedCompositeFieldContainer[FaceEmotion]
    engagement: _containers.RepeatedCompositeFieldContainer[AffectLevel]
    rules_version: str
    status: _common_pb2.ItemStatus
    face: _common_pb2.BoundingBox
    def __init__(self, timestamp_us: _Optional[int] = ..., faces: _Optional[_Iterable[_Union[FaceEmotion, _Mapping]]] = ..., engagement: _Optional[_Iterable[_Union[AffectLevel, _Mapping]]] = ..., rules_version: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.ItemStatus, _Mapping]] = ..., face: _Optional[_Union[_common_pb2.BoundingBox, _Mapping]] = ...) -> None: ...

class ScoreTextsRequest(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[_proxylabel_service_pb2.TextRow]
    def __init__(self, rows: _Optional[_Iterable[_Union[_proxylabel_service_pb2.TextRow, _Mapping]]] = ...) -> None: ...

class TextScore(_message.Message):
    __slots__ = ("id", "status", "label", "probabilities", "confidence", "decided_by")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: _common_pb2.ItemStatus
    label: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    confidence: float
    decided_by: str
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.ItemStatus, _Mapping]] = ..., label: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ..., confidence: _Optional[float] = ..., decided_by: _Optional[str] = ...) -> None: ...

class ScoreTextsResponse(_message.Message):
    __slots__ = ("rows", "models", "rules_version")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[TextScore]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    rules_version: str
    def __init__(self, rows: _Optional[_Iterable[_Union[TextScore, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ..., rules_version: _Optional[str] = ...) -> None: ...

class ScoreShardRequest(_message.Message):
    __slots__ = ("input_path", "output_path", "batch_rows")
    INPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    input_path: str
    output_path: str
    batch_rows: int
    def __init__(self, input_path: _Optional[str] = ..., output_path: _Optional[str] = ..., batch_rows: _Optional[int] = ...) -> None: ...

class ScoreShardResponse(_message.Message):
    __slots__ = ("progress", "summary")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    progress: _proxylabel_service_pb2.ShardProgress
    summary: _proxylabel_service_pb2.ShardSummary
    def __init__(self, progress: _Optional[_Union[_proxylabel_service_pb2.ShardProgress, _Mapping]] = ..., summary: _Optional[_Union[_proxylabel_service_pb2.ShardSummary, _Mapping]] = ...) -> None: ...

class GetShardJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetShardJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _proxylabel_service_pb2.ShardJob
    def __init__(self, job: _Optional[_Union[_proxylabel_service_pb2.ShardJob, _Mapping]] = ...) -> None: ...

class ListShardJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListShardJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[_proxylabel_service_pb2.ShardJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[_proxylabel_service_pb2.ShardJob, _Mapping]]] = ...) -> None: ...

class CancelShardJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelShardJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _proxylabel_service_pb2.ShardJob
    def __init__(self, job: _Optional[_Union[_proxylabel_service_pb2.ShardJob, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("services", "rules_version", "gateway_version")
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_VERSION_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[_common_pb2.ServiceStatus]
    rules_version: str
    gateway_version: str
    def __init__(self, services: _Optional[_Iterable[_Union[_common_pb2.ServiceStatus, _Mapping]]] = ..., rules_version: _Optional[str] = ..., gateway_version: _Optional[str] = ...) -> None: ...
