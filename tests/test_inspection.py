"""Inspection: per-pass dumps, structural and numerical diffs, the layer table, HTML reports, --explain."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import make_model, mlp_feeds, mlp_model
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.diff import numerical_diff, structural_diff
from qcompile.inspection import layer_table, short_names, size_breakdown
from qcompile.ir import io, runtime
from qcompile.ir.canonicalize import canonicalize
from qcompile.passes.calibration import CalibrationSet
from qcompile.passes.context import PassContext
from qcompile.passes.manager import PassManager
from qcompile.passes.registry import parse_pipeline
from qcompile.report import render_report


def qcompile_cli(*args, cwd=None):
    env = {**os.environ, "COLUMNS": "200"}  # wide tables stay whole
    return subprocess.run([sys.executable, "-m", "qcompile", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env=env)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The mlp model compiled with quant(bits=4), its dump folder and report."""
    folder = tmp_path_factory.mktemp("compiled")
    source = folder / "mlp.onnx"
    onnx.save(mlp_model(), source)
    result = qcompile.compile(source, passes="quant(bits=4)", calib="random:4", output=folder / "out",
                              dump_dir=folder / "dump", report=folder / "report.html")
    return {"source": source, "result": result, "dump": folder / "dump", "report": folder / "report.html"}


def samples(n: int = 3) -> CalibrationSet:
    return CalibrationSet(mlp_feeds(n), "test")


# ----------------------------------------------------------------------------------
# pass manager hook and dumps
# ----------------------------------------------------------------------------------


def test_after_pass_hook_sees_each_model_and_record():
    model = canonicalize(io.Model.from_proto(mlp_model()))
    seen = []

    def after_pass(index, pass_, current, record):
        seen.append((index, pass_.name, len(current.quantized_nodes()), record.changed, record.spec))

    pipeline = parse_pipeline("quant(bits=8),quant(bits=4)")
    PassManager(pipeline).run(model, PassContext(), after_pass=after_pass)
    assert seen == [(0, "quant", 4, True, "quant(bits=8)"), (1, "quant", 4, False, "quant")]


def test_dump_dir_holds_runnable_models_and_records(compiled):
    dump = compiled["dump"]
    assert sorted(p.name for p in dump.iterdir()) == ["00-input.json", "00-input.onnx", "01-quant.json",
                                                      "01-quant.onnx"]
    reference = None
    for name in ("00-input.onnx", "01-quant.onnx"):
        outputs = runtime.run_batches(runtime.make_session(dump / name), [mlp_feeds(2)])
        assert outputs["y"].shape == (8, 48)
        reference = outputs if reference is None else reference
    details = json.loads((dump / "01-quant.json").read_text())
    assert details["model"] == "01-quant.onnx" and details["record"]["name"] == "quant"
    assert details["record"]["stats"]["layers"]["fc1"]["bits"] == 4
    assert {"node": "fc1", "layer": "fc1"}.items() <= next(
        c for c in details["diff"]["nodes"] if c["node"] == "fc1").items()
    assert json.loads((dump / "00-input.json").read_text())["inspect"]["layers"]["fc1"]["format"] == "float32"


def test_dump_dir_replaces_stale_dumps_only(tmp_path, mlp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "07-old.onnx").write_bytes(b"stale")
    (dump / "notes.txt").write_text("mine")
    qcompile.compile(mlp_path, passes="quant", output=tmp_path / "out", dump_dir=dump)
    assert not (dump / "07-old.onnx").exists() and (dump / "notes.txt").read_text() == "mine"
    assert (dump / "01-quant.onnx").exists()


# ----------------------------------------------------------------------------------
# diff
# ----------------------------------------------------------------------------------


def test_diff_of_an_exact_transformation_is_numerically_zero(compiled):
    before, after = io.load(compiled["source"]), io.load(compiled["dump"] / "00-input.onnx")
    structure = structural_diff(before, after)
    assert not [c for c in structure["nodes"] if c["change"] in ("replaced", "added", "removed")]
    assert structure["quantized"] == []
    numbers = numerical_diff(before, after, samples())
    assert [row["tensor"] for row in numbers["outputs"]] == ["y"]
    assert {"h1", "a1", "h2"} <= {row["tensor"] for row in numbers["tensors"]}
    for row in numbers["outputs"] + numbers["tensors"]:
        assert row["max_abs"] == 0.0 and row["sqnr_db"] == float("inf") and row["cosine"] == pytest.approx(1.0)


