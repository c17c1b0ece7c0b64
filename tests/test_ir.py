"""IR: loading (hostile files included), saving, atomic folders, canonicalization, verify."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import mlp_feeds, mlp_model
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import ModelLoadError, UsageError, VerificationError
from qcompile.ir import io
from qcompile.ir.canonicalize import canonicalize, parse_input_shapes
from qcompile.ir.model import PROVENANCE_KEY, Model
from qcompile.ir.runtime import make_session
from qcompile.ir.verify import verify


def test_load_missing_empty_random_truncated(tmp_path, mlp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        io.load(tmp_path / "missing.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty file"):
        io.load(tmp_path / "empty.onnx")
    (tmp_path / "random.onnx").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        io.load(tmp_path / "random.onnx")
    data = mlp_path.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 7):
        (tmp_path / "cut.onnx").write_bytes(data[:cut])
        with pytest.raises(ModelLoadError):
            io.load(tmp_path / "cut.onnx")
    with pytest.raises(ModelLoadError, match="not a file"):
        io.load(tmp_path)


def _external_model(tmp_path, location: str) -> os.PathLike:
    model = mlp_model()
    tensor = next(t for t in model.graph.initializer if t.name == "w1")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    path = tmp_path / "ext.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_cannot_escape_the_model_folder(tmp_path, location):
    with pytest.raises(ModelLoadError, match="outside the model folder"):
        io.load(_external_model(tmp_path, location))


def test_external_data_symlink_escape_and_missing_file(tmp_path):
    outside = tmp_path.parent / f"{tmp_path.name}-outside.bin"
    outside.write_bytes(b"\0" * 4096)
    (tmp_path / "link.bin").symlink_to(outside)
    with pytest.raises(ModelLoadError, match="escapes the model folder"):
        io.load(_external_model(tmp_path, "link.bin"))
    with pytest.raises(ModelLoadError, match="missing"):
        io.load(_external_model(tmp_path, "nothing-here.bin"))


def test_large_models_round_trip_through_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = Model.from_proto(mlp_model())
    path = io.save(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > 10_000
    assert path.stat().st_size < 10_000
    again = io.load(path)
    feeds = mlp_feeds()
    expected = make_session(model).run(None, feeds)[0]
    np.testing.assert_array_equal(make_session(again).run(None, feeds)[0], expected)


def test_input_file_is_never_modified(mlp_path):
    before = hashlib.sha256(mlp_path.read_bytes()).hexdigest()
    model = canonicalize(io.load(mlp_path))
    model.graph.nodes.clear()
    assert hashlib.sha256(mlp_path.read_bytes()).hexdigest() == before


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with io.atomic_directory(target) as staging:
            (staging / "half.onnx").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_directory(target) as staging:
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with io.atomic_directory(target) as staging:
            (staging / "new.txt").write_text("new")
            raise ValueError
    assert (target / "old.txt").exists()
    with io.atomic_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert target.stat().st_mode & 0o755 == 0o755
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_canonicalize_shapes_folding_names(tmp_path):
    f = np.float32
    nodes = [
        helper.make_node("Add", ["c1", "c2"], ["c3"]),  # constant subgraph, unnamed
        helper.make_node("MatMul", ["x", "c3"], ["h"]),
        helper.make_node("Relu", ["h"], ["y"], name="dup"),
        helper.make_node("Identity", ["y"], ["z"], name="dup"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((8, 4), f), "c1"), numpy_helper.from_array(np.ones((8, 4), f), "c2")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = canonicalize(Model.from_proto(proto), {"x": (2, 8)})
    ops = [n.op for n in model.graph.nodes]
    assert ops == ["MatMul", "Relu", "Identity"]  # Add folded into a constant
    names = [n.name for n in model.graph.nodes]
    assert len(set(names)) == 3 and all(names)
    assert model.graph.inputs[0].shape == [2, 8]
    assert model.graph.outputs[0].shape == [2, 4]
    with pytest.raises(UsageError, match="no input 'nope'"):
        canonicalize(Model.from_proto(proto), {"nope": (1, 8)})
    with pytest.raises(UsageError, match="fixed to 8"):
        canonicalize(Model.from_proto(proto), {"x": (2, 9)})


@pytest.mark.parametrize("input_shape", [None, (1, 5, 4)])
def test_folding_keeps_shape_start_and_end(input_shape):
    """Shape(start=, end=) (opset 15, what torch.export writes for symbolic sizes) folds to the
    sliced shape: graphsurgeon alone folded the full shape, and a Gather of it took the wrong dim."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s1"], start=1, end=2),  # [n]
        helper.make_node("Shape", ["x"], ["s2"], start=-2),  # [n, 4]
        helper.make_node("Gather", ["s2", "zero"], ["n"], axis=0),  # n
        helper.make_node("Cast", ["s1"], ["y1"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["s2"], ["y2"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["n"], ["y3"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y1", "y2", "y3")],
        [numpy_helper.from_array(np.array(0, np.int64), "zero")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.zeros((1, 5, 4), np.float32)}
    expected = make_session(proto).run(None, feeds)
    model = canonicalize(Model.from_proto(proto), {"x": input_shape} if input_shape else None)
    actual = make_session(model).run(None, feeds)
    assert [a.tolist() for a in actual] == [e.tolist() for e in expected] == [[5.0], [5.0, 4.0], 5.0]
    if input_shape:  # static: every size folds into a constant
        assert not any(n.op in ("Shape", "Gather") for n in model.graph.nodes)


def test_canonicalize_upgrades_old_opsets():
    model = mlp_model()
    model.opset_import[0].version = 11
    result = canonicalize(Model.from_proto(model))
    assert result.opset >= 13


@pytest.mark.parametrize("spec", ["x", "x=", "x=1xa", "=1x2", "x=0x3"])
def test_input_shape_syntax_errors(spec):
    with pytest.raises(UsageError, match="expected NAME=DxDx"):
        parse_input_shapes([spec])


def test_verify_catches_dangling_inputs_and_bad_quantized_nodes():
    model = canonicalize(Model.from_proto(mlp_model()))
    verify(model)
    ghost = gs.Variable("ghost", np.float32, [1])
    model.graph.nodes[2].inputs[0] = ghost
    with pytest.raises(VerificationError, match="never produced"):
        verify(model)

    x = gs.Variable("x", np.float32, [1, 32])
    y = gs.Variable("y", np.float32, [1, 8])
    bad = gs.Node("QMatMul", "q", {"format": "int", "bits": 4, "group_size": 32, "cols": 32, "sym": 0},
                  [x, gs.Constant("p", np.zeros((8, 7), np.uint8)), gs.Constant("s", np.ones((8, 1), np.float16)),
                   gs.Constant("z", np.zeros((8, 1), np.uint8))], [y], domain="qcompile")
    with pytest.raises(VerificationError, match="expected uint8"):
        verify(Model(gs.Graph(nodes=[bad], inputs=[x], outputs=[y], opset=17)))


def test_provenance_survives_save_and_load(tmp_path):
    model = canonicalize(Model.from_proto(mlp_model()))
    node = model.graph.nodes[0]
    model.mark(node, "quant")
    io.save(model, tmp_path / "m.onnx")
    proto = onnx.load(tmp_path / "m.onnx")
    props = {p.key: p.value for p in proto.graph.node[0].metadata_props}
    assert props == {PROVENANCE_KEY: "quant"}
    assert io.load(tmp_path / "m.onnx").provenance == {node.name: "quant"}


def test_error_metrics_of_huge_outputs_do_not_overflow():
    from qcompile.ir.runtime import error_metrics

    reference = np.array([3e200, -4e200, 1e199])
    with np.errstate(over="raise"):
        same = error_metrics(reference, reference * (1 + 1e-6))
        tiny = error_metrics(reference * 1e-390, reference * 1e-390)
    assert same["cosine"] == pytest.approx(1.0) and same["sqnr_db"] == pytest.approx(120.0, abs=0.1)
    assert tiny["cosine"] == pytest.approx(1.0) and tiny["sqnr_db"] == float("inf")
