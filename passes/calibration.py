"""Calibration data: loading, checking against the model, and synthetic samples.

Sources: ``samples.npz`` (arrays named by model input, first axis = samples), a
folder of ``<input name>.npy`` files, or ``random:N`` (synthetic; real data is
better and a warning says so). Every array is checked against the model input of
the same name: name, dtype, rank and every fixed dimension.

Axis 0 is the model input's own (batch) axis when the array has the input's rank: a
sample is ``array[i:i+1]``. When the array has one axis more, whole inputs are stacked
on a new axis 0 and a sample is ``array[i]`` — the only way to give samples to inputs
without a batch axis (scalars, or a fixed first dimension such as ``[5, 3]``).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.errors import CalibrationError
from qcompile.ir.model import Model

log = logging.getLogger(__name__)

DEFAULT_DYNAMIC_DIM = 16


@dataclass
class CalibrationSet:
    """Arrays keyed by model input name; axis 0 indexes samples."""

    arrays: dict[str, np.ndarray]
    source: str
    synthetic: bool = False
    stacked: frozenset[str] = frozenset()  # inputs whose samples are stacked on a new axis 0

    @property
    def n_samples(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 0

    def head(self, n: int) -> CalibrationSet:
        return CalibrationSet({k: v[:n] for k, v in self.arrays.items()}, self.source, self.synthetic, self.stacked)

    def batches(self, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of ``batch_size`` samples (one at a time when some input has no batch axis)."""
        step = 1 if self.stacked else batch_size
        for start in range(0, self.n_samples, step):
            yield {name: value[start] if name in self.stacked else value[start : start + step]
                   for name, value in self.arrays.items()}


def load_calibration(spec: str | Path | dict | CalibrationSet, model: Model, *, seed: int = 0) -> CalibrationSet:
    """Load ``spec`` and check it against ``model``'s inputs."""
    if isinstance(spec, CalibrationSet):
        calib = spec
    elif isinstance(spec, dict):
        calib = CalibrationSet({k: np.asarray(v) for k, v in spec.items()}, "<arrays>")
    elif isinstance(spec, str) and spec.startswith("random:"):
        count = spec.partition(":")[2]
        if not count.isdigit() or int(count) <= 0:
            raise CalibrationError(f"--calib {spec}: expected random:N with N a positive integer")
        log.warning("calibrating on %s synthetic samples; real data gives better results", count)
        return random_calibration(model, int(count), seed=seed)
    else:
        calib = _load_files(Path(spec))
    check_calibration(calib, model)
    return calib


def _load_files(path: Path) -> CalibrationSet:
    if not path.exists():
        raise CalibrationError(f"{path}: no such calibration file or folder")
    try:
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise CalibrationError(f"{path}: folder holds no .npy files")
            arrays = {f.stem: np.load(f, allow_pickle=False) for f in files}
        else:
            with np.load(path, allow_pickle=False) as archive:
                if not isinstance(archive, np.lib.npyio.NpzFile):
                    raise CalibrationError(f"{path}: expected an .npz archive of arrays named by model input")
                arrays = {name: archive[name] for name in archive.files}
    except CalibrationError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"{path}: unreadable calibration data ({str(exc).splitlines()[0]})") from None
    if not arrays:
        raise CalibrationError(f"{path}: no arrays")
    return CalibrationSet(arrays, str(path))


def model_inputs(model: Model) -> list[gs.Variable]:
    """Graph inputs that are not initializers."""
    return [t for t in model.graph.inputs if not isinstance(t, gs.Constant)]


