"""The research ensemble end to end: three timm teachers exported by the exporter, served, fused by
the gateway in logit space (the shipped rules' ensemble `research`, named in the request), equal to
the PyTorch reference; rules edits change the answer live."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.special import softmax
from skimage import data as skdata

pytest.importorskip("timm")
import torch

from launcher.suite import ROOT
from services.vision.preprocess import load_params, preprocess_faces
from tessera_client import TesseraClient
from tests.helpers.suites import CACHE, start_suite
from tools.builders.fer_student import build_fer_student
from tools.modeller.export.timm_export import DEFAULT_CACHE, build_model, export_timm

pytestmark = pytest.mark.torch

TEACHERS = {"emotion_rn18": "resnet18", "emotion_b3": "tf_efficientnet_b3", "emotion_cnxt": "convnext_tiny"}


def face_crop() -> np.ndarray:
    bgr = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
    return np.ascontiguousarray(bgr[50:290, 140:380])


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.nn.Module]]:
    """A repository with the student and three teachers whose logits are O(1) on a face.

    A random init gives near-zero logits (tf_efficientnet_b3: ~1e-4), which would make any
    comparison vacuous; so each head is scaled, saved as a checkpoint and exported from the file.
    """
    repo = tmp_path_factory.mktemp("ensemble_repo")
    build_fer_student(repo, CACHE)
    # The default repository's other models (the face detector the emotion service loads, …).
    for entry in (ROOT / "model_repository").iterdir():
        if entry.is_dir() and not entry.name.startswith("emotion_"):
            (repo / entry.name).symlink_to(entry)
    models = {}
    crop = face_crop()
    for i, (name, arch) in enumerate(TEACHERS.items()):
        model = build_model(arch, 7, seed=100 + i)
        probe = torch.from_numpy(preprocess_faces([crop], _imagenet_params()))
        with torch.no_grad():
            scale = 3.0 / float(model(probe).abs().max())
            head = model.get_classifier()
            head.weight.mul_(scale)
            head.bias.mul_(scale)
        checkpoint = repo.parent / f"{name}.pt"
        torch.save(model.state_dict(), checkpoint)
        export_timm(arch, checkpoint, 7, name, repo, input_size=224, cache_dir=DEFAULT_CACHE)
        models[name] = model.eval()
    return repo, models


def _imagenet_params():
    from services.vision.preprocess import ClaheParams, PreprocessParams

    return PreprocessParams(
        input_name="input",
        output_name="logits",
        input_size=(224, 224),
        color="rgb",
        layout="NCHW",
        clahe=ClaheParams(clip_limit=2.0, tile_grid=(8, 8), space="lab_l"),
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        class_names=["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"],
    )


def reference(
    repo: Path, models: dict[str, torch.nn.Module], weights: dict[str, float], temperature: float = 1.0
) -> np.ndarray:
    """softmax(Σ w·l / T) with the PyTorch teachers on the crop preprocessed as each export says."""
    fused = 0.0
    for name, model in models.items():
        params = load_params(repo / name / "1" / "preprocess.json")
        assert params.clahe is not None  # the teachers were trained with CLAHE
        with torch.no_grad():
            logits = model(torch.from_numpy(preprocess_faces([face_crop()], params))).numpy()[0]
        fused = fused + weights[name] * logits.astype(np.float64)
    return softmax(fused / temperature)


def test_gateway_ensemble_equals_the_pytorch_reference_and_follows_rules_edits(
    teachers: tuple[Path, dict[str, torch.nn.Module]], tmp_path: Path
) -> None:
    repo, models = teachers
    rules = tmp_path / "rules.yaml"
    rules.write_text((ROOT / "config" / "fusion_rules.yaml").read_text())
    crop_png = cv2.imencode(".png", face_crop())[1].tobytes()
    suite = start_suite(tmp_path / "suite", repo, rules=rules, data_roots=(tmp_path,))
    try:
        with TesseraClient(suite.gateway.target, timeout=120) as client:
            reply = client.classify(
                [crop_png], mode="ensemble", ensemble="research", face_crop=True, return_member_logits=True
            )
            (face,) = reply.images[0].faces
            expected = reference(repo, models, {"emotion_rn18": 0.4, "emotion_b3": 0.4, "emotion_cnxt": 0.2})
            np.testing.assert_allclose(face.probabilities, expected, atol=1e-4)
            assert {m.model for m in face.members} == set(TEACHERS)
            assert {m.name for m in reply.models} == set(TEACHERS)

            text = rules.read_text().replace(
                "{model: emotion_rn18, weight: 0.4}", "{model: emotion_rn18, weight: 0.0}"
            )
            text = text.replace("temperature: {}", "temperature: {ensemble: 2.0}")
            rules.write_text(text)
            deadline = time.monotonic() + 15
            while (
                again := client.classify([crop_png], ensemble="research", face_crop=True)
            ).rules_version == reply.rules_version:
                assert time.monotonic() < deadline, "rules not reloaded"
                time.sleep(0.2)
            changed = reference(
                repo,
                models,
                {"emotion_rn18": 0.0, "emotion_b3": 0.4 / 0.6, "emotion_cnxt": 0.2 / 0.6},
                temperature=2.0,
            )
            np.testing.assert_allclose(again.images[0].faces[0].probabilities, changed, atol=1e-4)
            assert np.abs(np.array(again.images[0].faces[0].probabilities) - expected).max() > 1e-3
    finally:
        suite.stop()
