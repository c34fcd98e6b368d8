"""services.runtime.model_files: a config written from a ModelSpec reads back, through the services'
own repository reader, as the entry it describes; files are replaced atomically."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from services.runtime.backends.inprocess import batch_policy
from services.runtime.model_files import (
    IR_VERSION,
    OPSET,
    Batching,
    ModelSpec,
    Tensor,
    config_text,
    model_config,
    write_atomic,
    write_config,
)
from services.runtime.repository import CONFIG_FILE, ModelRepository

SPEC = ModelSpec(
    name="pair",
    max_batch_size=16,
    inputs=[Tensor("ids", (-1,), mc.TYPE_INT64), Tensor("x", (3, 4))],
    outputs=[Tensor("y", (3, 4))],
    batching=Batching(preferred=(4, 8), max_queue_delay_us=1500),
    parameters={"demo": "true", "source": 'quotes " and \\ backslashes survive'},
)


def write_pair_model(version_dir: Path) -> None:
    """An ONNX model with SPEC's signature: y = x, ids unused but declared."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "pair",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "L"]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    version_dir.mkdir(parents=True)
    onnx.save(model, str(version_dir / "model.onnx"))


def test_written_config_reads_back_as_the_entry_it_describes(tmp_path: Path) -> None:
    write_pair_model(tmp_path / "pair" / "1")
    path = write_config(tmp_path / "pair", SPEC)
    assert path == tmp_path / "pair" / CONFIG_FILE

    entry = ModelRepository(tmp_path).get("pair")
    assert entry.ok, entry.error
    assert entry.config == model_config(SPEC)
    assert entry.kind == "onnxruntime_onnx" and entry.version == 1 and entry.model_filename == "model.onnx"
    assert [(t.name, t.data_type, list(t.dims)) for t in entry.config.input] == [
        ("ids", mc.TYPE_INT64, [-1]),
        ("x", mc.TYPE_FP32, [3, 4]),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in entry.config.output] == [("y", mc.TYPE_FP32, [3, 4])]
    assert entry.parameters == dict(SPEC.parameters)
    policy = batch_policy(entry, default_queue_size=32)
    assert policy.dynamic and policy.max_batch_size == 16
    assert policy.preferred_batch_sizes == (4, 8) and policy.max_queue_delay_microseconds == 1500


def test_spec_and_its_message_print_the_same_config() -> None:
    assert config_text(SPEC) == config_text(model_config(SPEC))


def test_backend_batching_without_preferred_sizes_and_no_batching() -> None:
    fil = model_config(
        ModelSpec(name="trees", backend="fil", max_batch_size=8, batching=Batching(max_queue_delay_us=500))
    )
    assert fil.backend == "fil" and not fil.platform
    assert fil.HasField("dynamic_batching") and not fil.dynamic_batching.preferred_batch_size
    alone = model_config(ModelSpec(name="detector", max_batch_size=8))
    assert alone.platform == "onnxruntime_onnx" and not alone.HasField("dynamic_batching")


@pytest.mark.parametrize("durable", [True, False])
def test_write_atomic_replaces_content_and_leaves_no_temporary_file(tmp_path: Path, durable: bool) -> None:
    path = tmp_path / "deep" / "dir" / "file.json"
    write_atomic(path, "first\n", durable=durable)  # parents are made
    assert path.read_text() == "first\n"
    inode = path.stat().st_ino
    write_atomic(path, b"second", durable=durable)
    assert path.read_bytes() == b"second"
    assert path.stat().st_ino != inode  # a new file renamed over the old, not the old rewritten
    assert sorted(os.listdir(path.parent)) == ["file.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    write_atomic(path, b"old")
    with pytest.raises(TypeError):
        write_atomic(path, 12345)  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