def test_diff_of_quantization_names_the_layers_and_their_bits(compiled):
    before, after = io.load(compiled["source"]), io.load(compiled["dump"] / "01-quant.onnx")
    structure = structural_diff(before, after)
    assert structure["by_op"] == {"+ Add": 2, "Gather -> QGather": 1, "Gemm -> QMatMul": 2, "MatMul -> QMatMul": 1}
    fc1 = next(c for c in structure["nodes"] if c["node"] == "fc1")
    assert fc1["change"] == "replaced" and "w1" in fc1["inputs"]["before"] and "w1.qweight" in fc1["inputs"]["after"]
    assert {c["layer"] for c in structure["nodes"] if c["node"] == "fc2/bias"} == {"fc2"}
    quantized = {layer["node"]: layer for layer in structure["quantized"]}
    assert sorted(quantized) == ["embed", "fc1", "fc2", "fc3"]
    assert quantized["fc1"]["bits"] == 4 and quantized["fc1"]["group_size"] == 32 and quantized["fc1"]["was"] == "MatMul"
    stats = compiled["result"].manifest["passes"][0]["stats"]["layers"]
    for name in quantized:  # the diff's weight SQNR (Gemm alpha folded in) matches the pass's own
        assert quantized[name]["weight_sqnr_db"] == pytest.approx(stats[name]["weight_sqnr_db"], abs=0.02)
    changes = {item["name"]: item for item in structure["initializers"]}
    assert changes["w1"]["change"] == "removed" and changes["w1"]["dtype"] == "float32"
    assert changes["w1.qweight"]["change"] == "added" and changes["w1.qweight"]["shape"] == [128, 32]
    assert structure["weight_bytes"]["after"] < structure["weight_bytes"]["before"] / 5

    numbers = numerical_diff(before, after, samples())
    output = numbers["outputs"][0]
    assert 15 < output["sqnr_db"] < 60 and output["max_abs"] > 0
    sqnrs = [row["sqnr_db"] for row in numbers["tensors"]]
    assert sqnrs == sorted(sqnrs)  # worst first


def test_diff_matches_unnamed_nodes_by_their_outputs():
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [weight])
    raw = io.Model.from_proto(proto)
    structure = structural_diff(raw, canonicalize(raw))
    assert structure["unchanged"], structure["nodes"]


def test_diff_refuses_models_with_different_inputs(compiled):
    from qcompile.errors import UsageError

    other = io.Model.from_proto(make_model(
        [helper.make_node("Relu", ["z"], ["y"], name="r")],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], []))
    with pytest.raises(UsageError, match="different inputs"):
        numerical_diff(io.load(compiled["source"]), other, samples())


# ----------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------


def _odd_model() -> onnx.ModelProto:
    """A layer with outliers, a sparse one and one too small to quantize."""
    rng = np.random.default_rng(0)
    spiky = rng.standard_normal((64, 64)).astype(np.float32)
    spiky[3, 5] = 80.0
    sparse = rng.standard_normal((64, 64)).astype(np.float32)
    sparse[:, :16] = 0.0
    small = rng.standard_normal((64, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((spiky, "spiky"), (sparse, "sparse"), (small, "small"))]
    nodes = [helper.make_node("MatMul", ["x", "spiky"], ["a"], name="outlier_layer"),
             helper.make_node("MatMul", ["a", "sparse"], ["b"], name="sparse_layer"),
             helper.make_node("MatMul", ["b", "small"], ["y"], name="small_layer")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], inits)


