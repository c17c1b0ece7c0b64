"""Sparse GEMV kernels, one run: qcompile's TVM kernels for ``int.nm`` (2:4) and ``int.bitmask``
(50% unstructured) at 4 bits next to the dense int4 kernel, ONNX Runtime MatMulNBits int4 and FP32.

For ``1 x K @ K x N`` (default 4096x4096 and 4096x11008), on one random activation:

* ``ORT FP32 MatMul``: the dense float matrix (what ONNX Runtime runs for a sparse layer: the
  reference function decodes it to float at session start).
* ``ORT MatMulNBits int4``: ``accuracy_level=4`` (int8 activations), group 32, dense.
* ``TVM dense int4``: the backend's dense ``int`` GEMV kernels (float activations and, on
  AVX-512 VNNI CPUs, int8 activations: the backend's default for dense layers there).
* ``TVM sparse 2:4 int4`` / ``TVM sparse bitmask int4 lanes|rows``: the
  :mod:`qcompile.backends.tvm_sparse` GEMV kernels over the compact codes + metadata of a
  magnitude-pruned weight (float activations, exact). Bitmask ``lanes``: SIMD lanes over
  output rows, per-lane running counts (any target, any bits); ``rows``: one output row per
  task, activations compressed through the mask with ``vcompressps`` (AVX-512, 2/4/8 bits:
  what the backend picks there for GEMV rows).

Latencies are medians measured round-robin (``interleaved_latency_ms``); the table gives each
kernel's time as a ratio to the TVM dense int4 (float activations) kernel, to ORT
MatMulNBits int4 and to ORT FP32.

    python benchmarks/sparse_gemv.py [--shapes 4096x4096,4096x11008] [--rounds 3] [--batch 1]

``--batch B`` runs ``B x K`` activations (more than 4: the GEMM kernels; the bitmask
``rows`` kernel is GEMV-only).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gemv import GROUP, OrtKernel, TvmKernel, random_weight  # noqa: E402
from ort_baselines import interleaved_latency_ms  # noqa: E402

from qcompile.backends import tvm_kernels, tvm_sparse  # noqa: E402
from qcompile.ir.sparse import SparseWeight  # noqa: E402
from qcompile.passes.sparsequant import quantize_sparse  # noqa: E402


def pruned(dense: np.ndarray, pattern: str) -> np.ndarray:
    """``dense`` ``[rows, cols]`` magnitude-pruned to 2:4 or to 50% per row (unstructured)."""
    rows, cols = dense.shape
    if pattern == "2:4":
        runs = np.abs(dense).reshape(rows, -1, 4)
        keep = np.zeros_like(runs, bool)
        np.put_along_axis(keep, np.argsort(runs, -1)[..., 2:], True, -1)
        return np.where(keep.reshape(rows, cols), dense, 0).astype(np.float32)
    threshold = np.median(np.abs(dense), axis=1, keepdims=True)
    return np.where(np.abs(dense) > threshold, dense, 0).astype(np.float32)


def tvm_sparse_kernel(weight: SparseWeight, x: np.ndarray, rows_kernel: bool = False) -> tuple[TvmKernel, int]:
    """The sparse GEMV: lanes over output rows (``cpu_layout``) or, ``rows_kernel``, the
    bitmask kernel that takes one output row per task (``bitmask_row_layout``)."""
    import tvm

    from qcompile.backends.tvm import _llvm_target, has_feature

    layout = tvm_sparse.bitmask_row_layout(weight) if rows_kernel else tvm_sparse.cpu_layout(weight)
    padded = np.zeros((x.shape[0], layout.x_cols), np.float32)
    padded[:, : x.shape[1]] = x
    batch = x.shape[0]
    func = tvm_sparse.qmatmul_cpu(batch, layout, has_feature("avx512f", _llvm_target("cpu")))  # as the backend does
    kernel = TvmKernel(func, [padded, *layout.arrays()], (batch, layout.padded_rows), _llvm_target("cpu"), tvm.cpu(0))
    return kernel, sum(a.nbytes for a in layout.arrays())


def tvm_dense_kernel(weight, x: np.ndarray, vnni: bool = False) -> tuple[TvmKernel, int]:
    """The backend's dense ``int`` kernel for ``x.shape[0]`` activation rows."""
    import tvm

    from qcompile.backends.tvm import _llvm_target

    layout = tvm_kernels.vnni_layout(weight) if vnni else tvm_kernels.cpu_layout(weight)
    func = tvm_kernels.qmatmul_cpu(x.shape[0], layout, weight.bits, GROUP, weight.cols)
    arrays = [x, layout.packed, layout.scales, layout.zero_points]
    kernel = TvmKernel(func, arrays, (x.shape[0], layout.padded_rows), _llvm_target("cpu"), tvm.cpu(0))
    return kernel, sum(a.nbytes for a in arrays[1:])


def _ort_model(node, inits, batch: int, cols: int, rows: int, domains=()):
    graph = helper.make_graph([node], "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cols])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, rows])], inits)
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, 1) for d in domains)]
    return OrtKernel(helper.make_model(graph, opset_imports=opsets), [])


