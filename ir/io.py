"""Loading and saving models, safely.

* The input file is only ever read.
* External data must live inside the model's folder: absolute paths, ``..`` and
  symbolic links that leave the folder are refused before anything is read.
* Outputs are written atomically: :func:`atomic_directory` builds a folder under a
  temporary name and renames it into place only when everything succeeded.
* Models larger than memory: external data of the main graph's initializers is not read
  but memory-mapped (:mod:`qcompile.ir.mapped`), and :func:`save` streams weights into the
  output's data file one tensor at a time, so neither loading nor saving holds the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from qcompile.errors import ModelLoadError

from . import mapped
from .model import Model

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # save weights beside the model above this size


def load(path: str | os.PathLike, *, map_weights: bool = True) -> Model:
    """Load an ONNX file (external data included) into a :class:`Model`.

    ``map_weights``: leave the main graph's external-data initializers on disk, memory-mapped
    (the file must then outlive the model: callers loading from a temporary folder say False).
    """
    return Model.from_proto(load_proto(path, map_weights=map_weights), source=Path(path))


def load_proto(path: str | os.PathLike, *, map_weights: bool = False) -> onnx.ModelProto:
    """Read and check an ONNX file; every failure is a one-line :class:`ModelLoadError`.

    With ``map_weights``, mappable external-data initializers of the main graph are not read:
    they keep their reference, completed by the absolute file (:data:`mapped.PATH_KEY`).
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise ModelLoadError(f"{path}: not a valid ONNX model (no graph, or an empty one; truncated?)")
    _load_external_data(proto, path, map_weights)
    _check(proto, path)
    return proto


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _load_external_data(proto: onnx.ModelProto, path: Path, map_weights: bool) -> None:
    base = path.resolve().parent
    if map_weights:  # main-graph initializers first: these are mapped, not read
        for tensor in proto.graph.initializer:
            if external_data_helper.uses_external_data(tensor) and mapped.mappable(tensor):
                info, target = _external_target(tensor, path, base)
                _check_extent(tensor, info, target, path)
                entry = tensor.external_data.add()
                entry.key, entry.value = mapped.PATH_KEY, str(target)
    for tensor in external_data_helper._get_all_tensors(proto):
        if not external_data_helper.uses_external_data(tensor) or mapped.mapped_info(tensor) is not None:
            continue
        _external_target(tensor, path, base)
        try:
            external_data_helper.load_external_data_for_tensor(tensor, str(base))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path}: cannot read external data ({_first_line(exc)})") from None


def _external_target(tensor: onnx.TensorProto, path: Path, base: Path):
    """The checked file behind a tensor's external data: inside the model folder, long enough."""
    info = external_data_helper.ExternalDataInfo(tensor)
    location = Path(info.location)
    if location.is_absolute() or ".." in location.parts:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name!r} points outside the model folder ({info.location})"
        )
    target = (base / location).resolve()
    if base not in target.parents:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name!r} external data escapes the model folder through a link"
        )
    if not target.is_file():
        raise ModelLoadError(f"{path}: external data file {info.location} is missing")
    end = (info.offset or 0) + (info.length or 0)
    if end > target.stat().st_size:
        raise ModelLoadError(f"{path}: external data file {info.location} is truncated")
    return info, target


def _check_extent(tensor: onnx.TensorProto, info, target: Path, path: Path) -> None:
    """A mapped tensor's bytes must be exactly its shape's, and inside the file."""
    size = _shape_bytes(tensor)
    if info.length is not None and info.length != size:
        raise ModelLoadError(f"{path}: tensor {tensor.name!r} has {info.length} bytes of external data, "
                             f"its shape needs {size}")
    if (info.offset or 0) + size > target.stat().st_size:
        raise ModelLoadError(f"{path}: external data file {info.location} is truncated")


def _shape_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes a tensor's shape and element type need (one element per byte or more)."""
    size = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    for dim in tensor.dims:
        size *= dim
    return size


def _check(proto: onnx.ModelProto, path: Path) -> None:
    external = any(mapped.mapped_info(t) is not None for t in proto.graph.initializer)
    try:
        if proto.ByteSize() < PROTOBUF_LIMIT and not external:
            onnx.checker.check_model(proto)
        else:
            onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelLoadError(f"{path}: invalid ONNX model ({_first_line(exc)})") from None