def test_inspect_plain_model_shows_what_could_be_quantized_and_outliers():
    table = layer_table(io.Model.from_proto(_odd_model()))
    layers = table["layers"]
    assert list(layers) == ["outlier_layer", "sparse_layer", "small_layer"]
    assert layers["small_layer"]["shape"] == [8, 64] and layers["small_layer"]["params"] == 512
    assert layers["small_layer"]["quantizable"].startswith("no: 512 weights < min_size")
    assert layers["outlier_layer"]["quantizable"] == "yes" and layers["outlier_layer"]["outlier"]
    assert layers["outlier_layer"]["kurtosis"] > 100 and layers["outlier_layer"]["max_over_std"] > 50
    assert not layers["sparse_layer"]["outlier"] and layers["sparse_layer"]["sparsity"] == pytest.approx(0.25)
    assert table["outliers"] == ["outlier_layer"]
    assert layers["outlier_layer"]["bits"] == 32 and layers["outlier_layer"]["group_size"] is None
    assert sum(row["share"] for row in layers.values()) == pytest.approx(1.0)


def test_inspect_quantized_model_and_size_breakdown(compiled):
    model = io.load(compiled["dump"] / "01-quant.onnx")
    table = layer_table(model)
    fc1 = table["layers"]["fc1"]
    assert (fc1["op"], fc1["format"], fc1["bits"], fc1["group_size"], fc1["shape"]) == ("QMatMul", "int", 4, 32,
                                                                                        [128, 64])
    assert table["totals"]["quantized_layers"] == 4 and table["totals"]["weight_bytes"] == model.constant_bytes()
    sizes = size_breakdown(model)
    assert sum(sizes.values()) == model.constant_bytes()
    assert sizes["embeddings"] == table["layers"]["embed"]["bytes"] and sizes["packed"] > sizes["scales_zero_points"]


def test_short_names_drop_the_common_prefix_and_op():
    names = ["/enc/layer.0/query/MatMul", "/enc/layer.0/key/MatMul", "/enc/emb/Gather"]
    assert short_names(names) == {names[0]: "layer.0/query", names[1]: "layer.0/key", names[2]: "emb"}
    assert short_names(["fc1", "fc2"]) == {"fc1": "fc1", "fc2": "fc2"}


# ----------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------


def test_report_is_self_contained_with_plots(compiled):
    text = compiled["report"].read_text()
    assert text.count('src="data:image/png;base64,') == 3
    assert "http://" not in text and "https://" not in text and "<script" not in text
    for expected in ("Pass pipeline", "Bits and error per layer", "Size breakdown", "fc1", "MatMulNBits"):
        assert expected in text


def test_report_from_an_older_manifest_estimates_the_breakdown(compiled):
    manifest = json.loads(json.dumps(compiled["result"].manifest))
    exact = manifest["sizes"].pop("breakdown")
    del manifest["float_layers"], manifest["layer_order"]
    from qcompile.report import size_breakdown as manifest_breakdown

    assert manifest_breakdown(manifest)["after"] == exact["after"]  # packed bytes follow from shape and bits
    assert render_report(manifest).count("data:image/png;base64,") == 3


# ----------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------