def ort_fp32(weight_t: np.ndarray, batch: int) -> OrtKernel:
    cols, rows = weight_t.shape
    return _ort_model(helper.make_node("MatMul", ["x", "w"], ["y"]), [numpy_helper.from_array(weight_t, "w")],
                      batch, cols, rows)


def ort_nbits(weight, batch: int) -> OrtKernel:
    """``MatMulNBits`` 4-bit, group 32, ``accuracy_level=4`` (int8 activations)."""
    from qcompile.backends.ort import _packed_zero_points

    blob = GROUP * weight.bits // 8
    inits = [numpy_helper.from_array(weight.packed.reshape(weight.rows, weight.n_groups, blob), "b"),
             numpy_helper.from_array(weight.scales.astype(np.float32).reshape(-1), "s"),
             numpy_helper.from_array(_packed_zero_points(weight).reshape(-1), "z")]
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=weight.cols,
                            N=weight.rows, bits=weight.bits, block_size=GROUP, accuracy_level=4)
    return _ort_model(node, inits, batch, weight.cols, weight.rows, ("com.microsoft",))


def bench_shape(cols: int, rows: int, rounds: int, rng: np.random.Generator, batch: int = 1) -> list[tuple]:
    from qcompile.backends.tvm import _llvm_target, has_feature, has_vnni

    x = rng.standard_normal((batch, cols)).astype(np.float32)
    dense = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    int4 = random_weight(rows, cols, 4, rng)
    kernels: list[tuple[str, object, int, object]] = [
        ("ORT FP32 MatMul", ort_fp32(np.ascontiguousarray(dense.T), batch), dense.nbytes, None)]
    nbits_bytes = int4.packed.nbytes + int4.scales.size * 4 + int4.rows * -(-int4.n_groups * 4 // 8)
    kernels.append(("ORT MatMulNBits int4", ort_nbits(int4, batch), nbits_bytes, int4))
    kernel, nbytes = tvm_dense_kernel(int4, x)
    kernels.append(("TVM dense int4 fp32-act", kernel, nbytes, int4))
    if has_vnni(_llvm_target("cpu")) and tvm_kernels.vnni_eligible(int4):
        kernel, nbytes = tvm_dense_kernel(int4, x, vnni=True)
        kernels.append(("TVM dense int4 int8-act", kernel, nbytes, int4))
    for pattern in ("2:4", "bitmask"):
        weight = quantize_sparse(pruned(dense, pattern), bits=4, group_size=GROUP, clip_search=1)
        assert weight.layout == ("nm" if pattern == "2:4" else "bitmask")
        kernel, nbytes = tvm_sparse_kernel(weight, x)
        kernels.append((f"TVM sparse {pattern} int4" + (" lanes" if pattern == "bitmask" else ""), kernel, nbytes,
                        weight))
        if pattern == "bitmask" and batch <= tvm_kernels.GEMV_MAX_ROWS and has_feature("avx512f", _llvm_target("cpu")):
            kernel, nbytes = tvm_sparse_kernel(weight, x, rows_kernel=True)
            kernels.append(("TVM sparse bitmask int4 rows", kernel, nbytes, weight))
    for label, kernel, _, weight in kernels:  # correctness before speed
        if weight is None:
            continue
        out = kernel.run(None, {"x": x})[0]
        got = np.asarray(out.numpy() if hasattr(out, "numpy") else out)[:, :rows]
        want = x @ weight.dequantize().T
        error = float(np.abs(got - want).max() / np.abs(want).max())
        if error > (5e-2 if "int8" in label or "ORT" in label else 1e-4):
            raise SystemExit(f"{label}: output differs from the reference by {error:.3g}")
    times = interleaved_latency_ms([k for _, k, _, _ in kernels], {"x": x}, rounds=rounds, repeats=rounds * 20)
    by_label = {label: ms for (label, _, _, _), ms in zip(kernels, times, strict=True)}
    dense_int4, nbits, fp32 = (by_label[k] for k in ("TVM dense int4 fp32-act", "ORT MatMulNBits int4",
                                                      "ORT FP32 MatMul"))
    return [(f"{batch}x{cols}x{rows}", label, nbytes / 1e6, ms, ms / dense_int4, ms / nbits, ms / fp32)
            for (label, _, nbytes, _), ms in zip(kernels, times, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,4096x11008", help="KxN pairs (x is 1xK)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="activation rows (> 4: the GEMM kernels)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    table = []
    for spec in args.shapes.split(","):
        cols, rows = (int(v) for v in spec.lower().split("x"))
        table += bench_shape(cols, rows, args.rounds, rng, args.batch)
    print(f"sparse {'GEMV' if args.batch <= 4 else 'GEMM'} {args.batch}xK @ KxN, cpu, {os.cpu_count()} threads, {platform.machine()}; time as a ratio to "
          "TVM dense int4 (fp32 activations), ORT MatMulNBits int4 and ORT FP32 (lower is faster)")
    print("| BxKxN | kernel | MB read | ms | / TVM dense int4 | / ORT NBits int4 | / ORT FP32 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape, label, mb, ms, vs_dense, vs_nbits, vs_fp32 in table:
        print(f"| {shape} | {label} | {mb:.2f} | {ms:.3f} | {vs_dense:.2f} | {vs_nbits:.2f} | {vs_fp32:.2f} |")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
