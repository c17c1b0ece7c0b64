"""Quantized-weight formats: what a ``format`` attribute of a ``qcompile`` op means.

A format says how a weight matrix ``[rows, cols]`` (reduction axis last) is stored as
initializers and how standard ONNX ops decode it back to float. The quantized ops
(:mod:`qcompile.ir.qops`) are format-agnostic: ``QMatMul(X, *w)``, ``QGather(w[0],
indices, *w[1:])`` and ``QConv(X, *w, B)`` take the format's weight inputs ``w`` in the
format's order, and their reference functions are built from the format's decode body.
One function is emitted per (op, format), told apart by ONNX's function ``overload``
field, so one model can mix formats.

Every weight input of a format has ``rows`` as its first axis: a ``QGather`` gathers
the rows it needs from each input before decoding them.

Adding a format means writing a :class:`WeightFormat` subclass, a weight class with
the :class:`Weight` protocol, and calling :func:`register` at import time of the
module (which :mod:`qcompile.ir.qops` imports).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper


class Weight(Protocol):
    """What passes, backends and inspection read from any quantized weight."""

    @property
    def format(self) -> str: ...

    @property
    def bits(self) -> int: ...

    @property
    def group_size(self) -> int: ...

    @property
    def cols(self) -> int: ...

    @property
    def rows(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def dequantize(self) -> np.ndarray: ...


class FunctionBody:
    """Accumulates the nodes of a function body with short unique value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._count += 1
        out = f"_{op_type.lower()}{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value) -> str:
        if isinstance(value, list):
            return self.op("Constant", value_ints=value)
        return self.op("Constant", value_int=value)

    def attr_const(self, attribute: str, kind: int = onnx.AttributeProto.INT) -> str:
        """A Constant whose value is the function attribute ``attribute``."""
        self._count += 1
        out = f"_{attribute}{self._count}"
        node = helper.make_node("Constant", [], [out])
        ref = onnx.AttributeProto()
        ref.name = "value_int" if kind == onnx.AttributeProto.INT else "value_ints"
        ref.type = kind  # type: ignore[assignment]
        ref.ref_attr_name = attribute
        node.attribute.append(ref)
        self.nodes.append(node)
        return out

    @staticmethod
    def ref_attrs(node_attrs: Iterable[tuple[str, int]]) -> list[onnx.AttributeProto]:
        refs = []
        for name, kind in node_attrs:
            ref = onnx.AttributeProto()
            ref.name, ref.ref_attr_name = name, name
            ref.type = kind  # type: ignore[assignment]
            refs.append(ref)
        return refs


class WeightFormat(ABC):
    """One storage format of quantized weights."""

    name: str  # the value of the ops' ``format`` attribute
    inputs: tuple[str, ...]  # the weight inputs, in op order (first one is what QGather indexes)
    attributes: tuple[str, ...]  # node attributes the decode body reads (``format`` included)

    @abstractmethod
    def node_attributes(self, weight: Any) -> dict[str, Any]:
        """The node attributes describing ``weight`` (``format`` included)."""

    @abstractmethod
    def constants(self, prefix: str, weight: Any) -> list[gs.Constant]:
        """The initializers of ``weight``, in :attr:`inputs` order, named after ``prefix``."""

    @abstractmethod
    def from_arrays(self, attrs: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> Weight:
        """Rebuild the weight from node attributes and its initializers (in :attr:`inputs` order)."""

    @abstractmethod
    def check(self, attrs: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> str | None:
        """What is wrong with these attributes and initializers (None when they agree)."""

    @abstractmethod
    def decode(self, body: FunctionBody, inputs: Sequence[str]) -> str:
        """Append nodes turning the weight inputs into the float32 matrix ``[rows, cols]``."""


FORMATS: dict[str, WeightFormat] = {}


def register(fmt: WeightFormat) -> WeightFormat:
    if fmt.name in FORMATS and FORMATS[fmt.name] is not fmt:
        raise ValueError(f"weight format {fmt.name!r} is registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def format_named(name: str) -> WeightFormat:
    try:
        return FORMATS[name]
    except KeyError:
        known = ", ".join(sorted(FORMATS)) or "none"
        raise ValueError(f"unknown quantized-weight format {name!r} (known: {known})") from None


def format_of(weight: Weight) -> WeightFormat:
    return format_named(weight.format)
