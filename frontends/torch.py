"""PyTorch frontend: export a ``torch.nn.Module`` to a single ONNX file.

The TorchScript exporter (``dynamo=False``) is tried first: it is fast and yields
clean, constant-folded graphs. If it fails (or writes something ONNX cannot load),
the ``torch.export``-based exporter (``dynamo=True``) is tried instead. The file is
written atomically: a temporary file in the destination folder is renamed over
``path`` only once it has been exported and checked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qcompile.errors import FrontendError

logger = logging.getLogger(__name__)

DynamicAxes = Mapping[str, Mapping[int, str] | Sequence[int]]
_FILE_MODE = 0o644  # mkstemp creates 0600 files; exports should be readable like any other

__all__ = ["export_module"]


def _import_torch() -> Any:
    """Import torch, turning its absence into a ``FrontendError`` with an install hint."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise FrontendError("PyTorch is not installed; run `pip install qcompile[torch]`") from exc
    return torch


def _one_line(exc: BaseException) -> str:
    """Return ``Type: first line of message`` for an exception."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise example inputs (one tensor, a list or a tuple) to a tuple."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


@contextlib.contextmanager
def _eval_mode(module: Any) -> Iterator[None]:
    """Put ``module`` in eval mode for the block, then restore every submodule's own flag."""
    flags = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, was_training in flags:
            sub.training = was_training


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporters' deprecation and tracer warnings (logged at DEBUG instead)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for item in caught:
        logger.debug("export warning: %s: %s", item.category.__name__, item.message)


def _check_onnx(path: Path) -> None:
    """Load and check the ONNX file at ``path``; raise if it is not a valid model."""
    import onnx

    onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path))


# Exporter name -> the torch.onnx.export arguments that select and configure it, in the
# order they are tried: TorchScript is fast and gives clean graphs; the torch.export-based
# exporter (weights kept inside the file) handles what tracing cannot.
EXPORTERS: dict[str, dict[str, Any]] = {
    "torchscript": {"dynamo": False, "do_constant_folding": True},
    "dynamo": {"dynamo": True, "external_data": False, "optimize": True},
}


def _export(
    torch: Any,
    exporter: str,
    module: Any,
    args: tuple[Any, ...],
    dest: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: DynamicAxes | None,
    opset: int,
    fold: bool = True,
    dynamic_shapes: Any = None,
) -> None:
    """Export with one of :data:`EXPORTERS`; ``fold=False`` keeps the graph unfolded.

    ``dynamic_shapes`` (``torch.export`` style, dynamo only) replaces ``dynamic_axes`` where
    inputs are nested (a KV cache passed as a tuple), which ``dynamic_axes`` cannot describe.
    """
    options = dict(EXPORTERS[exporter])
    if not fold:
        options["do_constant_folding" if exporter == "torchscript" else "optimize"] = False
    if dynamic_shapes is not None and exporter == "dynamo":
        options["dynamic_shapes"] = dynamic_shapes
    else:
        options["dynamic_axes"] = dict(dynamic_axes) if dynamic_axes else None
    torch.onnx.export(
        module,
        args,
        str(dest),
        input_names=list(input_names),
        output_names=list(output_names),
        opset_version=opset,
        **options,
    )


def _remove_quietly(*paths: Path) -> None:
    """Delete files that may or may not exist."""
    for item in paths:
        with contextlib.suppress(OSError):
            item.unlink()


def _try_exporters(torch: Any, module: Any, args: tuple[Any, ...], tmp: Path,
                   exporters: Sequence[str] = tuple(EXPORTERS), **kw: Any) -> str:
    """Run the exporters in order (TorchScript, then dynamo); return the one that worked."""
    errors: list[str] = []
    for name in exporters:
        try:
            with _quiet_export(), torch.no_grad():
                _export(torch, name, module, args, tmp, **kw)
            _check_onnx(tmp)
            return name
        except Exception as exc:  # noqa: BLE001 - any exporter failure triggers the fallback
            logger.info("%s exporter failed: %s", name, _one_line(exc))
            errors.append(f"{name}: {_one_line(exc)}")
            _remove_quietly(tmp, tmp.with_name(tmp.name + ".data"))
    raise FrontendError("; ".join(errors))


def export_module(
    module: Any,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: DynamicAxes | None = None,
    opset: int = 18,
    fold: bool = True,
    exporters: Sequence[str] = tuple(EXPORTERS),
    dynamic_shapes: Any = None,
) -> Path:
    """Export ``module`` to one self-contained ONNX file at ``path``.

    Args:
        module: a ``torch.nn.Module``; it is exported in eval mode under ``torch.no_grad``
            and its training flag is restored afterwards.
        example_inputs: one tensor or a tuple of tensors passed positionally to ``forward``.
        path: destination ``.onnx`` file; its folder is created when missing.
        input_names: names of the graph inputs, in ``forward`` argument order.
        output_names: names of the graph outputs.
        dynamic_axes: ``{name: {axis: "symbol"}}`` for axes that may vary at run time.
        opset: the default-domain ONNX opset to target.
        fold: let the exporter fold constants (and BatchNorm into Conv); False keeps the
            graph as the module wrote it, for qcompile's own ``fold`` pass to see.
        exporters: the :data:`EXPORTERS` to try, in order (causal LMs go straight to
            ``("dynamo",)``: TorchScript fails on current transformers masking code).
        dynamic_shapes: ``torch.export``-style dynamic shapes (dynamo only), for nested inputs.

    Returns:
        The absolute path of the written file.

    Raises:
        FrontendError: when both exporters fail or the destination cannot be written.
    """
    torch = _import_torch()
    unknown = [name for name in exporters if name not in EXPORTERS]
    if unknown or not exporters:
        raise FrontendError(f"export_module: unknown exporters {unknown}; expected some of {list(EXPORTERS)}")
    if not isinstance(module, torch.nn.Module):
        raise FrontendError(
            f"export_module: expected a torch.nn.Module, got {type(module).__name__}"
        )
    dest = Path(path).expanduser().resolve()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{dest.stem}.", suffix=".onnx.tmp", dir=dest.parent
        )
        os.close(fd)
    except OSError as exc:
        raise FrontendError(f"cannot write ONNX export to {dest}: {_one_line(exc)}") from exc
    tmp = Path(tmp_name)
    kw = {
        "input_names": input_names,
        "output_names": output_names,
        "dynamic_axes": dynamic_axes,
        "opset": opset,
        "fold": fold,
        "dynamic_shapes": dynamic_shapes,
    }
    try:
        with _eval_mode(module):
            used = _try_exporters(torch, module, _as_tuple(example_inputs), tmp, exporters, **kw)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, dest)
    except FrontendError as exc:
        raise FrontendError(f"exporting {type(module).__name__} to {dest} failed: {exc}") from exc
    except OSError as exc:
        raise FrontendError(f"cannot write ONNX export to {dest}: {_one_line(exc)}") from exc
    finally:
        _remove_quietly(tmp)
    logger.info("exported %s to %s with the %s exporter", type(module).__name__, dest, used)
    return dest
