"""Thin gRPC servicer of the proxylabel service: validate, delegate, map to messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

from services.fusion.rules import KnnRules, ProxyLabelRules
from services.proxylabel.access import Caller
from services.proxylabel.config import ProxyLabelConfig
from services.proxylabel.jobs import ORPHANED, JobStatus, relative_to_roots
from services.proxylabel.manifest import CANCELLED, FAILED, RUNNING, SUCCEEDED
from services.proxylabel.paths import INPUT_ROOTS, OUTPUT_ROOTS, check_input, check_output, confine, shown
from services.proxylabel.pipeline import ProxyLabelPipeline, RowInput
from services.proxylabel.runner import REATTACHED, RESUMED, STARTED, Attached, ShardJobs
from services.proxylabel.shard_plan import ShardJob
from services.proxylabel.shard_run import Progress, Summary
from services.runtime.errors import InvalidArgument, item_status
from services.runtime.servicing import check_batch_size
from services.runtime.streams import Drain, until_drained
from tessera.common.v1 import common_pb2
from tessera.proxylabel.v1 import proxylabel_service_pb2 as pb
from tessera.proxylabel.v1 import proxylabel_service_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ProxyLabelService"].full_name

_WEIGHTING = {
    pb.KNN_WEIGHTING_SOFTMAX: "softmax",
    pb.KNN_WEIGHTING_POWER: "power",
    pb.KNN_WEIGHTING_UNIFORM: "uniform",
}
_AGGREGATION = {pb.KNN_AGGREGATION_VOTE: "vote", pb.KNN_AGGREGATION_REGRESSION: "regression"}
_MODES = {pb.PROXY_MODE_KNN: "knn", pb.PROXY_MODE_MLP: "mlp", pb.PROXY_MODE_ENSEMBLE: "ensemble"}
_ATTACHMENTS = {
    STARTED: pb.SHARD_JOB_ATTACHMENT_STARTED,
    RESUMED: pb.SHARD_JOB_ATTACHMENT_RESUMED,
    REATTACHED: pb.SHARD_JOB_ATTACHMENT_REATTACHED,
}
_STATES = {
    RUNNING: pb.SHARD_JOB_STATE_RUNNING,
    SUCCEEDED: pb.SHARD_JOB_STATE_SUCCEEDED,
    FAILED: pb.SHARD_JOB_STATE_FAILED,
    CANCELLED: pb.SHARD_JOB_STATE_CANCELLED,
    ORPHANED: pb.SHARD_JOB_STATE_ORPHANED,
}


def knn_rules(options: pb.KnnOptions) -> KnnRules:
    """Overrides from the message; a field left unset keeps the index's stored value."""
    values = {
        name: getattr(options, name)
        for name in ("k", "tau", "power_alpha", "similarity_threshold", "prior_calibration")
        if options.HasField(name)
    }
    if options.weighting in _WEIGHTING:
        values["weighting"] = _WEIGHTING[options.weighting]
    if options.aggregation in _AGGREGATION:
        values["aggregation"] = _AGGREGATION[options.aggregation]
    try:
        return KnnRules(**values)
    except ValueError as exc:
        raise InvalidArgument(f"invalid kNN options: {exc}") from None


def proxy_rules(rules: pb.FusionRules) -> ProxyLabelRules:
    if rules.mode not in _MODES:
        raise InvalidArgument("the job's rules name no proxylabel mode")
    try:
        return ProxyLabelRules(mode=_MODES[rules.mode], alpha=rules.alpha, knn=knn_rules(rules.knn))
    except ValueError as exc:
        raise InvalidArgument(f"invalid fusion rules: {exc}") from None


def caller_of(
    request: pb.ScoreShardRequest
    | pb.GetShardJobRequest
    | pb.ListShardJobsRequest
    | pb.CancelShardJobRequest,
) -> Caller | None:
    """Who asks, as the gateway says (it alone reaches this service); None: an open gateway."""
    if not request.HasField("caller"):
        return None
    return Caller(request.caller.name, request.caller.admin)


