"""Weights that stay on disk: initializers memory-mapped from their external-data file.

A model whose weights live in external data (any model over 2 GB) is never read into
memory as a whole. :func:`qcompile.ir.io.load` checks every external-data reference
(inside the model's folder, file long enough) and records the absolute file behind it;
:func:`map_external` then turns those initializers into :class:`MappedConstant`\\ s, whose
``values`` are a fresh read-only ``np.memmap`` at every access. Nothing is cached: once a
pass has rewritten a layer and dropped its float weight, the pages it touched leave the
process (the mapping is closed when the last array over it goes away), so a pass that
works layer by layer holds one layer's float weight at a time.

Exported (``Model.to_proto``), a mapped initializer is its external-data reference, with
the absolute path under :data:`PATH_KEY`; :func:`qcompile.ir.io.save` streams its bytes into
the output's data file, :func:`qcompile.ir.runtime.make_session` hands ONNX Runtime the
mapping itself (no copy), and :func:`qcompile.ir.verify.verify` checks the graph without
reading it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper, helper
from onnx_graphsurgeon.ir.tensor import LazyValues

PATH_KEY = "qcompile.mapped_path"  # external_data key: the absolute file a mapped tensor reads


class MappedValues(LazyValues):
    """A tensor's bytes ``[offset, offset + length)`` of ``path``, read through a memory map."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], data_type: int, location: str) -> None:
        # no super().__init__: LazyValues would keep a TensorProto; these fields are all it needs
        self.path = Path(path)
        self.offset = int(offset)
        self.shape = tuple(int(d) for d in shape)
        self.data_type = int(data_type)
        self.dtype = helper.tensor_dtype_to_np_dtype(self.data_type)
        self.location = location
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def load(self) -> np.ndarray:
        """A read-only array over the file (no copy; the mapping closes with the last view)."""
        if self.nbytes == 0:
            return np.zeros(self.shape, self.dtype)
        mapped = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        return np.asarray(mapped)  # a plain ndarray view: ONNX Runtime mis-reads memmap subclasses

    @property
    def tensor(self) -> onnx.TensorProto:
        """The external-data reference the exporter writes (gs uses ``.tensor`` of lazy values)."""
        proto = onnx.TensorProto()
        proto.data_type = self.data_type
        proto.dims.extend(self.shape)
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)),
                           ("length", str(self.nbytes)), (PATH_KEY, str(self.path))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        return proto

    def __str__(self) -> str:
        return f"MappedValues({self.path.name}@{self.offset}, shape={self.shape}, dtype={np.dtype(self.dtype)})"


class MappedConstant(gs.Constant):
    """A ``gs.Constant`` whose mapped values are re-mapped at every access instead of cached."""

    @property  # type: ignore[override]
    def values(self):
        if isinstance(self._values, MappedValues):
            return self._values.load()
        return super().values

    @values.setter
    def values(self, values) -> None:
        self._values = values

    def copy(self) -> MappedConstant:
        return MappedConstant(self.name, self._values, export_dtype=self.export_dtype)


def mapped_info(tensor: onnx.TensorProto) -> MappedValues | None:
    """The mapping an exported tensor stands for (None: not a mapped tensor)."""
    if not external_data_helper.uses_external_data(tensor):
        return None
    entries = {entry.key: entry.value for entry in tensor.external_data}
    if PATH_KEY not in entries:
        return None
    return MappedValues(Path(entries[PATH_KEY]), int(entries.get("offset") or 0), tuple(tensor.dims),
                        tensor.data_type, entries.get("location", Path(entries[PATH_KEY]).name))


def mappable(tensor: onnx.TensorProto) -> bool:
    """Whether a tensor's external data can be mapped as it is: a plain fixed-width NumPy dtype
    (bfloat16, float8 and 4-bit types, which NumPy lacks, are read into memory instead)."""
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):
        return False
    return dtype.kind in "fiub"


def map_external(graph: gs.Graph) -> int:
    """Replace every constant of ``graph`` that is an exported mapped tensor by a :class:`MappedConstant`.

    Returns how many were mapped. Readers of one initializer keep sharing one object.
    """
    replaced: dict[int, gs.Constant] = {}

    def swap(tensor: gs.Tensor) -> gs.Tensor:
        if not isinstance(tensor, gs.Constant) or isinstance(tensor, MappedConstant):
            return tensor
        if id(tensor) in replaced:
            return replaced[id(tensor)]
        lazy = tensor._values
        info = mapped_info(lazy.tensor) if isinstance(lazy, LazyValues) and not isinstance(lazy, MappedValues) else (
            lazy if isinstance(lazy, MappedValues) else None)
        if info is None:
            return tensor
        mapped = MappedConstant(tensor.name, info)
        replaced[id(tensor)] = mapped
        return mapped

    for node in graph.nodes:
        for index, tensor in enumerate(node.inputs):
            new = swap(tensor)
            if new is not tensor:
                node.inputs[index] = new
    graph.outputs = [swap(tensor) for tensor in graph.outputs]
    return len(replaced)


def mapped_bytes(graph: gs.Graph) -> int:
    """Bytes of the constants of ``graph`` that stay on disk."""
    return sum(t._values.nbytes for t in graph.tensors().values()
               if isinstance(t, gs.Constant) and isinstance(t._values, MappedValues))


def mapped_arrays(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Per mapped initializer of ``proto``'s main graph, its memory-mapped array."""
    arrays = {}
    for tensor in proto.graph.initializer:
        info = mapped_info(tensor)
        if info is not None:
            arrays[tensor.name] = info.load()
    return arrays


def materialize(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` (modified) with its mapped initializers read into memory: for consumers that need
    the whole model as one message (the TVM importer)."""
    for tensor in proto.graph.initializer:
        info = mapped_info(tensor)
        if info is not None:
            tensor.raw_data = info.load().tobytes()
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    return proto
