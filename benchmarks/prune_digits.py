"""Pruning the digits CNN (examples/digits_cnn.py) next to FP32 and ONNX Runtime int8, in one run.

Trains the Conv + BatchNorm network on scikit-learn's 8x8 digits (seconds), then for each
setting: held-out accuracy, cosine of the logits against FP32 (finer than accuracy, which
saturates on this easy task), KB on disk, and latency relative to FP32 on a batch of 256
images, measured round-robin. The convolutions use magnitude (Wanda's input norms are
collected for MatMul/Gemm only); the first conv (288 weights) is under ``min_size``.

    python benchmarks/prune_digits.py [--epochs 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

from digits_cnn import train  # noqa: E402
from ort_baselines import cosine_rows, interleaved_latency_ms, make_session, ort_int8_dynamic  # noqa: E402

import qcompile  # noqa: E402
from qcompile.frontends.torch import export_module  # noqa: E402

SETTINGS = [
    "fold",
    "fold,prune(sparsity=0.5)",
    "fold,prune(sparsity=0.5,method=wanda)",
    "fold,prune(sparsity=0.5,method=wanda,update=true)",
    "fold,prune(pattern=2:4,method=wanda)",
    "fold,quant(bits=4,method=gptq)",
    "fold,prune(sparsity=0.5,method=wanda),quant(bits=4,method=gptq)",
    "fold,prune(sparsity=0.75,method=wanda,update=true),quant(bits=4,method=gptq)",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    model, x_train, x_test, y_test = train(args.epochs)
    calib = {"image": x_train[:256]}
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = export_module(model, torch.from_numpy(x_test[:2]), Path(folder) / "digits.onnx",
                                  input_names=["image"], output_names=["logits"],
                                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, fold=False)
        rows = [("ONNX Runtime FP32", make_session(onnx_path), onnx_path.stat().st_size / 1e3)]
        int8 = ort_int8_dynamic(onnx_path, Path(folder) / "int8.onnx")
        rows.append(("ORT int8 dynamic", make_session(int8), int8.stat().st_size / 1e3))
        for index, spec in enumerate(SETTINGS):
            result = qcompile.compile(onnx_path, passes=spec, calib=calib, output=Path(folder) / f"a{index}")
            rows.append((f"qcompile {spec}", qcompile.load(result.path).session,
                         result.manifest["sizes"]["artifact_bytes"] / 1e3))
        feed = {"image": x_test[:256]}
        reference = rows[0][1].run(None, {"image": x_test})[0]
        latency = interleaved_latency_ms([session for _, session, _ in rows], feed, rounds=5, repeats=50)
        print(f"digits CNN, {len(y_test)} held-out real images; latency relative to ONNX Runtime FP32 = "
              f"{latency[0]:.2f} ms per batch of 256")
        print("| setting | accuracy | logit cos (mean) | KB | latency |\n|---|---:|---:|---:|---:|")
        for (label, session, kb), ms in zip(rows, latency, strict=True):
            logits = session.run(None, {"image": x_test})[0]
            accuracy = float((logits.argmax(1) == y_test).mean())
            cosine = float(np.mean(cosine_rows(logits, reference)))
            print(f"| {label} | {accuracy:.4f} | {cosine:.4f} | {kb:.0f} | {ms / latency[0]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
