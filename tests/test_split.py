"""split: SplitQuant k-means splitting and OCS are exact; quant stores split groups compactly."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cnn_feeds, cnn_model, make_model, mlp_feeds, mlp_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_fold import _block_feeds as block_feeds
from test_fold import pre_ln_block

from qcompile.ir import qops
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.cluster import ClusterWeight
from qcompile.ir.model import Model
from qcompile.ir.runtime import make_session
from qcompile.passes.calibration import CalibrationSet
from qcompile.passes.context import PassContext
from qcompile.passes.manager import PassManager
from qcompile.passes.registry import parse_pipeline
from qcompile.passes.split import GROUPS_KEY, kmeans_thresholds

MLP_FEEDS = mlp_feeds(6)
CNN_FEEDS = cnn_feeds()


def _run(proto, spec, feeds):
    model = canonicalize(Model.from_proto(proto))
    calib = CalibrationSet(feeds, "test")
    manager = PassManager(parse_pipeline(spec), verify_exact=True, eval_samples=calib)
    before = model.copy()
    after, records = manager.run(model, PassContext(calib=calib))
    return before, after, records


def _assert_same_outputs(before, after, feeds, tol=1e-4):
    for expected, actual in zip(make_session(before).run(None, feeds), make_session(after).run(None, feeds),
                                strict=True):
        np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("spec", ["split", "split(k=2)", "split(k=4)", "split(method=ocs)",
                                  "split(method=ocs,expand_ratio=0.3)"])
def test_split_is_exact_on_mlp(spec):
    before, after, (record,) = _run(mlp_model(), spec, MLP_FEEDS)
    assert record.changed and set(record.stats["layers"]) == {"fc1", "fc2", "fc3"}
    _assert_same_outputs(before, after, MLP_FEEDS)


def test_kmeans_parts_partition_the_weight():
    before, after, (record,) = _run(mlp_model(), "split", MLP_FEEDS)
    parts = [n for n in after.graph.nodes if n.name.startswith("fc2/split") and n.op == "Gemm"]
    assert len(parts) == 3
    values = [np.asarray(p.inputs[1].values) for p in parts]
    original = next(np.asarray(n.inputs[1].values) for n in before.graph.nodes if n.name == "fc2")
    np.testing.assert_array_equal(np.sum(values, axis=0), original)
    assert ((np.stack(values) != 0).sum(0) <= 1).all()  # every weight lives in one part
    assert GROUPS_KEY in after.metadata
    assert sum(record.stats["layers"]["fc2"]["fractions"]) == pytest.approx(1.0)


def test_conv_filters_are_split_each_on_their_own():
    before, after, (record,) = _run(cnn_model(), "split(min_size=0)", CNN_FEEDS)
    assert any(name.startswith("conv") for name in record.stats["layers"])
    _assert_same_outputs(before, after, CNN_FEEDS)


def test_ocs_halves_the_largest_channel_and_widens_the_input():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((32, 8)).astype(np.float32)
    weight[5] *= 20
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
                       [numpy_helper.from_array(weight, "w")])
    feeds = {"x": rng.standard_normal((4, 32)).astype(np.float32)}
    before, after, (record,) = _run(proto, "split(method=ocs,expand_ratio=0.05,min_size=0)", feeds)
    stats = record.stats["layers"]["fc"]
    assert stats["channels_added"] == 2 and stats["channels"] == [5]  # channel 5 split twice
    assert stats["absmax_after"] == pytest.approx(stats["absmax_before"] / 2, rel=1e-6)  # one copy still at 1/2
    _assert_same_outputs(before, after, feeds)


def test_min_outlier_ratio_leaves_plain_layers_alone():
    _, _, (record,) = _run(mlp_model(), "split(min_outlier_ratio=50)", MLP_FEEDS)
    assert not record.changed
    assert "outlier ratio" in record.stats["skipped"]["fc1"]


def test_split_twice_changes_nothing_the_second_time():
    _, once, _ = _run(mlp_model(), "split", MLP_FEEDS)
    calib = CalibrationSet(MLP_FEEDS, "t")
    _, (second,) = PassManager(parse_pipeline("split"), eval_samples=calib).run(once, PassContext(calib=calib))
    assert not second.changed
    assert all(reason == "already split" for name, reason in second.stats["skipped"].items() if "/split" in name)


def test_split_then_fold_stays_exact():
    feeds = block_feeds()
    before, after, records = _run(pre_ln_block(), "split,fold", feeds)
    assert records[1].stats["smoothed"]["ln"]["consumers"]  # fold scales all nine parts together
    _assert_same_outputs(before, after, feeds)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quant_merges_a_split_group_into_one_cluster_op(method):
    _, after, records = _run(mlp_model(), f"split,quant(bits=3,method={method})", MLP_FEEDS)
    nodes = {n.name: n for n in after.graph.nodes}
    fc2 = nodes["fc2"]
    weight = qops.read_weight(fc2)
    assert isinstance(weight, ClusterWeight) and weight.k == 3 and weight.bits == 3
    assert not any("/split" in name for name in nodes)
    assert GROUPS_KEY not in after.metadata
    # one code per weight plus a 1.6-bit cluster id, not three mostly-zero matrices
    assert weight.nbytes <= 96 * 128 * (3 + 1.6 + 0.8) / 8  # + per-row grids: 3 x (fp16 + fp16) / 128
    layer = records[1].stats["layers"]["fc2"]
    assert layer["split"] == 3 and layer["output_sqnr_db"] > 17


def test_split_groups_beat_plain_quantization_at_three_bits():
    _, plain, plain_records = _run(mlp_model(), "quant(bits=3,group_size=0)", MLP_FEEDS)
    _, split, split_records = _run(mlp_model(), "split,quant(bits=3)", MLP_FEEDS)
    for layer in ("fc1", "fc2", "fc3"):
        assert (split_records[1].stats["layers"][layer]["output_sqnr_db"]
                > plain_records[0].stats["layers"][layer]["output_sqnr_db"] + 3)


def test_kmeans_thresholds_find_outlier_clusters():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 0.1, 1000), rng.normal(5, 0.1, 50), rng.normal(-5, 0.1, 50)])
    (low, high), = kmeans_thresholds(values[None, :], 3, False, rng)
    assert -5 < low < -0.5 and 0.5 < high < 5


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(2, 4), method=st.sampled_from(["kmeans", "ocs"]),
       hidden=st.sampled_from([16, 48]))
def test_property_split_random_graphs_stays_exact(seed, k, method, hidden):
    proto = mlp_model(seed, hidden=hidden)
    feeds = {"ids": np.random.default_rng(seed).integers(0, 200, (3, 4))}
    before, after, _ = _run(proto, f"split(method={method},k={k},min_size=0)", feeds)
    _assert_same_outputs(before, after, feeds)


def test_cluster_gptq_beats_rtn_on_correlated_inputs():
    from qcompile.passes.cluster_quant import quantize_split
    from qcompile.passes.split import cluster_ids

    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 64))
    x[:, 1:] += 2 * x[:, :1]  # every input channel shares one strong component
    hessian = x.T @ x
    weight = rng.standard_normal((96, 64)).astype(np.float32)
    ids = cluster_ids(weight, kmeans_thresholds(weight, 3, False, rng))

    def output_error(quantized):
        delta = quantized.dequantize() - weight
        return float(np.trace(delta @ hessian @ delta.T))

    rtn = quantize_split(weight, ids, k=3, bits=3, group_size=0, gram=hessian)
    gptq = quantize_split(weight, ids, k=3, bits=3, group_size=0, gram=hessian, gptq=True)
    assert output_error(gptq) < 0.5 * output_error(rtn)
