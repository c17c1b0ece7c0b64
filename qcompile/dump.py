"""``--dump-dir``: the model after canonicalization and after every pass, with what each pass did.

    DIR/00-input.onnx   the canonical model the passes start from
    DIR/00-input.json   its layer table (see :func:`qcompile.inspection.layer_table`)
    DIR/01-quant.onnx   the model after pass 1
    DIR/01-quant.json   pass 1's record and the structural diff against 00-input.onnx

Every model is saved with :func:`qcompile.ir.io.save`, which regenerates the reference
functions of quantized ops, so each one runs in plain ONNX Runtime. Files are written
as the passes run, so a failing compilation still leaves the models before the
failure; dump files of an earlier run (``NN-*.onnx``/``.json``) are removed first.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from qcompile.errors import UsageError
from qcompile.ir import io
from qcompile.ir.model import Model
from qcompile.passes.base import Pass
from qcompile.passes.manager import PassRecord

from .diff import structural_diff
from .inspection import layer_table

log = logging.getLogger(__name__)

DUMP_FILE = re.compile(r"^\d{2,}-[A-Za-z0-9_.-]+\.(onnx|json|onnx\.data)$")


class Dumper:
    """Writes the dump folder; :meth:`after_pass` is a :class:`PassManager` ``after_pass`` hook."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(f"--dump-dir {self.folder}: exists and is not a folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--dump-dir {self.folder}: cannot create it ({exc.strerror})") from None
        for stale in sorted(self.folder.iterdir()):
            if stale.is_file() and DUMP_FILE.match(stale.name):
                stale.unlink()
        self.previous: Model | None = None
        self.files: list[Path] = []

    def input(self, model: Model) -> None:
        """Dump the model the passes start from."""
        snapshot = model.copy()
        self._write(0, "input", snapshot, {"stage": "input", "inspect": layer_table(snapshot)})

    def after_pass(self, index: int, pass_: Pass, model: Model, record: PassRecord) -> None:
        snapshot = model.copy()
        details: dict[str, Any] = {"stage": "pass", "index": index + 1, "record": record.to_json()}
        if self.previous is not None:
            details["diff"] = structural_diff(self.previous, snapshot)
        self._write(index + 1, _file_name(pass_.name), snapshot, details)

    def _write(self, number: int, name: str, snapshot: Model, details: dict[str, Any]) -> None:
        stem = f"{number:02d}-{name}"
        model_path = self.folder / f"{stem}.onnx"
        details = {"model": model_path.name, **details}
        try:
            io.save(snapshot, model_path)
            text = json.dumps(details, indent=2, default=_json_default)
            (self.folder / f"{stem}.json").write_text(text + "\n")
        except OSError as exc:
            raise UsageError(f"--dump-dir {self.folder}: cannot write {stem} ({exc.strerror})") from None
        self.files.append(model_path)
        self.previous = snapshot
        log.info("dumped %s", model_path)


def _file_name(pass_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", pass_name) or "pass"


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
