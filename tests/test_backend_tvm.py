"""The TVM backend: parity with the IR's ONNX Runtime reference, artifacts, targets, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import cnn_feeds, cnn_model, make_model, mlp_feeds, mlp_model
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile import api
from qcompile.backends import tvm as tvm_backend
from qcompile.cli import main
from qcompile.errors import BackendError, CalibrationError, UnsupportedModelError, UsageError
from qcompile.ir import io
from qcompile.ir.runtime import make_session

pytest.importorskip("tvm")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA artifacts are built with nvcc")


def _compile(tmp_path, proto, spec, shapes, **kwargs):
    """Compile with the TVM backend; also return the IR after the passes (an ONNX file ORT runs)."""
    result = qcompile.compile(proto, passes=spec, backend="tvm", input_shapes=shapes, output=tmp_path / "out",
                              dump_dir=tmp_path / "dump", **kwargs)
    final = sorted((tmp_path / "dump").glob("0*.onnx"))[-1]
    return result, io.load(final)


def _reference(ir_model, feeds):
    session = make_session(ir_model)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


@pytest.mark.parametrize("bits, group_size, sym, batch", [
    (2, 32, False, 3),   # GEMM kernel (12 activation rows)
    (3, 0, False, 3),    # per channel, codes straddling bytes
    (4, 32, True, 1),    # GEMV kernel (4 rows), symmetric
    (8, 0, False, 1),
    (3, 16, True, 1),
])
def test_parity_with_ir_reference(tmp_path, bits, group_size, sym, batch):
    spec = f"quant(bits={bits},group_size={group_size},sym={str(sym).lower()},min_size=0)"
    feeds = mlp_feeds(batch, seed=bits)
    result, ir_model = _compile(tmp_path, mlp_model(), spec, {"ids": (batch, 4)},
                                calib={"ids": mlp_feeds(2 * batch, seed=7)["ids"]}, accuracy_level=0)
    layers = result.manifest["layers"]
    assert layers["fc1"]["kernel"].startswith("tvm decode-fused " + ("GEMV" if batch == 1 else "GEMM"))
    assert layers["embed"]["kernel"].startswith("tvm decode-fused gather")
    vs_ir = result.manifest["errors"]["artifact_vs_ir"]["y"]
    assert vs_ir["cosine"] > 0.99999
    got = qcompile.load(result.path).run(feeds)["y"]
    want = _reference(ir_model, feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # the packed bytes stay packed: params hold uint8 codes, no float copy of any weight matrix
    params = np.load(result.path / "params.npz")
    packed = [params[name] for name in params.files if params[name].dtype == np.uint8]
    assert packed and all(p.size * 8 // bits <= 200 * 64 * 2 for p in packed)


@pytest.mark.parametrize("bits, batch", [(2, 1), (3, 1), (4, 1), (8, 1), (4, 3)])
def test_int8_activation_kernels(tmp_path, bits, batch):
    """accuracy_level=4: QMatMul layers quantize activations to int8 (VNNI), like MatMulNBits."""
    if not tvm_backend.has_vnni(tvm_backend._llvm_target("cpu")):
        pytest.skip("this CPU has no AVX-512 VNNI")
    feeds = mlp_feeds(batch, seed=bits)
    result, ir_model = _compile(tmp_path, mlp_model(), f"quant(bits={bits},min_size=0)", {"ids": (batch, 4)},
                                calib={"ids": mlp_feeds(2, seed=7)["ids"]}, accuracy_level=4)
    layers = result.manifest["layers"]
    kind = "GEMV" if batch == 1 else "GEMM"
    assert layers["fc1"]["kernel"] == f"tvm decode-fused {kind} int{bits} (cpu, int8 activations, VNNI)"
    assert "VNNI" not in layers["fc2"]["kernel"]  # 96 output rows: not whole 64-row blocks
    got = qcompile.load(result.path).run(feeds)["y"]
    want = _reference(ir_model, feeds)["y"]
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert 0.999 < cosine and not np.array_equal(got, want)


def test_conv_model_parity(tmp_path):
    feeds = cnn_feeds(2)
    result, ir_model = _compile(tmp_path, cnn_model(), "quant(bits=4,min_size=0)", {"x": (2, 3, 16, 16)},
                                calib={"x": cnn_feeds(4, seed=3)["x"]})
    assert result.manifest["layers"]["conv1"]["kernel"].startswith("tvm decode int4 + conv2d")
    got = qcompile.load(result.path).run(feeds)["y"]
    np.testing.assert_allclose(got, _reference(ir_model, feeds)["y"], rtol=1e-4, atol=1e-4)


def test_artifact_round_trip_and_cli_run(tmp_path, capsys):
    result, _ = _compile(tmp_path, mlp_model(), "quant(bits=4,min_size=0)", {"ids": (2, 4)})
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["backend"]["backend"] == "tvm" and manifest["backend"]["input_shapes"] == {"ids": [2, 4]}
    assert sorted(p.name for p in result.path.iterdir()) == ["manifest.json", "model.so", "params.npz"]
    artifact = qcompile.load(result.path)
    assert artifact.input_names == ["ids"] and artifact.output_names == ["y"]
    feeds = mlp_feeds(2)
    first = artifact.run(feeds)["y"]
    np.savez(tmp_path / "x.npz", **feeds)
    assert main(["run", str(result.path), "--inputs", str(tmp_path / "x.npz"), "--output",
                 str(tmp_path / "y.npz"), "--quiet"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npz")["y"], first)
    with pytest.raises(CalibrationError, match="missing: ids"):
        artifact.run({"x": feeds["ids"]})
    with pytest.raises(CalibrationError):
        artifact.run({"ids": mlp_feeds(3)["ids"]})  # the artifact is compiled for batch 2


def test_an_artifact_rebuilt_in_the_same_folder_runs_the_new_build(tmp_path):
    """The dynamic loader would hand back the library already loaded from that path."""
    feeds = mlp_feeds(2)
    outputs = []
    for seed in (0, 1):
        result = qcompile.compile(mlp_model(seed=seed), passes="quant(bits=8,min_size=0)", backend="tvm",
                                  input_shapes={"ids": (2, 4)}, output=tmp_path / "same")
        outputs.append(qcompile.load(result.path).run(feeds)["y"])
        expected = make_session(mlp_model(seed=seed)).run(None, feeds)[0]
        np.testing.assert_allclose(outputs[-1], expected, rtol=0.05, atol=0.05 * np.abs(expected).max())
    assert not np.allclose(outputs[0], outputs[1])


def test_an_artifact_runs_with_tvm_runtime_only(tmp_path):
    """A deployment needs TVM's runtime library, not its 260 MB compiler (TVM_USE_RUNTIME_LIB=1
    loads only libtvm_runtime; `tvm.relax` cannot be imported then)."""
    import os
    import subprocess
    import sys

    result = qcompile.compile(mlp_model(), passes="quant(bits=4,min_size=0)", backend="tvm",
                              input_shapes={"ids": (2, 4)}, output=tmp_path / "out")
    np.save(tmp_path / "ids.npy", mlp_feeds(2)["ids"])
    script = (
        "import sys, numpy as np, tvm.base, qcompile\n"
        "assert tvm.base._RUNTIME_ONLY and 'tvm_compiler' not in tvm.base._LOADED_LIBS\n"
        f"y = qcompile.load({str(result.path)!r}).run({{'ids': np.load({str(tmp_path / 'ids.npy')!r})}})['y']\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y)\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = qcompile.load(result.path).run(mlp_feeds(2))["y"]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)


@needs_nvcc
def test_cuda_build_without_gpu(tmp_path):
    result, _ = _compile(tmp_path, mlp_model(), "quant(bits=3,min_size=0)", {"ids": (1, 4)}, target="cuda",
                         arch="sm_80,sm_90")
    backend = result.manifest["backend"]
    assert backend["libraries"] == {"sm_80": "model.sm_80.so", "sm_90": "model.sm_90.so"}
    assert all((result.path / name).stat().st_size > 0 for name in backend["libraries"].values())
    assert "not measured" in result.manifest["errors"]["note"]
    import tvm

    if not tvm.cuda(0).exist:
        with pytest.raises(BackendError, match="no CUDA GPU"):
            qcompile.load(result.path)
    else:
        out = qcompile.load(result.path).run(mlp_feeds(1))["y"]
        assert out.shape == (4, 48)


@needs_nvcc
@pytest.mark.parametrize("bits", [3, 4])
def test_cuda_build_of_a_gemv(tmp_path, bits):
    """One activation row: dlight's GEMV rule raises on some decode blocks; the build goes on."""
    rng = np.random.default_rng(0)
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])],
        [numpy_helper.from_array(rng.standard_normal((256, 128)).astype(np.float32), "w")],
    )
    result = qcompile.compile(proto, passes=f"quant(bits={bits})", backend="tvm", target="cuda", arch="sm_90",
                              output=tmp_path / "out")
    assert (result.path / "model.sm_90.so").stat().st_size > 0