def check_calibration(calib: CalibrationSet, model: Model) -> None:
    inputs = {t.name: t for t in model_inputs(model)}
    where = calib.source
    missing = [name for name in inputs if name not in calib.arrays]
    extra = [name for name in calib.arrays if name not in inputs]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unknown {', '.join(extra)}")
        raise CalibrationError(
            f"{where}: arrays do not match the model inputs ({'; '.join(parts)}; model inputs: {', '.join(inputs)})"
        )
    counts = {name: a.shape[0] if a.ndim else 0 for name, a in calib.arrays.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise CalibrationError(f"{where}: every array needs the same, non-zero number of samples on axis 0 ({counts})")
    stacked = {name for name, tensor in inputs.items() if _check_array(where, name, calib.arrays[name], tensor)}
    calib.stacked = frozenset(stacked)


def _check_array(where: str, name: str, array: np.ndarray, tensor: gs.Variable) -> bool:
    """Check one array; True when its samples are whole inputs stacked on a new axis 0."""
    expected = np.dtype(tensor.dtype) if tensor.dtype is not None else array.dtype
    if array.dtype != expected:
        raise CalibrationError(f"{where}: {name} is {array.dtype}, the model expects {expected}")
    shape = list(tensor.shape or [])
    stacked = tensor.shape is not None and array.ndim == len(shape) + 1
    if tensor.shape is not None and array.ndim != len(shape) and not stacked:
        raise CalibrationError(
            f"{where}: {name} has rank {array.ndim}, the model expects rank {len(shape)} "
            f"(axis 0 = samples, then the input's other dims: {_format_shape(shape)}), or rank {len(shape) + 1} "
            f"(whole inputs stacked on a new axis 0)"
        )
    first = 0 if stacked else 1
    for axis, dim in enumerate(shape[first:], start=1):
        if isinstance(dim, int) and dim > 0 and array.shape[axis] != dim:
            raise CalibrationError(
                f"{where}: {name} has shape {list(array.shape)}, the model expects {_format_shape(shape)}"
                + (" per sample (whole inputs stacked on axis 0)" if stacked else "")
            )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise CalibrationError(f"{where}: {name} contains NaN or Inf")
    return stacked


def _format_shape(shape: list) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in shape) + "]"


def random_calibration(model: Model, n: int, *, seed: int = 0) -> CalibrationSet:
    """Synthetic samples: token ids within the embedding table, masks of ones, N(0,1) floats."""
    rng = np.random.default_rng(seed)
    arrays = {}
    stacked = set()
    for tensor in model_inputs(model):
        dims = list(tensor.shape) if tensor.shape is not None else [1]
        if not dims or (isinstance(dims[0], int) and dims[0] > 1):  # no batch axis: stack whole inputs
            stacked.add(tensor.name)
            dims = [n, *dims]
        shape = [n] + [d if isinstance(d, int) and d > 0 else DEFAULT_DYNAMIC_DIM for d in dims[1:]]
        dtype = np.dtype(tensor.dtype or np.float32)
        arrays[tensor.name] = _random_array(model, tensor, shape, dtype, rng)
    return CalibrationSet(arrays, f"random:{n}", synthetic=True, stacked=frozenset(stacked))


def _random_array(model: Model, tensor: gs.Variable, shape: list[int], dtype: np.dtype, rng) -> np.ndarray:
    if dtype == np.bool_:
        return np.ones(shape, bool)
    if not np.issubdtype(dtype, np.integer):
        return rng.standard_normal(shape).astype(dtype)
    if "mask" in tensor.name.lower():
        return np.ones(shape, dtype)
    high = _index_bound(tensor)
    return rng.integers(0, high, size=shape).astype(dtype)


def _index_bound(tensor: gs.Variable) -> int:
    """Rows of the table an integer input indexes (through Cast/Reshape/...), else 2."""
    frontier, seen = [tensor], set()
    while frontier:
        current = frontier.pop()
        for node in current.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op in ("Gather", "QGather") and len(node.inputs) > 1 and node.inputs[1] is current:
                table = node.inputs[0]
                if isinstance(table, gs.Constant) and table.shape:
                    return int(table.shape[0])
            if node.op in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"):
                frontier.extend(node.outputs)
    return 2