def test_cli_compile_dump_report_then_diff_inspect_report(tmp_path, mlp_path):
    done = qcompile_cli(mlp_path, "--passes", "quant(bits=4)", "--calib", "random:8", "-o", "out",
                        "--dump-dir", "dump", "--report", "report.html", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    dumped = sorted((tmp_path / "dump").glob("*.onnx"))
    assert [p.name for p in dumped] == ["00-input.onnx", "01-quant.onnx"]
    assert (tmp_path / "report.html").read_text().count("data:image/png") == 3

    done = qcompile_cli("diff", mlp_path, dumped[-1], "--calib", "random:2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "MatMul -> QMatMul" in done.stdout and "fc1" in done.stdout and "quantized layers" in done.stdout
    assert "numerical diff" in done.stdout and "SQNR" in done.stdout
    done = qcompile_cli("diff", mlp_path, dumped[-1], "--json", cwd=tmp_path)
    quantized = {q["node"]: q for q in json.loads(done.stdout)["structural"]["quantized"]}
    assert quantized["fc1"]["bits"] == 4

    done = qcompile_cli("inspect", dumped[-1], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    fc1_line = next(line for line in done.stdout.splitlines() if "fc1" in line)
    assert "QMatMul" in fc1_line and " 4 " in fc1_line and " 32 " in fc1_line
    done = qcompile_cli("inspect", mlp_path, "--json")
    assert json.loads(done.stdout)["layers"]["fc1"]["quantizable"] == "yes"

    done = qcompile_cli("report", tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "out" / "report.html").exists(), done.stderr


def test_cli_explain_lists_skipped_layers_with_reasons(tmp_path, mlp_path):
    done = qcompile_cli(mlp_path, "--passes", "quant(skip=fc1)", "-o", tmp_path / "out", "--explain")
    assert done.returncode == 0, done.stderr
    assert "layers left alone" in done.stdout and "excluded by skip pattern 'fc1'" in done.stdout
    done = qcompile_cli(mlp_path, "--passes", "quant(skip=fc1)", "-o", tmp_path / "out", "--explain", "--json")
    assert json.loads(done.stdout)["skipped"] == [
        {"pass": "quant(skip=fc1)", "layer": "fc1", "reason": "excluded by skip pattern 'fc1'"}]


def test_cli_inspection_errors_are_one_line_exit_2(tmp_path, mlp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00" * 64)
    (tmp_path / "empty").mkdir()
    cases = [
        (["diff", mlp_path, tmp_path / "junk.onnx"], "not a valid ONNX model"),
        (["diff", tmp_path / "missing.onnx", mlp_path], "no such file"),
        (["diff", mlp_path, mlp_path, "--calib", "random:x"], "random:N"),
        (["inspect", tmp_path / "junk.onnx"], "not a valid ONNX model"),
        (["report", tmp_path / "empty"], "not a qcompile artifact"),
        ([mlp_path, "--dump-dir", mlp_path, "-o", tmp_path / "never"], "not a folder"),
    ]
    for args, message in cases:
        done = qcompile_cli(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (args, done.stderr)
        assert len(lines) == 1 and message in lines[0], (args, done.stderr)
    assert not (tmp_path / "never").exists()


def _layernorm_model() -> onnx.ModelProto:
    """LayerNormalization feeding two MatMuls: what fold's SmoothQuant migration rewrites."""
    rng = np.random.default_rng(0)
    f = np.float32
    inits = [numpy_helper.from_array(a, n) for a, n in (
        ((1 + rng.standard_normal(64) * 0.5).astype(f), "gamma"), (rng.standard_normal(64).astype(f), "beta"),
        ((rng.standard_normal((64, 64)) / 8).astype(f), "wq"), ((rng.standard_normal((64, 32)) / 8).astype(f), "wk"))]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="norm", axis=-1),
             helper.make_node("MatMul", ["n", "wq"], ["q"], name="query"),
             helper.make_node("MatMul", ["n", "wk"], ["k"], name="key")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                      [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["n", 64]),
                       helper.make_tensor_value_info("k", TensorProto.FLOAT, ["n", 32])], inits)


def test_dump_of_an_exact_then_a_lossy_pass(tmp_path):
    source = tmp_path / "ln.onnx"
    onnx.save(_layernorm_model(), source)
    dump = tmp_path / "dump"
    qcompile.compile(source, passes="fold,quant(bits=8)", output=tmp_path / "out", dump_dir=dump)
    names = sorted(p.name for p in dump.glob("*.onnx"))
    assert names == ["00-input.onnx", "01-fold.onnx", "02-quant.onnx"]
    fold = json.loads((dump / "01-fold.json").read_text())
    assert fold["record"]["exact"] and fold["record"]["changed"]
    replaced = {i["was"]: i for i in fold["diff"]["initializers"] if i["change"] == "replaced"}
    assert sorted(replaced) == ["beta", "gamma", "wk", "wq"]  # rescaled copies under new names
    assert replaced["wq"]["shape"] == replaced["wq"]["before"]["shape"] == [64, 64]
    assert {"cosine", "sqnr_db", "max_abs"} <= set(replaced["wq"]["error"])
    assert json.loads((dump / "02-quant.json").read_text())["diff"]["by_op"] == {"MatMul -> QMatMul": 2}

    before, after = io.load(dump / "00-input.onnx"), io.load(dump / "01-fold.onnx")
    feeds = {"x": np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)}
    numbers = numerical_diff(before, after, CalibrationSet(feeds, "test"))
    assert [row["tensor"] for row in numbers["outputs"]] in (["q", "k"], ["k", "q"])
    for row in numbers["outputs"]:
        assert row["sqnr_db"] > 90 and row["max_abs"] < 1e-4  # exact up to float round-off
