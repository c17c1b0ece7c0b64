"""The GPU check behind ``benchmarks/gpu_check.sh``: CUDA artifacts built, loaded and run.

Every case is an artifact of ``qcompile.compile(..., backend="tvm", target="cuda")`` with its
inputs and the reference outputs of the same pipeline's IR under ONNX Runtime (CPU):

1. The tests' MLP (embedding + three linear layers, 2x4 tokens): ``int`` 4 and 3 bits,
   ``bcq`` (shiftadd) 3-bit column and 2-bit block layouts, and sparse 4-bit layers
   (2:4: the N:M CUDA kernel; 50% bitmask: decoded to float at load).
2. One ``1 x 4096 @ 4096 x 4096`` layer (a decode-step GEMV) at int4, int3, bcq3 and
   2:4-sparse int4, timed with the inputs already on the GPU next to PyTorch's FP32 and FP16
   ``matmul`` (cuBLAS) of the same shape, when PyTorch with CUDA is there.
3. One decode step of a tiny Llama (GQA, RMSNorm, SwiGLU, tied embeddings, KV cache at a fixed
   past length) after ``fold,quant(bits=4)``.
4. all-MiniLM-L6-v2 ``quant(bits=4)``, batch 8 x 64 tokens: cosine of mean-pooled embeddings
   vs ONNX Runtime FP32 on real sentences.

Two halves, so the GPU machine needs only TVM's runtime (``TVM_USE_RUNTIME_LIB=1``, no
compiler library, no ONNX Runtime, no model wheels):

    python benchmarks/gpu_check.py --arch sm_90 --prepare DIR   # anywhere with nvcc: build
    python benchmarks/gpu_check.py --prebuilt DIR               # on the GPU: load, check, time

With neither flag it builds into ``--out`` and runs there (a full TVM on the GPU machine);
``--gemv`` then adds the GEMV kernel benchmark (``benchmarks/gemv.py --device cuda``). Prints
one table; exits non-zero when an artifact fails to load or to match.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import qcompile  # noqa: E402

LAYER = 4096
MLP_SPECS = {
    "int4": "quant(bits=4,min_size=0)",
    "int3": "quant(bits=3,min_size=0)",
    "bcq3 column": "shiftadd(bits=3,min_size=0,outliers=0)",
    "bcq2 block": "shiftadd(bits=2,layout=block,min_size=0,outliers=0)",
    "2:4 int4": "prune(pattern=2:4,min_size=0),quant(bits=4,min_size=0)",
    "50% bitmask int4": "prune(sparsity=0.5,min_size=0),quant(bits=4,min_size=0)",
}
LAYER_SPECS = {
    "int4": "quant(bits=4,min_size=0)",
    "int3": "quant(bits=3,min_size=0)",
    "bcq3 column": "shiftadd(bits=3,min_size=0,outliers=0)",
    "2:4 int4": "prune(pattern=2:4,min_size=0),quant(bits=4,min_size=0)",
}


def progress(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# building (needs the TVM compiler, nvcc, ONNX Runtime; no GPU)
# ---------------------------------------------------------------------------------------------

def _reference(dump: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The outputs of the pipeline's last IR (the dump's last file) under ONNX Runtime."""
    from qcompile.ir import io
    from qcompile.ir.runtime import make_session

    model = io.load(sorted(dump.glob("0*.onnx"))[-1])
    session = make_session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def _case(folder: Path, cases: list[dict], name: str, shape: str, model, spec: str, feeds: dict,
          calib: dict, input_shapes, arch: str, **extra) -> None:
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    progress(f"build {name}: {spec}")
    with tempfile.TemporaryDirectory() as dump:
        started = time.perf_counter()
        result = qcompile.compile(model, passes=spec, backend="tvm", target="cuda", arch=arch, calib=calib,
                                  input_shapes=input_shapes, output=folder / slug, dump_dir=dump)
        seconds = time.perf_counter() - started
        reference = _reference(Path(dump), feeds)
    np.savez(folder / f"{slug}.feeds.npz", **feeds)
    np.savez(folder / f"{slug}.reference.npz", **reference)
    kernels = sorted({layer.get("kernel", "") for layer in result.manifest.get("layers", {}).values()} - {""})
    cases.append({"name": name, "shape": shape, "artifact": slug, "build_s": round(seconds),
                  "mb": result.manifest["sizes"]["artifact_bytes"] / 1e6, "kernels": kernels, **extra})


