"""Small models built inline, shared by the tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def make_model(nodes, inputs, outputs, initializers, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def mlp_model(seed: int = 0, hidden: int = 64, vocab: int = 200) -> onnx.ModelProto:
    """Embedding -> MatMul+Add -> Relu -> Gemm(transB=1) -> Gemm(transB=0, alpha, beta)."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [
        _init("emb", rng.standard_normal((vocab, hidden)).astype(f)),
        _init("w1", (rng.standard_normal((hidden, 128)) / 8).astype(f)),
        _init("b1", rng.standard_normal(128).astype(f)),
        _init("w2", (rng.standard_normal((96, 128)) / 11).astype(f)),
        _init("b2", rng.standard_normal(96).astype(f)),
        _init("w3", (rng.standard_normal((96, 48)) / 10).astype(f)),
        _init("b3", rng.standard_normal(48).astype(f)),
        _init("shape2d", np.array([-1, hidden], np.int64)),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
        helper.make_node("Reshape", ["e", "shape2d"], ["e2"], name="flatten"),
        helper.make_node("MatMul", ["e2", "w1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["h1b"], name="fc1_bias"),
        helper.make_node("Relu", ["h1b"], ["a1"], name="relu"),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], name="fc2", transB=1),
        helper.make_node("Gemm", ["h2", "w3", "b3"], ["y"], name="fc3", alpha=0.5, beta=2.0),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 48])],
        inits,
    )


def cnn_model(seed: int = 0) -> onnx.ModelProto:
    """Conv(pads, strides) -> Relu -> Conv(group=2, no bias) -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [
        _init("c1w", (rng.standard_normal((16, 3, 3, 3)) / 5).astype(f)),
        _init("c1b", rng.standard_normal(16).astype(f)),
        _init("c2w", (rng.standard_normal((32, 8, 3, 3)) / 8).astype(f)),
        _init("fw", (rng.standard_normal((32, 10)) / 6).astype(f)),
        _init("fb", rng.standard_normal(10).astype(f)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1w", "c1b"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2w"], ["c2"], name="conv2", group=2, kernel_shape=[3, 3]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fw", "fb"], ["y"], name="fc"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), path)
    return path


@pytest.fixture
def cnn_path(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_model(), path)
    return path


def mlp_feeds(n: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(seed).integers(0, 200, size=(n, 4)).astype(np.int64)}


def cnn_feeds(n: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)}


def artifact_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of an artifact folder, the manifest's wall-clock timings left out."""
    digests = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("seconds", None)
            for record in manifest.get("passes", []):
                record.pop("seconds", None)
            data = json.dumps(manifest, sort_keys=True).encode()
        digests[path.name] = hashlib.sha256(data).hexdigest()
    return digests