def test_arm64_build_is_aarch64(tmp_path):
    result, _ = _compile(tmp_path, mlp_model(), "quant(bits=4,min_size=0)", {"ids": (1, 4)}, target="arm64")
    library = result.path / result.manifest["backend"]["libraries"]["cpu"]
    if library.suffix == ".so":
        header = library.read_bytes()[:20]
        assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    else:
        assert library.suffix == ".tar"  # no cross compiler: objects to link on the device
    with pytest.raises(BackendError, match="aarch64"):
        qcompile.load(result.path)


def test_auto_backend_table(monkeypatch):
    from qcompile.ir.canonicalize import canonicalize
    from qcompile.ir.model import Model
    from qcompile.passes.calibration import random_calibration
    from qcompile.passes.context import PassContext, Progress
    from qcompile.passes.manager import PassManager
    from qcompile.passes.registry import parse_pipeline

    model = canonicalize(Model.from_proto(mlp_model()))
    assert api.choose_backend("auto", "cpu", model) == "ort"
    assert api.choose_backend("auto", "arm64", model) == "tvm"
    assert api.choose_backend("ort", "cpu", model) == "ort"
    monkeypatch.setitem(api.FORMAT_BACKENDS, "int", "tvm")  # what adding `"bcq": "tvm"` does for bcq
    ctx = PassContext(calib=None, target="cpu", seed=0, progress=Progress(),
                      synthetic_calib=random_calibration(model, 4, seed=0))
    compiled, _ = PassManager(parse_pipeline("quant(min_size=0)"), eval_samples=random_calibration(model, 2)).run(
        model, ctx)
    assert api.choose_backend("auto", "cpu", compiled) == "tvm"
    assert api.choose_backend("auto", "edge", compiled) == "ort"  # TVM has no edge target


