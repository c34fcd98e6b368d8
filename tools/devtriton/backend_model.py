"""ONNX Runtime inside Triton's python backend, for a local Triton that has no onnxruntime backend.

`tools.devtriton.local` copies this file as `model.py` into each version of an overlay model, with
`model.json` beside it: the ONNX file to run (relative to the version directory) and the
site-packages the stub takes its packages from. Production serves the original onnxruntime_onnx
config instead.

It runs in the backend stub: the system Python in isolated mode, which sees neither PYTHONPATH nor
the suite's venv, so it imports nothing of the suite. Its numpy (1.x) and onnxruntime come from
the settings' site-packages, which must come first on the path, before they are imported. Its
merge and split are the in-process batcher's own (`services/runtime/batch_rows.py`, copied beside it
as `batch_rows.py`, which the stub imports from this directory).
"""

import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

SETTINGS = json.loads(Path(__file__).with_suffix(".json").read_text())
if SETTINGS["site_packages"] not in sys.path:
    sys.path.insert(0, SETTINGS["site_packages"])
sys.path.insert(1, str(Path(__file__).parent))  # batch_rows.py, copied beside this file

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]  # noqa: E402
from batch_rows import merge, signature, split  # type: ignore[import-not-found]  # noqa: E402

Feed = dict[str, np.ndarray]

# ONNX Runtime's exception types for a request the model cannot take.
BAD_INPUT = ("InvalidArgument", "InvalidGraph", "NotImplemented")


def error_response(message: str, invalid: bool) -> Any:
    """A response that fails one request: INVALID_ARG for what the request got wrong."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def mergeable(feeds: Sequence[Mapping[str, np.ndarray]]) -> bool:
    """Whether the feeds can run as one: same inputs, dtypes and shapes but for the batch axis."""
    return len({signature(f) for f in feeds}) == 1


def run_merged(
    session: ort.InferenceSession, output_names: list[str], feeds: Sequence[Mapping[str, np.ndarray]]
) -> list[list[np.ndarray]]:
    """One run over the feeds' rows merged; each feed's outputs, split back at its rows."""
    rows = [len(next(iter(f.values()))) for f in feeds]
    outputs = dict(zip(output_names, session.run(output_names, merge(feeds)), strict=True))
    return [[part[n] for n in output_names] for part in split(outputs, rows)]


class TritonPythonModel:
    def initialize(self, args: Mapping[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("tessera_intra_op_threads") or 1)
        opts.inter_op_num_threads = 1
        # No spinning: idle ORT threads would take the cores from Triton and the other models.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.name = args["model_name"]
        self.session = ort.InferenceSession(
            str(Path(__file__).with_name(SETTINGS["onnx"])),
            sess_options=opts,
            providers=["CPUExecutionProvider"],
        )
        self.inputs = [(i["name"], bool(i.get("optional", False))) for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        feeds: list[tuple[int, Feed]] = []
        for i, request in enumerate(requests):
            try:
                feeds.append((i, self._feed(request)))
            except ValueError as exc:
                responses[i] = error_response(str(exc), invalid=True)
        for i, response in self._run(feeds):
            responses[i] = response
        return responses

    def _feed(self, request: Any) -> Feed:
        feed: Feed = {}
        for name, optional in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                if optional:
                    continue
                raise ValueError(f"model '{self.name}' needs input '{name}'")
            feed[name] = tensor.as_numpy()
        return feed

    def _run(self, feeds: list[tuple[int, Feed]]) -> Iterator[tuple[int, Any]]:
        """One ORT run over the merged rows of all requests when they fit together (what dynamic
        batching is for); request by request otherwise, or when the merged run fails, so one bad
        request fails alone."""
        if self.batched and len(feeds) > 1 and mergeable([f for _, f in feeds]):
            try:
                outputs = run_merged(self.session, self.outputs, [f for _, f in feeds])
            except Exception:  # fall back, to find the request at fault
                pass
            else:
                for (i, _), out in zip(feeds, outputs, strict=True):
                    yield i, self._response(out)
                return
        for i, feed in feeds:
            try:
                outputs = self.session.run(self.outputs, feed)
            except Exception as exc:  # reported on this request only
                yield i, error_response(f"{type(exc).__name__}: {exc}", type(exc).__name__ in BAD_INPUT)
                continue
            yield i, self._response(outputs)

    def _response(self, outputs: Sequence[np.ndarray]) -> Any:
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(n, np.ascontiguousarray(o))
                for n, o in zip(self.outputs, outputs, strict=True)
            ]
        )
