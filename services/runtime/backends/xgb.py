"""In-process XGBoost backend for models in the Triton FIL backend's layout.

The same repository directory production Triton serves with the FIL backend is served here with
the ``xgboost`` Booster (docs/architecture.md#real-parts):

    <repo>/<model>/config.pbtxt            backend: "fil", parameters model_type / output_class /
                                           predict_proba / threshold, input__0, output__0
    <repo>/<model>/<version>/xgboost.json  FIL's default file name for model_type xgboost_json

Model files are Booster JSON (or UBJSON): loading them parses data and executes no code. Outputs
follow FIL's conventions so either server gives the same tensors: with ``predict_proba`` one
probability per class ([n, n_classes], binary models too: [1 - p, p]); without it the class id
([n, 1]); a regressor (``output_class: false``) its prediction.

Versions and reload behave like the ONNX backend: a (booster, batcher) pair per model is swapped
in one assignment, in-flight requests finish on the old pair, and a new version that fails to load
leaves the old one serving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field
from tritonclient.grpc import model_config_pb2 as mc

from services.runtime.backends.inprocess import InProcessBackend, InputSpec, Opened
from services.runtime.config import StrictModel
from services.runtime.metrics import Metrics
from services.runtime.repository import FIL_FILENAMES, ModelEntry, ModelRepository

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _without_sklearn() -> Iterator[None]:
    """xgboost imports scikit-learn, when it is installed (the model builders need it), for its
    estimator API: 1.6 of the engagement service's 3.1 s of imports. The Booster served here uses
    none of it, so the import is made to fail while xgboost loads; a process that imported
    scikit-learn already keeps it, and one that imports it later gets it as usual."""
    if "sklearn" in sys.modules:
        yield
        return
    sys.modules["sklearn"] = None  # type: ignore[assignment]  # None: "import sklearn" raises ImportError
    try:
        yield
    finally:
        del sys.modules["sklearn"]


with _without_sklearn():
    import xgboost as xgb

BACKEND_NAME = "xgboost"
FIL_BACKEND = "fil"
INPUT_NAME = "input__0"
OUTPUT_NAME = "output__0"

# FIL's default file name per model_type, for the types a Booster loads without executing code.
# FIL's other types (legacy binary "xgboost", "lightgbm", "treelite_checkpoint") need Triton.
MODEL_FILENAMES = {t: FIL_FILENAMES[t] for t in ("xgboost_json", "xgboost_ubj")}

Predict = Callable[[np.ndarray], np.ndarray]


class XgbConfig(StrictModel):
    nthread: int = Field(
        1,
        ge=1,
        description="XGBoost threads per prediction. Small: the process shares 2 cores with "
        "the event loop and other models' batchers, and tree batches of a few rows gain little.",
    )
    max_queue_size: int = Field(
        1024,
        gt=0,
        description="Queued requests per model beyond which requests are refused "
        "(the config's default_queue_policy.max_queue_size wins when set).",
    )


def is_xgb_entry(entry: ModelEntry) -> bool:
    """Models this backend answers for: every FIL model (types it cannot load are reported as
    broken, which says more than NotFound); an unreadable config counts when its directory holds
    FIL model files."""
    if entry.config is None:
        names = FIL_FILENAMES.values()
        return any(any(entry.path.glob(f"*/{n}")) for n in names)
    backend: str = entry.config.backend
    return backend == FIL_BACKEND


def _flag(parameters: dict[str, str], key: str, default: bool) -> bool:
    value = parameters.get(key, "").strip().lower()
    return default if not value else value == "true"


def model_file(entry: ModelEntry) -> tuple[str | None, str | None]:
    """(file name of the entry's model type, why it cannot be served in process)."""
    assert entry.config is not None
    model_type = entry.parameters.get("model_type", "")
    if model_type not in MODEL_FILENAMES:
        return None, (
            f"{entry.path / 'config.pbtxt'}: model_type '{model_type}' is served only by "
            f"Triton's FIL backend; in process: {sorted(MODEL_FILENAMES)}"
        )
    return entry.config.default_model_filename or MODEL_FILENAMES[model_type], None


def _xgb_error(exc: Exception) -> str:
    # XGBoostError messages end with a native stack trace: keep the part that says what is wrong.
    return str(exc).split("Stack trace:")[0].strip()


def load_booster(path: Path, model_type: str, nthread: int) -> xgb.Booster:
    """Read a Booster from JSON/UBJSON bytes; ValueError naming the file if it is not one."""
    data = path.read_bytes()
    if model_type == "xgboost_json" and not data.lstrip()[:1] == b"{":
        raise ValueError(f"{path}: not XGBoost JSON (model_type xgboost_json)")
    booster = xgb.Booster(params={"nthread": nthread, "device": "cpu"})
    try:
        # From bytes: the format is detected from the content, not the file name, and the file
        # read is exactly the one checked above.
        booster.load_model(bytearray(data))
    except xgb.core.XGBoostError as exc:
        raise ValueError(f"{path}: XGBoost cannot load it: {_xgb_error(exc)}") from None
    return booster


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    probabilities: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return probabilities


@dataclass(frozen=True)
class _Model:
    """What a loaded booster gives per row, and how the config must declare it."""

    predict: Predict
    n_features: int
    output_dim: int
    describe: str


def make_predictor(booster: xgb.Booster, parameters: dict[str, str]) -> _Model:
    """The prediction function FIL's parameters ask for; ValueError for objectives they cannot
    express (e.g. a ranker served as a classifier)."""
    learner = json.loads(booster.save_config())["learner"]
    objective = learner["objective"]["name"]
    params = learner["learner_model_param"]
    num_class = int(params.get("num_class", "0"))
    if int(params.get("num_target", "1")) > 1:
        raise ValueError("multi-target boosters are not served")
    n_features = booster.num_features()
    classifier = _flag(parameters, "output_class", False)
    proba = _flag(parameters, "predict_proba", False)
    threshold = float(parameters.get("threshold") or 0.5)

    def raw(x: np.ndarray) -> np.ndarray:
        return booster.inplace_predict(x, validate_features=False)

    if not classifier:
        return _Model(
            lambda x: raw(x).reshape(x.shape[0], -1).astype(np.float32),
            n_features,
            1,
            f"regressor ({objective})",
        )
    if objective == "binary:logistic":

        def binary_proba(x: np.ndarray) -> np.ndarray:
            p = raw(x).astype(np.float32)
            return np.stack([1.0 - p, p], axis=1)

        prob_fn, n_classes = binary_proba, 2
    elif objective == "multi:softprob":
        prob_fn, n_classes = (lambda x: raw(x).astype(np.float32)), num_class
    elif objective == "multi:softmax":
        # softmax predicts labels; its probabilities are the softmax of the margins (= softprob).
        def margin_softmax(x: np.ndarray) -> np.ndarray:
            z = booster.inplace_predict(x, predict_type="margin", validate_features=False)
            return _softmax(z.astype(np.float64)).astype(np.float32)

        prob_fn, n_classes = margin_softmax, num_class
    else:
        raise ValueError(
            f"objective '{objective}' gives no class probabilities; "
            "set output_class to false to serve it as a regressor"
        )
    if proba:
        return _Model(prob_fn, n_features, n_classes, f"{n_classes}-class probabilities ({objective})")

    def class_id(x: np.ndarray) -> np.ndarray:
        p = prob_fn(x)
        ids = (p[:, 1] > threshold) if n_classes == 2 else p.argmax(axis=1)
        return ids.astype(np.float32)[:, None]

    return _Model(class_id, n_features, 1, f"class ids of {n_classes} classes ({objective})")


def check_config(config: mc.ModelConfig, model: _Model) -> list[str]:
    """How a FIL config disagrees with the booster it names (empty when they agree)."""
    problems = []
    if config.max_batch_size <= 0:
        problems.append("max_batch_size must be > 0 (FIL models always batch)")
    if len(config.input) != 1:
        problems.append(f"needs exactly one input ('{INPUT_NAME}'), has {len(config.input)}")
    else:
        problems += _tensor_problems(
            "input", config.input[0], model.n_features, f"the booster has {model.n_features} features"
        )
    if len(config.output) < 1:
        problems.append(f"needs an output ('{OUTPUT_NAME}')")
    else:
        problems += _tensor_problems(
            "output",
            config.output[0],
            model.output_dim,
            f"the booster gives {model.describe}: [{model.output_dim}]",
        )
    return problems


def _tensor_problems(
    kind: str, t: mc.ModelInput | mc.ModelOutput, width: int, booster_says: str
) -> list[str]:
    """A FIL tensor is FP32 with one dimension: the booster's width (or -1)."""
    problems = []
    if t.data_type != mc.TYPE_FP32:
        problems.append(f"{kind} '{t.name}' must be TYPE_FP32, is {mc.DataType.Name(t.data_type)}")
    if list(t.dims) not in ([width], [-1]):
        problems.append(f"{kind} '{t.name}' dims {list(t.dims)}; {booster_says}")
    return problems


class XgbBackend(InProcessBackend):
    """Serves every FIL-backend model of a repository with the XGBoost Booster, in process."""

    name = BACKEND_NAME
    kind = "an XGBoost (FIL) model"

    def __init__(
        self,
        repository: ModelRepository,
        config: XgbConfig,
        metrics: Metrics,
        serves: Callable[[str], bool] | None = None,
    ) -> None:
        super().__init__(repository, metrics, config.max_queue_size, serves)
        self.config = config

    def _owns(self, entry: ModelEntry) -> bool:
        return is_xgb_entry(entry)

    def _open(self, entry: ModelEntry) -> tuple[Opened | None, str | None]:
        loaded, error = self._load(entry)
        if loaded is None:
            return None, error
        version, model = loaded
        assert entry.config is not None
        output = entry.config.output[0].name
        predict = model.predict

        def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {output: predict(inputs[INPUT_NAME])}

        spec = InputSpec(INPUT_NAME, np.dtype(np.float32), (-1, model.n_features), False)
        return Opened(version, run, (spec,), f": {model.describe}", model), None

    def _load(self, entry: ModelEntry) -> tuple[tuple[int, _Model] | None, str | None]:
        """Load and check a booster (runs in a worker thread); the error names the file."""
        if entry.error is not None:
            return None, entry.error
        assert entry.config is not None
        config_path = entry.path / "config.pbtxt"
        filename, why = model_file(entry)
        if filename is None:
            return None, why
        if entry.config.input and entry.config.input[0].name != INPUT_NAME:
            return None, (
                f"{config_path}: FIL's input is named '{INPUT_NAME}', not '{entry.config.input[0].name}'"
            )
        version = entry.version
        if version is None or version not in entry.versions:
            return None, f"{entry.path}: no version directory with {filename}"
        path = entry.versions[version] / filename
        if not path.is_file():
            return None, f"{path}: missing"
        try:
            booster = load_booster(path, entry.parameters["model_type"], self.config.nthread)
            model = make_predictor(booster, dict(entry.parameters))
        except ValueError as exc:
            message = str(exc)
            return None, message if str(path) in message else f"{path}: {message}"
        except OSError as exc:
            return None, f"{path}: cannot read: {exc.strerror}"
        problems = check_config(entry.config, model)
        if problems:
            return None, f"{path}: does not match {config_path}: " + "; ".join(problems)
        return (version, model), None