def _layer_model(rows: int, cols: int):
    from onnx import TensorProto, helper, numpy_helper

    weight = (np.random.default_rng(3).standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")], "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", cols])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tiny_llama_decode(home: Path) -> tuple[Path, dict, dict]:
    """The tests' tiny Llama (randomly initialised) exported as a decode graph, with one step's
    inputs at a fixed past length and calibration inputs."""
    import torch
    import transformers
    from test_llm import HEAD_DIM, KV_HEADS, LAYERS, VOCAB

    from qcompile.frontends.llm import cached_causal_lm_onnx

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                                      tie_word_embeddings=True, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(home / "tiny-llama")
    decode = cached_causal_lm_onnx(home / "tiny-llama", "decode", cache_dir=home / "cache")
    past = 5
    rng = np.random.default_rng(2)
    feeds = {"input_ids": np.array([[11]], np.int64), "attention_mask": np.ones((1, past + 1), np.int64)}
    for i in range(LAYERS):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((1, KV_HEADS, past, HEAD_DIM)).astype(np.float32)
    calib = {name: np.concatenate([value, value]) for name, value in feeds.items()}
    return decode, feeds, calib


def _minilm(folder: Path, cases: list[dict], arch: str) -> None:
    """MiniLM ``quant(bits=4)`` at 8 x 64 with 64 real sentences and their ORT FP32 embeddings."""
    from ort_baselines import mean_pooled

    from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize
    from qcompile.frontends.text import english_sentences
    from qcompile.ir import io
    from qcompile.ir.runtime import make_session

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fp32 = cached_minilm_onnx()
    evals = tokenize(minilm_path(), english_sentences(64, "eval"), max_length=64)
    calib = tokenize(minilm_path(), english_sentences(32, "calib"), max_length=64)
    session = make_session(io.load(fp32))
    reference = np.concatenate([
        mean_pooled(session.run(None, {k: v[i:i + 8] for k, v in evals.items()})[0], evals["attention_mask"][i:i + 8])
        for i in range(0, 64, 8)])
    progress("build MiniLM quant(bits=4)")
    started = time.perf_counter()
    result = qcompile.compile(fp32, passes="quant(bits=4)", calib=calib, backend="tvm", target="cuda", arch=arch,
                              input_shapes={name: (8, 64) for name in evals}, output=folder / "minilm")
    np.savez(folder / "minilm.feeds.npz", **evals)
    np.savez(folder / "minilm.reference.npz", pooled=reference)
    cases.append({"name": "MiniLM quant(bits=4)", "shape": "8x64", "artifact": "minilm",
                  "build_s": round(time.perf_counter() - started),
                  "mb": result.manifest["sizes"]["artifact_bytes"] / 1e6, "kernels": [], "check": "pooled"})


def prepare(arch: str, folder: Path, minilm: bool = True) -> None:
    from conftest import mlp_feeds, mlp_model

    folder.mkdir(parents=True, exist_ok=True)
    cases: list[dict] = []
    for name, spec in MLP_SPECS.items():
        _case(folder, cases, f"MLP {name}", "2x4", mlp_model(), spec, mlp_feeds(2),
              {"ids": mlp_feeds(8, seed=7)["ids"]}, {"ids": (2, 4)}, arch)
    x = np.random.default_rng(5).standard_normal((1, LAYER)).astype(np.float32)
    calib = {"x": np.random.default_rng(6).standard_normal((64, LAYER)).astype(np.float32)}
    for name, spec in LAYER_SPECS.items():
        _case(folder, cases, f"layer {name}", f"1x{LAYER}x{LAYER}", _layer_model(LAYER, LAYER), spec, {"x": x},
              calib, {"x": (1, LAYER)}, arch, gemv=[LAYER, LAYER])
    with tempfile.TemporaryDirectory() as home:
        decode, feeds, calib = _tiny_llama_decode(Path(home))
        shapes = [f"{name}={'x'.join(map(str, value.shape))}" for name, value in feeds.items()]
        _case(folder, cases, "tiny Llama decode step fold,quant(bits=4)", "1 token, past 5", str(decode),
              "fold,quant(bits=4,min_size=0)", feeds, calib, shapes, arch)
    if minilm:
        _minilm(folder, cases, arch)
    (folder / "cases.json").write_text(json.dumps({"arch": arch, "cases": cases}, indent=1))
    megabytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
    progress(f"{len(cases)} cases in {folder} ({megabytes:.1f} MB)")


# ---------------------------------------------------------------------------------------------
# running (needs a CUDA GPU and TVM's runtime only)
# ---------------------------------------------------------------------------------------------

def device_ms(artifact, feeds: dict[str, np.ndarray], repeat: int = 7) -> float:
    """Median ms of the artifact's ``main`` with its inputs already on the GPU (no copies)."""
    import tvm

    device = artifact._device
    args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[name].astype(artifact._dtypes.get(name, feeds[name].dtype))),
                               device) for name in artifact.input_names]
    timer = artifact._vm.time_evaluator("main", device, number=50, repeat=repeat)
    return float(statistics.median(timer(*args, *artifact._params).results) * 1e3)


