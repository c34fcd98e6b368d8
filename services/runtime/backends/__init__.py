"""Model backends behind one interface (``Backend``). Import a concrete backend from its module
(``services.runtime.backends.onnx``) so a process pays only for the runtime it uses."""

from services.runtime.backends.base import Backend, InferResult, ModelStatus

__all__ = ["Backend", "InferResult", "ModelStatus"]
