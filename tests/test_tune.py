"""tune: distillation toward the input model lowers the loss and keeps every zero exactly zero."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import mlp_model

from qcompile.errors import UsageError
from qcompile.ir import qops
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.ir.sparse import SparseWeight
from qcompile.passes import registry
from qcompile.passes.calibration import CalibrationSet, random_calibration
from qcompile.passes.context import PassContext
from qcompile.passes.layers import as_rows, weight_of
from qcompile.passes.manager import PassManager

torch = pytest.importorskip("torch")

from qcompile.passes.tune import Tune, _distillation_loss  # noqa: E402

TUNE = "tune(steps=30,lr=0.003,batch=8)"


def _run(model: Model, spec: str, calib: CalibrationSet | None):
    return PassManager(registry.parse_pipeline(spec), eval_samples=calib).run(model, PassContext(calib=calib))


def _mlp() -> tuple[Model, CalibrationSet]:
    model = canonicalize(Model.from_proto(mlp_model()))
    return model, random_calibration(model, 32)


def _weights(model: Model) -> dict[str, np.ndarray]:
    return {n.name: as_rows(n, np.asarray(weight_of(n).values)) for n in model.graph.nodes
            if weight_of(n) is not None and n.op != "Gather"}


@pytest.mark.parametrize("prune", ["prune(sparsity=0.5,method=wanda,min_size=0)", "prune(pattern=2:4,min_size=0)",
                                   "prune(sparsity=0.7,scope=layer,min_size=0)"])
def test_zeros_stay_exactly_zero_and_the_loss_drops(prune):
    model, calib = _mlp()
    pruned, _ = _run(model, prune, calib)
    tuned, (_, record) = _run(model, f"{prune},{TUNE}", calib)
    before, after = _weights(pruned), _weights(tuned)
    for name, weight in before.items():
        np.testing.assert_array_equal(after[name] == 0, weight == 0, err_msg=name)  # the same mask, bit for bit
        assert not np.array_equal(after[name], weight), f"{name} was not trained"
    if "2:4" in prune:
        for weight in after.values():
            assert (np.count_nonzero(weight.reshape(weight.shape[0], -1, 4), axis=2) <= 2).all()
    stats = record.stats
    assert record.changed and stats["kept"] and stats["masks_preserved"] and stats["steps"] == 30
    assert stats["calib_error_after"]["relative_error"] < 0.5 * stats["calib_error_before"]["relative_error"]
    assert stats["loss_end"] < stats["loss_start"]
    assert {layer["mask_preserved"] for layer in stats["layers"].values()} == {True}
    assert record.output_error["y"]["cosine"] > _run(model, prune, calib)[1][0].output_error["y"]["cosine"]


def test_results_are_reproducible_and_follow_the_seed():
    model, calib = _mlp()
    spec = f"prune(sparsity=0.5,min_size=0),{TUNE.replace('steps=30', 'steps=5')}"
    first, second = (_weights(_run(model, spec, calib)[0]) for _ in range(2))
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    other = PassManager(registry.parse_pipeline(spec)).run(model, PassContext(calib=calib, seed=1))[0]
    assert any(not np.array_equal(first[n], w) for n, w in _weights(other).items())


def test_train_biases_and_norms_too():
    model, calib = _mlp()
    _, (_, record) = _run(model, f"prune(sparsity=0.5,min_size=0),{TUNE[:-1]},train=biases)", calib)
    assert record.stats["trained_tensors"] == 6 and record.stats["trained_weights"] == 3  # w1..w3, b1..b3


def test_composes_with_sparse_quantization():
    model, calib = _mlp()
    tuned, _ = _run(model, f"prune(sparsity=0.5,min_size=0),{TUNE}", calib)
    masks = {name: weight == 0 for name, weight in _weights(tuned).items()}
    result, records = _run(model, f"prune(sparsity=0.5,min_size=0),{TUNE},quant(bits=4,method=gptq,min_size=0)",
                           calib)
    decoded = {n.name: qops.read_weight(n) for n in result.graph.nodes if n.op == "QMatMul"}
    assert sorted(decoded) == ["fc1", "fc2", "fc3"]
    for name, weight in decoded.items():
        assert isinstance(weight, SparseWeight)
        assert (weight.dequantize()[masks[name]] == 0).all()
    assert records[-1].output_error["y"]["cosine"] > 0.9


def test_loss_leaves_padding_positions_out():
    teacher = torch.randn(2, 5, 4)
    student = teacher.clone()
    student[1, 3:] += 100.0  # padding positions: any value
    feed = {"attention_mask": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    assert float(_distillation_loss({"h": student}, {"h": teacher}, feed, ["h"])) == 0.0
    student[0, 0] += 1.0
    assert float(_distillation_loss({"h": student}, {"h": teacher}, feed, ["h"])) > 0.0


def test_needs_calibration_teacher_and_a_float_model():
    model, calib = _mlp()
    with pytest.raises(UsageError, match="^pass tune needs calibration data"):
        _run(model, "prune(min_size=0),tune", None)
    with pytest.raises(UsageError, match="needs the pipeline's input model"):
        Tune().run(model.copy(), PassContext(calib=calib))


def _quantized(model: Model) -> dict[str, list[np.ndarray]]:
    return {n.name: [np.asarray(t.values) for t in qops.weight_inputs(n)] for n in model.quantized_nodes()}


@pytest.mark.parametrize("spec", ["quant(bits=3,min_size=0)", "shiftadd(bits=2,min_size=0)",
                                  "shiftadd(bits=2,outliers=0,min_size=0)"])
def test_quantized_layers_train_their_scales_and_keep_their_codes(spec):
    """After quant/shiftadd: codes, zero points and outlier corrections bit for bit; scales (alphas)
    trained, stored in their format (float16, powers of two); the stored model is closer to FP32."""
    model, calib = _mlp()
    quantized, (record,) = _run(model, spec, calib)
    tuned, (_, tune) = _run(model, f"{spec},{TUNE}", calib)
    before, after = _quantized(quantized), _quantized(tuned)
    assert sorted(before) == sorted(after) and len(before) == 4  # embed, fc1..fc3
    for name, arrays in before.items():
        node = next(n for n in tuned.quantized_nodes() if n.name == name)
        assert qops.node_format(node).check(node.attrs, after[name]) is None
        for index, (old, new) in enumerate(zip(arrays, after[name], strict=True)):
            assert old.dtype == new.dtype and old.shape == new.shape
            if index == 1:  # scales (int) or alpha codes (bcq)
                assert not np.array_equal(old, new), f"{name} scales were not trained"
            else:
                np.testing.assert_array_equal(old, new, err_msg=name)
    stats = tune.stats
    assert tune.changed and stats["kept"] and stats["quantized_trained"] == 4 and not stats["quantized_frozen"]
    assert {layer["codes"] for layer in stats["quantized_layers"].values()} == {"unchanged"}
    assert stats["calib_error_after"]["relative_error"] < stats["calib_error_before"]["relative_error"]
    assert tune.output_error["y"]["cosine"] > record.output_error["y"]["cosine"]


def test_sparse_quantized_layers_train_their_scales_and_stay_sparse():
    model, calib = _mlp()
    spec = "prune(sparsity=0.5,min_size=0),quant(bits=4,min_size=0)"
    quantized, _ = _run(model, spec, calib)
    tuned, (*_, tune) = _run(model, f"{spec},{TUNE}", calib)
    before, after = _quantized(quantized), _quantized(tuned)
    for node in tuned.quantized_nodes():
        weight, old = qops.read_weight(node), next(n for n in quantized.quantized_nodes() if n.name == node.name)
        if node.name == "embed":
            continue  # tables are not pruned
        assert isinstance(weight, SparseWeight)
        np.testing.assert_array_equal(weight.dequantize() == 0, qops.read_weight(old).dequantize() == 0)
        arrays, trained = before[node.name], after[node.name]
        assert not np.array_equal(arrays[1], trained[1])  # scales
        for index in (0, 2, 3):  # codes, zero points, bitmask
            np.testing.assert_array_equal(arrays[index], trained[index])
    assert tune.stats["kept"] and tune.stats["quantized_trained"] == 4 and not tune.stats["quantized_frozen"]


def test_skip_leaves_a_quantized_layer_as_it_was():
    model, calib = _mlp()
    quantized, _ = _run(model, "quant(bits=3,min_size=0)", calib)
    tuned, (_, tune) = _run(model, f"quant(bits=3,min_size=0),{TUNE[:-1]},skip=fc1)", calib)
    before, after = _quantized(quantized), _quantized(tuned)
    for old, new in zip(before["fc1"], after["fc1"], strict=True):
        np.testing.assert_array_equal(old, new)
    assert not np.array_equal(before["fc2"][1], after["fc2"][1]) and tune.stats["quantized_trained"] == 3


def test_stored_scales_are_what_was_evaluated():
    """The error measured after training (scales rounded to their format) is the stored model's."""
    from qcompile.ir.runtime import make_session

    model, calib = _mlp()
    tuned, (_, tune) = _run(model, f"shiftadd(bits=2,min_size=0),{TUNE}", calib)
    reference = make_session(model)
    decoded = tuned.copy()
    qops.decode_to_float(decoded.graph)
    head = calib.head(calib.n_samples)
    got = make_session(decoded).run(None, head.arrays)[0]
    want = reference.run(None, head.arrays)[0]
    error = float(np.square(got - want).sum() / np.square(want).sum())
    assert error == pytest.approx(tune.stats["calib_error_after"]["relative_error"], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("spec, message", [
    ("tune(steps=0)", "tune: steps=0 is out of range"),
    ("tune(lr=fast)", "tune: lr=fast is not valid"),
    ("tune(train=everything)", "tune: train=everything is not valid: expected one of weights, biases, all"),
    ("tune(epochs=3)", "tune: unknown option 'epochs'"),
])
def test_bad_options_name_the_problem(spec, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        registry.parse_pipeline(spec)


def _norm_model() -> Model:
    """MatMul -> LayerNormalization -> MatMul: a block output for ``hidden`` to match."""
    from conftest import make_model
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f = np.float32
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w1", (rng.standard_normal((32, 64)) / 5).astype(f)), ("gamma", (1 + 0.3 * rng.standard_normal(64)).astype(f)),
        ("beta", (0.1 * rng.standard_normal(64)).astype(f)), ("w2", (rng.standard_normal((64, 16)) / 8).astype(f))]]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], name="norm", axis=-1),
             helper.make_node("MatMul", ["n", "w2"], ["y"], name="fc2")]
    value = helper.make_tensor_value_info
    return canonicalize(Model.from_proto(make_model(nodes, [value("x", TensorProto.FLOAT, ["batch", 32])],
                                                    [value("y", TensorProto.FLOAT, ["batch", 16])], inits)))


