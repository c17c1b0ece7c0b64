"""GEMV kernels, one run: ONNX Runtime FP32 and MatMulNBits next to qcompile's TVM kernels.

For ``1 x K @ K x N`` (default 4096x4096 and 4096x11008), every row of the table is one
kernel on the same random activation: ONNX Runtime FP32 ``MatMul``, ONNX Runtime
``MatMulNBits`` 4- and 2-bit with ``accuracy_level=4`` (int8 activations), and the TVM
decode-fused kernels of the ``int`` format at 4, 3 and 2 bits (group 32): ``fp32`` (float
activations, exact) and, on CPUs with AVX-512 VNNI, ``int8-act`` (activations quantized to
int8 per group as ``accuracy_level=4`` does; qcompile's default there), and of the ``bcq``
format (shiftadd) at 3 and 2 bits in its column and block layouts, each with both GEMV
kernels (``plain``: shifted activations + masked adds; ``lut``: 8-wide lookup tables;
CUDA: the dlight-scheduled decode-fused GEMV). Latencies are
medians measured round-robin (``interleaved_latency_ms``) so background load hits every
kernel alike. "ideal" is the bytes the kernel must read (weights, scales, zero points)
divided by the bandwidth FP32 achieved (``4*K*N`` bytes / FP32 time): the time a purely
memory-bound kernel of that format would take here (weights that fit the last-level cache
can beat it: the FP32 matrix never does).

    python benchmarks/gemv.py [--shapes 4096x4096,4096x11008] [--device cpu|cuda] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ort_baselines import interleaved_latency_ms  # noqa: E402

from qcompile.backends import tvm_bcq, tvm_kernels  # noqa: E402
from qcompile.ir.bcq import BCQWeight, encode_terms, from_signs  # noqa: E402
from qcompile.ir.qformat import QuantizedWeight, from_codes  # noqa: E402

GROUP = 32


def random_weight(rows: int, cols: int, bits: int, rng: np.random.Generator) -> QuantizedWeight:
    """Random codes with fp16 scales and uint8 zero points: the shape of a real quantized layer."""
    groups = cols // GROUP
    codes = rng.integers(0, 1 << bits, (rows, cols), dtype=np.uint8)
    scales = (rng.random((rows, groups)) * 0.02 + 0.001).astype(np.float16)
    zero_points = rng.integers(0, 1 << bits, (rows, groups), dtype=np.uint8)
    return from_codes(codes, scales, zero_points, bits, GROUP, sym=False)


BCQ_ROW_GROUP = 128  # shiftadd's default group_size
BCQ_TERMS = 3  # shiftadd's default apot_terms


def random_bcq(rows: int, cols: int, bits: int, layout: str, rng: np.random.Generator) -> BCQWeight:
    """Random signs and 3-term power-of-two alphas in shiftadd's layouts (column: one alpha per
    input column and 128 rows; block: per 8 columns and 128 rows)."""
    col_group = 1 if layout == "column" else 8
    shape = (rows // BCQ_ROW_GROUP, cols // col_group, bits, BCQ_TERMS)
    signs = rng.choice([-1, 0, 1], shape)
    signs[..., 0] = 1
    return from_signs(rng.random((rows, bits, cols)) > 0.5, encode_terms(signs, rng.integers(-9, -3, shape)),
                      BCQ_ROW_GROUP, col_group)


def tvm_cpu_bcq(weight: BCQWeight, x: np.ndarray, gemv: str) -> tuple[TvmKernel, int]:
    """``gemv``: ``plain`` / ``lut`` (float activations) or ``int8-act`` (the VNNI kernel)."""
    import tvm

    from qcompile.backends.tvm import _llvm_target, has_feature

    layout = tvm_bcq.vnni_layout(weight) if gemv == "int8-act" else tvm_bcq.cpu_layout(weight)
    gemv = "plain" if gemv == "int8-act" else gemv
    gather = has_feature("avx512f", _llvm_target("cpu"))
    func = tvm_bcq.qmatmul_cpu(1, layout, gemv, gather)
    arrays = [x, *layout.arrays()]
    kernel = TvmKernel(func, arrays, (1, layout.padded_rows), _llvm_target("cpu"), tvm.cpu(0))
    return kernel, sum(a.nbytes for a in arrays[1:])


def tvm_cuda_bcq(weight: BCQWeight, x: np.ndarray) -> tuple[TvmKernel, int]:
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    from qcompile.backends.tvm import _cuda_target
    from qcompile.backends.tvm_schedule import gpu_rules

    device = tvm.cuda(0)
    major, minor = str(device.compute_version).split(".")
    target = _cuda_target(f"sm_{major}{minor}")
    arrays = tvm_bcq.gpu_arrays(weight)
    tensors = [te.placeholder(x.shape, "float32", "x")]
    tensors += [te.placeholder(a.shape, str(a.dtype), f"w{i}") for i, a in enumerate(arrays)]
    out = tvm_bcq.qmatmul_split_te(*tensors, bits=weight.bits, row_group=weight.row_group,
                                   col_group=weight.col_group, cols=weight.cols)
    module = tvm.IRModule({"main": te.create_prim_func([*tensors, out])})
    with target:
        module = dl.ApplyDefaultSchedule(*gpu_rules())(module)
    kernel = TvmKernel(module["main"], [x, *arrays], (1, weight.rows), target, device)
    return kernel, sum(a.nbytes for a in arrays)


class OrtKernel:
    def __init__(self, model: onnx.ModelProto, providers: list[str]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)

    def run(self, _names, feeds):
        return self.session.run(None, feeds)


def ort_fp32(weight: np.ndarray, providers: list[str]) -> OrtKernel:
    cols, rows = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cols])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows])],
                              [numpy_helper.from_array(weight, "w")])
    return OrtKernel(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), providers)


def ort_nbits(weight: QuantizedWeight, providers: list[str]) -> OrtKernel:
    from qcompile.backends.ort import _packed_zero_points

    blob = GROUP * weight.bits // 8
    inits = [numpy_helper.from_array(weight.packed.reshape(weight.rows, weight.n_groups, blob), "b"),
             numpy_helper.from_array(weight.scales.astype(np.float32).reshape(-1), "s"),
             numpy_helper.from_array(_packed_zero_points(weight).reshape(-1), "z")]
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=weight.cols,
                            N=weight.rows, bits=weight.bits, block_size=GROUP, accuracy_level=4)
    graph = helper.make_graph([node], "gemv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.cols])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.rows])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return OrtKernel(model, providers)


class TvmKernel:
    """One compiled TVM kernel with its arguments resident on the device."""

    def __init__(self, func, arrays: list[np.ndarray], out_shape: tuple[int, ...], target, device) -> None:
        import tvm

        from qcompile.backends.tvm import fix_thread_count

        fix_thread_count()  # as artifacts do: else every launch reads /sys/devices/system/cpu/online
        module = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        self.device = device
        self.function = module["main"]
        self.args = [tvm.runtime.tensor(a, device) for a in arrays]
        self.args.append(tvm.runtime.tensor(np.zeros(out_shape, np.float32), device))

    def run(self, _names, _feeds):
        self.function(*self.args)
        self.device.sync()
        return [self.args[-1]]

    def result(self) -> np.ndarray:
        return self.args[-1].numpy()


def tvm_cpu_kernel(weight: QuantizedWeight, x: np.ndarray, vnni: bool = False) -> tuple[TvmKernel, int]:
    import tvm

    from qcompile.backends.tvm import _llvm_target

    layout = tvm_kernels.vnni_layout(weight) if vnni else tvm_kernels.cpu_layout(weight)
    func = tvm_kernels.qmatmul_cpu(1, layout, weight.bits, GROUP, weight.cols)
    arrays = [x, layout.packed, layout.scales, layout.zero_points]
    kernel = TvmKernel(func, arrays, (1, layout.padded_rows), _llvm_target("cpu"), tvm.cpu(0))
    return kernel, sum(a.nbytes for a in arrays[1:])


def tvm_cuda_kernel(weight: QuantizedWeight, x: np.ndarray) -> tuple[TvmKernel, int]:
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    from qcompile.backends.tvm import _cuda_target
    from qcompile.backends.tvm_schedule import gpu_rules

    device = tvm.cuda(0)
    major, minor = str(device.compute_version).split(".")
    target = _cuda_target(f"sm_{major}{minor}")
    if weight.bits == 3:  # the backend's CUDA layout: a 2-bit and a 1-bit plane
        arrays = [x, *tvm_kernels.split3_planes(weight), weight.scales, weight.zero_points]
    else:
        arrays = [x, weight.packed, weight.scales, weight.zero_points]
    tensors = [te.placeholder(a.shape, str(a.dtype), f"a{i}") for i, a in enumerate(arrays)]
    if weight.bits == 3:
        out = tvm_kernels.qmatmul3_te(*tensors, GROUP, weight.cols)
    else:
        out = tvm_kernels.qmatmul_te(*tensors, weight.bits, GROUP, weight.cols)
    module = tvm.IRModule({"main": te.create_prim_func([*tensors, out])})
    with target:
        module = dl.ApplyDefaultSchedule(*gpu_rules())(module)
    kernel = TvmKernel(module["main"], arrays, (1, weight.rows), target, device)
    return kernel, sum(a.nbytes for a in arrays[1:])


def tvm_cuda_fp32(dense: np.ndarray, x: np.ndarray) -> TvmKernel:
    """The FP32 GEMV baseline on a GPU: TVM's dlight GEMV rule over ``W^T`` ``[N, K]``."""
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    from qcompile.backends.tvm import _cuda_target
    from qcompile.backends.tvm_schedule import gpu_rules

    device = tvm.cuda(0)
    major, minor = str(device.compute_version).split(".")
    target = _cuda_target(f"sm_{major}{minor}")
    weight_t = np.ascontiguousarray(dense.T)
    xs = te.placeholder(x.shape, "float32", "x")
    ws = te.placeholder(weight_t.shape, "float32", "w")
    k = te.reduce_axis((0, weight_t.shape[1]), "k")
    out = te.compute((1, weight_t.shape[0]), lambda m, n: te.sum(xs[m, k] * ws[n, k], axis=k), name="gemv")
    module = tvm.IRModule({"main": te.create_prim_func([xs, ws, out])})
    with target:
        module = dl.ApplyDefaultSchedule(*gpu_rules())(module)
    return TvmKernel(module["main"], [x, weight_t], (1, weight_t.shape[0]), target, device)


