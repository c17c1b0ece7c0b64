"""all-MiniLM-L6-v2 end to end: qcompile's TVM artifact next to ONNX Runtime, in one run.

For one pass pipeline (default ``quant(bits=4)``): ONNX Runtime FP32, qcompile's ONNX
Runtime artifact and qcompile's TVM artifact (``--target cpu``; one per input shape,
since TVM artifacts are compiled for static shapes). Mean and min cosine of mean-pooled
sentence embeddings against FP32 on real English sentences (batches of 8 x 64 tokens),
and latency at batch 8 x seq 64 and batch 1 x seq 128, measured round-robin so
background load hits every model alike.

    python benchmarks/tvm_minilm.py [--passes "quant(bits=4)"] [--sentences 128] [--out DIR]
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

from ort_baselines import cosine_rows, interleaved_latency_ms, make_session, mean_pooled  # noqa: E402

import qcompile  # noqa: E402
from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize  # noqa: E402
from qcompile.frontends.text import english_sentences  # noqa: E402


class ArtifactSession:
    """``session.run(None, feeds)`` over a qcompile artifact (what the timing helpers call)."""

    def __init__(self, artifact) -> None:
        self.artifact = artifact

    def run(self, _names, feeds):
        return list(self.artifact.run(dict(feeds)).values())


def embed_fixed(session, feeds: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """Mean-pooled embeddings in batches of exactly ``batch`` rows (the last one padded)."""
    count = len(feeds["input_ids"])
    chunks = []
    for start in range(0, count, batch):
        index = np.arange(start, start + batch) % count
        part = {name: value[index] for name, value in feeds.items()}
        hidden = session.run(None, part)[0]
        chunks.append(mean_pooled(hidden, part["attention_mask"])[: min(batch, count - start)])
    return np.concatenate(chunks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="quant(bits=4)")
    parser.add_argument("--sentences", type=int, default=128, help="evaluation sentences")
    parser.add_argument("--calib-sentences", type=int, default=64)
    parser.add_argument("--target", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--arch", default=None, help="cuda: compute capability of this GPU, e.g. sm_90")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="out/bench-tvm-minilm")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    fp32 = cached_minilm_onnx()
    folder = minilm_path()
    evals = tokenize(folder, english_sentences(args.sentences, "eval"), max_length=64)
    calib = tokenize(folder, english_sentences(args.calib_sentences, "calib"), max_length=64)
    long_feed = tokenize(folder, [" ".join(english_sentences(12, "eval"))], max_length=128)
    batch8 = {k: v[:8] for k, v in evals.items()}
    out = Path(args.out)
    slug = re.sub(r"\W+", "_", args.passes)

    started = time.perf_counter()
    ort_result = qcompile.compile(fp32, passes=args.passes, calib=calib, backend="ort",
                                  output=out / f"ort_{slug}")
    ort_seconds = time.perf_counter() - started
    tvm_artifacts, tvm_seconds = {}, {}
    for shape, feed in (("8x64", batch8), ("1x128", long_feed)):
        started = time.perf_counter()
        result = qcompile.compile(fp32, passes=args.passes, calib=calib, backend="tvm", target=args.target,
                                  arch=args.arch, input_shapes={name: value.shape for name, value in feed.items()},
                                  output=out / f"tvm_{slug}_{shape}")
        tvm_seconds[shape] = time.perf_counter() - started
        tvm_artifacts[shape] = (result, qcompile.load(result.path))

    fp32_session = make_session(fp32)
    ort_session = qcompile.load(ort_result.path).session
    tvm8 = ArtifactSession(tvm_artifacts["8x64"][1])
    tvm1 = ArtifactSession(tvm_artifacts["1x128"][1])
    reference = embed_fixed(fp32_session, evals, 8)
    cosines = [cosine_rows(embed_fixed(s, evals, 8), reference) for s in (fp32_session, ort_session, tvm8)]
    lat8 = interleaved_latency_ms([fp32_session, ort_session, tvm8], batch8, rounds=args.rounds,
                                  repeats=args.rounds * 6)
    lat1 = interleaved_latency_ms([fp32_session, ort_session, tvm1], long_feed, rounds=args.rounds,
                                  repeats=args.rounds * 6)
    sizes = [os.path.getsize(fp32) / 1e6, ort_result.manifest["sizes"]["artifact_bytes"] / 1e6,
             tvm_artifacts["8x64"][0].manifest["sizes"]["artifact_bytes"] / 1e6]
    labels = ["ONNX Runtime FP32", f"qcompile ORT {args.passes}", f"qcompile TVM {args.passes}"]
    build = [0.0, ort_seconds, tvm_seconds["8x64"]]
    print(f"all-MiniLM-L6-v2, {len(reference)} real sentences, {os.cpu_count()} threads, {platform.machine()}; "
          f"latency relative to ONNX Runtime FP32 = {lat8[0]:.1f} ms (8x64) and {lat1[0]:.1f} ms (1x128)")
    print("| model | MB | mean cos | min cos | latency 8x64 | latency 1x128 | build s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, mb, cos, l8, l1, seconds in zip(labels, sizes, cosines, lat8, lat1, build, strict=True):
        print(f"| {label} | {mb:.1f} | {cos.mean():.4f} | {cos.min():.4f} | {l8 / lat8[0]:.2f}x | "
              f"{l1 / lat1[0]:.2f}x | {seconds:.0f} |")
    gap = abs(float(cosines[2].mean()) - float(cosines[1].mean()))
    print(f"mean cosine gap TVM vs ORT artifact: {gap:.5f}")
    return 0 if all(np.isfinite(c).all() for c in cosines) else 1


if __name__ == "__main__":
    sys.exit(main())
