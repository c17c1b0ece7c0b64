"""One SmolLM2 decode step at a fixed past length: ONNX Runtime FP32 next to qcompile's ORT and TVM artifacts.

TVM artifacts are compiled for static shapes, so a TVM build of the decode graph runs one
step shape: ``--past`` cached positions plus one new token (batch 1). This script builds
each ``--passes`` pipeline twice from the cached decode export, with the ONNX Runtime
backend (dynamic shapes) and the TVM backend (``input_shapes`` fixing that step), fills
the KV cache by running FP32 over ``--past`` tokens of the built-in English eval text, and
times that same step for every model, interleaved round by round. Also reported: the
step's logits against FP32's (cosine, and whether the argmax token agrees).

    python benchmarks/smollm2_step.py [--passes "quant(bits=4,group_size=64)" ...] [--past 127]
                                      [--rounds 5] [--steps 20] [--calib-windows 16]

Builds go to ``--work`` (default ``~/.cache/qcompile/bench-smollm2-step``) and are reused.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from smollm2 import _build_qcompile

import qcompile
from qcompile.frontends.llm import cached_causal_lm_onnx, smollm2_path
from qcompile.frontends.text import english_text
from qcompile.ir.runtime import make_session
from qcompile.llm_eval import SETTLE_SECONDS, calibration_arrays, open_lm, tokenizer_for

DEFAULT_PASSES = ("quant(bits=4,group_size=64)",)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", action="append", help="a qcompile pipeline (repeatable); default: "
                        + "; ".join(DEFAULT_PASSES))
    parser.add_argument("--past", type=int, default=127, help="cached positions before the timed step")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model and round")
    parser.add_argument("--calib-windows", type=int, default=16, help="calibration windows of 256 tokens")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile" / "bench-smollm2-step")
    parser.add_argument("--rebuild", action="store_true", help="rebuild models found in --work")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    source = cached_causal_lm_onnx(None, "decode")
    fp32 = open_lm(source)
    tokenizer = tokenizer_for(fp32, smollm2_path())
    past_inputs = {i.name: (int(i.shape[1]), int(i.shape[3])) for i in fp32.past_inputs}
    calib = calibration_arrays(fp32.input_names, tokenizer, samples=args.calib_windows, past_shapes=past_inputs)
    del fp32
    reference_model = _OrtFile(source)
    feeds = _step_feeds(reference_model, tokenizer, past_inputs, args.past)
    shapes = {name: tuple(value.shape) for name, value in feeds.items()}

    args.work.mkdir(parents=True, exist_ok=True)
    models: dict[str, tuple[object, float]] = {"ONNX Runtime FP32": (reference_model, source.stat().st_size / 1e6)}
    for spec in args.passes or list(DEFAULT_PASSES):
        for backend in ("ort", "tvm"):
            label, target, seconds = _build_qcompile(
                source, args.work, spec, calib, args.rebuild, backend=backend,
                input_shapes=shapes if backend == "tvm" else None, suffix=f"-tvm-p{args.past}" if backend == "tvm" else "")
            print(f"{label} ({backend}): {target.name}, {seconds:.0f} s", flush=True)
            manifest = json.loads((target / "manifest.json").read_text())
            models[f"qcompile {spec} ({backend.upper()})"] = (qcompile.load(target),
                                                             manifest["sizes"]["artifact_bytes"] / 1e6)

    logits = {label: _logits(model.run(feeds)) for label, (model, _) in models.items()}
    reference = logits["ONNX Runtime FP32"]
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(args.rounds):
        for label, (model, _) in models.items():
            model.run(feeds)  # warm
            time.sleep(SETTLE_SECONDS)  # the previous model's thread pool goes quiet
            started = time.perf_counter()
            for _ in range(args.steps):
                model.run(feeds)
            times[label].append((time.perf_counter() - started) / args.steps)
    base = float(np.median(times["ONNX Runtime FP32"]))
    print(f"SmolLM2-135M-Instruct, one decode step at batch 1 after {args.past} cached positions (English eval "
          f"text), median of {args.rounds} interleaved rounds of {args.steps} steps; ONNX Runtime FP32 = "
          f"{1e3 * base:.1f} ms per step; {platform.machine()}, MB = 10^6 bytes.\n")
    print("| setting | MB | step ms | x FP32 | logits cos vs FP32 | same next token |")
    print("|---|---:|---:|---:|---:|:---:|")
    for label, (_, mb) in models.items():
        step = float(np.median(times[label]))
        got = logits[label]
        cosine = float(got @ reference / np.linalg.norm(got) / np.linalg.norm(reference))
        same = "yes" if int(np.argmax(got)) == int(np.argmax(reference)) else "no"
        print(f"| {label} | {mb:.1f} | {1e3 * step:.1f} | {step / base:.2f}x | {cosine:.4f} | {same} |")
    print(f"\nProduced by: `.venv/bin/python benchmarks/smollm2_step.py --past {args.past} --rounds {args.rounds} "
          f"--steps {args.steps}" + "".join(f' --passes "{p}"' for p in args.passes or []) + "`")
    return 0


class _OrtFile:
    """The FP32 export in an ONNX Runtime session, with the artifacts' ``run(feeds) -> dict``."""

    def __init__(self, path: Path) -> None:
        self.session = make_session(str(path))
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(None, feeds), strict=True))


def _step_feeds(fp32: _OrtFile, tokenizer, past_inputs: dict[str, tuple[int, int]], past: int) -> dict[str, np.ndarray]:
    """input_ids / attention_mask / past_key_values.* of the step after ``past`` real tokens (FP32's cache)."""
    ids = np.asarray(tokenizer(english_text("eval"), add_special_tokens=False)["input_ids"][: past + 1], np.int64)
    prompt = {"input_ids": ids[None, :past], "attention_mask": np.ones((1, past), np.int64)}
    prompt.update({name: np.zeros((1, heads, 0, dim), np.float32) for name, (heads, dim) in past_inputs.items()})
    outputs = fp32.run(prompt)
    feeds = {"input_ids": ids[None, past:], "attention_mask": np.ones((1, past + 1), np.int64)}
    feeds.update({name: outputs[name.replace("past_key_values", "present")] for name in past_inputs})
    return feeds


def _logits(outputs: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(outputs["logits"], np.float64).reshape(-1)


if __name__ == "__main__":
    sys.exit(main())
