"""The Python API: ``compile`` a model into an artifact folder, ``load`` one back."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.backends import artifact as artifact_io
from qcompile.backends import ort as ort_backend
from qcompile.backends import tvm as tvm_backend
from qcompile.errors import UsageError
from qcompile.frontends import load_model
from qcompile.ir import io, qops
from qcompile.ir.canonicalize import canonicalize, expand_input_shapes, parse_input_shapes
from qcompile.ir.model import Model
from qcompile.ir.runtime import compare_outputs, run_batches
from qcompile.passes.base import Pass
from qcompile.passes.calibration import CalibrationSet, load_calibration, random_calibration
from qcompile.passes.context import PassContext, Progress
from qcompile.passes.executor import Executor, make_executor
from qcompile.passes.manager import PassManager, PassRecord
from qcompile.passes.registry import parse_pipeline

from .dump import Dumper
from .inspection import float_layers, float_weight, size_breakdown, skipped_layers
from .report import write_report

log = logging.getLogger(__name__)

BACKENDS = ("ort", "tvm", "auto")
EVAL_SAMPLES = 8
# Which backend runs each quantized-weight format fast; ``auto`` picks TVM for a model
# holding any format mapped to "tvm" (when TVM is installed), else ONNX Runtime.
# bcq, bcq_outliers: ORT only has their decode-then-MatMul reference functions
FORMAT_BACKENDS = {"int": "ort", "bcq": "tvm", "bcq_outliers": "tvm"}
TVM_CPU_ONLY_FORMATS = ("bcq_outliers",)  # no TVM GPU kernel: auto keeps ONNX Runtime for cuda
TARGETS = {"ort": ort_backend.TARGETS, "tvm": tvm_backend.TARGETS}


@dataclass
class CompileResult:
    """What :func:`compile` produced: the artifact folder, its manifest and per-pass records."""

    path: Path
    manifest: dict[str, Any]
    records: list[PassRecord] = field(default_factory=list)

    def load(self) -> artifact_io.Artifact:
        return artifact_io.load(self.path)

    def explain(self) -> list[dict[str, str]]:
        """Every layer a pass left alone: ``{"pass", "layer", "reason"}`` (``--explain``)."""
        return skipped_layers(self.manifest["passes"])


def default_output(source: Any) -> Path:
    text = str(source)
    if isinstance(source, (str, os.PathLike)) and not text.startswith("hf:"):
        path = Path(text)
        return path.with_name(f"{path.stem}.qcompile")
    return Path("qcompile-out")


def compile(
    model: Any,
    *,
    passes: str | list[str | Pass] = "quant",
    target: str = "cpu",
    backend: str = "auto",
    calib: str | Path | dict | CalibrationSet | None = None,
    output: str | Path | None = None,
    input_shapes: dict[str, tuple[int, ...]] | list[str] | None = None,
    verify: bool = False,
    seed: int = 0,
    accuracy_level: int = 4,
    ort_fusion: bool = True,
    example_inputs: Any = None,
    progress: Progress | None = None,
    on_pass=None,
    dump_dir: str | Path | None = None,
    report: str | Path | None = None,
    arch: str | None = None,
    jobs: int = 1,
    executor: Executor | None = None,
    max_reference_bytes: int | None = 1 << 30,
) -> CompileResult:
    """Compile ``model`` through ``passes`` and emit an artifact folder.

    ``model``: an ONNX path, ``hf:FOLDER``, an ``onnx.ModelProto``, a :class:`Model`,
    or a ``torch.nn.Module`` (with ``example_inputs``). ``calib``: ``.npz`` path, a
    folder of ``.npy``, ``random:N``, or a dict of arrays. Without calibration data
    the output error is measured on synthetic inputs. The output folder appears
    only when everything succeeded.

    ``dump_dir``: write the model after canonicalization and after every pass there,
    with each pass's record and structural diff (see :mod:`qcompile.dump`).
    ``report``: write a self-contained HTML report there (see :mod:`qcompile.report`).
    ``backend``: ``ort``, ``tvm`` or ``auto`` (see :func:`choose_backend`); ``arch``: CUDA
    compute capabilities for ``backend="tvm", target="cuda"`` (default ``sm_80,sm_90``).
    The TVM backend compiles for static input shapes: ``input_shapes`` fixes them there
    (the IR and the passes keep the model's dynamic dimensions).
    ``jobs``: processes for per-layer work (quant, shiftadd, prune): 1 = this process,
    0 = every core; the artifact is byte-identical for any value. ``executor``: run that
    work elsewhere instead (any :class:`qcompile.passes.executor.Executor`, e.g. a
    ``RayExecutor``); the caller keeps it (it is not closed here).
    ``ort_fusion``: let the ONNX Runtime backend fuse residual + RMSNorm and attention
    blocks into ONNX Runtime's fused kernels (:mod:`qcompile.backends.ort_fusion`).
    ``max_reference_bytes``: per-pass output errors are measured on the IR's reference
    functions, which decode every quantized weight to float at once; past this many decoded
    bytes they are skipped (the artifact's own error is still measured; None = no limit).
    """
    if jobs < 0:
        raise UsageError(f"--jobs {jobs}: expected 0 (every core) or more")
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    allowed = sorted({t for targets in TARGETS.values() for t in targets}) if backend == "auto" else TARGETS[backend]
    if target not in allowed:
        raise UsageError(f"--target {target!r}: expected one of {', '.join(allowed)}"
                         + (f" for --backend {backend}" if backend != "auto" else ""))
    if arch is not None:
        tvm_backend.parse_arch(arch)
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise UsageError(f"--ort-accuracy-level {accuracy_level}: expected 0..4")
    pipeline = parse_pipeline(passes)
    shapes = parse_input_shapes(input_shapes) if isinstance(input_shapes, list) else (input_shapes or {})
    output = Path(output) if output is not None else default_output(model)
    started = time.perf_counter()

    source = load_model(model, example_inputs=example_inputs)
    shapes = expand_input_shapes(shapes, [tensor.name for tensor in source.graph.inputs])
    tvm_only = backend == "tvm" or (backend == "auto" and target not in ort_backend.TARGETS)
    canonical = canonicalize(source, {} if tvm_only else shapes)
    calibration = load_calibration(calib, canonical, seed=seed) if calib is not None else None
    eval_samples = (calibration.head(EVAL_SAMPLES) if calibration is not None
                    else random_calibration(canonical, 4, seed=seed))
    owned = make_executor(jobs) if executor is None else None
    ctx = PassContext(calib=calibration, target=target, seed=seed, progress=progress or Progress(),
                      synthetic_calib=None if calibration is not None else random_calibration(canonical, 8, seed=seed),
                      executor=executor or owned or make_executor(1))
    manager = PassManager(pipeline, verify_exact=verify, eval_samples=eval_samples,
                          max_reference_bytes=max_reference_bytes)
    dumper = Dumper(dump_dir) if dump_dir is not None else None
    if dumper is not None:
        dumper.input(canonical)
    try:
        compiled, records = manager.run(canonical, ctx, on_pass=on_pass,
                                        after_pass=dumper.after_pass if dumper is not None else None)
    finally:
        if owned is not None:
            owned.close()

    chosen = choose_backend(backend, target, compiled, shapes)
    with io.atomic_directory(output) as staging:
        if chosen == "tvm":
            backend_section = tvm_backend.emit(compiled, staging, target=target, arch=arch, input_shapes=shapes,
                                               accuracy_level=accuracy_level)
            backend_error = _tvm_backend_error(manager, staging, backend_section, eval_samples, compiled)
        else:
            backend_section = ort_backend.emit(compiled, staging, target=target, accuracy_level=accuracy_level,
                                               fuse=ort_fusion)
            backend_error = _backend_error(manager, staging, backend_section, eval_samples)
        manifest = _manifest(model, source, canonical, compiled, records, backend_section, staging)
        manifest["errors"] = {
            "calibration": eval_samples.source,
            "synthetic": eval_samples.synthetic,
            **backend_error,
        }
        manifest["seconds"] = round(time.perf_counter() - started, 2)
        artifact_io.write_manifest(staging, manifest)
        if report is not None:
            written = json.loads((staging / artifact_io.MANIFEST).read_text())  # what `qcompile report` reads
            write_report(written, report, title=_title(model))
    return CompileResult(output, manifest, records)


def load(folder: str | Path, **kwargs) -> artifact_io.Artifact:
    """Open an artifact folder; ``.run(feeds)`` executes it."""
    return artifact_io.load(folder, **kwargs)


def _title(source: Any) -> str:
    text = str(source) if not hasattr(source, "graph") else "in-memory model"
    return f"qcompile report: {Path(text).name if os.sep in text else text}"


def choose_backend(requested: str, target: str, model: Model,
                   input_shapes: dict[str, tuple[int, ...]] | None = None) -> str:
    """``requested`` unless it is ``auto``: then TVM for targets only TVM has (``arm64``)
    or models holding a format :data:`FORMAT_BACKENDS` maps to TVM (if TVM is installed and
    has kernels for every format on ``target``), else ONNX Runtime. With ``input_shapes`` given (what :func:`compile` fixes), a model
    whose inputs stay dynamic goes to ONNX Runtime: TVM compiles static shapes only."""
    if requested != "auto":
        return requested
    if target not in ort_backend.TARGETS:
        return "tvm"
    formats = sorted({str(node.attrs.get("format", "int")) for node in model.quantized_nodes()})
    wants_tvm = [fmt for fmt in formats if FORMAT_BACKENDS.get(fmt, "ort") == "tvm"]
    if target == "cuda" and any(fmt in TVM_CPU_ONLY_FORMATS for fmt in formats):
        wants_tvm = []
    if wants_tvm and tvm_backend.available() and target in tvm_backend.TARGETS:
        dynamic = [] if input_shapes is None else [
            tensor.name for tensor in model.graph.inputs
            if tensor.name not in input_shapes and not all(isinstance(d, int) for d in (tensor.shape or [None]))]
        if not dynamic:
            return "tvm"
        log.warning("backend auto: %s runs fastest with TVM, but input %s has a dynamic shape (pass "
                    "--input-shape); using ONNX Runtime", "/".join(wants_tvm), dynamic[0])
    return "ort"


def _tvm_backend_error(manager: PassManager, folder: Path, backend: dict, samples: CalibrationSet,
                       model: Model) -> dict:
    """Like :func:`_backend_error` for a TVM artifact, whose inputs have static shapes: the
    samples are grouped into batches of the compiled batch size (cycling to fill the last).
    Measured only where the artifact can run here (a CPU build for this host) and the
    samples' other dimensions match the compiled shapes."""
    if backend["target"] != "cpu":
        return {"note": f"not measured: a {backend['target']} artifact does not run on this machine"}
    shapes = backend["input_shapes"]
    mismatched = [name for name, shape in shapes.items()
                  if tuple(samples.arrays[name].shape[1:]) != tuple(shape[1:])]
    if mismatched:
        return {"note": f"not measured: samples of {', '.join(mismatched)} do not have the compiled shape"}
    batch = next(iter(shapes.values()))[0]
    count = samples.n_samples
    order = [i % count for i in range(-(-count // batch) * batch)]
    artifact = tvm_backend.load(folder, {"backend": backend, "inputs": [_io_info(t) for t in model.graph.inputs]})
    chunks = [artifact.run({name: value[order[start:start + batch]] for name, value in samples.arrays.items()})
              for start in range(0, len(order), batch)]
    emitted = {name: np.concatenate([chunk[name] for chunk in chunks])[: _rows(chunks[0][name], batch, count)]
               for name in artifact.output_names}
    return {
        "artifact_vs_fp32": compare_outputs(manager.reference_outputs or {}, emitted),
        "artifact_vs_ir": compare_outputs(manager.final_outputs or {}, emitted),
    }


def _rows(first_chunk: np.ndarray, batch: int, count: int) -> int:
    """Output rows of ``count`` samples when one batch of ``batch`` gives ``first_chunk``."""
    return first_chunk.shape[0] // batch * count


def _backend_error(manager: PassManager, folder: Path, backend: dict, samples: CalibrationSet) -> dict:
    """Output error of the emitted model vs the FP32 input and vs the IR's reference semantics."""
    session = ort_backend.make_session(folder / backend["model_file"], backend)
    if manager.reference_outputs is None:
        return {"not_measured": manager.unmeasured or "no evaluation samples"}
    emitted = run_batches(session, samples.batches(1))
    errors = {
        "artifact_vs_fp32": compare_outputs(manager.reference_outputs or {}, emitted),
        "artifact_vs_ir": compare_outputs(manager.final_outputs or {}, emitted),
    }
    if manager.ir_unmeasured:
        errors["note"] = manager.ir_unmeasured
    return errors


def _manifest(user_source: Any, source: Model, canonical: Model, compiled: Model,
              records: list[PassRecord], backend_section: dict, folder: Path) -> dict:
    input_info: dict[str, Any] = {"description": str(user_source) if not hasattr(user_source, "graph") else "<in-memory model>"}
    if source.source is not None and Path(source.source).is_file():
        input_info["sha256"] = artifact_io.sha256_file(Path(source.source))
        input_info["bytes"] = Path(source.source).stat().st_size
    merged_with = {name: group for group in backend_section["merged"] for name in group}
    layers = {}
    for node in compiled.quantized_nodes():
        weight = qops.read_weight(node)
        layers[node.name] = {
            "op": node.op,
            "bits": weight.bits,
            "group_size": weight.group_size,
            **qops.describe(node),
            "shape": [weight.rows, weight.cols],
            "bytes": weight.nbytes,
            "kernel": backend_section["kernels"].get(node.name, node.op),
        }
        if node.attrs.get("sparse"):  # stored sparse: "bitmask" or "N:M"
            layers[node.name]["sparse"] = getattr(weight, "pattern", str(node.attrs["sparse"]))
        if node.name in merged_with:
            layers[node.name]["merged_with"] = [n for n in merged_with[node.name] if n != node.name]
    return {
        "format_version": artifact_io.FORMAT_VERSION,
        "input": input_info,
        "passes": [r.to_json() for r in records],
        "backend": backend_section,
        "layers": layers,
        "sizes": {
            "input_weight_bytes": canonical.constant_bytes(),
            "ir_weight_bytes": compiled.constant_bytes(),
            "artifact_bytes": artifact_io.folder_bytes(folder, backend_section["files"]),
            "breakdown": {"before": size_breakdown(canonical), "after": size_breakdown(compiled)},
        },
        "float_layers": float_layers(compiled),
        "layer_order": [node.name for node in compiled.graph.nodes
                        if qops.is_quantized(node) or float_weight(node) is not None],
        "inputs": [_io_info(t) for t in compiled.graph.inputs],
        "outputs": [_io_info(t) for t in compiled.graph.outputs],
        "versions": artifact_io.tool_versions(),
    }


def _io_info(tensor) -> dict:
    shape = [d if isinstance(d, int) else str(d) for d in (tensor.shape or [])]
    return {"name": tensor.name, "dtype": str(tensor.dtype), "shape": shape}
