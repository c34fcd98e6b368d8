"""Thin gRPC servicer of the proxylabel service: validate, delegate, map to messages."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
from tessera.common.v1 import common_pb2
from tessera.proxylabel.v1 import proxylabel_service_pb2 as pb
from tessera.proxylabel.v1 import proxylabel_service_pb2_grpc as pb_grpc

from services.fusion.rules import KnnRules, ProxyLabelRules
from services.proxylabel.config import ProxyLabelConfig
from services.proxylabel.paths import confine
from services.proxylabel.pipeline import ProxyLabelPipeline, RowInput
from services.proxylabel.shards import Progress, ShardJob, Summary, plan_shard, run_shard
from services.runtime.errors import InvalidArgument, NotFound, ResourceExhausted, item_status

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ProxyLabelService"].full_name

_WEIGHTING = {pb.KNN_WEIGHTING_SOFTMAX: "softmax", pb.KNN_WEIGHTING_POWER: "power",
              pb.KNN_WEIGHTING_UNIFORM: "uniform"}
_AGGREGATION = {pb.KNN_AGGREGATION_VOTE: "vote", pb.KNN_AGGREGATION_REGRESSION: "regression"}
_MODES = {pb.PROXY_MODE_KNN: "knn", pb.PROXY_MODE_MLP: "mlp", pb.PROXY_MODE_ENSEMBLE: "ensemble"}


def knn_rules(options: pb.KnnOptions) -> KnnRules:
    """Overrides from the message; a field left unset keeps the index's stored value."""
    values = {name: getattr(options, name) for name in
              ("k", "tau", "power_alpha", "similarity_threshold", "prior_calibration") if options.HasField(name)}
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


class ProxyLabelServicer(pb_grpc.ProxyLabelServiceServicer):
    def __init__(self, config: ProxyLabelConfig, pipeline: ProxyLabelPipeline) -> None:
        self.config = config
        self.pipeline = pipeline

    def _models(self, pipeline: ProxyLabelPipeline | None = None) -> list[common_pb2.ModelInfo]:
        return [m.info() for m in (pipeline or self.pipeline).models]

    async def ScoreTexts(self, request: pb.ScoreTextsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ScoreTextsResponse:
        if not request.rows:
            raise InvalidArgument("no rows to score")
        if len(request.rows) > self.config.max_rows_per_request:
            raise ResourceExhausted(
                f"{len(request.rows)} rows exceed the limit of {self.config.max_rows_per_request} per request")
        if not (request.run_knn or request.run_mlp):
            raise InvalidArgument("ask for run_knn, run_mlp or both")
        rows = [RowInput(text=r.text, response=r.response,
                         embedding=np.asarray(r.embedding, np.float32) if len(r.embedding) else None,
                         embedder=r.embedder) for r in request.rows]
        pipeline = self.pipeline  # one snapshot per request: a model swap may replace self.pipeline
        results = await pipeline.score_rows(rows, knn_rules(request.knn), request.run_knn, request.run_mlp)
        out = []
        for row, result in zip(request.rows, results, strict=True):
            code, message = item_status(result.error)
            scores = pb.RowScores(id=row.id, status=common_pb2.ItemStatus(code=code, message=message or result.note))
            if result.error is None:
                if result.knn_probabilities is not None:
                    scores.knn_probabilities.extend(result.knn_probabilities.tolist())
                    scores.knn_expected_score = result.knn_expected_score
                    scores.knn_label = result.knn_label
                if result.mlp_probabilities is not None:
                    scores.mlp_probabilities.extend(result.mlp_probabilities.tolist())
            out.append(scores)
        return pb.ScoreTextsResponse(rows=out, models=self._models(pipeline))

    async def ScoreShard(self, request: pb.ScoreShardRequest, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[pb.ScoreShardResponse]:
        source = confine(request.input_path, self.config.input_roots, "input_path")
        target = confine(request.output_path, self.config.output_roots, "output_path")
        if not source.exists():
            raise NotFound(f"shard {request.input_path!r} does not exist")
        job = ShardJob(source, target, proxy_rules(request.rules), request.rules.version, request.batch_rows)
        pipeline = self.pipeline  # the job runs on the models it was planned with, even across a swap
        plan = plan_shard(job, pipeline)
        async for event in run_shard(plan, pipeline):
            if isinstance(event, Progress):
                yield pb.ScoreShardResponse(progress=pb.ShardProgress(
                    rows_done=event.rows_done, rows_total=event.rows_total, rows_per_second=event.rows_per_second,
                    rows_failed=event.rows_failed))
            elif isinstance(event, Summary):
                summary = pb.ShardSummary(
                    output_path=event.output_path, rows_done=event.rows_done, rows_failed=event.rows_failed,
                    rows_resumed=event.rows_resumed, seconds=event.seconds, rules_version=event.rules_version,
                    models=self._models(pipeline))
                if event.evaluation is not None:
                    e = event.evaluation
                    summary.evaluation.CopyFrom(pb.ShardEvaluation(
                        rows_labelled=e.rows_labelled, accuracy=e.accuracy, macro_f1=e.macro_f1,
                        mean_absolute_error=e.mean_absolute_error, per_class_accuracy=e.per_class_accuracy))
                yield pb.ScoreShardResponse(summary=summary)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=self._models())