class ProxyLabelServicer(pb_grpc.ProxyLabelServiceServicer):
    def __init__(
        self,
        config: ProxyLabelConfig,
        pipeline: ProxyLabelPipeline,
        jobs: ShardJobs | None = None,
        drain: Drain | None = None,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.jobs = jobs or ShardJobs(config)
        self.drain = drain or Drain()

    def _models(self, pipeline: ProxyLabelPipeline | None = None) -> list[common_pb2.ModelInfo]:
        return [m.info() for m in (pipeline or self.pipeline).models]

    async def ScoreTexts(
        self, request: pb.ScoreTextsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreTextsResponse:
        check_batch_size(len(request.rows), self.config.max_rows_per_request, "rows")
        if not (request.run_knn or request.run_mlp):
            raise InvalidArgument("ask for run_knn, run_mlp or both")
        rows = [
            RowInput(
                text=r.text,
                response=r.response,
                embedding=np.asarray(r.embedding, np.float32) if len(r.embedding) else None,
                embedder=r.embedder,
            )
            for r in request.rows
        ]
        pipeline = self.pipeline  # one snapshot per request: a model swap may replace self.pipeline
        results = await pipeline.score_rows(rows, knn_rules(request.knn), request.run_knn, request.run_mlp)
        out = []
        for row, result in zip(request.rows, results, strict=True):
            code, message = item_status(result.error)
            scores = pb.RowScores(
                id=row.id, status=common_pb2.ItemStatus(code=code, message=message or result.note)
            )
            if result.error is None:
                if result.knn_probabilities is not None:
                    scores.knn_probabilities.extend(result.knn_probabilities.tolist())
                    scores.knn_expected_score = result.knn_expected_score
                    scores.knn_label = result.knn_label
                if result.mlp_probabilities is not None:
                    scores.mlp_probabilities.extend(result.mlp_probabilities.tolist())
            out.append(scores)
        return pb.ScoreTextsResponse(rows=out, models=self._models(pipeline))

    async def ScoreShard(
        self, request: pb.ScoreShardRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreShardResponse]:
        # Every path problem is answered here, before any work: both paths under their roots first
        # (outside them is refused whether the path exists or not), then what they are. Messages
        # name the paths relative to the configured roots, never as the server's absolute paths.
        source = confine(request.input_path, self.config.input_roots, "input_path", INPUT_ROOTS)
        target = confine(request.output_path, self.config.output_roots, "output_path", OUTPUT_ROOTS)
        check_input(source, self.config.input_roots)
        check_output(target, self.config.output_roots)
        job = ShardJob(
            source,
            target,
            proxy_rules(request.rules),
            request.rules.version,
            request.batch_rows,
            caller=caller_of(request),
            input_label=shown(source, self.config.input_roots, INPUT_ROOTS),
            output_label=shown(target, self.config.output_roots, OUTPUT_ROOTS),
        )
        pipeline = self.pipeline  # the job runs on the models it was planned with, even across a swap
        info: pb.ShardJobInfo | None = None
        # The job is a task of the service: this stream only watches it, and its end (a cancelled
        # call, a drain) leaves the job running.
        async for event in until_drained(self.jobs.score(job, pipeline), self.drain, "shard job watch"):
            if isinstance(event, Attached):
                info = pb.ShardJobInfo(job_id=event.job_id, attachment=_ATTACHMENTS[event.attachment])
            elif isinstance(event, Progress):
                progress = pb.ShardProgress(
                    rows_done=event.rows_done,
                    rows_total=event.rows_total,
                    rows_per_second=event.rows_per_second,
                    rows_failed=event.rows_failed,
                )
                if info is not None:  # the stream's first event names the job
                    progress.job.CopyFrom(info)
                    info = None
                yield pb.ScoreShardResponse(progress=progress)
            elif isinstance(event, Summary):
                yield pb.ScoreShardResponse(summary=self._summary(event, pipeline))

    def _summary(self, event: Summary, pipeline: ProxyLabelPipeline) -> pb.ShardSummary:
        summary = pb.ShardSummary(
            output_path=relative_to_roots(Path(event.output_path), self.config.output_roots),
            rows_done=event.rows_done,
            rows_failed=event.rows_failed,
            rows_resumed=event.rows_resumed,
            seconds=event.seconds,
            rules_version=event.rules_version,
            models=self._models(pipeline),
            job_id=event.job_id,
        )
        if event.evaluation is not None:
            e = event.evaluation
            summary.evaluation.CopyFrom(
                pb.ShardEvaluation(
                    rows_labelled=e.rows_labelled,
                    accuracy=e.accuracy,
                    macro_f1=e.macro_f1,
                    mean_absolute_error=e.mean_absolute_error,
                    per_class_accuracy=e.per_class_accuracy,
                )
            )
        return summary

    def _job(self, status: JobStatus) -> pb.ShardJob:
        """A job as messages show it: paths relative to the configured roots, never the server's own."""
        job = pb.ShardJob(
            job_id=status.job_id,
            state=_STATES[status.state],
            input_path=relative_to_roots(status.input_path, self.config.input_roots),
            output_path=relative_to_roots(status.output_path, self.config.output_roots),
            rows_done=status.rows_done,
            rows_total=status.rows_total,
            rows_failed=status.rows_failed,
            parts_done=status.parts_done,
            parts_total=status.parts_total,
            batch_rows=status.batch_rows,
            rules_version=status.rules_version,
            owner=status.owner,
            cancel_requested=status.cancel_requested,
            started_by=status.started_by,
        )
        if status.error_code:
            code = grpc.StatusCode.__members__.get(status.error_code, grpc.StatusCode.INTERNAL)
            job.error.CopyFrom(common_pb2.ItemStatus(code=code.value[0], message=status.error_message))
        job.update_time.FromNanoseconds(int(status.updated * 1e9))
        if status.heartbeat is not None:
            job.heartbeat_time.FromNanoseconds(int(status.heartbeat * 1e9))
        return job

    async def GetShardJob(
        self, request: pb.GetShardJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetShardJobResponse:
        return pb.GetShardJobResponse(job=self._job(self.jobs.get(request.job_id, caller_of(request))))

    async def ListShardJobs(
        self, request: pb.ListShardJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListShardJobsResponse:
        return pb.ListShardJobsResponse(jobs=[self._job(s) for s in self.jobs.list_jobs(caller_of(request))])

    async def CancelShardJob(
        self, request: pb.CancelShardJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelShardJobResponse:
        return pb.CancelShardJobResponse(job=self._job(self.jobs.cancel(request.job_id, caller_of(request))))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=self._models())