def test_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), path)
    assert main([str(path), "--backend", "tvm", "-o", str(tmp_path / "a")]) == 2
    assert "dynamic shape; pass --input-shape ids=" in capsys.readouterr().err
    assert main([str(path), "--backend", "tvm", "--target", "edge"]) == 2
    assert main([str(path), "--backend", "tvm", "--target", "cuda", "--arch", "80"]) == 2
    err = capsys.readouterr().err
    assert "expected one of cpu, arm64, cuda" in err and "--arch '80'" in err
    assert not (tmp_path / "a").exists()
    with pytest.raises(UsageError):
        tvm_backend.parse_arch("sm80")


def test_unsupported_op_is_reported(tmp_path):
    rng = np.random.default_rng(0)
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Celu", ["h"], ["y"], name="act")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")],
    )
    with pytest.raises(UnsupportedModelError, match="does not support Celu"):
        qcompile.compile(proto, passes="quant(min_size=0)", backend="tvm", output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.heavy
def test_minilm_tvm_matches_ort_artifact(tmp_path):
    from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize
    from qcompile.frontends.text import english_sentences

    folder = minilm_path()
    feeds = tokenize(folder, english_sentences(16, "eval"), max_length=64)
    calib = tokenize(folder, english_sentences(16, "calib"), max_length=64)
    shapes = {name: (8, 64) for name in feeds}
    ort_result = qcompile.compile(cached_minilm_onnx(), passes="quant(bits=4)", calib=calib,
                                  output=tmp_path / "ort")
    tvm_result = qcompile.compile(cached_minilm_onnx(), passes="quant(bits=4)", calib=calib, backend="tvm",
                                  input_shapes=shapes, output=tmp_path / "tvm")
    assert all("VNNI" in layer["kernel"] or layer["op"] == "QGather"
               for layer in tvm_result.manifest["layers"].values()) or not tvm_result.manifest["backend"]["int8_activations"]
    ort_artifact, tvm_artifact = qcompile.load(ort_result.path), qcompile.load(tvm_result.path)
    batch = {k: v[:8] for k, v in feeds.items()}
    ours = tvm_artifact.run(batch)["last_hidden_state"].reshape(-1, 384)
    theirs = ort_artifact.run(batch)["last_hidden_state"].reshape(-1, 384)
    token_cosine = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    assert token_cosine.min() > 0.99  # both quantize activations to int8, each its own way
    vs_fp32 = {"tvm": tvm_result.manifest["errors"]["artifact_vs_fp32"]["last_hidden_state"]["cosine"],
               "ort": ort_result.manifest["errors"]["artifact_vs_fp32"]["last_hidden_state"]["cosine"]}
    assert abs(vs_fp32["tvm"] - vs_fp32["ort"]) < 0.002


# ----------------------------------------------------------------------------------
# bcq (shiftadd)
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, layout, batch", [
    (3, "column", 1),  # GEMV kernels (4 activation rows)
    (2, "block", 1),
    (2, "column", 3),  # GEMM kernel (12 rows)
    (3, "block", 3),
    (3, "row", 1),  # alphas per output row and 32 input columns
    (2, "row", 3),
])
def test_bcq_parity_with_ir_reference(tmp_path, bits, layout, batch):
    """The float32-activation kernels (``accuracy_level`` below 4) are exact."""
    spec = f"shiftadd(bits={bits},layout={layout},min_size=0,table_group=32,outliers=0)"
    feeds = mlp_feeds(batch, seed=bits)
    result, ir_model = _compile(tmp_path, mlp_model(), spec, {"ids": (batch, 4)},
                                calib={"ids": mlp_feeds(8, seed=7)["ids"]}, accuracy_level=0)
    layers = result.manifest["layers"]
    kind = "GEMV" if batch == 1 and layout != "row" else "GEMM"  # row-wise alphas: float tiles (VNNI rows at level 4)
    assert layers["fc1"]["kernel"] == f"tvm decode-fused {kind} bcq{bits} {layout} (cpu, 64 lanes)"
    assert layers["fc2"]["kernel"].startswith(f"tvm decode-fused {kind} bcq{bits}")
    assert layers["embed"]["kernel"] == f"tvm decode-fused gather bcq{bits}"
    got = qcompile.load(result.path).run(feeds)["y"]
    want = _reference(ir_model, feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    params = np.load(result.path / "params.npz")  # planes stay packed, alphas stay int8 exponent codes
    assert {str(params[name].dtype) for name in params.files} == {"uint8", "int8"}
    assert api.choose_backend("auto", "cpu", ir_model) == "tvm"  # ONNX Runtime only has the reference function


@pytest.mark.parametrize("bits, layout, batch", [
    (3, "column", 1),  # GEMV kernel + corrections
    (2, "block", 3),  # GEMM kernel + corrections
])
def test_bcq_outliers_parity_with_ir_reference(tmp_path, bits, layout, batch):
    """``shiftadd``'s default sparse corrections (format bcq_outliers) run in TVM: the bcq
    kernels plus the corrections, for MatMul, Gemm and the embedding gather."""
    spec = f"shiftadd(bits={bits},layout={layout},min_size=0,table_group=32,outliers=0.05)"
    feeds = mlp_feeds(batch, seed=bits)
    result, ir_model = _compile(tmp_path, mlp_model(), spec, {"ids": (batch, 4)},
                                calib={"ids": mlp_feeds(8, seed=7)["ids"]}, accuracy_level=0)
    assert {n.attrs["format"] for n in ir_model.quantized_nodes()} == {"bcq_outliers"}
    layers = result.manifest["layers"]
    assert layers["fc1"]["kernel"].endswith("sparse corrections per row")
    assert layers["embed"]["kernel"] == f"tvm decode-fused gather bcq{bits} + sparse corrections"
    got = qcompile.load(result.path).run(feeds)["y"]
    want = _reference(ir_model, feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    plain = qcompile.compile(mlp_model(), passes=spec.replace("0.05", "0"), backend="ort",
                             calib={"ids": mlp_feeds(8, seed=7)["ids"]}, output=tmp_path / "plain")
    assert not np.allclose(qcompile.load(plain.path).run(feeds)["y"], want)  # the corrections are applied
    assert api.choose_backend("auto", "cpu", ir_model) == "tvm"
    assert api.choose_backend("auto", "cuda", ir_model) == "ort"  # no GPU kernel for the corrections
    with pytest.raises(UnsupportedModelError, match="'bcq_outliers' has no GPU kernel yet") as info:
        qcompile.compile(mlp_model(), passes=spec, backend="tvm", target="cuda", input_shapes={"ids": (batch, 4)},
                         calib={"ids": mlp_feeds(8, seed=7)["ids"]}, output=tmp_path / "cuda")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bits, layout, batch, outliers", [
    (3, "column", 1, 0), (2, "block", 1, 0), (3, "column", 1, 0.05), (3, "row", 1, 0)])
