"""The Fusion MLP both trainers make (scikit-learn in `train_mlp`, torch in `train_mlp_torch`):
its input, its ONNX tensor names, and the graph run as the service runs it.

    input  `features`      [batch, dim + 35]   the L2-normalised embedding ⊕ standardised v1 text features
    output `probabilities` [batch, 6]          one per score; a score no training row had is 0
"""

from __future__ import annotations

import numpy as np
import onnx

from services.proxylabel.features import FeatureStats
from services.proxylabel.knn import normalise

INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
# A score the training rows never had gets this logit bias: softmax gives it probability 0.
ABSENT_CLASS_BIAS = -1e9


def design_matrix(embeddings: np.ndarray, raw_features: np.ndarray, stats: FeatureStats) -> np.ndarray:
    """The network's input rows: normalised embeddings beside the standardised text features."""
    return np.concatenate([normalise(embeddings), stats.standardise(raw_features)], axis=1).astype(np.float32)


def onnx_probabilities(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The six probabilities ONNX Runtime gives the graph on the rows `x`."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: x.astype(np.float32)})[0]
