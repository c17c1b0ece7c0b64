"""Every model graph the ``onnx`` wheel ships, through qcompile: compiled, or rejected in one line.

The wheel's ``onnx/backend/test/data`` holds real graphs (PyTorch-converted layers and
operators, small CNNs such as AlexNet, DenseNet, Inception, ResNet-50 in "light" form),
most with reference inputs and outputs. Each is compiled with ``--passes`` (default
``quant(bits=8)``) and the artifact run on the reference inputs. Outcomes:

* ``reproduced``: every output matches the reference (float outputs within
  ``--tolerance`` relative L2 error, others exactly);
* ``compiled``: no reference outputs ship; the artifact ran on generated inputs and
  matched the FP32 model the same way;
* ``rejected``: qcompile refused the model with one clear line (the reason is listed);
* ``mismatch``, ``crash`` (any other exception: a bug), ``timeout``.

    python benchmarks/onnx_sweep.py [--passes "quant(bits=8)"] [--timeout 120] [--only SUBSTRING]

``--timeout`` counts the CPU seconds of this process (all its threads) per model, so a
machine shared with other work does not turn a slow case into a timeout; a case also times
out after ``WALL_FACTOR`` times as many wall-clock seconds (a hang that uses no CPU).

Exit status 1 when anything crashed, timed out or mismatched.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import qcompile
from qcompile.errors import QCompileError
from qcompile.frontends import load_model
from qcompile.ir.runtime import make_session
from qcompile.passes.calibration import random_calibration

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
SUITES = ("simple", "pytorch-converted", "pytorch-operator", "light")


@dataclass
class Case:
    name: str
    model: Path
    inputs: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)


@dataclass
class Outcome:
    case: str
    status: str
    detail: str = ""
    error: float = 0.0
    seconds: float = 0.0


def cases(only: str | None = None) -> list[Case]:
    found = []
    for suite in SUITES:
        for path in sorted((DATA / suite).glob("*")):
            if path.is_dir() and (path / "model.onnx").exists():
                data = path / "test_data_set_0"
                found.append(Case(f"{suite}/{path.name}", path / "model.onnx", sorted(data.glob("input_*.pb")),
                                  sorted(data.glob("output_*.pb"))))
            elif path.suffix == ".onnx":
                found.append(Case(f"{suite}/{path.stem}", path))
    return [case for case in found if only is None or only in case.name]


WALL_FACTOR = 3


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _read_tensor(path: Path) -> np.ndarray:
    tensor = onnx.TensorProto()
    tensor.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(tensor)


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    if not np.issubdtype(expected.dtype, np.floating):
        return 0.0 if np.array_equal(actual, expected) else float("inf")
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    if not np.isfinite(e).all():
        same = np.array_equal(np.isfinite(a), np.isfinite(e)) and np.allclose(a[np.isfinite(e)], e[np.isfinite(e)],
                                                                               rtol=1e-3, atol=1e-5)
        return 0.0 if same else float("inf")
    top = float(np.abs(e).max(initial=0.0)) or 1.0  # norms of x / top: huge float64 outputs do not overflow
    scale = max(top * float(np.linalg.norm(e / top)), 1e-6)
    return top * float(np.linalg.norm((a - e) / top)) / scale


def run_case(case: Case, passes: str, tolerance: float, timeout: int, folder: Path) -> Outcome:
    started = time.perf_counter()
    signal.signal(signal.SIGPROF, _alarm)
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_PROF, timeout)
    signal.alarm(WALL_FACTOR * timeout)
    try:
        proto = onnx.load(case.model)
        input_names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
        if case.inputs:
            feeds = {name: _read_tensor(path) for name, path in zip(input_names, case.inputs, strict=False)}
            expected = [_read_tensor(path) for path in case.outputs]
        else:
            model = load_model(case.model)
            sample = random_calibration(model, 1, seed=0)
            feeds = next(iter(sample.batches()))
            expected = make_session(case.model).run(None, feeds)
        result = qcompile.compile(case.model, passes=passes, output=folder / "artifact")
        actual = qcompile.load(result.path).run(feeds)
        outputs = list(actual.values()) if isinstance(actual, dict) else list(actual)
        error = max((_relative_error(a, e) for a, e in zip(outputs, expected, strict=False)), default=0.0)
        status = "reproduced" if case.inputs else "compiled"
        if error > tolerance:
            status = "mismatch"
        return Outcome(case.name, status, "", error, time.perf_counter() - started)
    except _Timeout:
        return Outcome(case.name, "timeout", f"over {timeout} CPU s or {WALL_FACTOR * timeout} s",
                       seconds=time.perf_counter() - started)
    except QCompileError as exc:
        lines = str(exc).strip().splitlines()
        status = "rejected" if len(lines) == 1 else "crash"
        return Outcome(case.name, status, lines[0] if lines else type(exc).__name__,
                       seconds=time.perf_counter() - started)
    except Exception as exc:  # a bug: any failure that is not a clear QCompileError
        return Outcome(case.name, "crash", f"{type(exc).__name__}: {str(exc).strip()[:200]}",
                       seconds=time.perf_counter() - started)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.alarm(0)


def sweep(passes: str = "quant(bits=8)", tolerance: float = 0.05, timeout: int = 120,
          only: str | None = None) -> list[Outcome]:
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, case in enumerate(cases(only)):
            outcomes.append(run_case(case, passes, tolerance, timeout, Path(tmp) / str(index)))
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="quant(bits=8)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest relative L2 error of an output")
    parser.add_argument("--timeout", type=int, default=120, help="CPU seconds per model (wall-clock: 3x)")
    parser.add_argument("--only", help="cases whose name contains this")
    args = parser.parse_args()
    outcomes = sweep(args.passes, args.tolerance, args.timeout, args.only)
    for outcome in outcomes:
        if outcome.status not in ("reproduced", "compiled"):
            print(f"{outcome.status:10s} {outcome.case}: {outcome.detail or f'error {outcome.error:.3g}'}")
    counts = Counter(o.status for o in outcomes)
    worst = max((o.error for o in outcomes if o.status in ("reproduced", "compiled")), default=0.0)
    print(f"\n{len(outcomes)} models, passes {args.passes}: " + ", ".join(f"{n} {s}" for s, n in counts.most_common())
          + f"; largest relative output error of a compiled model {worst:.2e}; "
          + f"{sum(o.seconds for o in outcomes):.0f} s")
    return 1 if counts["crash"] or counts["timeout"] or counts["mismatch"] else 0


if __name__ == "__main__":
    sys.exit(main())
