"""prune: exact sparsity levels and N:M patterns, Wanda and SparseGPT where they should win,
and pruning then quantizing through the sparse file format."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import mlp_feeds, mlp_model

from qcompile.errors import UsageError
from qcompile.ir import qops
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.ir.qformat import quantize_int
from qcompile.ir.runtime import make_session
from qcompile.ir.sparse import SparseWeight
from qcompile.passes import registry
from qcompile.passes.calibration import CalibrationSet, random_calibration
from qcompile.passes.context import PassContext
from qcompile.passes.layers import as_rows, weight_of
from qcompile.passes.manager import PassManager
from qcompile.passes.obs import obs_prune
from qcompile.passes.pruning import keep_mask, wanda_scores
from qcompile.passes.sparsequant import quantize_sparse


def _run(model: Model, spec: str, calib: CalibrationSet | None = None):
    return PassManager(registry.parse_pipeline(spec), eval_samples=calib).run(model, PassContext(calib=calib))


def _mlp() -> tuple[Model, CalibrationSet]:
    model = canonicalize(Model.from_proto(mlp_model()))
    return model, random_calibration(model, 8)


def _weights(model: Model) -> dict[str, np.ndarray]:
    return {n.name: as_rows(n, np.asarray(weight_of(n).values)) for n in model.graph.nodes if weight_of(n) is not None}


def _output_error(inputs, weight, approx):
    return float(np.square(inputs @ weight.T - inputs @ approx.T).sum())


def _correlated_inputs(rng, rows=2048, cols=128, rank=8):
    return (rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))
            + 0.05 * rng.standard_normal((rows, cols))).astype(np.float32)


# -- sparsity levels and patterns ------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_every_row_has_exactly_the_requested_sparsity(method, sparsity):
    model, calib = _mlp()
    result, (record,) = _run(model, f"prune(method={method},sparsity={sparsity},min_size=0)", calib)
    weights = _weights(result)
    for name in ("fc1", "fc2", "fc3"):
        rows, cols = weights[name].shape
        assert ((weights[name] == 0).sum(1) == round(sparsity * cols)).all(), name
        assert record.stats["layers"][name]["sparsity"] == pytest.approx(round(sparsity * cols) / cols, abs=1e-4)
        assert record.stats["layers"][name]["criterion"] == method
    assert (weights["embed"] != 0).all() and record.stats["skipped"]["embed"] == "embeddings=false"
    assert record.output_error["y"]["cosine"] > 0.5


def test_layer_scope_prunes_the_layer_total():
    model, _ = _mlp()
    result, _ = _run(model, "prune(sparsity=0.4,scope=layer,min_size=0)")
    for name, weight in _weights(result).items():
        if name != "embed":
            assert (weight == 0).sum() == round(0.4 * weight.shape[1]) * weight.shape[0]


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
@pytest.mark.parametrize("update", [False, True])
def test_n_m_patterns_are_valid(pattern, update):
    n, m = map(int, pattern.split(":"))
    model, calib = _mlp()
    result, (record,) = _run(model, f"prune(method=wanda,pattern={pattern},update={update},min_size=0)", calib)
    for name in ("fc1", "fc2", "fc3"):
        weight = _weights(result)[name]
        groups = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
        assert (groups == n).all(), name  # exactly N of every M (random weights have no zeros)
        assert record.stats["layers"][name]["update"] is update


def test_prune_twice_changes_nothing_the_second_time():
    model, calib = _mlp()
    once, (first,) = _run(model, "prune(method=wanda,min_size=0)", calib)
    twice, (second,) = _run(once, "prune(method=wanda,min_size=0)", calib)
    assert first.changed and not second.changed


def test_overrides_skip_and_embeddings():
    model, _ = _mlp()
    result, (record,) = _run(model, "prune(sparsity=0.5,layers=fc2=2:4|fc3=0,skip=fc1,embeddings=true,min_size=0)")
    weights = _weights(result)
    assert (weights["fc1"] != 0).all() and record.stats["skipped"]["fc1"] == "excluded by skip pattern 'fc1'"
    assert (weights["fc3"] != 0).all()
    assert ((weights["fc2"] != 0).reshape(96, -1, 4).sum(-1) == 2).all()
    assert ((weights["embed"] == 0).sum(1) == 32).all()
    assert record.stats["plan"]["fc2"] == {"pattern": "2:4", "source": "layers fc2=2:4"}


@pytest.mark.parametrize("spec, message", [
    ("prune(pattern=4:4)", "expected N:M with 0 < N < M"),
    ("prune(pattern=two)", "expected N:M"),
    ("prune(layers=fc1)", "should look like glob=0.6"),
    ("prune(layers=fc1=1.5)", "out of range"),
    ("prune(sparsity=1.0)", "out of range"),
])
def test_bad_options_name_the_problem(spec, message):
    with pytest.raises(UsageError, match=message):
        registry.parse_pipeline(spec)


def test_data_driven_methods_need_calibration():
    model, _ = _mlp()
    for spec in ("prune(method=wanda)", "prune(update=true)", "prune(allocate=sensitivity)"):
        with pytest.raises(UsageError, match="needs calibration data"):
            _run(model, spec)


def test_sensitivity_plan_meets_the_global_target_and_spares_sensitive_layers():
    model, calib = _mlp()
    _, (record,) = _run(model, "prune(method=wanda,allocate=sensitivity,sparsity=0.5,min_size=0)", calib)
    layers, plan = record.stats["layers"], record.stats["plan"]
    total = sum(s["params"] for s in layers.values())
    assert sum(s["params"] * s["sparsity"] for s in layers.values()) / total == pytest.approx(0.5, abs=0.03)
    assert {entry["source"] for entry in plan.values()} == {"sensitivity"}
    assert len({entry["sparsity"] for entry in plan.values()}) > 1
    uniform, _ = _run(model, "prune(method=wanda,sparsity=0.5,min_size=0)", calib)
    planned, (planned_record,) = _run(model, "prune(method=wanda,allocate=sensitivity,sparsity=0.5,min_size=0)", calib)
    assert planned_record.output_error["y"]["sqnr_db"] >= _run(model, "prune(method=wanda,sparsity=0.5,min_size=0)",
                                                               calib)[1][0].output_error["y"]["sqnr_db"] - 0.5


# -- where Wanda and SparseGPT should win ------------------------------------------------


def test_wanda_beats_magnitude_when_input_norms_are_skewed():
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((4096, 64)).astype(np.float32) * np.geomspace(0.05, 20, 64)[rng.permutation(64)]
    weight = rng.standard_normal((32, 64)).astype(np.float32)
    gram = inputs.astype(np.float64).T @ inputs
    magnitude = weight * keep_mask(np.abs(weight), sparsity=0.5)
    wanda = weight * keep_mask(wanda_scores(weight, gram), sparsity=0.5)
    assert _output_error(inputs, weight, wanda) < 0.5 * _output_error(inputs, weight, magnitude)


def test_sparsegpt_update_beats_no_update_on_correlated_inputs():
    rng = np.random.default_rng(1)
    inputs = _correlated_inputs(rng)
    weight = rng.standard_normal((48, 128)).astype(np.float32)
    gram = inputs.astype(np.float64).T @ inputs
    plain = weight * keep_mask(wanda_scores(weight, gram), sparsity=0.5)

    def block_mask(values, begin, diag):
        return keep_mask(np.abs(values) * np.sqrt(np.diag(gram))[begin : begin + values.shape[1]], count=32)

    updated = obs_prune(weight, gram, block_mask, block_size=64)
    assert ((updated == 0).sum(1) == 64).all()
    assert _output_error(inputs, weight, updated) < 0.5 * _output_error(inputs, weight, plain)


def test_update_lowers_the_pass_output_error():
    model, calib = _mlp()
    _, (plain,) = _run(model, "prune(method=wanda,sparsity=0.6,min_size=0)", calib)
    _, (updated,) = _run(model, "prune(method=wanda,sparsity=0.6,update=true,min_size=0)", calib)
    _, (sparsegpt,) = _run(model, "prune(method=sparsegpt,sparsity=0.6,min_size=0)", calib)
    for name in ("fc1", "fc2", "fc3"):
        assert updated.stats["layers"][name]["output_sqnr_db"] > plain.stats["layers"][name]["output_sqnr_db"]
        assert sparsegpt.stats["layers"][name]["sparsity"] == plain.stats["layers"][name]["sparsity"]
    assert updated.output_error["y"]["sqnr_db"] > plain.output_error["y"]["sqnr_db"]


# -- then quantize: sparse storage -------------------------------------------------------


def test_mask_aware_gptq_keeps_zeros_and_beats_rtn():
    rng = np.random.default_rng(2)
    inputs = _correlated_inputs(rng, cols=256)
    weight = rng.standard_normal((40, 256)).astype(np.float32)
    weight *= keep_mask(np.abs(weight), sparsity=0.5)
    gram = inputs.astype(np.float64).T @ inputs
    rtn = quantize_sparse(weight, bits=3, group_size=32)
    gptq = quantize_sparse(weight, bits=3, group_size=32, hessian=gram)
    for quantized in (rtn, gptq):
        assert (quantized.dequantize()[weight == 0] == 0).all()
    assert _output_error(inputs, weight, gptq.dequantize()) < 0.7 * _output_error(inputs, weight, rtn.dequantize())


@pytest.mark.parametrize("spec, layout", [
    ("prune(sparsity=0.5,min_size=0),quant(bits=4,min_size=0)", "bitmask"),
    ("prune(pattern=2:4,min_size=0),quant(bits=4,min_size=0)", "nm"),
    ("prune(method=wanda,sparsity=0.5,min_size=0),quant(bits=4,method=gptq,min_size=0)", "bitmask"),
])
def test_prune_then_quant_round_trips_through_the_file_format(tmp_path, spec, layout):
    model, calib = _mlp()
    pruned, _ = _run(model, spec.split("),quant")[0] + ")", calib)
    masks = {name: weight == 0 for name, weight in _weights(pruned).items()}
    result, records = _run(model, spec, calib)
    path = tmp_path / "model.onnx"
    onnx.save(result.to_proto(), path)
    loaded = Model.from_proto(onnx.load(path))
    expected = Model.from_proto(mlp_model())
    replaced = {}
    for node in loaded.graph.nodes:
        if node.op == "QMatMul":
            weight = qops.read_weight(node)
            assert isinstance(weight, SparseWeight) and weight.layout == layout, node.name
            assert node.attrs["format"] == "int" and node.attrs["sparse"] == layout
            recon = weight.dequantize()
            assert (recon[masks[node.name]] == 0).all()
            replaced[node.name] = recon
    assert records[1].stats["layers"]["fc1"]["sparse"] == ("bitmask" if layout == "bitmask" else "2:4")
    embed = qops.read_weight(next(n for n in loaded.graph.nodes if n.op == "QGather")).dequantize()
    tensors = expected.tensors()
    tensors["emb"].values = embed
    tensors["w1"].values = np.ascontiguousarray(replaced["fc1"].T)
    tensors["w2"].values = replaced["fc2"]
    tensors["w3"].values = np.ascontiguousarray(replaced["fc3"].T) / 0.5
    feeds = mlp_feeds()
    np.testing.assert_allclose(make_session(loaded).run(None, feeds)[0], make_session(expected).run(None, feeds)[0],
                               rtol=1e-4, atol=1e-4)


def test_file_size_drops_with_sparsity():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((256, 512)).astype(np.float32)
    x = gs.Variable("x", np.float32, [1, 512])
    y = gs.Variable("y", np.float32, [1, 256])
    dense = Model(gs.Graph(nodes=[gs.Node("MatMul", "fc", inputs=[x, gs.Constant("w", weight.T.copy())], outputs=[y])],
                           inputs=[x], outputs=[y], opset=17))
    sizes, weight_bytes = {}, {}
    for spec in ("quant(bits=4)", "prune(sparsity=0.5),quant(bits=4)", "prune(sparsity=0.75),quant(bits=4)"):
        result, records = _run(dense.copy(), spec)
        sizes[spec] = len(result.to_proto().SerializeToString())
        weight_bytes[spec] = records[-1].stats["weight_bytes"]
    dense_bytes = quantize_int(weight, 4, 32).nbytes
    mask_bytes = weight.size // 8
    assert weight_bytes["quant(bits=4)"] == dense_bytes
    assert weight_bytes["prune(sparsity=0.5),quant(bits=4)"] == dense_bytes // 2 + mask_bytes  # half + the mask
    assert sizes["prune(sparsity=0.5),quant(bits=4)"] < dense_bytes // 2 + mask_bytes + 6000  # + graph, functions
    assert sizes["prune(sparsity=0.5),quant(bits=4)"] < 0.8 * sizes["quant(bits=4)"]
    assert sizes["prune(sparsity=0.75),quant(bits=4)"] < sizes["prune(sparsity=0.5),quant(bits=4)"]


def test_quant_keeps_dense_storage_below_the_threshold():
    model, _ = _mlp()
    result, (_, record) = _run(model, "prune(sparsity=0.2,min_size=0),quant(bits=4,min_size=0)")
    assert all("sparse" not in n.attrs for n in result.quantized_nodes())
    result, _ = _run(model, "prune(sparsity=0.2,min_size=0),quant(bits=4,min_size=0,sparse_min=0.1)")
    assert any(n.attrs.get("sparse") == "bitmask" for n in result.quantized_nodes())


def test_sparse_artifact_runs_in_onnx_runtime_through_the_reference_function(tmp_path):
    import qcompile

    result = qcompile.compile(mlp_model(), passes="prune(pattern=2:4,min_size=0,embeddings=true),quant(bits=4,min_size=0)",
                              output=tmp_path / "out")
    layers = result.manifest["layers"]
    assert "no sparse kernel in ONNX Runtime" in layers["fc1"]["kernel"]
    assert "int.nm" in layers["fc1"]["kernel"] and "QGather reference" in layers["embed"]["kernel"]
    assert layers["fc1"]["sparse"] == "2:4" and layers["fc1"]["format"] == "int"
    vs_ir = result.manifest["errors"]["artifact_vs_ir"]["y"]
    assert vs_ir["max_abs"] < 1e-3 and vs_ir["cosine"] > 0.99999


def test_sequential_stages_follow_the_dataflow_and_keep_exact_sparsity():
    from qcompile.passes.sequential import layer_stages as _stages

    model, calib = _mlp()
    nodes = [n for n in model.graph.nodes if n.name in ("fc1", "fc2", "fc3")]
    assert [[n.name for n in stage] for stage in _stages(model, nodes)] == [["fc1"], ["fc2"], ["fc3"]]
    result, (record,) = _run(model, "prune(method=wanda,sequential=true,min_size=0)", calib)
    assert record.stats["sequential"] is True
    for name in ("fc1", "fc2", "fc3"):
        weight = _weights(result)[name]
        assert ((weight == 0).sum(1) == weight.shape[1] // 2).all()


def test_inspection_counts_the_sparse_metadata_as_packed_weights():
    from qcompile.inspection import layer_table

    model, _ = _mlp()
    result, _ = _run(model, "prune(sparsity=0.5,min_size=0),quant(bits=4,min_size=0)")
    table = layer_table(result)
    row = table["layers"]["fc2"]
    assert row["format"] == "int" and row["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert row["bytes"] == qops.read_weight(next(n for n in result.graph.nodes if n.name == "fc2")).nbytes
    sizes = table["totals"]["sizes"]
    assert sum(sizes.values()) == result.constant_bytes()
    assert sizes["packed"] >= sum(t.values.nbytes for t in result.tensors().values() if t.name.endswith(".mask"))


@pytest.mark.parametrize("layer, width", [("fc1", 128), ("fc3", 48)])  # MatMul + Add; Gemm with alpha, beta
def test_bias_correction_removes_the_mean_output_error(layer, width):
    """After pruning one layer, its output averaged over the calibration rows equals FP32's: the
    mean error (W - W')E[x] went into the bias, and only the zero-mean part is left."""
    model, calib = _mlp()
    node = next(n for n in model.graph.nodes if n.name == layer)
    probe = node.outputs[0].outputs[0].outputs[0].name if node.op == "MatMul" else node.outputs[0].name

    def outputs(m: Model) -> np.ndarray:
        session = make_session(m, extra_outputs=[probe])
        return np.concatenate([session.run([probe], f)[0].reshape(-1, width) for f in calib.batches(1)])

    reference = outputs(model)
    errors = {}
    for correct in (False, True):
        others = "|".join(n for n in ("fc1", "fc2", "fc3") if n != layer)
        spec = f"prune(sparsity=0.5,skip={others},min_size=0,bias_correction={str(correct).lower()})"
        result, (record,) = _run(model.copy(), spec, calib)
        errors[correct] = np.abs((outputs(result) - reference).mean(0)).max()
        if correct:
            assert isinstance(record.stats["layers"][layer]["bias_shift"], float)
    assert errors[True] < 1e-4 < errors[False]
