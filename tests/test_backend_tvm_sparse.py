"""The TVM backend on sparse ``int`` weights (``int.nm``, ``int.bitmask``): kernels and parity with the IR."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import mlp_feeds, mlp_model

import qcompile
from qcompile.backends import tvm as tvm_backend
from qcompile.ir import io, qops
from qcompile.ir.runtime import make_session
from qcompile.passes.sparsequant import quantize_sparse

pytest.importorskip("tvm")


def _compile(tmp_path, spec, batch, **kwargs):
    result = qcompile.compile(mlp_model(), passes=spec, backend="tvm", input_shapes={"ids": (batch, 4)},
                              output=tmp_path / "out", dump_dir=tmp_path / "dump",
                              calib={"ids": mlp_feeds(8, seed=7)["ids"]}, **kwargs)
    return result, io.load(sorted((tmp_path / "dump").glob("0*.onnx"))[-1])


@pytest.mark.parametrize("prune, bits, batch, kernel", [
    ("pattern=2:4", 4, 1, "tvm sparse GEMV 2:4 int4"),     # 4 activation rows (vpermilps on AVX-512)
    ("pattern=2:4", 3, 3, "tvm sparse GEMM 2:4 int3"),     # 12 rows: tile decode
    ("sparsity=0.5", 4, 3, "tvm sparse GEMM bitmask int4"),
    ("sparsity=0.5", 3, 3, "tvm sparse GEMM bitmask int3"),
    ("sparsity=0.5", 4, 1, "tvm sparse GEMV bitmask int4"),  # one row per task (AVX-512) or 16 lanes
    ("sparsity=0.5", 3, 1, "tvm sparse GEMV bitmask int3 (cpu, "),  # 3 bits: the lanes kernel
])
def test_sparse_parity_with_ir_reference(tmp_path, prune, bits, batch, kernel):
    spec = f"prune(method=wanda,{prune},min_size=0),quant(bits={bits},group_size=32,min_size=0)"
    result, ir_model = _compile(tmp_path, spec, batch)
    sparse = {node.name: qops.format_name(node) for node in ir_model.quantized_nodes() if node.attrs.get("sparse")}
    assert set(sparse) >= {"fc1", "fc2", "fc3"}
    layers = result.manifest["layers"]
    for name in sparse:
        assert layers[name]["kernel"].startswith(kernel), layers[name]["kernel"]
        if tvm_backend.has_feature("avx512f", tvm_backend._llvm_target("cpu")):
            if kernel == "tvm sparse GEMV bitmask int4":
                assert layers[name]["kernel"].endswith("(cpu, one row per task, vcompressps)")
            if kernel == "tvm sparse GEMV 2:4 int4":
                assert layers[name]["kernel"].endswith(" lanes, vpermilps)")
    feeds = mlp_feeds(batch, seed=bits)
    got = qcompile.load(result.path).run(feeds)["y"]
    session = make_session(ir_model)
    want = session.run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    params = np.load(result.path / "params.npz")  # the compact codes and metadata, no float weight matrix
    assert all(params[name].dtype != np.float32 or params[name].ndim < 2 for name in params.files)


def _sparse_weight(rng, rows, cols, bits, pattern, group_size):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if pattern == "bitmask":
        w[rng.random((rows, cols)) < 0.5] = 0
        w[: rows // 3, : cols // 2] = 0  # whole zero tiles: the skipped blocks
    else:
        n, m = (int(v) for v in pattern.split(":"))
        runs = np.abs(w).reshape(rows, -1, m)
        np.put_along_axis(runs, np.argsort(runs, -1)[..., : m - n], 0, -1)
        w = (np.sign(w).reshape(rows, -1, m) * runs).reshape(rows, cols)
    weight = quantize_sparse(w, bits=bits, group_size=group_size)
    expected = "bitmask" if pattern == "bitmask" else "nm"
    assert weight.layout == expected and (expected == "bitmask" or weight.pattern == pattern)
    return weight


@pytest.mark.parametrize("avx512", [False, True])
@pytest.mark.parametrize("rows_in, rows, cols, bits, pattern, group_size", [
    (1, 96, 256, 4, "2:4", 32),      # GEMV, 32 lanes
    (3, 100, 128, 3, "2:4", 0),      # GEMV, per channel, padded rows
    (1, 64, 256, 4, "2:8", 32),      # 3-bit offsets
    (2, 64, 256, 2, "1:4", 16),
    (9, 64, 256, 4, "2:4", 64),      # GEMM
    (6, 48, 256, 3, "2:8", 32),
    (1, 96, 200, 4, "bitmask", 32),  # GEMV kernel (the backend decodes these; the kernel stays correct)
    (2, 100, 130, 3, "bitmask", 16),
    (8, 64, 300, 4, "bitmask", 0),   # GEMM
])
def test_sparse_cpu_kernels(rows_in, rows, cols, bits, pattern, group_size, avx512):
    """Each CPU kernel against the dequantized weight, reading the compact codes and metadata
    (``avx512``: the N:M GEMV over runs of 4 picks activations with ``vpermilps``)."""
    import tvm

    from qcompile.backends import tvm_sparse

    if avx512 and (pattern not in ("2:4", "1:4") or rows_in > 4):
        pytest.skip("avx512 changes only the N:M GEMV over runs of 4")
    if avx512 and not tvm_backend.has_feature("avx512f", tvm_backend._llvm_target("cpu")):
        pytest.skip("this CPU has no AVX-512")
    rng = np.random.default_rng(rows + cols + bits)
    weight = _sparse_weight(rng, rows, cols, bits, pattern, group_size)
    layout = tvm_sparse.cpu_layout(weight)
    func = tvm_sparse.qmatmul_cpu(rows_in, layout, avx512)
    module = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                         target=tvm_backend._llvm_target("cpu"))
    x = rng.standard_normal((rows_in, cols)).astype(np.float32)
    padded = np.zeros((rows_in, layout.x_cols), np.float32)
    padded[:, :cols] = x
    out = np.zeros((rows_in, layout.padded_rows), np.float32)
    args = [tvm.runtime.tensor(a) for a in (padded, *layout.arrays(), out)]
    module["main"](*args)
    want = x @ weight.dequantize().T
    np.testing.assert_allclose(args[-1].numpy()[:, :rows], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("rows_in, rows, cols, bits, group_size", [
    (1, 96, 200, 4, 32),
    (3, 100, 130, 2, 16),
    (2, 70, 300, 8, 0),   # per channel: one group of 512 compact slots
])
def test_bitmask_row_kernel(rows_in, rows, cols, bits, group_size):
    """The one-row-per-task bitmask GEMV (activations compressed through the mask)."""
    import tvm

    from qcompile.backends import tvm_sparse

    if not tvm_backend.has_feature("avx512f", tvm_backend._llvm_target("cpu")):
        pytest.skip("this CPU has no AVX-512")
    rng = np.random.default_rng(rows + bits)
    weight = _sparse_weight(rng, rows, cols, bits, "bitmask", group_size)
    assert tvm_sparse.rows_eligible(weight)
    layout = tvm_sparse.bitmask_row_layout(weight)
    module = tvm.compile(tvm.IRModule({"main": tvm_sparse.qmatmul_cpu(rows_in, layout).with_attr("global_symbol",
                                                                                                 "main")}),
                         target=tvm_backend._llvm_target("cpu"))
    x = rng.standard_normal((rows_in, cols)).astype(np.float32)
    padded = np.zeros((rows_in, layout.x_cols), np.float32)
    padded[:, :cols] = x
    args = [tvm.runtime.tensor(a) for a in (padded, *layout.arrays(), np.zeros((rows_in, rows), np.float32))]
    module["main"](*args)
    want = x @ weight.dequantize().T
    np.testing.assert_allclose(args[-1].numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("prune, kernel", [
    ("pattern=2:4", "tvm sparse GEMV 2:4 int4 (cpu, 64 lanes)"),  # the select chain (no AVX-512)
    ("sparsity=0.5", "tvm sparse GEMV bitmask int4 (cpu, 64 lanes)"),  # the lanes kernel (no vcompressps)
])
def test_sparse_arm64_build(tmp_path, prune, kernel):
    result, _ = _compile(tmp_path, f"prune({prune},min_size=0),quant(bits=4,min_size=0)", 1, target="arm64")
    library = result.path / result.manifest["backend"]["libraries"]["cpu"]
    assert library.stat().st_size > 0
    assert result.manifest["layers"]["fc1"]["kernel"] == kernel


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA artifacts are built with nvcc")
@pytest.mark.parametrize("prune, kernel", [
    ("pattern=2:4", "tvm sparse decode-fused matmul 2:4 int4 (dlight)"),
    ("sparsity=0.5", "tvm float32 matmul, sparse bitmask int4 decoded at load (no bitmask kernel on GPUs)"),
])
def test_sparse_cuda_build(tmp_path, prune, kernel):
    result, _ = _compile(tmp_path, f"prune({prune},min_size=0),quant(bits=4,min_size=0)", 1, target="cuda",
                         arch="sm_90")
    assert (result.path / "model.sm_90.so").stat().st_size > 0
    assert result.manifest["layers"]["fc1"]["kernel"] == kernel


def test_sparse_embedding_is_refused_in_one_line(tmp_path):
    from qcompile.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=r"embed: sparse QGather \(only QMatMul\) is not supported yet"):
        _compile(tmp_path, "prune(pattern=2:4,min_size=0,embeddings=true),quant(bits=4,min_size=0)", 1)


@pytest.mark.heavy
@pytest.mark.parametrize("prune, shape, kernel", [
    ("pattern=2:4", (1, 4), "tvm sparse GEMV 2:4 int4"),
    ("sparsity=0.5", (2, 16), "tvm sparse GEMM bitmask int4"),
])
def test_minilm_sparse_tvm_matches_ir(tmp_path, prune, shape, kernel):
    """MiniLM pruned + 4-bit through the sparse kernels gives the IR's outputs (ORT reference)."""
    from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize
    from qcompile.frontends.text import english_sentences

    feeds = tokenize(minilm_path(), english_sentences(4, "eval"), max_length=shape[1])
    result = qcompile.compile(cached_minilm_onnx(), passes=f"prune({prune}),quant(bits=4)", backend="tvm",
                              input_shapes={name: shape for name in feeds}, output=tmp_path / "tvm",
                              calib={k: v[: shape[0]] for k, v in feeds.items()})
    layers = [layer for layer in result.manifest["layers"].values() if layer["op"] == "QMatMul"]
    assert len(layers) == 36 and all(layer["kernel"].startswith(kernel) for layer in layers)
    assert result.manifest["errors"]["artifact_vs_ir"]["last_hidden_state"]["cosine"] > 0.99999
