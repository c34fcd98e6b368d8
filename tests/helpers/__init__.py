"""Helpers the test packages share, one module per concern: suites, images, pki, onnx_models,
texts, wire, deploy."""
