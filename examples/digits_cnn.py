"""A CNN on real data: scikit-learn's handwritten digits through fold and quant.

Trains a small Conv + BatchNorm network on the 8x8 digits (1797 real images, seconds on
a CPU), exports it to ONNX, and prints test accuracy and size for the FP32 model and for
qcompile's ``fold`` (BatchNorm folded into the convolutions: exact), ``split`` (SplitQuant,
each Conv filter clustered on its own; after ``fold``, since BatchNorm folds into a single
Conv) and ``quant`` at 8, 4, 3 and 2 bits (RTN and GPTQ; Conv layers keep RTN), so the
Conv + BatchNorm path runs on real data.

    python examples/digits_cnn.py [--epochs 30] [--out out/digits]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import qcompile
from qcompile.frontends.torch import export_module
from qcompile.ir.runtime import make_session

SETTINGS = [
    "fold",
    "fold,quant(bits=8)",
    "fold,quant(bits=4)",
    "fold,quant(bits=4,method=gptq)",
    "fold,quant(bits=3)",
    "fold,quant(bits=3,method=gptq)",
    "fold,quant(bits=2,method=gptq)",
    "fold,quant(bits=2,group_size=0)",
    "fold,split,quant(bits=4)",
    "fold,split,quant(bits=3,method=gptq)",
    "fold,split,quant(bits=2,method=gptq)",
    "fold,split,quant(bits=2,group_size=0)",
    "fold,quant(bits=8,act_bits=8)",
]


class DigitsNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        )
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 16, 128), torch.nn.ReLU(),
                                        torch.nn.Linear(128, 10))

    def forward(self, x):
        return self.head(self.features(x))


def train(epochs: int, seed: int = 0):
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.3, random_state=seed,
                                                        stratify=digits.target)
    torch.manual_seed(seed)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    inputs, labels = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(inputs)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval(), x_train, x_test, y_test


def accuracy(session, images: np.ndarray, labels: np.ndarray) -> float:
    logits = session.run(None, {"image": images})[0]
    return float((logits.argmax(1) == labels).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="out/digits")
    args = parser.parse_args()
    model, x_train, x_test, y_test = train(args.epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_module(model, torch.from_numpy(x_test[:2]), out / "digits.onnx", input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                              fold=False)  # keep BatchNormalization for qcompile's fold pass
    calib = {"image": x_train[:256]}
    table = Table(title=f"digits CNN, {len(y_test)} held-out real images")
    for column in ("setting", "accuracy", "KB on disk", "kernels"):
        table.add_column(column, justify="left" if column in ("setting", "kernels") else "right")
    table.add_row("FP32 (ONNX Runtime)", f"{accuracy(make_session(onnx_path), x_test, y_test):.4f}",
                  f"{onnx_path.stat().st_size / 1e3:.0f}", "-")
    with tempfile.TemporaryDirectory() as folder:
        for spec in SETTINGS:
            result = qcompile.compile(onnx_path, passes=spec, calib=calib, output=Path(folder) / "artifact")
            session = qcompile.load(result.path).session
            kernels = sorted({layer["kernel"].split(" (")[0] for layer in result.manifest["layers"].values()})
            table.add_row(f"qcompile {spec}", f"{accuracy(session, x_test, y_test):.4f}",
                          f"{result.manifest['sizes']['artifact_bytes'] / 1e3:.0f}", ", ".join(kernels) or "-")
    Console(width=140).print(table)
    print("BatchNormalization nodes in the exported model:",
          sum(node.op_type == "BatchNormalization" for node in onnx.load(onnx_path).graph.node))
    return 0


if __name__ == "__main__":
    sys.exit(main())