def torch_matmul_ms(rows: int, cols: int) -> dict[str, float]:
    """cuBLAS FP32 and FP16 ``1 x rows @ rows x cols`` through PyTorch (CUDA events), if present."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    timings = {}
    for label, dtype in (("FP32", torch.float32), ("FP16", torch.float16)):
        x = torch.randn(1, rows, device="cuda", dtype=dtype)
        w = torch.randn(rows, cols, device="cuda", dtype=dtype)
        for _ in range(20):
            x @ w
        samples = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                x @ w
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 50)
        timings[label] = float(statistics.median(samples))
    return timings


def run_prebuilt(folder: Path) -> tuple[list[tuple], bool]:
    from ort_baselines import cosine_rows, mean_pooled

    spec = json.loads((folder / "cases.json").read_text())
    rows: list[tuple] = []
    ok = True
    baselines: dict[tuple, dict[str, float]] = {}
    for case in spec["cases"]:
        name = case["name"]
        progress(f"run {name}")
        feeds = dict(np.load(folder / f"{case['artifact']}.feeds.npz"))
        reference = dict(np.load(folder / f"{case['artifact']}.reference.npz"))
        try:
            artifact = qcompile.load(folder / case["artifact"])
            if case.get("check") == "pooled":
                chunks = []
                for start in range(0, len(feeds["input_ids"]), 8):
                    part = {k: v[start:start + 8] for k, v in feeds.items()}
                    chunks.append(mean_pooled(artifact.run(part)["last_hidden_state"], part["attention_mask"]))
                cosine = float(cosine_rows(np.concatenate(chunks), reference["pooled"]).mean())
                good, check = cosine > 0.95, f"mean cosine vs ORT FP32 {cosine:.4f}"
                feeds = {k: v[:8] for k, v in feeds.items()}
            else:
                outputs = artifact.run(feeds)
                error = max(float(np.abs(outputs[k] - v).max() / max(np.abs(v).max(), 1e-12))
                            for k, v in reference.items())
                good, check = error < 1e-3, f"max rel err vs IR {error:.1e}"
            ms = device_ms(artifact, feeds)
        except Exception as exc:  # one failing case must not hide the others
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            rows.append((name, case["shape"], f"{case['mb']:.1f}", f"FAILED: {first}", "-"))
            ok = False
            continue
        ok &= good
        if "gemv" in case:
            shape = tuple(case["gemv"])
            if shape not in baselines:
                baselines[shape] = torch_matmul_ms(*shape)
            check += "".join(f", {ms_ref / ms:.2f}x cuBLAS {label}" for label, ms_ref in baselines[shape].items())
        rows.append((name, case["shape"], f"{case['mb']:.1f}", check, f"{ms:.4f}"))
    for shape, timings in baselines.items():
        for label, ms in timings.items():
            rows.append((f"PyTorch {label} matmul (cuBLAS)", f"1x{shape[0]}x{shape[1]}",
                         f"{shape[0] * shape[1] * (4 if label == 'FP32' else 2) / 1e6:.1f}", "baseline", f"{ms:.4f}"))
    return rows, ok


def gemv_rows() -> list[tuple]:
    import gemv

    progress("GEMV kernels on the GPU")
    rows = []
    for spec in ("4096x4096", "4096x11008"):
        cols, n = (int(v) for v in spec.split("x"))
        for shape, label, mb, ms, speedup, _ideal, distance in gemv.bench_shape(cols, n, "cuda", 3,
                                                                                np.random.default_rng(0)):
            rows.append((f"GEMV {label}", shape, f"{mb:.1f}", f"{speedup:.2f}x FP32, {distance:.2f}x ideal",
                         f"{ms:.4f}"))
    return rows


def print_table(rows: list[tuple], ok: bool) -> None:
    header = ("what", "shape", "MB", "check", "GPU ms")
    width = [max(len(str(r[i])) for r in [*rows, header]) for i in range(5)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, width, strict=True)))
    print("  ".join("-" * w for w in width))
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, width, strict=True)))
    print("RESULT:", "PASS" if ok else "FAIL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", help="the GPU's compute capability, e.g. sm_90 (to build)")
    parser.add_argument("--out", default="out/gpu-check", help="build-and-run folder (neither mode flag)")
    parser.add_argument("--prepare", metavar="DIR", help="build every case into DIR, then stop")
    parser.add_argument("--prebuilt", metavar="DIR", help="run the cases --prepare built")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--gemv", action="store_true", help="also the GEMV kernel benchmark (needs the compiler)")
    args = parser.parse_args(argv)
    if not args.prebuilt and not args.arch:
        parser.error("--arch is needed to build (e.g. --arch sm_90)")
    if args.prepare:
        prepare(args.arch, Path(args.prepare), minilm=not args.skip_minilm)
        return 0
    folder = Path(args.prebuilt or args.out)
    if not args.prebuilt:
        prepare(args.arch, folder, minilm=not args.skip_minilm)
    rows, ok = run_prebuilt(folder)
    if args.gemv:
        rows += gemv_rows()
    print_table(rows, ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
