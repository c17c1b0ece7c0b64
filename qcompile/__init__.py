"""qcompile: a compiler for model compression.

    import qcompile
    result = qcompile.compile("model.onnx", passes="quant(bits=4)", target="cpu", output="out")
    artifact = qcompile.load("out")
    outputs = artifact.run({"input_ids": ids, "attention_mask": mask})
"""

from __future__ import annotations

__version__ = "0.1.0"

from qcompile.errors import QCompileError  # noqa: E402

__all__ = ["QCompileError", "__version__", "compile", "load"]


def compile(model, **kwargs):  # noqa: A001 - the public name users expect
    """Compile ``model``; see :func:`qcompile.api.compile` for the options."""
    from qcompile.api import compile as _compile

    return _compile(model, **kwargs)


def load(folder, **kwargs):
    """Open an artifact folder; see :func:`qcompile.api.load`."""
    from qcompile.api import load as _load

    return _load(folder, **kwargs)
