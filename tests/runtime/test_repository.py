"""The Triton-layout model repository: parsing, versions, broken entries, hot-reload changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.runtime.errors import NotFound
from services.runtime.repository import ModelRepository, TensorSpec, check_signature, onnx_signature

LINEAR_CONFIG = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {din} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 3 ] }} ]
dynamic_batching {{ preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 500 }}
parameters {{ key: "temperature" value: {{ string_value: "1.5" }} }}
{extra}
"""


def linear_onnx(path: Path, din: int = 4, dout: int = 3, bias: float = 0.0) -> None:
    w = numpy_helper.from_array(np.ones((din, dout), np.float32), "W")
    b = numpy_helper.from_array(np.full((dout,), bias, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", din])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dout])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def write_model(
    root: Path, name: str, versions=(1,), din: int = 4, extra: str = "", config_din: int | None = None
) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(LINEAR_CONFIG.format(name=name, din=config_din or din, extra=extra))
    for v in versions:
        linear_onnx(d / str(v) / "model.onnx", din=din)
    return d


def test_parses_config_versions_and_parameters(tmp_path: Path) -> None:
    d = write_model(tmp_path, "lin", versions=(1, 3, 2))
    (d / "3" / "preprocess.json").write_text('{"size": 64}')
    (d / "notaversion").mkdir()
    repo = ModelRepository(tmp_path)
    entry = repo.get("lin")
    assert entry.ok and entry.error is None
    assert entry.kind == "onnxruntime_onnx"
    assert entry.config.max_batch_size == 8
    assert list(entry.config.dynamic_batching.preferred_batch_size) == [4]
    assert sorted(entry.versions) == [1, 2, 3]
    assert entry.version == 3
    assert entry.model_path() == d / "3" / "model.onnx"
    assert entry.model_path(1) == d / "1" / "model.onnx"
    assert entry.file("preprocess.json").read_text() == '{"size": 64}'
    assert entry.parameters == {"temperature": "1.5"}
    assert repo.names() == ["lin"]


def test_version_policy_specific_and_latest(tmp_path: Path) -> None:
    write_model(
        tmp_path, "pinned", versions=(1, 2, 3), extra="version_policy { specific { versions: [ 2 ] } }"
    )
    write_model(tmp_path, "latest", versions=(1, 2), extra="version_policy { latest { num_versions: 1 } }")
    write_model(tmp_path, "wants9", versions=(1,), extra="version_policy { specific { versions: [ 9 ] } }")
    repo = ModelRepository(tmp_path)
    assert repo.get("pinned").version == 2
    assert repo.get("latest").version == 2
    assert not repo.get("wants9").ok
    assert "[9]" in repo.get("wants9").error


def test_incomplete_newer_version_keeps_older_one(tmp_path: Path) -> None:
    d = write_model(tmp_path, "lin", versions=(1,))
    (d / "2").mkdir()  # a version still being copied in
    entry = ModelRepository(tmp_path).get("lin")
    assert entry.ok and entry.version == 1


def test_broken_entries_name_the_file_and_others_load(tmp_path: Path) -> None:
    write_model(tmp_path, "good")
    # Model file missing.
    missing = write_model(tmp_path, "missing", versions=())
    (missing / "1").mkdir()
    # Corrupt ONNX.
    corrupt = write_model(tmp_path, "corrupt", versions=())
    (corrupt / "1").mkdir()
    (corrupt / "1" / "model.onnx").write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    # Truncated ONNX (a copy cut short).
    truncated = write_model(tmp_path, "truncated")
    onnx_file = truncated / "1" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:60])
    # Config input shape disagrees with the model (model takes 4 features, config says 5).
    write_model(tmp_path, "mismatch", din=4, config_din=5)
    # Config missing, config unparsable.
    (tmp_path / "noconfig" / "1").mkdir(parents=True)
    bad = write_model(tmp_path, "badconfig")
    (bad / "config.pbtxt").write_text("name: 'badconfig' max_batch_size: lots {")

    repo = ModelRepository(tmp_path)
    assert repo.get("good").ok
    errors = {e.name: e.error for e in repo.entries() if not e.ok}
    assert set(errors) == {"missing", "corrupt", "truncated", "mismatch", "noconfig", "badconfig"}
    assert str(missing / "1" / "model.onnx") in errors["missing"]
    assert str(corrupt / "1" / "model.onnx") in errors["corrupt"]
    assert "not a valid ONNX model" in errors["corrupt"]
    assert str(onnx_file) in errors["truncated"] and "not a valid ONNX model" in errors["truncated"]
    assert "mismatch/1/model.onnx" in errors["mismatch"] and "'x'" in errors["mismatch"]
    assert "noconfig/config.pbtxt" in errors["noconfig"]
    assert "badconfig/config.pbtxt" in errors["badconfig"]


def test_config_name_must_match_directory(tmp_path: Path) -> None:
    d = write_model(tmp_path, "lin")
    (d / "config.pbtxt").write_text((d / "config.pbtxt").read_text().replace('"lin"', '"other"'))
    entry = ModelRepository(tmp_path).get("lin")
    assert not entry.ok and "other" in entry.error


def test_unknown_model_is_not_found(tmp_path: Path) -> None:
    write_model(tmp_path, "lin")
    repo = ModelRepository(tmp_path)
    with pytest.raises(NotFound) as err:
        repo.get("nope")
    assert "nope" in err.value.message and str(tmp_path) in err.value.message


def test_missing_repository_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        ModelRepository(tmp_path / "absent")


def test_rescan_reports_changes(tmp_path: Path) -> None:
    write_model(tmp_path, "a")
    write_model(tmp_path, "b")
    repo = ModelRepository(tmp_path)
    assert not repo.rescan()

    linear_onnx(tmp_path / "a" / "2" / "model.onnx")
    write_model(tmp_path, "c")

    shutil.rmtree(tmp_path / "b")
    changes = repo.rescan()
    assert changes.changed == ("a",)
    assert changes.versions["a"] == (1, 2)
    assert changes.added == ("c",)
    assert changes.removed == ("b",)
    assert repo.get("a").version == 2
    assert not repo.rescan()


def test_check_signature_rules(tmp_path: Path) -> None:
    linear_onnx(tmp_path / "m.onnx", din=4)
    inputs, outputs = onnx_signature(tmp_path / "m.onnx")
    assert inputs == [TensorSpec("x", np.dtype(np.float32), (None, 4))]
    write_model(tmp_path / "repo", "lin")
    config = ModelRepository(tmp_path / "repo").get("lin").config
    assert check_signature(config, inputs, outputs) == []
    # A fixed batch axis cannot take merged batches.
    fixed = [TensorSpec("x", np.dtype(np.float32), (1, 4))]
    assert check_signature(config, fixed, outputs)
    # Wrong dtype is named.
    f64 = [TensorSpec("x", np.dtype(np.float64), (None, 4))]
    assert any("TYPE_FP32" in p for p in check_signature(config, f64, outputs))
    # Output missing from the model.
    assert any("'y'" in p for p in check_signature(config, inputs, []))
