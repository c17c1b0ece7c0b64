"""Reference execution of IR models with ONNX Runtime, and output comparison."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qcompile.errors import ExecutionError, UnsupportedModelError

from . import mapped
from .model import Model

PROTOBUF_LIMIT = 2**31 - 1
# Graph rewrites that change numerics. ONNX Runtime's MatMulAddFusion, in a model that
# holds QuantizeLinear/DequantizeLinear, re-quantizes the (constant-folded) float weight
# of MatMul+Add per tensor to int8 to keep the graph "quantized": the reference
# semantics of the IR would silently change. Reference sessions never run it.
SEMANTICS_CHANGING_OPTIMIZERS = ("MatMulAddFusion",)
# ONNX Runtime constant-folds the inlined reference functions of quantized ops when a
# session starts, materialising every decoded FP32 weight and its intermediates at once:
# a quantized SmolLM2-135M reference session went past 16 GB and was OOM-killed. Reference
# sessions of models with more constant bytes than this decode the weights at every run.
LARGE_REFERENCE_BYTES = 64 * 2**20


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.log_severity_level = 3
    return options


def make_session(
    model: Model | onnx.ModelProto | str | os.PathLike,
    *,
    extra_outputs: Iterable[str] = (),
    threads: int | None = None,
    providers: list[str] | None = None,
    disabled_optimizers: Iterable[str] = (),
) -> ort.InferenceSession:
    """A session for ``model`` (a model over 2 GB goes through a temporary file); CPU unless
    ``providers`` says otherwise, with ``disabled_optimizers`` off besides the ones that change
    the model's semantics."""
    chosen = list(disabled_optimizers)
    if isinstance(model, (str, os.PathLike)) and not extra_outputs:
        return _session(str(model), session_options(threads), tuple(chosen), providers)
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model))
    proto = model.to_proto() if isinstance(model, Model) else model
    extra = [name for name in extra_outputs if name not in {o.name for o in proto.graph.output}]
    if extra:
        proto = _with_outputs(proto, extra)
    options = session_options(threads)
    if not isinstance(model, Model) and not extra and any(mapped.mapped_info(t) for t in proto.graph.initializer):
        proto = _with_outputs(proto, [])  # a copy: the caller's proto is not edited
    mapped_size, keep_alive = _map_into_session(proto, options)
    size = proto.ByteSize()
    # decoded float weights are several times their packed bytes (8x at 4 bits)
    disabled = ("ConstantFolding",) if 8 * size + mapped_size > LARGE_REFERENCE_BYTES and any(
        f.domain == "qcompile" for f in proto.functions) else ()
    disabled = (*disabled, *chosen)
    if size < PROTOBUF_LIMIT:
        session = _session(proto.SerializeToString(), options, disabled, providers)
        session._qcompile_arrays = keep_alive  # type: ignore[attr-defined]  # in case ONNX Runtime reads them later
        return session
    with tempfile.TemporaryDirectory(prefix="qcompile-") as folder:
        path = Path(folder) / "model.onnx"
        onnx.save_model(proto, str(path), save_as_external_data=True, location="model.onnx.data")
        return _session(str(path), options, disabled, providers)


def _map_into_session(proto: onnx.ModelProto, options: ort.SessionOptions) -> tuple[int, list[np.ndarray]]:
    """Let ONNX Runtime map the weights that stay on disk (:mod:`.mapped`) itself; returns their
    bytes and the arrays the session reads (to be kept alive with it).

    When they all live in one folder, their references are made relative to it and ONNX Runtime
    memory-maps the files (no copy: pages are read as the kernels touch them; prepacking, which
    would copy every weight, is off). Otherwise they are handed over as external initializers,
    which ONNX Runtime copies.
    """
    infos = {t.name: info for t in proto.graph.initializer if (info := mapped.mapped_info(t)) is not None}
    if not infos:
        return 0, []
    arrays: list[np.ndarray] = []
    options.add_session_config_entry("session.disable_prepacking", "1")
    folders = {info.path.parent for info in infos.values()}
    if len(folders) == 1:
        folder = folders.pop()
        for tensor in proto.graph.initializer:
            if tensor.name in infos:
                entries = [(e.key, e.value) for e in tensor.external_data if e.key != mapped.PATH_KEY]
                del tensor.external_data[:]
                for key, value in entries:
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, infos[tensor.name].path.name if key == "location" else value
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    else:
        names = list(infos)
        arrays = [infos[name].load() for name in names]
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    return sum(info.nbytes for info in infos.values()), arrays


