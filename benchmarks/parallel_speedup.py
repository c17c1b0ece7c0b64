"""Local speed-up of per-layer work with ``--jobs``: MiniLM through a weight pass, jobs=1 vs jobs=N.

    python benchmarks/parallel_speedup.py --passes "quant(bits=4,method=gptq)" --jobs 2 --repeats 2

Runs alternate (1, N, 1, N, ...) so that load from other work on the machine hits both
alike; the table gives the pass's own seconds (the manifest's per-pass time, calibration
statistics included) and the whole compile's, best of ``--repeats``, and checks that the
artifacts are byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import numpy as np

import qcompile
from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize
from qcompile.frontends.text import english_sentences


def _model_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name != "manifest.json":
            digest.update(path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="quant(bits=4,method=gptq)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=64)
    args = parser.parse_args()
    model = cached_minilm_onnx()
    with tempfile.TemporaryDirectory(prefix="qcompile-speedup-") as tmp:
        calib = Path(tmp) / "calib.npz"
        np.savez(calib, **tokenize(minilm_path(), english_sentences(args.sentences, "calib"), max_length=64))
        times: dict[int, list[tuple[float, float]]] = {1: [], args.jobs: []}
        digests: set[str] = set()
        for repeat in range(args.repeats):
            for jobs in (1, args.jobs):
                out = Path(tmp) / f"out-{jobs}-{repeat}"
                result = qcompile.compile(model, passes=args.passes, calib=calib, output=out, jobs=jobs)
                pass_seconds = sum(r["seconds"] for r in result.manifest["passes"])
                times[jobs].append((pass_seconds, result.manifest["seconds"]))
                digests.add(_model_digest(out))
    serial_pass = min(t[0] for t in times[1])
    serial_total = min(t[1] for t in times[1])
    print(f"\nMiniLM `{args.passes}`, {args.sentences} calibration sentences, best of {args.repeats}\n")
    print("| jobs | pass s | compile s | pass speed-up |")
    print("|---:|---:|---:|---:|")
    for jobs in (1, args.jobs):
        best_pass = min(t[0] for t in times[jobs])
        best_total = min(t[1] for t in times[jobs])
        print(f"| {jobs} | {best_pass:.1f} | {best_total:.1f} | {serial_pass / best_pass:.2f}x |")
    print(f"\nartifacts byte-identical across jobs: {len(digests) == 1} (serial compile {serial_total:.1f} s)")


if __name__ == "__main__":
    main()
