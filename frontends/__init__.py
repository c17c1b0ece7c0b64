"""Frontends: everything that turns a user's model into the IR.

* an ONNX file (``model.onnx``; external data beside it),
* a Hugging Face model folder (``hf:PATH``, or a folder holding ``config.json``): encoders
  through :mod:`qcompile.frontends.hf`; causal LMs (``...ForCausalLM`` configs, GGUF-packed
  folders) through :mod:`qcompile.frontends.llm`, as their prefill graph (cached export),
* a PyTorch ``nn.Module`` with example inputs (:mod:`qcompile.frontends.torch`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx

from qcompile.errors import ModelLoadError
from qcompile.ir import io
from qcompile.ir.model import Model


def load_model(source: Any, *, example_inputs: Any = None, cache_dir: Path | None = None) -> Model:
    """Import ``source`` (path, ``hf:PATH``, ModelProto, Model or nn.Module) into the IR."""
    if isinstance(source, Model):
        return source
    if isinstance(source, onnx.ModelProto):
        return Model.from_proto(source)
    if _is_torch_module(source):
        return _from_torch(source, example_inputs)
    text = str(source)
    if text.startswith("hf:") or (Path(text).is_dir() and (
            (Path(text) / "config.json").is_file() or any(Path(text).glob("*.gguf")))):
        return _from_hf(Path(text[3:] if text.startswith("hf:") else text), cache_dir)
    if Path(text).is_dir():
        raise ModelLoadError(f"{text}: a folder, but not a Hugging Face model folder (no config.json)")
    return io.load(text)


def _is_torch_module(source: Any) -> bool:
    return any(cls.__module__.startswith("torch.nn") and cls.__name__ == "Module" for cls in type(source).__mro__)


def _from_torch(module: Any, example_inputs: Any) -> Model:
    from .torch import export_module

    if example_inputs is None:
        raise ModelLoadError("compiling a PyTorch module needs example_inputs=(tensor, ...)")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    names = [f"input_{i}" for i in range(len(inputs))]
    with tempfile.TemporaryDirectory(prefix="qcompile-torch-") as folder:
        path = export_module(module, inputs, Path(folder) / "model.onnx", input_names=names, output_names=["output"])
        return io.load(path, map_weights=False)  # the folder goes away: read the weights now


def _from_hf(folder: Path, cache_dir: Path | None) -> Model:
    from .hf import export_hf_encoder
    from .llm import cached_causal_lm_onnx, is_causal_lm_folder

    if is_causal_lm_folder(folder):
        return io.load(cached_causal_lm_onnx(folder, "prefill"))

    with tempfile.TemporaryDirectory(prefix="qcompile-hf-", dir=cache_dir) as tmp:
        path = export_hf_encoder(folder, Path(tmp) / "model.onnx")
        return io.load(path, map_weights=False)  # the folder goes away: read the weights now