def test_bcq_int8_activation_kernel(tmp_path, bits, layout, batch, outliers):
    """At ``accuracy_level=4`` (the default) on AVX-512 VNNI CPUs, bcq GEMV layers take int8
    activations: shifted by the alphas, quantized per 32 columns, summed by ``vpdpbusd``
    (GEMM rows keep the float-tile kernel, which measured faster)."""
    if not tvm_backend.has_vnni(tvm_backend._llvm_target("cpu")):
        pytest.skip("this CPU has no AVX-512 VNNI")
    spec = f"shiftadd(bits={bits},layout={layout},min_size=0,table_group=32,outliers={outliers})"
    feeds = mlp_feeds(batch, seed=bits)
    result, ir_model = _compile(tmp_path, mlp_model(), spec, {"ids": (batch, 4)},
                                calib={"ids": mlp_feeds(8, seed=7)["ids"]})
    assert result.manifest["layers"]["fc1"]["kernel"].startswith(
        f"tvm decode-fused GEMV int8 activations, VNNI bcq{bits} {layout}")
    gemm, _ = _compile(tmp_path / "gemm", mlp_model(), spec, {"ids": (3, 4)}, calib={"ids": mlp_feeds(8, seed=7)["ids"]})
    assert gemm.manifest["layers"]["fc1"]["kernel"].startswith(f"tvm decode-fused GEMM bcq{bits}")  # float tiles
    got = qcompile.load(result.path).run(feeds)["y"]
    want = _reference(ir_model, feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=0.03, atol=0.03 * np.abs(want).max())
    assert np.abs(got - want).max() > 1e-6 * np.abs(want).max()  # not the float kernels


