"""shiftadd and bits next to FP32, ONNX Runtime's quantizers and quant on all-MiniLM-L6-v2.

For every setting: MB on disk (the whole artifact for qcompile), mean and min cosine of
mean-pooled sentence embeddings against FP32 on real English sentences (eval split;
calibration uses other sentences), compile time, and for multiplication-less settings the
estimated energy per token of the linear layers (:mod:`qcompile.ir.energy`, 45 nm unit
costs) relative to FP32 and FP16 multiply-adds.

    python benchmarks/shiftadd_minilm.py [--sentences 256] [--settings "shiftadd(bits=3)" ...]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ort_baselines import cosine_rows, embed, file_mb, make_session, ort_matmulnbits  # noqa: E402

import qcompile  # noqa: E402
from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize  # noqa: E402
from qcompile.frontends.text import english_sentences  # noqa: E402
from qcompile.ir import io  # noqa: E402
from qcompile.ir.energy import PJ, model_energy  # noqa: E402

ORT_SETTINGS = [
    ("ORT MatMulNBits HQQ 4-bit g32", lambda src, dst: ort_matmulnbits(src, dst, 4, algo="hqq")),
    ("ORT MatMulNBits HQQ 2-bit g32", lambda src, dst: ort_matmulnbits(src, dst, 2, algo="hqq")),
]
QCOMPILE_SETTINGS = [
    "quant(bits=4,method=gptq)",
    "quant(bits=3,method=gptq)",
    "quant(bits=2,method=gptq)",
    "shiftadd(bits=4)",
    "shiftadd(bits=4,layout=block)",
    "shiftadd(bits=3)",
    "shiftadd(bits=3,layout=block)",
    "shiftadd(bits=2)",
    "shiftadd(bits=2,layout=block)",
    "bits(avg=2.5),shiftadd",
    "bits(avg=2.5),shiftadd(layout=block)",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256, help="evaluation sentences")
    parser.add_argument("--calib-sentences", type=int, default=256)
    parser.add_argument("--settings", nargs="*", help="qcompile pass specs (default: the full list)")
    parser.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime quantizers")
    parser.add_argument("--out", default="out/bench-shiftadd", help="folder for the built models")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    fp32 = cached_minilm_onnx()
    folder = minilm_path()
    evals = tokenize(folder, english_sentences(args.sentences, "eval"), max_length=64)
    calib = tokenize(folder, english_sentences(args.calib_sentences, "calib"), max_length=64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = embed(make_session(fp32), evals)

    print("| setting | MB | mean cos | min cos | build s | energy vs FP32 | vs FP16 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    fp32_vs_fp16 = (PJ["fp32_mul"] + PJ["fp32_add"]) / (PJ["fp16_mul"] + PJ["fp16_add"])
    print(f"| ONNX Runtime FP32 | {file_mb(fp32):.1f} | 1.0000 | 1.0000 | 0 | 1.000 | {fp32_vs_fp16:.3f} |", flush=True)
    if not args.no_ort:
        for label, build in ORT_SETTINGS:
            started = time.perf_counter()
            path = build(fp32, out / (re.sub(r"\W+", "_", label.lower()) + ".onnx"))
            seconds = time.perf_counter() - started
            cos = cosine_rows(embed(make_session(path), evals), reference)
            print(f"| {label} | {file_mb(path):.1f} | {cos.mean():.4f} | {cos.min():.4f} | {seconds:.0f} | - | - |",
                  flush=True)
    cosines = []
    for spec in args.settings or QCOMPILE_SETTINGS:
        started = time.perf_counter()
        result = qcompile.compile(fp32, passes=spec, calib=calib, output=out / re.sub(r"\W+", "_", spec))
        seconds = time.perf_counter() - started
        cos = cosine_rows(embed(qcompile.load(result.path).session, evals), reference)
        cosines.append(cos)
        energy = _energy(result)
        print(f"| qcompile {spec} | {result.manifest['sizes']['artifact_bytes'] / 1e6:.1f} | {cos.mean():.4f} | "
              f"{cos.min():.4f} | {seconds:.0f} | {energy} |", flush=True)
    return 0 if all(np.isfinite(c).all() for c in cosines) else 1


def _energy(result) -> str:
    """Linear layers' energy per token vs FP32 and FP16 (shift-add settings only)."""
    if not any(layer["format"] in ("bcq", "bcq_outliers") for layer in result.manifest["layers"].values()):
        return "- | -"
    estimate = model_energy(io.load(Path(result.path) / result.manifest["backend"]["model_file"]))
    return f"{estimate['ratio']:.3f} | {estimate['ratio_fp16']:.3f}"


if __name__ == "__main__":
    sys.exit(main())
