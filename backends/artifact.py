"""Artifact folders: ``manifest.json`` beside the emitted model, and running them.

The manifest records what made the artifact (input model hash, passes and their
options, tool versions), what it holds (per-layer format, bits, group size, kernel,
bytes), and what it costs (sizes, measured output errors). :func:`load` reads it
back and returns an :class:`Artifact` whose ``run(feeds)`` executes the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qcompile.backends import ort as ort_backend
from qcompile.errors import BackendError, CalibrationError, ModelLoadError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    import onnx

    from qcompile import __version__

    return {
        "qcompile": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def folder_bytes(folder: Path, files: list[str]) -> int:
    return sum((folder / name).stat().st_size for name in files)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True, default=_json_default, allow_nan=True)
    (folder / MANIFEST).write_text(text + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


class Artifact:
    """A compiled artifact folder, ready to run."""

    def __init__(self, folder: Path, manifest: dict[str, Any], session: ort.InferenceSession) -> None:
        self.folder = folder
        self.manifest = manifest
        self.session = session

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; ``feeds`` maps every input name to an array."""
        expected = {i.name: i for i in self.session.get_inputs()}
        missing = sorted(set(expected) - set(feeds))
        unknown = sorted(set(feeds) - set(expected))
        if missing or unknown:
            raise CalibrationError(
                f"inputs do not match the artifact (missing: {', '.join(missing) or '-'}; "
                f"unknown: {', '.join(unknown) or '-'}; expected: {', '.join(expected)})"
            )
        try:
            values = self.session.run(None, {k: np.asarray(v) for k, v in feeds.items()})
        except Exception as exc:  # ORT raises its own exception types for bad feeds
            raise CalibrationError(f"running {self.folder}: {str(exc).splitlines()[0]}") from None
        return dict(zip(self.output_names, values, strict=True))


def load(folder: str | Path, *, providers: list[str] | None = None, threads: int | None = None,
         device: str = "auto") -> Any:
    """Open an artifact folder written by :func:`qcompile.compile`.

    ONNX Runtime artifacts give an :class:`Artifact`; TVM ones a
    :class:`qcompile.backends.tvm.TvmArtifact` (``device``: ``auto`` or ``cpu``), both
    with ``run(feeds)``, ``input_names``, ``output_names`` and ``manifest``."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ModelLoadError(f"{folder}: not a qcompile artifact (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        backend = manifest["backend"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if backend.get("backend") == "tvm":
        from qcompile.backends import tvm as tvm_backend

        return tvm_backend.load(folder, manifest, device)
    if backend.get("backend") != "ort":
        raise BackendError(f"{folder}: backend {backend.get('backend')!r} cannot be run by this version")
    wanted = providers or backend.get("providers") or ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    chosen = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    if chosen != wanted:
        log.warning("providers %s not available here; running on %s", wanted, chosen)
    model_file = folder / backend.get("model_file", "model.onnx")
    try:
        session = ort_backend.make_session(model_file, backend, providers=chosen, threads=threads)
    except Exception as exc:
        raise BackendError(f"{model_file}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
    return Artifact(folder, manifest, session)
