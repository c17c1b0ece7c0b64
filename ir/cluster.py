"""The `cluster` quantized-weight format: one packed code per weight, a cluster id per
weight, and a uniform grid per (row, cluster, group).

This is how the ``split`` pass's parts are stored after quantization without tripling
the artifact. SplitQuant cuts a weight matrix into ``k`` value clusters (k-means on the
values) and quantizes each part with its own scale. Stored as ``k`` separate masked
matrices that costs ``k`` times the codes; here the parts share one code tensor, since
each weight belongs to exactly one part, and a cluster id per weight says whose grid
decodes it:

    W[r, c] = offset[r, k, g] + code[r, c] * scale[r, k, g],  k = cluster[r, c],
                                                                    g = c // group_size

(an offset, not the ``int`` format's zero point: a cluster's grid usually does not
contain zero, so a zero point would fall outside the code range).

Inputs (all ``[rows, ...]``): ``packed`` (the ``int`` format's packing of ``bits``-bit
codes, columns padded to a multiple of 8), ``clusters`` (ids in base ``k``, packed
``floor(log_k 256)`` per byte, lowest digit first: 5 per byte for k=3, so 1.6 bits per
weight), ``scales`` (float16 or float32 ``[rows, k * n_groups]``, cluster-major) and
``group_size`` 0 in the pass options means one grid
per (row, cluster), stored as ``group_size = padded cols``: the clusters are narrow, so
per-row grids keep most of the accuracy at a fraction of the parameter bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from .formats import FunctionBody, WeightFormat, register
from .qformat import FP16_MAX, MAX_BITS, MIN_BITS, decode_codes, pack_codes, unpack_codes

MAX_CLUSTERS = 4


def digits_per_byte(k: int) -> int:
    """How many base-``k`` digits one byte holds (k=2: 8, k=3: 5, k=4: 4)."""
    count = 0
    while k ** (count + 1) <= 256:
        count += 1
    return count


def pack_clusters(ids: np.ndarray, k: int) -> np.ndarray:
    """Cluster ids ``[rows, n]`` to bytes ``[rows, ceil(n / digits_per_byte(k))]``."""
    per = digits_per_byte(k)
    rows, n = ids.shape
    padded = np.zeros((rows, -(-n // per) * per), np.int64)
    padded[:, :n] = ids
    powers = k ** np.arange(per, dtype=np.int64)
    return (padded.reshape(rows, -1, per) * powers).sum(-1).astype(np.uint8)


def unpack_clusters(packed: np.ndarray, k: int, n: int) -> np.ndarray:
    per = digits_per_byte(k)
    powers = k ** np.arange(per, dtype=np.int64)
    digits = (packed.astype(np.int64)[..., None] // powers) % k
    return digits.reshape(packed.shape[0], -1)[:, :n].astype(np.uint8)


@dataclass(frozen=True)
class ClusterWeight:
    """Codes, cluster ids and per-(row, cluster, group) grids."""

    format: ClassVar[str] = "cluster"

    packed: np.ndarray  # uint8 [rows, padded_cols * bits / 8]
    clusters: np.ndarray  # uint8 [rows, ceil(padded_cols / digits_per_byte(k))]
    scales: np.ndarray  # float16/float32 [rows, k * n_groups]
    offsets: np.ndarray  # same dtype and shape as scales
    bits: int
    k: int
    group_size: int
    cols: int

    @property
    def rows(self) -> int:
        return int(self.packed.shape[0])

    @property
    def n_groups(self) -> int:
        return -(-self.cols // self.group_size)

    @property
    def padded_cols(self) -> int:
        return -(-self.cols // 8) * 8

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.clusters.nbytes + self.scales.nbytes + self.offsets.nbytes)

    def cluster_ids(self) -> np.ndarray:
        return unpack_clusters(self.clusters, self.k, self.padded_cols)[:, : self.cols]

    def dequantize(self) -> np.ndarray:
        codes = unpack_codes(self.packed, self.bits)[:, : self.cols].astype(np.float32)
        index = self.cluster_ids().astype(np.int64) * self.n_groups + np.arange(self.cols) // self.group_size
        scales = np.take_along_axis(self.scales.astype(np.float32), index, axis=1)
        offsets = np.take_along_axis(self.offsets.astype(np.float32), index, axis=1)
        return offsets + codes * scales


def fit_grids(weight: np.ndarray, ids: np.ndarray, k: int, bits: int, group_size: int,
              importance: np.ndarray | None = None, clip_search: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Grids ``[rows, k, n_groups]`` (scale, offset) per cluster and group.

    Each grid spans the values of its cluster in its group, narrowed by the candidate
    (up to 25%, about the centre) that minimises the squared error weighted by
    ``importance`` per column. Scales and offsets come back as they will be stored.
    """
    rows, cols = weight.shape
    n_groups = -(-cols // group_size)
    qmax = (1 << bits) - 1
    column_weight = np.ones(cols) if importance is None else np.maximum(np.asarray(importance, np.float64), 0) + 1e-8
    pad = n_groups * group_size - cols
    values = np.pad(weight.astype(np.float64), ((0, 0), (0, pad))).reshape(rows, n_groups, group_size)
    member_ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=k).reshape(rows, n_groups, group_size)
    col_w = np.pad(column_weight, (0, pad)).reshape(n_groups, group_size)
    dtype = storage_dtype(weight, bits)
    scales = np.ones((rows, k, n_groups))
    offsets = np.zeros((rows, k, n_groups))
    shrinks = np.linspace(1.0, 0.75, clip_search) if clip_search > 1 else np.array([1.0])
    for cluster in range(k):
        member = member_ids == cluster
        hi = np.where(member, values, -np.inf).max(-1)
        lo = np.where(member, values, np.inf).min(-1)
        empty = ~member.any(-1)
        hi, lo = np.where(empty, 0.0, hi), np.where(empty, 0.0, lo)
        best_err = np.full(hi.shape, np.inf)
        for shrink in shrinks:
            centre, half = (hi + lo) / 2, (hi - lo) / 2 * shrink
            scale = np.where(half > 0, 2 * half / qmax, 1.0).astype(dtype).astype(np.float64)
            scale = np.where(scale > 0, scale, 1.0)
            offset = (centre - half).astype(dtype).astype(np.float64)
            codes = np.clip(np.round((values - offset[..., None]) / scale[..., None]), 0, qmax)
            err = (np.square(offset[..., None] + codes * scale[..., None] - values) * col_w * member).sum(-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            scales[:, cluster] = np.where(better, scale, scales[:, cluster])
            offsets[:, cluster] = np.where(better, offset, offsets[:, cluster])
    return scales, offsets


def storage_dtype(weight: np.ndarray, bits: int) -> type:
    """float16 for scales and offsets at the magnitudes of trained weights; float32 outside them
    (where float16 would overflow, or lose the steps of the narrowest grids to subnormals)."""
    absmax = float(np.abs(weight).max()) if weight.size else 0.0
    return np.float16 if 2**-6 <= absmax <= FP16_MAX / 4 and bits <= 8 else np.float32


def encode(codes: np.ndarray, ids: np.ndarray, scales: np.ndarray, offsets: np.ndarray, bits: int,
           k: int, group_size: int, dtype: type) -> ClusterWeight:
    """Pack codes and cluster ids ``[rows, cols]`` with grids ``[rows, k, n_groups]``."""
    rows, cols = codes.shape
    padded = -(-cols // 8) * 8
    full_codes = np.zeros((rows, padded), np.uint8)
    full_codes[:, :cols] = codes
    full_ids = np.zeros((rows, padded), np.uint8)
    full_ids[:, :cols] = ids
    return ClusterWeight(
        packed=pack_codes(full_codes, bits),
        clusters=pack_clusters(full_ids, k),
        scales=scales.reshape(rows, -1).astype(dtype),
        offsets=offsets.reshape(rows, -1).astype(dtype),
        bits=bits, k=k, group_size=group_size, cols=cols,
    )


def nearest_codes(values: np.ndarray, scales: np.ndarray, offsets: np.ndarray, bits: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Codes and grid choice for ``values`` ``[rows, n]`` given the candidate grids ``[rows, k, n]``:
    every value goes to the grid that reconstructs it best."""
    codes = np.clip(np.round((values[:, None, :] - offsets) / scales), 0, (1 << bits) - 1)
    error = np.abs(offsets + codes * scales - values[:, None, :])
    chosen = error.argmin(axis=1)
    picked = np.take_along_axis(codes, chosen[:, None, :], axis=1)[:, 0]
    return picked.astype(np.uint8), chosen.astype(np.uint8)


def quantize_cluster(weight: np.ndarray, ids: np.ndarray, k: int, bits: int, group_size: int,
                     importance: np.ndarray | None = None, clip_search: int = 20) -> ClusterWeight:
    """Round-to-nearest quantization of ``weight`` on grids seeded by the clusters ``ids``."""
    cols = weight.shape[1]
    group_size = group_size or -(-cols // 8) * 8
    scales, offsets = fit_grids(weight, ids, k, bits, group_size, importance, clip_search)
    column_group = np.arange(cols) // group_size
    codes, chosen = nearest_codes(weight.astype(np.float64), scales[:, :, column_group], offsets[:, :, column_group],
                                  bits)
    return encode(codes, chosen, scales, offsets, bits, k, group_size, storage_dtype(weight, bits))


class ClusterFormat(WeightFormat):
    """``cluster``: inputs ``packed, clusters, scales, offsets``; see the module docstring."""

    name = "cluster"
    inputs = ("packed", "clusters", "scales", "offsets")
    attributes = ("format", "bits", "k", "group_size", "cols")

    def node_attributes(self, weight: Any) -> dict[str, Any]:
        return {"format": self.name, "bits": weight.bits, "k": weight.k, "group_size": weight.group_size,
                "cols": weight.cols}

    def constants(self, prefix: str, weight: Any) -> list[gs.Constant]:
        return [
            gs.Constant(f"{prefix}.qweight", weight.packed),
            gs.Constant(f"{prefix}.clusters", weight.clusters),
            gs.Constant(f"{prefix}.scales", weight.scales),
            gs.Constant(f"{prefix}.offsets", weight.offsets),
        ]

    def from_arrays(self, attrs: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> ClusterWeight:
        packed, clusters, scales, offsets = arrays
        return ClusterWeight(packed=packed, clusters=clusters, scales=scales, offsets=offsets,
                             bits=int(attrs["bits"]), k=int(attrs["k"]), group_size=int(attrs["group_size"]),
                             cols=int(attrs["cols"]))

    def check(self, attrs: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> str | None:
        bits, k, group_size, cols = (int(attrs[name]) for name in ("bits", "k", "group_size", "cols"))
        if not MIN_BITS <= bits <= MAX_BITS or not 2 <= k <= MAX_CLUSTERS or group_size <= 0 or cols <= 0:
            return f"bad format attributes bits={bits} k={k} group_size={group_size} cols={cols}"
        packed, clusters, scales, offsets = arrays
        rows, padded = packed.shape[0], -(-cols // 8) * 8
        expected = {
            "packed weight": (packed, (rows, padded * bits // 8)),
            "cluster ids": (clusters, (rows, -(-padded // digits_per_byte(k)))),
        }
        for what, (array, shape) in expected.items():
            if array.dtype != np.uint8 or array.shape != shape:
                return f"{what} is {array.dtype}{list(array.shape)}, expected uint8{list(shape)}"
        grid_shape = (rows, k * -(-cols // group_size))
        for what, array in (("scales", scales), ("offsets", offsets)):
            if array.dtype not in (np.float16, np.float32) or array.shape != grid_shape:
                return f"{what} are {array.dtype}{list(array.shape)}, expected float16/32{list(grid_shape)}"
            if not np.isfinite(array.astype(np.float32)).all():
                return f"non-finite {what}"
        return None

    def decode(self, body: FunctionBody, inputs: Sequence[str]) -> str:
        """Codes and cluster ids unpacked; grid index ``id * n_groups + col // group_size``."""
        packed, clusters, scales, offsets = inputs
        bits, k = body.attr_const("bits"), body.attr_const("k")
        group_size, cols = body.attr_const("group_size"), body.attr_const("cols")
        zero, one, minus_one = body.const([0]), body.const([1]), body.const([-1])
        rows = body.op("Slice", body.op("Shape", packed), zero, one)
        codes = decode_codes(body, packed, bits)
        cols_1d = body.op("Unsqueeze", cols, zero)
        codes = body.op("Slice", body.op("Reshape", codes, body.op("Concat", rows, minus_one, axis=0)), zero, cols_1d,
                        one)
        # cluster ids: digit i of each byte is (byte // k**i) % k
        log_257 = body.op("Log", body.op("Cast", body.const(257), to=TensorProto.FLOAT))
        per_byte = body.op("Cast", body.op("Floor", body.op(
            "Div", log_257, body.op("Log", body.op("Cast", k, to=TensorProto.FLOAT)))), to=TensorProto.INT64)
        powers = body.op("Pow", k, body.op("Range", body.const(0), per_byte, body.const(1)))
        digits = body.op("Mod", body.op("Div", body.op("Unsqueeze", body.op("Cast", clusters, to=TensorProto.INT64),
                                                       minus_one), powers), k)
        ids = body.op("Slice", body.op("Reshape", digits, body.op("Concat", rows, minus_one, axis=0)), zero, cols_1d,
                      one)
        # grid of each weight
        n_groups = body.op("Div", body.op("Slice", body.op("Shape", scales), one, body.const([2])), body.op(
            "Unsqueeze", k, zero))
        column_group = body.op("Div", body.op("Range", body.const(0), cols, body.const(1)), group_size)
        index = body.op("Add", body.op("Mul", ids, n_groups), column_group)
        scale = body.op("GatherElements", body.op("Cast", scales, to=TensorProto.FLOAT), index, axis=1)
        offset = body.op("GatherElements", body.op("Cast", offsets, to=TensorProto.FLOAT), index, axis=1)
        return body.op("Add", offset, body.op("Mul", body.op("Cast", codes, to=TensorProto.FLOAT), scale))


CLUSTER = register(ClusterFormat())
