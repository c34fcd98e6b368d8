"""Turn the services' member outputs into the gateway's final answers, by the fusion rules.

Pure conversions around `services.fusion`: protobuf in, numpy through the fusion functions,
protobuf out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np

from services.fusion.affect_enum import AFFECT_NAMES, AFFECT_VALUES
from services.fusion.emotion import fuse_logits, fusion_space_for, members_for, resolve_temperature
from services.fusion.engagement import AffectDecision, decide
from services.fusion.proxylabel import final_labels, soft_vote
from services.fusion.rules import EmotionModeName, FusionRules, UnknownEnsemble
from services.runtime.errors import FailedPrecondition, InvalidArgument
from tessera.emotion.v1 import emotion_service_pb2 as emotion_pb
from tessera.engagement.v1 import engagement_service_pb2 as engagement_pb
from tessera.gateway.v1 import gateway_service_pb2 as pb
from tessera.proxylabel.v1 import proxylabel_service_pb2 as proxylabel_pb

MODE_NAMES: dict[int, EmotionModeName] = {
    pb.EMOTION_MODE_ENSEMBLE: "ensemble",
    pb.EMOTION_MODE_STUDENT: "student",
}
MODE_VALUES = {name: value for value, name in MODE_NAMES.items()}


def emotion_mode(request_mode: int, rules: FusionRules, ensemble: str = "") -> EmotionModeName:
    """The request's mode; naming an ensemble implies mode ENSEMBLE (with STUDENT it is refused)."""
    if request_mode == pb.EMOTION_MODE_UNSPECIFIED:
        return "ensemble" if ensemble else rules.emotion.default_mode
    if request_mode not in MODE_NAMES:
        raise InvalidArgument(f"unknown emotion mode {request_mode}: use ENSEMBLE, STUDENT or leave it unset")
    if ensemble and MODE_NAMES[request_mode] == "student":
        raise InvalidArgument(
            f"ensemble {ensemble!r:.80} was named with mode STUDENT: name an ensemble with mode "
            "ENSEMBLE or unset, or leave the ensemble empty"
        )
    return MODE_NAMES[request_mode]


def emotion_ensemble(mode: EmotionModeName, rules: FusionRules, ensemble: str = "") -> str | None:
    """The ensemble a request in `mode` uses (None in student mode): the named one, or the rules'
    `emotion.ensemble`; INVALID_ARGUMENT for a name the rules do not define."""
    if mode == "student":
        return None
    try:
        return rules.emotion.ensemble_rules(ensemble or None)[0]
    except UnknownEnsemble:
        raise InvalidArgument(
            f"unknown ensemble {ensemble!r:.80}: the fusion rules define "
            f"{', '.join(sorted(rules.emotion.ensembles))}"
        ) from None


def emotion_models(mode: EmotionModeName, rules: FusionRules, ensemble: str | None) -> list[str]:
    """The models the emotion service must run for the mode (and ensemble), in the rules' order."""
    return list(members_for(rules.emotion, mode, ensemble))


def missing_members(exc: FailedPrecondition, ensemble: str | None) -> FailedPrecondition:
    """The emotion service's FAILED_PRECONDITION (it names the models it lacks), naming the ensemble."""
    if ensemble is None:
        return exc
    return FailedPrecondition(f"ensemble {ensemble!r} cannot be served: {exc.message}")


def emotion_answer(
    reply: emotion_pb.InferFacesResponse,
    mode: EmotionModeName,
    rules: FusionRules,
    with_members: bool,
    rules_version: str,
    ensemble: str | None = None,
) -> pb.ClassifyEmotionResponse:
    weights = members_for(rules.emotion, mode, ensemble)
    stored = {m.name: m.temperature for m in reply.models}
    temperature = resolve_temperature(rules.emotion, mode, stored.get(rules.emotion.student), ensemble)
    space = fusion_space_for(rules.emotion, mode, ensemble)
    class_names = list(reply.class_names)
    images = []
    for image in reply.images:
        faces = []
        if image.faces:
            per_face = [{m.model: m.logits for m in f.members} for f in image.faces]
            missing = sorted(set(weights) - set(per_face[0]))
            if missing:
                raise FailedPrecondition(f"the emotion service returned no logits for {', '.join(missing)}")
            logits = {name: np.array([pf[name] for pf in per_face], dtype=np.float32) for name in weights}
            probs = fuse_logits(logits, weights, temperature, space)
            for face, p in zip(image.faces, probs, strict=True):
                faces.append(
                    pb.FaceEmotion(
                        box=face.box,
                        detection_score=face.detection_score,
                        probabilities=p.tolist(),
                        label=class_names[int(np.argmax(p))],
                        members=[pb.MemberLogits(model=m.model, logits=m.logits) for m in face.members]
                        if with_members
                        else [],
                    )
                )
        images.append(pb.ImageEmotions(status=image.status, faces=faces))
    return pb.ClassifyEmotionResponse(
        images=images,
        class_names=class_names,
        mode=cast("pb.EmotionMode", MODE_VALUES[mode]),
        models=reply.models,
        rules_version=rules_version,
    )


