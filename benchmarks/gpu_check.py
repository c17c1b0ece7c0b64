"""The GPU check behind ``benchmarks/gpu_check.sh``: CUDA artifacts built, loaded and run.

1. A small model (the tests' MLP: embedding + three linear layers) at int 4 and 3 bits and
   bcq (shiftadd) 3-bit column and 2-bit block layouts:
   compiled with ``--backend tvm --target cuda --arch <this GPU>``, loaded on the GPU,
   compared with the ONNX Runtime (CPU) reference of the same IR, timed.
2. all-MiniLM-L6-v2, FP32 (no passes) and ``quant(bits=4)``, batch 8 x seq 64: built,
   loaded, cosine of mean-pooled embeddings vs ONNX Runtime FP32 (CPU) on real
   sentences, GPU latency.
3. The GEMV kernels (``benchmarks/gemv.py --device cuda``: int 4/3/2 and bcq 3/2 in both
   layouts).

Prints one table; exits non-zero when an artifact fails to build, load or match.

    python benchmarks/gpu_check.py --arch sm_90 [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import gemv  # noqa: E402
from ort_baselines import cosine_rows, mean_pooled  # noqa: E402

import qcompile  # noqa: E402
from qcompile.ir import io  # noqa: E402
from qcompile.ir.runtime import make_session  # noqa: E402


def progress(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


def gpu_ms(artifact, feeds: dict[str, np.ndarray], repeats: int = 30) -> float:
    """Median wall time of ``artifact.run`` (inputs copied in, outputs copied out: synchronous)."""
    for _ in range(3):
        artifact.run(feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        artifact.run(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))


def small_model(arch: str, out: Path, rows: list[tuple], build_only: bool = False) -> bool:
    from conftest import mlp_feeds, mlp_model

    ok = True
    specs = {"int4": "quant(bits=4,min_size=0)", "int3": "quant(bits=3,min_size=0)",
             "bcq3 column": "shiftadd(bits=3,min_size=0,outliers=0)",
             "bcq2 block": "shiftadd(bits=2,layout=block,min_size=0,outliers=0)"}
    for name, spec in specs.items():
        slug = name.replace(" ", "_")
        progress(f"small model {name}: build for {arch}")
        started = time.perf_counter()
        result = qcompile.compile(mlp_model(), passes=spec, backend="tvm", target="cuda", arch=arch,
                                  input_shapes={"ids": (2, 4)}, calib={"ids": mlp_feeds(8, seed=7)["ids"]},
                                  output=out / f"mlp_{slug}", dump_dir=out / f"mlp_{slug}_dump")
        seconds = time.perf_counter() - started
        if build_only:
            rows.append((f"MLP {name} (tvm cuda)", "2x4", f"{seconds:.0f}", "built, not run", "-"))
            continue
        artifact = qcompile.load(result.path)
        feeds = mlp_feeds(2)
        got = artifact.run(feeds)["y"]
        ir_model = io.load(sorted((out / f"mlp_{slug}_dump").glob("0*.onnx"))[-1])
        want = make_session(ir_model).run(None, feeds)[0]
        error = float(np.abs(got - want).max() / np.abs(want).max())
        ok &= error < 1e-3
        rows.append((f"MLP {name} (tvm cuda)", "2x4", f"{seconds:.0f}", f"max rel err vs IR {error:.1e}",
                     f"{gpu_ms(artifact, feeds):.3f}"))
    return ok


def minilm(arch: str, out: Path, rows: list[tuple], build_only: bool = False) -> bool:
    from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize
    from qcompile.frontends.text import english_sentences

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fp32 = cached_minilm_onnx()
    folder = minilm_path()
    evals = tokenize(folder, english_sentences(64, "eval"), max_length=64)
    calib = tokenize(folder, english_sentences(32, "calib"), max_length=64)
    shapes = {name: (8, 64) for name in evals}
    reference_session = make_session(io.load(fp32))

    def embeddings(run) -> np.ndarray:
        chunks = []
        for start in range(0, len(evals["input_ids"]), 8):
            part = {k: v[start:start + 8] for k, v in evals.items()}
            chunks.append(mean_pooled(run(part), part["attention_mask"]))
        return np.concatenate(chunks)

    reference = embeddings(lambda part: reference_session.run(None, part)[0])
    ok = True
    for label, spec in (("MiniLM FP32", "fold(smooth=false)"), ("MiniLM quant(bits=4)", "quant(bits=4)")):
        progress(f"{label}: build for {arch}")
        started = time.perf_counter()
        result = qcompile.compile(fp32, passes=spec, calib=calib, backend="tvm", target="cuda", arch=arch,
                                  input_shapes=shapes, output=out / label.replace(" ", "_").replace("=", ""))
        seconds = time.perf_counter() - started
        megabytes = result.manifest["sizes"]["artifact_bytes"] / 1e6
        if build_only:
            rows.append((f"{label} (tvm cuda, {megabytes:.0f} MB)", "8x64", f"{seconds:.0f}", "built, not run", "-"))
            continue
        artifact = qcompile.load(result.path)
        cosine = cosine_rows(embeddings(lambda part, a=artifact: a.run(part)["last_hidden_state"]), reference)
        ok &= bool(cosine.mean() > (0.999 if spec.startswith("fold") else 0.95))
        rows.append((f"{label} (tvm cuda, {megabytes:.0f} MB)", "8x64", f"{seconds:.0f}",
                     f"mean cosine vs ORT FP32 {cosine.mean():.4f}", f"{gpu_ms(artifact, {k: v[:8] for k, v in evals.items()}):.3f}"))
    return ok


def prepare_minilm(arch: str, folder: Path) -> None:
    """Build the MiniLM quant(bits=4) CUDA artifact here, with the evaluation inputs and the
    ONNX Runtime FP32 reference embeddings, for a GPU machine without the model or its wheel."""
    from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize
    from qcompile.frontends.text import english_sentences

    fp32 = cached_minilm_onnx()
    evals = tokenize(minilm_path(), english_sentences(64, "eval"), max_length=64)
    calib = tokenize(minilm_path(), english_sentences(32, "calib"), max_length=64)
    session = make_session(io.load(fp32))
    reference = np.concatenate([
        mean_pooled(session.run(None, {k: v[i:i + 8] for k, v in evals.items()})[0], evals["attention_mask"][i:i + 8])
        for i in range(0, 64, 8)])
    folder.mkdir(parents=True, exist_ok=True)
    qcompile.compile(fp32, passes="quant(bits=4)", calib=calib, backend="tvm", target="cuda", arch=arch,
                     input_shapes={name: (8, 64) for name in evals}, output=folder / "artifact")
    np.savez(folder / "reference.npz", reference=reference, **evals)


def prebuilt_minilm(folder: Path, rows: list[tuple]) -> bool:
    """Load and run the artifact :func:`prepare_minilm` built elsewhere."""
    data = np.load(folder / "reference.npz")
    evals = {name: data[name] for name in ("input_ids", "attention_mask", "token_type_ids") if name in data}
    artifact = qcompile.load(folder / "artifact")
    chunks = []
    for start in range(0, len(evals["input_ids"]), 8):
        part = {k: v[start:start + 8] for k, v in evals.items()}
        chunks.append(mean_pooled(artifact.run(part)["last_hidden_state"], part["attention_mask"]))
    cosine = cosine_rows(np.concatenate(chunks), data["reference"])
    megabytes = sum(p.stat().st_size for p in (folder / "artifact").iterdir()) / 1e6
    rows.append((f"MiniLM quant(bits=4) (tvm cuda, built elsewhere, {megabytes:.0f} MB)", "8x64", "-",
                 f"mean cosine vs ORT FP32 {cosine.mean():.4f}",
                 f"{gpu_ms(artifact, {k: v[:8] for k, v in evals.items()}):.3f}"))
    return bool(cosine.mean() > 0.95)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, help="this GPU's compute capability, e.g. sm_90")
    parser.add_argument("--out", default="out/gpu-check")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--build-only", action="store_true", help="no GPU here: build the artifacts only")
    parser.add_argument("--prepare-minilm", metavar="DIR",
                        help="build the MiniLM 4-bit CUDA artifact and its reference into DIR, then stop")
    parser.add_argument("--minilm-prebuilt", metavar="DIR", help="run the artifact --prepare-minilm built")
    args = parser.parse_args(argv)
    if args.prepare_minilm:
        prepare_minilm(args.arch, Path(args.prepare_minilm))
        return 0
    out = Path(args.out)
    rows: list[tuple] = []
    ok = small_model(args.arch, out, rows, args.build_only)
    if args.minilm_prebuilt:
        ok &= prebuilt_minilm(Path(args.minilm_prebuilt), rows)
    elif not args.skip_minilm:
        ok &= minilm(args.arch, out, rows, args.build_only)
    if not args.build_only:
        progress("GEMV kernels on the GPU")
    gemv_rows = []
    for spec in ("4096x4096", "4096x11008") if not args.build_only else ():
        cols, n = (int(v) for v in spec.split("x"))
        gemv_rows += gemv.bench_shape(cols, n, "cuda", 3, np.random.default_rng(0))
    for shape, label, mb, ms, speedup, _ideal, distance in gemv_rows:
        rows.append((f"GEMV {label}", shape, "-", f"{mb:.1f} MB read, {speedup:.2f}x FP32, {distance:.2f}x ideal",
                     f"{ms:.4f}"))
    width = [max(len(str(r[i])) for r in rows + [("what", "shape", "build s", "check", "GPU ms")]) for i in range(5)]
    header = ("what", "shape", "build s", "check", "GPU ms")
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, width, strict=True)))
    print("  ".join("-" * w for w in width))
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, width, strict=True)))
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
