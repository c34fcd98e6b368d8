import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tessera.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProxyMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROXY_MODE_UNSPECIFIED: _ClassVar[ProxyMode]
    PROXY_MODE_KNN: _ClassVar[ProxyMode]
    PROXY_MODE_MLP: _ClassVar[ProxyMode]
    PROXY_MODE_ENSEMBLE: _ClassVar[ProxyMode]

class KnnWeighting(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KNN_WEIGHTING_UNSPECIFIED: _ClassVar[KnnWeighting]
    KNN_WEIGHTING_SOFTMAX: _ClassVar[KnnWeighting]
    KNN_WEIGHTING_POWER: _ClassVar[KnnWeighting]
    KNN_WEIGHTING_UNIFORM: _ClassVar[KnnWeighting]

class KnnAggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KNN_AGGREGATION_UNSPECIFIED: _ClassVar[KnnAggregation]
    KNN_AGGREGATION_VOTE: _ClassVar[KnnAggregation]
    KNN_AGGREGATION_REGRESSION: _ClassVar[KnnAggregation]

class ShardJobAttachment(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARD_JOB_ATTACHMENT_UNSPECIFIED: _ClassVar[ShardJobAttachment]
    SHARD_JOB_ATTACHMENT_STARTED: _ClassVar[ShardJobAttachment]
    SHARD_JOB_ATTACHMENT_RESUMED: _ClassVar[ShardJobAttachment]
    SHARD_JOB_ATTACHMENT_REATTACHED: _ClassVar[ShardJobAttachment]

class ShardJobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARD_JOB_STATE_UNSPECIFIED: _ClassVar[ShardJobState]
    SHARD_JOB_STATE_RUNNING: _ClassVar[ShardJobState]
    SHARD_JOB_STATE_SUCCEEDED: _ClassVar[ShardJobState]
    SHARD_JOB_STATE_FAILED: _ClassVar[ShardJobState]
    SHARD_JOB_STATE_CANCELLED: _ClassVar[ShardJobState]
    SHARD_JOB_STATE_ORPHANED: _ClassVar[ShardJobState]
PROXY_MODE_UNSPECIFIED: ProxyMode
PROXY_MODE_KNN: ProxyMode
PROXY_MODE_MLP: ProxyMode
PROXY_MODE_ENSEMBLE: ProxyMode
KNN_WEIGHTING_UNSPECIFIED: KnnWeighting
KNN_WEIGHTING_SOFTMAX: KnnWeighting
KNN_WEIGHTING_POWER: KnnWeighting
KNN_WEIGHTING_UNIFORM: KnnWeighting
KNN_AGGREGATION_UNSPECIFIED: KnnAggregation
KNN_AGGREGATION_VOTE: KnnAggregation
KNN_AGGREGATION_REGRESSION: KnnAggregation
SHARD_JOB_ATTACHMENT_UNSPECIFIED: ShardJobAttachment
SHARD_JOB_ATTACHMENT_STARTED: ShardJobAttachment
SHARD_JOB_ATTACHMENT_RESUMED: ShardJobAttachment
SHARD_JOB_ATTACHMENT_REATTACHED: ShardJobAttachment
SHARD_JOB_STATE_UNSPECIFIED: ShardJobState
SHARD_JOB_STATE_RUNNING: ShardJobState
SHARD_JOB_STATE_SUCCEEDED: ShardJobState
SHARD_JOB_STATE_FAILED: ShardJobState
SHARD_JOB_STATE_CANCELLED: ShardJobState
SHARD_JOB_STATE_ORPHANED: ShardJobState

class KnnOptions(_message.Message):
    __slots__ = ("k", "tau", "weighting", "power_alpha", "aggregation", "similarity_threshold", "prior_calibration")
    K_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    WEIGHTING_FIELD_NUMBER: _ClassVar[int]
    POWER_ALPHA_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PRIOR_CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    k: int
    tau: float
    weighting: KnnWeighting
    power_alpha: float
    aggregation: KnnAggregation
    similarity_threshold: float
    prior_calibration: bool
    def __init__(self, k: _Optional[int] = ..., tau: _Optional[float] = ..., weighting: _Optional[_Union[KnnWeighting, str]] = ..., power_alpha: _Optional[float] = ..., aggregation: _Optional[_Union[KnnAggregation, str]] = ..., similarity_threshold: _Optional[float] = ..., prior_calibration: _Optional[bool] = ...) -> None: ...

class FusionRules(_message.Message):
    __slots__ = ("version", "mode", "alpha", "knn")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    KNN_FIELD_NUMBER: _ClassVar[int]
    version: str
    mode: ProxyMode
    alpha: float
    knn: KnnOptions
    def __init__(self, version: _Optional[str] = ..., mode: _Optional[_Union[ProxyMode, str]] = ..., alpha: _Optional[float] = ..., knn: _Optional[_Union[KnnOptions, _Mapping]] = ...) -> None: ...

class TextRow(_message.Message):
    __slots__ = ("id", "text", "response", "embedding", "embedder")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDER_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    response: str
    embedding: _containers.RepeatedScalarFieldContainer[float]
    embedder: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., response: _Optional[str] = ..., embedding: _Optional[_Iterable[float]] = ..., embedder: _Optional[str] = ...) -> None: ...

class RowScores(_message.Message):
    __slots__ = ("id", "status", "knn_probabilities", "mlp_probabilities", "knn_expected_score", "knn_label")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    KNN_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    MLP_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    KNN_EXPECTED_SCORE_FIELD_NUMBER: _ClassVar[int]
    KNN_LABEL_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: _common_pb2.ItemStatus
    knn_probabilities: _containers.RepeatedScalarFieldContainer[float]
    mlp_probabilities: _containers.RepeatedScalarFieldContainer[float]
    knn_expected_score: float
    knn_label: int
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.ItemStatus, _Mapping]] = ..., knn_probabilities: _Optional[_Iterable[float]] = ..., mlp_probabilities: _Optional[_Iterable[float]] = ..., knn_expected_score: _Optional[float] = ..., knn_label: _Optional[int] = ...) -> None: ...

