"""How shiftadd's fitting time grows with the layer size (synthetic layers up to 4096 x 11008).

For each shape ``rows x cols``: a random weight, a Hessian ``X^T X`` of 2048 correlated
calibration rows, then the seconds of :func:`bcq_gptq` split into the inverse-Hessian
factor (``O(cols^3)``, shared with GPTQ) and the BCQ column walk (fits ``O(rows * cols)``
plus GPTQ's rank-1 updates ``O(rows * cols * block)`` and the lazy block updates ``O(rows *
cols^2 / block)``), and the seconds per million parameters.

    python benchmarks/shiftadd_scaling.py [--bits 3] [--layout column] [--shapes 384x384 4096x11008]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from qcompile.passes import gptq
from qcompile.passes.bcqfit import bcq_gptq

SHAPES = ["384x384", "1024x1024", "1536x384", "384x1536", "2048x2048", "4096x4096", "4096x11008", "11008x4096"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--layout", choices=["column", "block"], default="column")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shapes", nargs="*", default=SHAPES)
    args = parser.parse_args()
    print(f"bcq_gptq bits={args.bits} layout={args.layout} rounds={args.rounds}")
    print("| rows x cols | M params | factor s | walk s | total s | s per M params |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        rows, cols = (int(v) for v in shape.split("x"))
        rng = np.random.default_rng(0)
        weight = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        inputs = rng.standard_normal((2048, 32)) @ rng.standard_normal((32, cols)) + rng.standard_normal((2048, cols))
        hessian = inputs.T @ inputs
        started = time.perf_counter()
        gptq.inverse_hessian_factor(hessian, 0.01)
        factor_seconds = time.perf_counter() - started
        started = time.perf_counter()
        bcq_gptq(weight, hessian, args.bits, layout=args.layout, rounds=args.rounds)
        total = time.perf_counter() - started
        params = rows * cols / 1e6
        print(f"| {rows}x{cols} | {params:.2f} | {factor_seconds:.1f} | {total - factor_seconds:.1f} | {total:.1f} | "
              f"{total / params:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