def test_hidden_matching_and_norm_parameters():
    model = _norm_model()
    calib = random_calibration(model, 32)
    spec = f"prune(sparsity=0.6,min_size=0),{TUNE[:-1]},hidden=1,train=all)"
    _, (_, record) = _run(model, spec, calib)
    stats = record.stats
    assert stats["hidden_matched"] == 1 and stats["trained_tensors"] == 4  # w1, w2, gamma, beta
    assert stats["calib_error_after"]["relative_error"] < 0.5 * stats["calib_error_before"]["relative_error"]


def test_command_line_refuses_without_calibration(tmp_path, mlp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "qcompile", str(mlp_path), "--passes", "prune(min_size=0),tune",
                           "-o", str(tmp_path / "never")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert "pass tune needs calibration data" in done.stderr and not (tmp_path / "never").exists()


@pytest.mark.heavy
def test_minilm_recovers_on_held_out_sentences():
    """Real model, real text: 20 steps on 32 calibration sentences lift the held-out cosine of 2:4 magnitude
    pruning, with the 2:4 pattern intact (well under a minute of training)."""
    from qcompile.frontends import load_model
    from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize
    from qcompile.frontends.text import english_sentences
    from qcompile.ir.runtime import make_session
    from qcompile.passes.calibration import load_calibration

    model = canonicalize(load_model(cached_minilm_onnx()), {})
    calib = load_calibration(tokenize(minilm_path(), english_sentences(32, "calib"), max_length=64), model)
    evals = tokenize(minilm_path(), english_sentences(32, "eval"), max_length=64)
    pruned, _ = PassManager(registry.parse_pipeline("prune(pattern=2:4)")).run(model, PassContext(calib=calib))
    tuned = pruned.copy()
    record = Tune(steps=20, batch=8).run(tuned, PassContext(calib=calib, reference=model))

    def pooled(m: Model) -> np.ndarray:
        (hidden,) = make_session(m).run(None, evals)
        mask = evals["attention_mask"][..., None]
        return (hidden * mask).sum(1) / mask.sum(1)

    def cosine(m: Model) -> float:
        a, b = pooled(m), pooled(model)
        return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))

    assert record.stats["masks_preserved"] and record.stats["hidden_matched"] == 0
    for name, weight in _weights(tuned).items():
        assert (np.count_nonzero(weight.reshape(weight.shape[0], -1, 4), axis=2) <= 2).all(), name
    assert cosine(tuned) > cosine(pruned) + 0.02


@pytest.mark.parametrize("row_group, col_group, planes", [(3, 1, 3), (1, 4, 2), (2, 8, 1)])
def test_the_plane_sum_and_its_gradient_equal_the_expanded_product(row_group, col_group, planes):
    """tune's weight ``sum_b alpha_b[group] * plane_b`` (ragged groups too) and its gradient
    match the product of the expanded alphas and the planes, which it never builds."""
    import torch

    from qcompile.passes.tunequant import _PlaneSum

    rng = np.random.default_rng(0)
    rows, cols = 7, 19
    row_index = torch.arange(rows) // row_group
    col_index = torch.arange(cols) // col_group
    values = torch.tensor(rng.normal(size=(int(row_index[-1]) + 1, int(col_index[-1]) + 1, planes)),
                          requires_grad=True)
    signs = torch.from_numpy(rng.integers(0, 2, size=(rows, planes, cols)).astype(np.int8) * 2 - 1)
    expanded = values[row_index][:, col_index].permute(0, 2, 1)
    assert torch.allclose(_PlaneSum.apply(values, signs, row_index, col_index), (expanded * signs).sum(1))
    assert torch.autograd.gradcheck(lambda v: _PlaneSum.apply(v, signs, row_index, col_index), (values,))