def _random_bcq(rng, rows, cols, bits, row_group, col_group, terms=3):
    from qcompile.ir.bcq import encode_terms, from_signs

    shape = (-(-rows // row_group), -(-cols // col_group), bits, terms)
    signs = rng.choice([-1, 0, 1], shape)
    signs[..., 0] = 1
    return from_signs(rng.random((rows, bits, cols)) > 0.5, encode_terms(signs, rng.integers(-9, -2, shape)),
                      row_group, col_group)


@pytest.mark.parametrize("rows_in, rows, cols, bits, row_group, col_group, gemv, gather", [
    (1, 256, 72, 3, 128, 1, "plain", False),   # column layout, columns padded to 72 -> 72
    (1, 256, 64, 2, 128, 8, "plain", False),   # block layout
    (1, 256, 64, 3, 128, 1, "lut", True),      # lookup tables, AVX-512 gathers
    (2, 128, 40, 2, 128, 8, "lut", False),     # lookup tables, scalar look-ups
    (4, 100, 64, 2, 1, 16, "plain", False),    # row-wise alphas: per-lane alphas, GEMM kernel
    (7, 96, 70, 4, 96, 1, "plain", False),     # GEMM, 32 lanes, odd widths
    (1, 256, 96, 3, 128, 1, "vnni", False),    # int8 activations: column layout
    (3, 192, 64, 2, 64, 8, "vnni", False),     # ... block layout, three rows
    (2, 100, 64, 4, 100, 64, "vnni", False),   # ... one alpha row group, rows padded to 128
    (1, 256, 64, 3, 1, 32, "vnni", False),     # ... row-wise alphas (a tied LM head)
    (3, 100, 128, 4, 1, 64, "vnni", False),    # ... row-wise, two words per alpha, rows padded
])
def test_bcq_cpu_kernels(rows_in, rows, cols, bits, row_group, col_group, gemv, gather):
    """Each CPU kernel against the dequantized weight (random codes: every alpha term sign and
    exponent); the int8-activation kernel within its activation rounding."""
    import tvm

    from qcompile.backends import tvm_bcq

    if (gather or gemv == "vnni") and not tvm_backend.has_feature("avx512f", tvm_backend._llvm_target("cpu")):
        pytest.skip("this CPU has no AVX-512")
    if gemv == "vnni" and not tvm_backend.has_vnni(tvm_backend._llvm_target("cpu")):
        pytest.skip("this CPU has no AVX-512 VNNI")
    rng = np.random.default_rng(rows + cols)
    weight = _random_bcq(rng, rows, cols, bits, row_group, col_group)
    layout = tvm_bcq.vnni_layout(weight) if gemv == "vnni" else tvm_bcq.cpu_layout(weight)
    gemv = "plain" if gemv == "vnni" else gemv
    func = tvm_bcq.qmatmul_cpu(rows_in, layout, gemv, gather)
    module = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                         target=tvm_backend._llvm_target("cpu"))
    x = rng.standard_normal((rows_in, cols)).astype(np.float32)
    padded = np.zeros((rows_in, layout.padded_cols), np.float32)
    padded[:, :cols] = x
    args = [tvm.runtime.tensor(a) for a in (padded, *layout.arrays(), np.zeros((rows_in, layout.padded_rows),
                                                                              np.float32))]
    module["main"](*args)
    want = x @ weight.dequantize().T
    tolerance = 2e-2 if isinstance(layout, tvm_bcq.BcqVnniLayout) else 1e-5
    np.testing.assert_allclose(args[-1].numpy()[:, :rows], want, rtol=tolerance, atol=tolerance * np.abs(want).max())


@needs_nvcc
@pytest.mark.parametrize("layout", ["column", "block"])
def test_cuda_build_of_bcq(tmp_path, layout):
    result, _ = _compile(tmp_path, mlp_model(), f"shiftadd(bits=3,layout={layout},min_size=0,outliers=0)", {"ids": (1, 4)},
                         calib={"ids": mlp_feeds(8, seed=7)["ids"]}, target="cuda", arch="sm_90")
    assert (result.path / "model.sm_90.so").stat().st_size > 0
    assert result.manifest["layers"]["fc1"]["kernel"] == f"tvm decode-fused matmul bcq3 {layout} (dlight)"


@pytest.mark.parametrize("fmt", ["int3", "bcq3-column", "bcq2-block"])
def test_gpu_gemv_rule_applies(fmt):
    """dlight's GEMV rule schedules the 1-row CUDA kernels (its fallback is one thread per
    output row with a serial loop over K: what made int3 ~100x slower than int4 on an H200)."""
    from tvm import te
    from tvm.s_tir import dlight as dl

    from qcompile.backends import tvm_bcq, tvm_kernels

    rows = cols = 256
    x = te.placeholder((1, cols), "float32", "x")
    if fmt == "int3":
        arrays = [te.placeholder((rows, cols // 4), "uint8", "lo"), te.placeholder((rows, cols // 8), "uint8", "hi"),
                  te.placeholder((rows, cols // 32), "float16", "s"), te.placeholder((rows, cols // 32), "uint8", "z")]
        out = tvm_kernels.qmatmul3_te(x, *arrays, 32, cols)
    else:
        bits, col_group = (3, 1) if fmt.endswith("column") else (2, 8)
        arrays = [te.placeholder((rows, cols // 8), "uint8", f"p{q}") for q in range(bits)]
        arrays += [te.placeholder((rows // 128, cols // col_group), "int8", f"a{n}") for n in range(bits * 3)]
        out = tvm_bcq.qmatmul_split_te(x, *arrays, bits=bits, row_group=128, col_group=col_group, cols=cols)
    func = te.create_prim_func([x, *arrays, out])
    target = tvm_backend._cuda_target("sm_90")
    with target:
        scheduled = dl.gpu.GEMV().apply(func, target, False)
    assert scheduled is not None


def _tied_model(vocab: int, hidden: int = 64) -> onnx.ModelProto:
    """ids -> Gather(table) -> Relu -> MatMul(table^T): an embedding tied to its LM head
    (the gathered rows are an output too)."""
    table = np.random.default_rng(4).standard_normal((vocab, hidden)).astype(np.float32)
    return make_model(
        [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
         helper.make_node("Relu", ["e"], ["h"], name="act"),
         helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="head")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4, hidden]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, vocab])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.ascontiguousarray(table.T), "table_t")])


@pytest.mark.parametrize("vocab, bits, accuracy_level, target, layout", [
    (256, 4, 4, "cpu", "int8 activations"),  # the VNNI word-major layout where AVX-512 VNNI is there
    (256, 3, 4, "cpu", "int8 activations"),  # ... 3 bits: the 2-bit plane, then the 1-bit plane
    (200, 4, 0, "cpu", "8 lanes"),           # float activations: [rows / lanes, bytes, lanes]
    (200, 3, 0, "cpu", "8 lanes"),           # ... codes straddling bytes
    pytest.param(256, 4, 0, "cuda", "dlight", marks=needs_nvcc),  # the packed arrays as stored
])
def test_a_tied_table_is_stored_once(tmp_path, vocab, bits, accuracy_level, target, layout):
    """The gather decodes its rows from the LM head's kernel arrays (SmolLM2: 15 MB saved)."""
    from qcompile.backends import tvm_kernels

    spec = f"quant(bits={bits},group_size=32,min_size=0,embedding_bits={bits})"
    result, ir_model = _compile(tmp_path, _tied_model(vocab), spec, {"ids": (1, 4)}, target=target,
                                accuracy_level=accuracy_level, calib={"ids": np.arange(16).reshape(4, 4)})
    kernels = result.manifest["layers"]
    assert "tied table stored once" in kernels["embed"]["kernel"]
    if target == "cpu" and not (accuracy_level == 4 and not tvm_kernels.vnni_eligible(
            qcompile.ir.qops.read_weight(next(n for n in ir_model.quantized_nodes() if n.op == "QMatMul")))):
        assert layout in kernels["head"]["kernel"]
    params = np.load(result.path / "params.npz")
    packed = [params[name] for name in params.files if params[name].dtype == np.uint8 and params[name].size >= vocab * 8]
    assert sum(a.nbytes for a in packed) == vocab * 64 * bits // 8  # one copy of the codes
    if target == "cuda":
        return
    ids = np.array([[0, 5, vocab - 1, -1]], np.int64)
    got = qcompile.load(result.path).run({"ids": ids})
    want = _reference(ir_model, {"ids": ids})
    np.testing.assert_allclose(got["e"], want["e"], rtol=1e-6, atol=1e-6)  # the rows decoded exactly
    tolerance = 1e-2 if accuracy_level == 4 else 1e-4  # int8 activations in the head's GEMV
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=tolerance,
                               atol=tolerance * np.abs(want["logits"]).max())


@pytest.mark.parametrize("outliers, accuracy_level", [(0, 0), (0.05, 0), (0.05, 4)])
def test_a_tied_bcq_table_is_stored_once(tmp_path, outliers, accuracy_level):
    """shiftadd's tied table: the gather decodes rows exactly from the LM head's arrays (and
    its sparse corrections): the float lanes layout, or the row-wise int8-activation one."""
    spec = f"shiftadd(bits=3,min_size=0,outliers={outliers},embedding_bits=3)"
    result, ir_model = _compile(tmp_path, _tied_model(256), spec, {"ids": (1, 4)}, accuracy_level=accuracy_level,
                                calib={"ids": np.arange(16).reshape(4, 4)})
    kernels = result.manifest["layers"]
    assert "tied table stored once" in kernels["embed"]["kernel"]
    vnni = accuracy_level == 4 and tvm_backend.has_vnni(tvm_backend._llvm_target("cpu"))
    assert ("int8 activations, VNNI" in kernels["head"]["kernel"]) == vnni
    params = np.load(result.path / "params.npz")
    planes = [name for name in params.files if params[name].dtype == np.uint8]
    assert sum(params[name].nbytes for name in planes) == 256 * 3 * 64 // 8  # one copy of the planes
    ids = np.array([[0, 5, 255, -1]], np.int64)
    got = qcompile.load(result.path).run({"ids": ids})
    want = _reference(ir_model, {"ids": ids})
    np.testing.assert_allclose(got["e"], want["e"], rtol=1e-6, atol=1e-6)
    tolerance = 2e-2 if vnni else 1e-4
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=tolerance,
                               atol=tolerance * np.abs(want["logits"]).max())


@pytest.mark.parametrize("kind", ["rmsnorm", "softmax", "layernorm"])
def test_one_row_reductions_are_computed_once(tmp_path, kind):
    """A decode step's normalizations and softmax have one row: no loop nest may run the
    reduction once per output element (dlight's cpu.Reduction did: D^2 work per row)."""
    import tvm

    width = 576
    row = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, width])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, width])
    constants = [numpy_helper.from_array(np.array([-1], np.int64), "axes"),
                 numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
                 numpy_helper.from_array(np.linspace(0.5, 1.5, width).astype(np.float32), "g"),
                 numpy_helper.from_array(np.zeros(width, np.float32), "b")]
    nodes = {
        "rmsnorm": [helper.make_node("Mul", ["x", "x"], ["p"]),
                    helper.make_node("ReduceMean", ["p", "axes"], ["m"], keepdims=1),
                    helper.make_node("Add", ["m", "eps"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"]),
                    helper.make_node("Div", ["x", "s"], ["n"]), helper.make_node("Mul", ["n", "g"], ["y"])],
        "softmax": [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
        "layernorm": [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)],
    }[kind]
    used = {name for node in nodes for name in node.input}
    proto = make_model(nodes, [row], [out], [c for c in constants if c.name in used], opset=18)
    from qcompile.backends import tvm_import
    from qcompile.ir.model import Model

    lowered = tvm_backend._lower(tvm_import.to_relax(Model.from_proto(proto), cpu=True).module,
                                 tvm_backend._llvm_target("cpu"), cpu=True)
    for _, func in lowered.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            sch = tvm.s_tir.Schedule(func)
            for block in sch.get_child_blocks(sch.get_sblock("root")):
                work = int(np.prod([int(sch.get(loop).extent) for loop in sch.get_loops(block)]))
                assert work <= width, (kind, sch.get(block).name_hint, work)
    result = qcompile.compile(proto, passes="fold(smooth=false)", backend="tvm", input_shapes={"x": (1, 1, width)},
                              output=tmp_path / "out")
    x = np.random.default_rng(0).standard_normal((1, 1, width)).astype(np.float32)
    np.testing.assert_allclose(qcompile.load(result.path).run({"x": x})["y"], make_session(proto).run(None, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_outputs_are_the_callers_own_arrays(tmp_path):
    """CPU inputs and outputs cross without copies; an output that is an input is still copied,
    and a later run does not overwrite an earlier run's outputs."""
    proto = make_model([helper.make_node("Identity", ["x"], ["same"]), helper.make_node("Add", ["x", "x"], ["twice"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                       [helper.make_tensor_value_info("same", TensorProto.FLOAT, [2, 64]),
                        helper.make_tensor_value_info("twice", TensorProto.FLOAT, [2, 64])], [])
    result = qcompile.compile(proto, passes="fold(smooth=false)", backend="tvm", input_shapes={"x": (2, 64)},
                              output=tmp_path / "out")
    artifact = qcompile.load(result.path)
    x = np.ones((2, 64), np.float32)
    first = artifact.run({"x": x})
    first["same"][0, 0] = 5
    assert x[0, 0] == 1
    second = artifact.run({"x": 3 * x})
    np.testing.assert_array_equal(first["twice"], 2 * x)
    np.testing.assert_array_equal(second["twice"], 6 * x)


@pytest.mark.parametrize("preset, expected", [({}, "affinity"), ({"TVM_NUM_THREADS": "1"}, "1"),
                                              ({"OMP_NUM_THREADS": "1"}, None)])
def test_loading_sizes_the_thread_pool_unless_the_user_did(tmp_path, preset, expected):
    """Without TVM_NUM_THREADS / OMP_NUM_THREADS, TVM reads /sys/devices/system/cpu/online at
    every parallel launch (half of an LLM decode step): loading an artifact sets the count."""
    import os
    import subprocess
    import sys

    result = qcompile.compile(mlp_model(), passes="quant(bits=4,min_size=0)", backend="tvm",
                              input_shapes={"ids": (2, 4)}, output=tmp_path / "out")
    script = (f"import os, qcompile\nqcompile.load({str(result.path)!r})\n"
              "print(os.environ.get('TVM_NUM_THREADS'), len(os.sched_getaffinity(0)))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", script], env={**env, **preset}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    value, affinity = done.stdout.split()
    assert value == {"affinity": affinity, None: "None"}.get(expected, expected)