def save(model: Model | onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write a model; weights go to ``<name>.data`` beside it when it would exceed 2 GB, or when
    it holds memory-mapped weights (those are streamed from their file, never read whole).

    A :class:`Model` saved with a data file has its in-memory weights written one at a time
    straight from their arrays: no proto ever holds a second copy of them."""
    path = Path(path)
    if isinstance(model, Model):
        if mapped.mapped_bytes(model.graph) or model.constant_bytes() > EXTERNAL_DATA_THRESHOLD:
            _save_model_streamed(model, path)
            return path
        proto = model.to_proto()
    else:
        proto = model
    has_mapped = any(mapped.mapped_info(t) is not None for t in proto.graph.initializer)
    if has_mapped or proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        _save_streamed(proto, path)
    else:
        onnx.save_model(proto, str(path))
    return path


def _save_model_streamed(model: Model, path: Path, min_bytes: int = 1024) -> None:
    """:func:`_save_streamed` for a :class:`Model`: each in-memory weight of ``min_bytes`` or
    more is exported alone, written to the data file and mapped from it in a copy of the graph
    (the caller's model is not touched), so the exported proto holds references only."""
    data_path = path.parent / f"{path.name}.data"
    copied = model.copy()
    with open(data_path, "wb") as data:
        for tensor in copied.graph.tensors().values():
            if not isinstance(tensor, gs.Constant) or isinstance(tensor._values, mapped.MappedValues):
                continue
            proto = OnnxExporter.export_tensor_proto(tensor)
            if not proto.HasField("raw_data") or proto.data_location == onnx.TensorProto.EXTERNAL:
                continue
            raw = proto.raw_data
            if len(raw) < min_bytes or len(raw) != _shape_bytes(proto):
                continue  # small, or a packed type whose bytes the shape does not give: left inline
            offset = -(-data.tell() // 4096) * 4096
            data.seek(offset)
            data.write(raw)
            tensor._values = mapped.MappedValues(data_path, offset, tuple(proto.dims), proto.data_type, data_path.name)
            del raw, proto
    _save_streamed(copied.to_proto(), path, append=True)


def _save_streamed(proto: onnx.ModelProto, path: Path, min_bytes: int = 1024, append: bool = False) -> None:
    """Save with every initializer of ``min_bytes`` or more in ``<name>.data``, one at a time.

    Mapped tensors are copied from their file in blocks (those already mapped from the data
    file itself, which ``append`` keeps, are only re-pointed); in-memory ones are written and
    dropped from ``proto`` (which is the caller's: it is modified). Offsets are 4 KiB
    aligned, so ONNX Runtime can map them.
    """
    location = f"{path.name}.data"
    data_path = path.parent / location
    with open(data_path, "r+b" if append else "wb") as data:
        data.seek(0, os.SEEK_END)
        for tensor in proto.graph.initializer:
            info = mapped.mapped_info(tensor)
            if info is None and len(tensor.raw_data) < min_bytes:
                continue
            if info is None and not tensor.HasField("raw_data"):
                continue  # typed fields (small, unusual): left inline
            if info is not None and info.path == data_path:
                offset, length = info.offset, info.nbytes
            else:
                offset = -(-data.tell() // 4096) * 4096
                data.seek(offset)
                if info is not None:
                    length = _copy_range(info.path, info.offset, info.nbytes, data)
                else:
                    length = len(tensor.raw_data)
                    data.write(tensor.raw_data)
                    tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    onnx.save_model(proto, str(path))


def _copy_range(source: Path, offset: int, length: int, target, block: int = 64 << 20) -> int:
    with open(source, "rb") as handle:
        handle.seek(offset)
        left = length
        while left:
            chunk = handle.read(min(block, left))
            if not chunk:
                raise ModelLoadError(f"{source}: external data ends early")
            target.write(chunk)
            left -= len(chunk)
    return length


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder that becomes ``final`` only if the block succeeds.

    An existing ``final`` is replaced only after the new folder is complete; on any
    exception (KeyboardInterrupt included) the staging folder is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the artifact is not
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    backup = None
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, backup)
    os.replace(staging, final)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