def model_outputs(
    outputs: Sequence[engagement_pb.ModelOutput], rules: FusionRules
) -> dict[str, dict[str, np.ndarray]]:
    """Engagement outputs by role ("temporal" / "xgboost") and affect name."""
    roles = {rules.engagement.temporal_model: "temporal", rules.engagement.xgboost_model: "xgboost"}
    by_role: dict[str, dict[str, np.ndarray]] = {}
    for out in outputs:
        role = roles.get(out.model)
        if role is None:
            continue
        by_role[role] = {
            AFFECT_NAMES[a.affect]: np.asarray(a.probabilities, dtype=np.float64)
            for a in out.affects
            if a.affect in AFFECT_NAMES
        }
    return by_role


def affect_levels(decisions: Sequence[AffectDecision], rules: FusionRules) -> list[pb.AffectLevel]:
    names = {"temporal": rules.engagement.temporal_model, "xgboost": rules.engagement.xgboost_model}
    return [
        pb.AffectLevel(
            affect=AFFECT_VALUES[d.affect],
            level=d.level,
            probabilities=d.probabilities.tolist(),
            decided_by=names[d.decided_by],
            confidence=d.confidence,
        )
        for d in decisions
    ]


def clip_answer(
    reply: engagement_pb.ScoreClipResponse, rules: FusionRules, rules_version: str
) -> pb.ScoreClipResponse:
    decisions = decide(model_outputs(reply.outputs, rules), rules.engagement)
    return pb.ScoreClipResponse(
        clip_id=reply.clip_id,
        affects=affect_levels(decisions, rules),
        frames_received=reply.frames_received,
        frames_with_face=reply.frames_with_face,
        models=reply.models,
        rules_version=rules_version,
    )


_WEIGHTING = {
    "softmax": proxylabel_pb.KNN_WEIGHTING_SOFTMAX,
    "power": proxylabel_pb.KNN_WEIGHTING_POWER,
    "uniform": proxylabel_pb.KNN_WEIGHTING_UNIFORM,
}
_AGGREGATION = {
    "vote": proxylabel_pb.KNN_AGGREGATION_VOTE,
    "regression": proxylabel_pb.KNN_AGGREGATION_REGRESSION,
}
_PROXY_MODES = {
    "knn": proxylabel_pb.PROXY_MODE_KNN,
    "mlp": proxylabel_pb.PROXY_MODE_MLP,
    "ensemble": proxylabel_pb.PROXY_MODE_ENSEMBLE,
}


def knn_options(rules: FusionRules) -> proxylabel_pb.KnnOptions:
    knn = rules.proxylabel.knn
    opts = proxylabel_pb.KnnOptions(
        weighting=_WEIGHTING.get(knn.weighting or "", proxylabel_pb.KNN_WEIGHTING_UNSPECIFIED),
        aggregation=_AGGREGATION.get(knn.aggregation or "", proxylabel_pb.KNN_AGGREGATION_UNSPECIFIED),
    )
    for name in ("k", "tau", "power_alpha", "similarity_threshold", "prior_calibration"):
        value = getattr(knn, name)
        if value is not None:
            setattr(opts, name, value)
    return opts


def proxy_rules(rules: FusionRules, version: str) -> proxylabel_pb.FusionRules:
    """The snapshot a shard job carries, so the service fuses exactly as the gateway would."""
    p = rules.proxylabel
    return proxylabel_pb.FusionRules(
        version=version, mode=_PROXY_MODES[p.mode], alpha=p.alpha, knn=knn_options(rules)
    )


def texts_answer(
    reply: proxylabel_pb.ScoreTextsResponse, rules: FusionRules, rules_version: str
) -> pb.ScoreTextsResponse:
    rows = []
    for row in reply.rows:
        if row.status.code != 0:
            rows.append(pb.TextScore(id=row.id, status=row.status))
            continue
        knn = np.asarray([row.knn_probabilities], np.float32) if row.knn_probabilities else None
        mlp = np.asarray([row.mlp_probabilities], np.float32) if row.mlp_probabilities else None
        try:
            probs = soft_vote(knn, mlp, rules.proxylabel)
        except ValueError as exc:
            raise FailedPrecondition(str(exc)) from None
        own = np.asarray([row.knn_label]) if row.knn_probabilities else None
        label, confidence = final_labels(probs, rules.proxylabel, own)
        rows.append(
            pb.TextScore(
                id=row.id,
                status=row.status,
                label=int(label[0]),
                probabilities=probs[0].tolist(),
                confidence=float(confidence[0]),
                decided_by=rules.proxylabel.mode,
            )
        )
    return pb.ScoreTextsResponse(rows=rows, models=reply.models, rules_version=rules_version)