class ScoreTextsRequest(_message.Message):
    __slots__ = ("rows", "knn", "run_knn", "run_mlp")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    KNN_FIELD_NUMBER: _ClassVar[int]
    RUN_KNN_FIELD_NUMBER: _ClassVar[int]
    RUN_MLP_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[TextRow]
    knn: KnnOptions
    run_knn: bool
    run_mlp: bool
    def __init__(self, rows: _Optional[_Iterable[_Union[TextRow, _Mapping]]] = ..., knn: _Optional[_Union[KnnOptions, _Mapping]] = ..., run_knn: _Optional[bool] = ..., run_mlp: _Optional[bool] = ...) -> None: ...

class ScoreTextsResponse(_message.Message):
    __slots__ = ("rows", "models")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[RowScores]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    def __init__(self, rows: _Optional[_Iterable[_Union[RowScores, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ...) -> None: ...

class Caller(_message.Message):
    __slots__ = ("name", "admin")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    admin: bool
    def __init__(self, name: _Optional[str] = ..., admin: _Optional[bool] = ...) -> None: ...

class ScoreShardRequest(_message.Message):
    __slots__ = ("input_path", "output_path", "rules", "batch_rows", "caller")
    INPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    input_path: str
    output_path: str
    rules: FusionRules
    batch_rows: int
    caller: Caller
    def __init__(self, input_path: _Optional[str] = ..., output_path: _Optional[str] = ..., rules: _Optional[_Union[FusionRules, _Mapping]] = ..., batch_rows: _Optional[int] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ...) -> None: ...

class ShardJobInfo(_message.Message):
    __slots__ = ("job_id", "attachment")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTACHMENT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attachment: ShardJobAttachment
    def __init__(self, job_id: _Optional[str] = ..., attachment: _Optional[_Union[ShardJobAttachment, str]] = ...) -> None: ...

class ShardProgress(_message.Message):
    __slots__ = ("rows_done", "rows_total", "rows_per_second", "rows_failed", "job")
    ROWS_DONE_FIELD_NUMBER: _ClassVar[int]
    ROWS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ROWS_FAILED_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    rows_done: int
    rows_total: int
    rows_per_second: float
    rows_failed: int
    job: ShardJobInfo
    def __init__(self, rows_done: _Optional[int] = ..., rows_total: _Optional[int] = ..., rows_per_second: _Optional[float] = ..., rows_failed: _Optional[int] = ..., job: _Optional[_Union[ShardJobInfo, _Mapping]] = ...) -> None: ...

class ShardEvaluation(_message.Message):
    __slots__ = ("rows_labelled", "accuracy", "macro_f1", "mean_absolute_error", "per_class_accuracy")
    ROWS_LABELLED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MACRO_F1_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABSOLUTE_ERROR_FIELD_NUMBER: _ClassVar[int]
    PER_CLASS_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    rows_labelled: int
    accuracy: float
    macro_f1: float
    mean_absolute_error: float
    per_class_accuracy: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, rows_labelled: _Optional[int] = ..., accuracy: _Optional[float] = ..., macro_f1: _Optional[float] = ..., mean_absolute_error: _Optional[float] = ..., per_class_accuracy: _Optional[_Iterable[float]] = ...) -> None: ...

class ShardSummary(_message.Message):
    __slots__ = ("output_path", "rows_done", "rows_failed", "rows_resumed", "seconds", "rules_version", "evaluation", "models", "job_id")
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    ROWS_DONE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FAILED_FIELD_NUMBER: _ClassVar[int]
    ROWS_RESUMED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    output_path: str
    rows_done: int
    rows_failed: int
    rows_resumed: int
    seconds: float
    rules_version: str
    evaluation: ShardEvaluation
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    job_id: str
    def __init__(self, output_path: _Optional[str] = ..., rows_done: _Optional[int] = ..., rows_failed: _Optional[int] = ..., rows_resumed: _Optional[int] = ..., seconds: _Optional[float] = ..., rules_version: _Optional[str] = ..., evaluation: _Optional[_Union[ShardEvaluation, _Mapping]] = ..., models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ..., job_id: _Optional[str] = ...) -> None: ...

class ScoreShardResponse(_message.Message):
    __slots__ = ("progress", "summary")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    progress: ShardProgress
    summary: ShardSummary
    def __init__(self, progress: _Optional[_Union[ShardProgress, _Mapping]] = ..., summary: _Optional[_Union[ShardSummary, _Mapping]] = ...) -> None: ...

class ShardJob(_message.Message):
    __slots__ = ("job_id", "state", "input_path", "output_path", "rows_done", "rows_total", "rows_failed", "parts_done", "parts_total", "batch_rows", "rules_version", "error", "owner", "update_time", "heartbeat_time", "cancel_requested", "started_by")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    ROWS_DONE_FIELD_NUMBER: _ClassVar[int]
    ROWS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROWS_FAILED_FIELD_NUMBER: _ClassVar[int]
    PARTS_DONE_FIELD_NUMBER: _ClassVar[int]
    PARTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    RULES_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIME_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    STARTED_BY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: ShardJobState
    input_path: str
    output_path: str
    rows_done: int
    rows_total: int
    rows_failed: int
    parts_done: int
    parts_total: int
    batch_rows: int
    rules_version: str
    error: _common_pb2.ItemStatus
    owner: str
    update_time: _timestamp_pb2.Timestamp
    heartbeat_time: _timestamp_pb2.Timestamp
    cancel_requested: bool
    started_by: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[ShardJobState, str]] = ..., input_path: _Optional[str] = ..., output_path: _Optional[str] = ..., rows_done: _Optional[int] = ..., rows_total: _Optional[int] = ..., rows_failed: _Optional[int] = ..., parts_done: _Optional[int] = ..., parts_total: _Optional[int] = ..., batch_rows: _Optional[int] = ..., rules_version: _Optional[str] = ..., error: _Optional[_Union[_common_pb2.ItemStatus, _Mapping]] = ..., owner: _Optional[str] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., heartbeat_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cancel_requested: _Optional[bool] = ..., started_by: _Optional[str] = ...) -> None: ...

class GetShardJobRequest(_message.Message):
    __slots__ = ("job_id", "caller")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    caller: Caller
    def __init__(self, job_id: _Optional[str] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ...) -> None: ...

class GetShardJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: ShardJob
    def __init__(self, job: _Optional[_Union[ShardJob, _Mapping]] = ...) -> None: ...

class ListShardJobsRequest(_message.Message):
    __slots__ = ("caller",)
    CALLER_FIELD_NUMBER: _ClassVar[int]
    caller: Caller
    def __init__(self, caller: _Optional[_Union[Caller, _Mapping]] = ...) -> None: ...

class ListShardJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[ShardJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[ShardJob, _Mapping]]] = ...) -> None: ...

class CancelShardJobRequest(_message.Message):
    __slots__ = ("job_id", "caller")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    caller: Caller
    def __init__(self, job_id: _Optional[str] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ...) -> None: ...

class CancelShardJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: ShardJob
    def __init__(self, job: _Optional[_Union[ShardJob, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[_common_pb2.ModelInfo, _Mapping]]] = ...) -> None: ...
