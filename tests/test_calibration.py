"""Calibration data: sources, checks against the model, synthetic samples, capture."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import mlp_model

from qcompile.errors import CalibrationError
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.passes.calibration import load_calibration, random_calibration
from qcompile.passes.context import PassContext


@pytest.fixture
def model():
    return canonicalize(Model.from_proto(mlp_model()))


def _ids(n=5, dtype=np.int64, width=4):
    return np.random.default_rng(0).integers(0, 200, size=(n, width)).astype(dtype)


def test_npz_and_npy_folder(tmp_path, model):
    np.savez(tmp_path / "calib.npz", ids=_ids())
    assert load_calibration(tmp_path / "calib.npz", model).n_samples == 5
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "ids.npy", _ids(3))
    calib = load_calibration(folder, model)
    assert calib.n_samples == 3 and [b["ids"].shape for b in calib.batches(2)] == [(2, 4), (1, 4)]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": _ids()}, r"missing ids; unknown x; model inputs: ids"),
        ({"ids": _ids(dtype=np.int32)}, "ids is int32, the model expects int64"),
        ({"ids": _ids()[:, :, None]}, r"ids has shape \[5, 4, 1\], the model expects \[\?, 4\] per sample"),
        ({"ids": _ids(width=5)}, r"ids has shape \[5, 5\], the model expects \[\?, 4\]"),
    ],
)
def test_mismatched_files_are_rejected(tmp_path, model, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CalibrationError, match=message):
        load_calibration(tmp_path / "bad.npz", model)


def test_unreadable_sources(tmp_path, model):
    with pytest.raises(CalibrationError, match="no such calibration file"):
        load_calibration(tmp_path / "none.npz", model)
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(CalibrationError, match="unreadable calibration data"):
        load_calibration(tmp_path / "junk.npz", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no .npy files"):
        load_calibration(tmp_path / "empty", model)
    for spec in ("random:", "random:0", "random:x"):
        with pytest.raises(CalibrationError, match="random:N"):
            load_calibration(spec, model)


def test_nan_and_uneven_sample_counts_are_rejected(model):
    from qcompile.passes.calibration import CalibrationSet, check_calibration

    floats = canonicalize(Model.from_proto(_float_input_model()))
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        check_calibration(CalibrationSet({"x": np.full((2, 3), np.nan, np.float32)}, "t"), floats)
    two = canonicalize(Model.from_proto(_float_input_model(two_inputs=True)))
    arrays = {"x": np.zeros((2, 3), np.float32), "x2": np.zeros((3, 3), np.float32)}
    with pytest.raises(CalibrationError, match="same, non-zero number of samples"):
        check_calibration(CalibrationSet(arrays, "t"), two)


def _float_input_model(two_inputs=False):
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])]
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    if two_inputs:
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["b", 3]))
        nodes = [helper.make_node("Add", ["x", "x2"], ["y"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_random_calibration_respects_embedding_range(model):
    calib = random_calibration(model, 6, seed=3)
    ids = calib.arrays["ids"]
    assert calib.synthetic and ids.shape == (6, 4) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 200 and ids.max() > 2
    np.testing.assert_array_equal(ids, random_calibration(model, 6, seed=3).arrays["ids"])


def test_capture_is_bounded_and_flattened(model):
    calib = random_calibration(model, 4)
    ctx = PassContext(calib=calib, max_capture_rows=5, max_capture_bytes=1)
    captured = ctx.capture(model, ["e2", "a1"])
    assert captured["e2"].shape == (5, 64) and captured["a1"].shape == (5, 128)
    assert PassContext().capture(model, ["e2"]) == {}


def test_synthetic_samples_stand_in_only_when_allowed(model):
    ctx = PassContext(synthetic_calib=random_calibration(model, 2))
    assert ctx.capture(model, ["e2"]) == {}
    assert ctx.capture(model, ["e2"], allow_synthetic=True)["e2"].shape == (8, 64)
    assert ctx.uses_synthetic and not PassContext(calib=random_calibration(model, 1)).uses_synthetic


def test_padding_tokens_are_left_out_of_statistics():
    """Rows where ``attention_mask`` is 0 never reach the Hessians; captured rows (activation
    ranges) keep them, which measured better for static activation quantization."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Identity", ["attention_mask"], ["m"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3]),
         helper.make_tensor_value_info("m", TensorProto.INT64, [1, 4])])
    model = Model.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    x = np.abs(np.random.default_rng(0).standard_normal((2, 1, 4, 3))).astype(np.float32)
    mask = np.array([[[1, 1, 0, 0]], [[1, 1, 1, 0]]], np.int64)
    calib = load_calibration({"x": x, "attention_mask": mask}, model)
    real = np.concatenate([x[0, 0, :2], x[1, 0, :3]]).astype(np.float64)
    gram, rows, sums = PassContext(calib=calib).gram(model, ["y"])["y"]
    assert rows == 5
    np.testing.assert_allclose(gram, real.T @ real, rtol=1e-6)
    np.testing.assert_allclose(sums, real.sum(0), rtol=1e-6)
    assert PassContext(calib=calib).capture(model, ["y"])["y"].shape == (8, 3)
    grams, captured = PassContext(calib=calib).statistics(model, gram_of=["y"], rows_of=["y"])
    assert grams["y"][1] == 5 and captured["y"].shape == (8, 3)
    assert PassContext(calib=calib, skip_padding=False).gram(model, ["y"])["y"][1] == 8


def test_gram_stacks_samples_into_blocks_without_changing_the_sums():
    from qcompile.passes.context import _gram

    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((int(n), 5)).astype(np.float32) for n in rng.integers(1, 9, size=23)]
    rows = np.concatenate(parts).astype(np.float64)
    for chunk_rows in (1, 7, 4096):  # one part per block, several per block, all in one
        gram, count, sums = _gram(parts, chunk_rows=chunk_rows)
        np.testing.assert_allclose(gram, rows.T @ rows, rtol=1e-12)
        np.testing.assert_allclose(sums, rows.sum(0), rtol=1e-12)
        assert count == rows.shape[0]
