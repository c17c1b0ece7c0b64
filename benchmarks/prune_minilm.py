"""Pruning on all-MiniLM-L6-v2 next to FP32 and ONNX Runtime's own quantizers, in one run.

Settings: 50% unstructured (magnitude vs Wanda, with and without the SparseGPT update),
2:4, and 50% + 4-bit GPTQ (sparse storage), each also followed by ``tune`` (distillation
with the masks fixed, on the calibration sentences only); ORT int8 dynamic and
MatMulNBits 4-bit as the reference points. Columns as in ``benchmarks/minilm.py``: MB on disk (whole artifact for
qcompile), mean/min cosine of mean-pooled sentence embeddings vs FP32 on real English
sentences (held apart from the calibration ones), latency relative to FP32 measured
round-robin (ONNX Runtime has no sparse kernel: pruned layers run dense).

    python benchmarks/prune_minilm.py [--sentences 256] [--calib-sentences 256] [--pack] [--only SPEC ...]
                                      [--no-ort] [--no-latency] [--update-readme]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ort_baselines import (  # noqa: E402
    cosine_rows,
    embed,
    file_mb,
    interleaved_latency_ms,
    make_session,
    ort_int8_dynamic,
    ort_matmulnbits,
)

import qcompile  # noqa: E402
from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize  # noqa: E402
from qcompile.frontends.text import english_sentences  # noqa: E402

README = HERE.parent / "README.md"
MARKERS = ("<!-- bench:prune-minilm:start -->", "<!-- bench:prune-minilm:end -->")

ORT_SETTINGS = [
    ("ORT int8 dynamic", lambda src, dst: ort_int8_dynamic(src, dst)),
    ("ORT MatMulNBits RTN 4-bit g32", lambda src, dst: ort_matmulnbits(src, dst, 4, algo="rtn")),
]
QCOMPILE_SETTINGS = [
    "prune(sparsity=0.5)",
    "prune(sparsity=0.5,method=wanda)",
    "prune(sparsity=0.5,method=wanda,update=true)",
    "prune(pattern=2:4,method=wanda)",
    "prune(pattern=2:4,method=wanda,update=true)",
    "quant(bits=4,method=gptq)",
    "prune(sparsity=0.5,method=wanda),quant(bits=4,method=gptq)",
    "prune(sparsity=0.5,method=wanda,update=true),quant(bits=4,method=gptq)",
    "prune(sparsity=0.5,method=wanda,embeddings=true),quant(bits=4,method=gptq)",
    "prune(sparsity=0.5,method=wanda),tune",
    "prune(pattern=2:4,method=wanda),tune",
    "prune(sparsity=0.5,method=wanda),tune,quant(bits=4,method=gptq)",
    "prune(sparsity=0.5,method=wanda,embeddings=true),tune,quant(bits=4,method=gptq)",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256, help="evaluation sentences")
    parser.add_argument("--calib-sentences", type=int, default=256)
    parser.add_argument("--only", nargs="*", help="qcompile pass specs to run instead of the default list")
    parser.add_argument("--pack", action="store_true",
                        help="calibration samples = consecutive sentences joined to fill max_length (no padding rows)")
    parser.add_argument("--no-ort", action="store_true", help="leave out ONNX Runtime's quantizers")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency columns")
    parser.add_argument("--out", default="out/bench-prune-minilm", help="folder for the built models")
    parser.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    fp32 = cached_minilm_onnx()
    folder = minilm_path()
    evals = tokenize(folder, english_sentences(args.sentences, "eval"), max_length=64)
    if args.pack:  # padding rows carry no signal but would weigh in the input norms and Hessians
        sentences = english_sentences(min(6 * args.calib_sentences, 1869), "calib")
        joined = [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)][: args.calib_sentences]
        calib = tokenize(folder, joined, max_length=64)
    else:
        calib = tokenize(folder, english_sentences(args.calib_sentences, "calib"), max_length=64)
    long_feed = tokenize(folder, [" ".join(english_sentences(12, "eval"))], max_length=128)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = [("ONNX Runtime FP32", make_session(fp32), file_mb(fp32), 0.0)]
    if not args.no_ort:
        for label, build in ORT_SETTINGS:
            started = time.perf_counter()
            path = build(fp32, out / (re.sub(r"\W+", "_", label.lower()) + ".onnx"))
            rows.append((label, make_session(path), file_mb(path), time.perf_counter() - started))
    for spec in args.only or QCOMPILE_SETTINGS:
        started = time.perf_counter()
        result = qcompile.compile(fp32, passes=spec, calib=calib, output=out / re.sub(r"\W+", "_", spec))
        seconds = time.perf_counter() - started
        artifact = qcompile.load(result.path)
        rows.append((f"qcompile {spec}", artifact.session, result.manifest["sizes"]["artifact_bytes"] / 1e6,
                     seconds))
        print(f"built {spec} in {seconds:.0f} s", file=sys.stderr, flush=True)

    reference = embed(rows[0][1], evals)
    cosines = [cosine_rows(embed(session, evals), reference) for _, session, _, _ in rows]
    sessions = [session for _, session, _, _ in rows]
    if args.no_latency:
        batch8 = batch1 = [float("nan")] * len(rows)
    else:
        batch8 = interleaved_latency_ms(sessions, {k: v[:8] for k, v in evals.items()}, rounds=5, repeats=20)
        batch1 = interleaved_latency_ms(sessions, long_feed, rounds=5, repeats=20)

    lines = ["| setting | MB | mean cos | min cos | latency 8x64 | latency 1x128 | build s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for (label, _, mb, seconds), cos, lat8, lat1 in zip(rows, cosines, batch8, batch1, strict=True):
        lines.append(f"| {label} | {mb:.1f} | {cos.mean():.4f} | {cos.min():.4f} | {lat8 / batch8[0]:.2f}x | "
                     f"{lat1 / batch1[0]:.2f}x | {seconds:.0f} |")
    table = "\n".join(lines)
    kind = "windows of joined sentences" if args.pack else "others"
    context = (f"all-MiniLM-L6-v2, {len(reference)} real sentences (calibration: {args.calib_sentences} {kind}); "
               f"latency relative to ONNX Runtime FP32 = {batch8[0]:.1f} ms (8x64) and {batch1[0]:.1f} ms (1x128) "
               f"on {os.cpu_count()} threads, {platform.machine()}; MB = 10^6 bytes.")
    print(context)
    print(table)
    if args.update_readme:
        command = " ".join(["benchmarks/prune_minilm.py", *(repr(a) if "(" in a else a for a in sys.argv[1:])])
        _update_readme(f"{context}\n\n{table}\n\nRegenerate: `.venv/bin/python {command}`")
    return 0 if all(np.isfinite(c).all() for c in cosines) else 1


def _update_readme(block: str) -> None:
    text = README.read_text()
    start, end = MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} section")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    README.write_text(f"{before}{start}\n{block}\n{end}{after}")


if __name__ == "__main__":
    sys.exit(main())
