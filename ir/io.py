"""Loading and saving models, safely.

* The input file is only ever read.
* External data must live inside the model's folder: absolute paths, ``..`` and
  symbolic links that leave the folder are refused before anything is read.
* Outputs are written atomically: :func:`atomic_directory` builds a folder under a
  temporary name and renames it into place only when everything succeeded.
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
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from qcompile.errors import ModelLoadError

from .model import Model

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # save weights beside the model above this size


def load(path: str | os.PathLike) -> Model:
    """Load an ONNX file (external data included) into a :class:`Model`."""
    return Model.from_proto(load_proto(path), source=Path(path))


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX file; every failure is a one-line :class:`ModelLoadError`."""
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
    _load_external_data(proto, path)
    _check(proto, path)
    return proto


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    base = path.resolve().parent
    for tensor in external_data_helper._get_all_tensors(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
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
    try:
        external_data_helper.load_external_data_for_model(proto, str(base))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read external data ({_first_line(exc)})") from None


def _check(proto: onnx.ModelProto, path: Path) -> None:
    try:
        if proto.ByteSize() < PROTOBUF_LIMIT:
            onnx.checker.check_model(proto)
        else:
            onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelLoadError(f"{path}: invalid ONNX model ({_first_line(exc)})") from None


def save(model: Model | onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write a model; weights go to ``<name>.data`` beside it when it would exceed 2 GB."""
    path = Path(path)
    proto = model.to_proto() if isinstance(model, Model) else model
    if proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(proto, str(path))
    return path


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
