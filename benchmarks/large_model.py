"""Peak memory and compile time of models larger than memory, at several sizes.

For each size, a synthetic transformer (:mod:`synthetic_transformer`, weights in external
data) is written streamed, then compiled in a fresh process so its peak RSS is its own:

    python benchmarks/large_model.py --sizes 0.5,1,2.2 --passes "quant(bits=4)"

Columns: float32 weight GB, the input's parameters, compile seconds, peak RSS (the
kernel's high-water mark, ``ru_maxrss``: anonymous memory plus the mapped pages of the
weights being read), peak anonymous RSS (sampled every 20 ms from ``/proc/self/status``:
the memory that must really fit; mapped weight pages are page cache the kernel can drop),
and the artifact's size. The output error is the artifact's against the FP32 model (ONNX
Runtime maps the FP32 weights from their file); the IR's per-pass errors are skipped
(``max_reference_bytes=0``: its reference functions would decode every weight at once).
``--keep`` keeps the generated models in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_transformer import Shape, write_transformer  # noqa: E402


class AnonPeak:
    """Samples this process's ``RssAnon`` in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_bytes("RssAnon"))
            time.sleep(self.interval)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_bytes("RssAnon"))


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def compile_one(model: str, passes: str, output: str, calib: str | None, jobs: int) -> dict:
    """Compile in this process; the measurements as a dict (run through ``--one``)."""
    import qcompile

    baseline = _status_bytes("VmRSS")
    started = time.perf_counter()
    with AnonPeak() as anon:
        # IR reference sessions decode every weight at once: the artifact's own error is measured instead
        result = qcompile.compile(model, passes=passes, output=output, calib=calib, jobs=jobs, max_reference_bytes=0)
    seconds = time.perf_counter() - started
    errors = result.manifest["errors"]
    return {
        "seconds": round(seconds, 1),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_anon": anon.peak,
        "baseline_rss": baseline,
        "artifact_bytes": result.manifest["sizes"]["artifact_bytes"],
        "measured": "artifact_vs_fp32" in errors,
        "cosine": min((e["cosine"] for e in errors.get("artifact_vs_fp32", {}).values()), default=None),
        "note": errors.get("note") or errors.get("not_measured"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5,1,2.2", help="float32 weight sizes in GB (1e9 bytes)")
    parser.add_argument("--passes", default="quant(bits=4)")
    parser.add_argument("--calib", default=None, help="e.g. random:4 (shiftadd needs calibration data)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--workdir", default=None, help="where models are written (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "OUTPUT", "PASSES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(compile_one(args.one[0], args.one[2], args.one[1], args.calib, args.jobs)))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="qcompile-large-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in (float(s) for s in args.sizes.split(",")):
            shape = Shape.for_bytes(size * 1e9, hidden=args.hidden, ffn=args.ffn, vocab=args.vocab)
            model = workdir / f"transformer-{shape.layers}l" / "model.onnx"
            if not model.exists():
                model.parent.mkdir(parents=True, exist_ok=True)
                write_transformer(model, shape)
            output = workdir / f"out-{shape.layers}l"
            command = [sys.executable, __file__, "--one", str(model), str(output), args.passes,
                       "--jobs", str(args.jobs)] + (["--calib", args.calib] if args.calib else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"compile of {model} failed: {done.stderr.strip().splitlines()[-1:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"gb": shape.params * 4 / 1e9, "params": shape.params, "layers": shape.layers, **row})
            shutil.rmtree(output, ignore_errors=True)
            print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n`{args.passes}`" + (f", --calib {args.calib}" if args.calib else "") + f", jobs={args.jobs}\n")
    print("| weights GB | M params | layers | compile s | s per GB | peak RSS GB | peak anon GB | artifact MB | "
          "cosine vs FP32 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['gb']:.2f} | {r['params'] / 1e6:.0f} | {r['layers']} | {r['seconds']:.0f} | "
              f"{r['seconds'] / r['gb']:.0f} | {r['peak_rss'] / 1e9:.2f} | {r['peak_anon'] / 1e9:.2f} | "
              f"{r['artifact_bytes'] / 1e6:.0f} | {r['cosine'] if r['cosine'] is None else round(r['cosine'], 4)} |")
    notes = {r["note"] for r in rows if r["note"]}
    for note in sorted(notes):
        print(f"\noutput error: {note}")


if __name__ == "__main__":
    main()