def _session(model: str | bytes, options: ort.SessionOptions, disabled: tuple[str, ...] = (),
             providers: list[str] | None = None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, options, providers=providers or ["CPUExecutionProvider"],
                                    disabled_optimizers=[*SEMANTICS_CHANGING_OPTIMIZERS, *disabled])
    except Exception as exc:  # ORT's own exception types (Fail, InvalidGraph, NotImplemented, ...)
        raise UnsupportedModelError(f"ONNX Runtime cannot load the model: {ort_message(exc)}") from None


def ort_message(exc: BaseException) -> str:
    """The informative first line of an ONNX Runtime exception."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return text[:300] or type(exc).__name__


def _with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(proto)
    for name in names:
        result.graph.output.append(onnx.ValueInfoProto(name=name))
    return result


def run_batches(session: ort.InferenceSession, feeds: Iterable[dict[str, np.ndarray]], names=None):
    """Run every feed; return, per output name, the results concatenated on axis 0."""
    outputs: dict[str, list[np.ndarray]] = {}
    names = names or [o.name for o in session.get_outputs()]
    for feed in feeds:
        try:
            values = session.run(names, feed)
        except Exception as exc:  # ORT's own exception types
            raise ExecutionError(f"ONNX Runtime failed running the model: {ort_message(exc)}") from None
        for name, value in zip(names, values, strict=True):
            outputs.setdefault(name, []).append(np.asarray(value))
    return {name: _concat(values) for name, values in outputs.items()}


def _concat(values: list[np.ndarray]) -> np.ndarray:
    if len(values) == 1 or values[0].ndim == 0:
        return values[0]
    try:
        return np.concatenate(values, axis=0)
    except ValueError:  # ragged outputs: compare flattened
        return np.concatenate([v.reshape(-1) for v in values])


def error_metrics(reference: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    """cosine, SQNR (dB) and max-abs error of ``actual`` against ``reference``."""
    ref = np.asarray(reference, np.float64).reshape(-1)
    act = np.asarray(actual, np.float64).reshape(-1)
    if ref.shape != act.shape:
        return {"cosine": float("nan"), "sqnr_db": float("nan"), "max_abs": float("inf")}
    max_abs = float(np.abs(ref - act).max(initial=0.0))
    scale = max(float(np.abs(ref).max(initial=0.0)), float(np.abs(act).max(initial=0.0)))
    if 0 < scale < np.inf:  # cosine and SQNR are scale-free; scaled, huge outputs do not overflow
        ref, act = ref / scale, act / scale
    noise = float(np.square(ref - act).sum())
    signal = float(np.square(ref).sum())
    denom = float(np.linalg.norm(ref) * np.linalg.norm(act))
    cosine = float(ref @ act / denom) if denom > 0 else (1.0 if noise == 0 else 0.0)
    sqnr = float("inf") if noise == 0 else float(10.0 * np.log10(max(signal, 1e-30) / noise))
    return {"cosine": cosine, "sqnr_db": sqnr, "max_abs": max_abs}


def compare_outputs(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per output, :func:`error_metrics` (only float outputs are compared)."""
    return {
        name: error_metrics(value, actual[name])
        for name, value in reference.items()
        if name in actual and np.issubdtype(np.asarray(value).dtype, np.floating)
    }
