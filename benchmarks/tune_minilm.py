"""Settings of ``tune`` on all-MiniLM-L6-v2: prune once, then try each tune spec on a copy.

Prints, per tune spec, the mean/min cosine of mean-pooled sentence embeddings vs FP32 on
real English eval sentences (held apart from the calibration ones), the pass's seconds
and its stats (calibration-output error before/after). Pruning runs once on the first
``--calib-sentences`` calibration sentences; tune trains on ``--tune-sentences`` of them
(default: the same), so the effect of more calibration text can be measured alone.

    python benchmarks/tune_minilm.py [--prune SPEC] [--sentences 256] [--calib-sentences 256]
                                     [--tune-sentences N] [--pack] TUNE_SPEC ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ort_baselines import cosine_rows, embed  # noqa: E402

from qcompile.frontends import load_model  # noqa: E402
from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize  # noqa: E402
from qcompile.frontends.text import english_sentences  # noqa: E402
from qcompile.ir import runtime  # noqa: E402
from qcompile.ir.canonicalize import canonicalize  # noqa: E402
from qcompile.passes.calibration import load_calibration  # noqa: E402
from qcompile.passes.context import PassContext  # noqa: E402
from qcompile.passes.registry import parse_pipeline  # noqa: E402

CALIB_SENTENCES_AVAILABLE = 1869


def _texts(count: int, pack: bool) -> list[str]:
    if not pack:
        return english_sentences(count, "calib")
    sentences = english_sentences(min(6 * count, CALIB_SENTENCES_AVAILABLE), "calib")
    return [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)][:count]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="tune pass specs, e.g. 'tune(steps=100)'")
    parser.add_argument("--prune", default="prune(sparsity=0.5,method=wanda)")
    parser.add_argument("--sentences", type=int, default=256, help="evaluation sentences")
    parser.add_argument("--calib-sentences", type=int, default=256)
    parser.add_argument("--tune-sentences", type=int, default=None)
    parser.add_argument("--pack", action="store_true", help="calibration samples = 6 sentences joined")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = minilm_path()
    model = canonicalize(load_model(cached_minilm_onnx()), {})
    evals = tokenize(folder, english_sentences(args.sentences, "eval"), max_length=64)
    prune_calib = load_calibration(tokenize(folder, _texts(args.calib_sentences, args.pack), max_length=64), model)
    tune_count = args.tune_sentences or args.calib_sentences
    tune_calib = load_calibration(tokenize(folder, _texts(tune_count, args.pack), max_length=64), model)
    reference = embed(runtime.make_session(model), evals)

    pruned = model.copy()
    started = time.perf_counter()
    for pass_ in parse_pipeline(args.prune):
        pass_.run(pruned, PassContext(calib=prune_calib))
    cosines = cosine_rows(embed(runtime.make_session(pruned), evals), reference)
    print(f"{args.prune} (calibration {prune_calib.n_samples}): mean {cosines.mean():.4f} min {cosines.min():.4f} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    for spec in args.specs:
        tuned = pruned.copy()
        started = time.perf_counter()
        (pass_,) = parse_pipeline(spec)
        stats = pass_.run(tuned, PassContext(calib=tune_calib, reference=model)).stats
        cosines = cosine_rows(embed(runtime.make_session(tuned), evals), reference)
        summary = {k: v for k, v in stats.items() if k != "layers"}
        print(f"  {spec} (calibration {tune_calib.n_samples}): mean {cosines.mean():.4f} min {cosines.min():.4f} "
              f"({time.perf_counter() - started:.0f} s) {json.dumps(summary)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