def bench_shape(cols: int, rows: int, device: str, rounds: int, rng: np.random.Generator) -> list[tuple]:
    import onnxruntime as ort

    x = rng.standard_normal((1, cols)).astype(np.float32)
    dense = (rng.standard_normal((cols, rows)) * 0.02).astype(np.float32)
    providers = (["CUDAExecutionProvider"] if device == "cuda" else []) + ["CPUExecutionProvider"]
    ort_on_device = device == "cpu" or "CUDAExecutionProvider" in ort.get_available_providers()
    rows_out: list[tuple] = []
    kernels = []
    if ort_on_device:
        kernels.append(("ORT FP32 MatMul", ort_fp32(dense, providers), dense.nbytes, None))
    elif device == "cuda":  # onnxruntime without the CUDA provider: TVM's own FP32 GEMV is the baseline
        kernels.append(("TVM FP32 GEMV (dlight)", tvm_cuda_fp32(dense, x), dense.nbytes, None))
    weights = {bits: random_weight(rows, cols, bits, rng) for bits in (4, 3, 2)}
    if ort_on_device:
        for bits in (4, 2):
            w = weights[bits]
            nbytes = w.packed.nbytes + w.scales.size * 4 + _packed_zp_bytes(w)
            kernels.append((f"ORT MatMulNBits {bits}-bit", ort_nbits(w, providers), nbytes, w))
    bcq = {(bits, layout): random_bcq(rows, cols, bits, layout, rng) for bits in (3, 2) for layout in ("column", "block")}
    if device == "cuda":
        for bits in (4, 3, 2):
            kernel, nbytes = tvm_cuda_kernel(weights[bits], x)
            kernels.append((f"qcompile TVM int{bits}", kernel, nbytes, weights[bits]))
        for (bits, layout), weight in bcq.items():
            kernel, nbytes = tvm_cuda_bcq(weight, x)
            kernels.append((f"qcompile TVM bcq{bits} {layout}", kernel, nbytes, weight))
    else:
        from qcompile.backends.tvm import _llvm_target, has_vnni

        vnni = has_vnni(_llvm_target("cpu"))
        for bits in (4, 3, 2):
            if vnni and tvm_kernels.vnni_eligible(weights[bits]):
                kernel, nbytes = tvm_cpu_kernel(weights[bits], x, vnni=True)
                kernels.append((f"qcompile TVM int{bits} int8-act", kernel, nbytes, weights[bits]))
            kernel, nbytes = tvm_cpu_kernel(weights[bits], x)
            kernels.append((f"qcompile TVM int{bits} fp32", kernel, nbytes, weights[bits]))
        for (bits, layout), weight in bcq.items():
            vnni_bcq = ("int8-act",) if vnni and tvm_bcq.vnni_eligible(weight) else ()
            for gemv in (*vnni_bcq, *tvm_bcq.GEMV_KERNELS):
                kernel, nbytes = tvm_cpu_bcq(weight, x, gemv)
                kernels.append((f"qcompile TVM bcq{bits} {layout} {gemv}", kernel, nbytes, weight))
    for _, kernel, _, weight in kernels:  # correctness before speed
        if weight is not None:
            got = np.asarray(kernel.run(None, {"x": x})[0].numpy() if isinstance(kernel, TvmKernel)
                             else kernel.run(None, {"x": x})[0])[:, :rows]
            want = x @ weight.dequantize().T
            error = float(np.abs(got - want).max() / np.abs(want).max())
            if error > 5e-2:
                raise SystemExit(f"kernel output differs from the reference by {error:.3g}")
    times = interleaved_latency_ms([k for _, k, _, _ in kernels], {"x": x}, rounds=rounds, repeats=rounds * 20)
    reference = times[0]  # the FP32 row
    bandwidth = dense.nbytes / (times[0] / 1e3)
    for (label, _, nbytes, _), ms in zip(kernels, times, strict=True):
        ideal = nbytes / bandwidth * 1e3 if bandwidth else float("nan")
        rows_out.append((f"{cols}x{rows}", label, nbytes / 1e6, ms, reference / ms if reference else float("nan"),
                         ideal, ms / ideal if bandwidth else float("nan")))
    return rows_out


def _packed_zp_bytes(weight: QuantizedWeight) -> int:
    return weight.rows * -(-weight.n_groups * weight.bits // 8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,4096x11008", help="KxN pairs (x is 1xK)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    table = []
    for spec in args.shapes.split(","):
        cols, rows = (int(v) for v in spec.lower().split("x"))
        table += bench_shape(cols, rows, args.device, args.rounds, rng)
    header = f"{'shape':<11} {'kernel':<32} {'MB read':>8} {'ms':>8} {'x FP32':>7} {'ideal ms':>9} {'x ideal':>8}"
    print(f"GEMV 1xK @ KxN, {args.device}, {os.cpu_count()} threads, {platform.machine()}; ideal = bytes read / "
          "FP32's measured bandwidth")
    print(header)
    print("-" * len(header))
    for shape, label, mb, ms, speedup, ideal, distance in table:
        print(f"{shape:<11} {label:<32} {mb:>8.2f} {ms:>8.3f} {speedup:>7.2f} {ideal:>9.3f} {distance:>8.2f}")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
