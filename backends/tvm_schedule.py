"""CPU schedules for the float kernels Relax legalizes (the quantized ones come scheduled).

TVM's dlight has only two CPU rules (``GEMV`` and row ``Reduction``); everything else
would ship as the unscheduled default (one thread, scalar loops, reduction over memory:
~120x slower than ONNX Runtime on MiniLM). Two more rules (and a last-resort
:class:`CpuParallel`) close the gap without a tuning search:

* :class:`CpuMatmul`: a block ``C[.., i, j] += A[.., i, k] * B[.., k, j]`` is tiled
  ``i`` by 4 and ``j`` by the vector width times 2, its accumulator tile cached in
  registers (``cache_write`` to ``local``), ``j`` vectorized, ``i`` unrolled, and the
  outer tiles run in parallel (the classic register-blocked CPU GEMM schedule); its
  elementwise epilogues (bias, scale, GELU) are inlined into the tile's write-back. When
  ``B`` is read transposed (``B[.., j, k]``) it is first copied into ``[k, j]`` order by
  its own parallel block.
* :class:`CpuRowReduction`: one row's reductions over the last axis followed by an
  elementwise epilogue (a decode step's normalizations, softmax): each reduction computed
  once (dlight's ``cpu.Reduction`` recomputed it per output element there).
* :class:`CpuFallback`: every other block gets its outer spatial loops fused and run
  in parallel and its innermost spatial loop vectorized when that is contiguous.

Rules are applied per PrimFunc with dlight's ``ApplyDefaultSchedule``; each returns
``None`` when it does not apply so the next one is tried.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

log = logging.getLogger(__name__)

VECTOR = 16  # float32 lanes of one AVX-512 register
PARALLEL_MIN_ITERATIONS = 32768  # smaller elementwise / row loop nests run on the calling thread
ROW_TILE = 4
DIRECT = "direct"


def _extent(loop_sref_extent) -> int | None:
    return int(loop_sref_extent) if isinstance(loop_sref_extent, tirx.IntImm) else None


def _loop_extent(sch: s_tir.Schedule, loop) -> int | None:
    return _extent(sch.get(loop).extent)


def _vector_split(extent: int | None) -> int:
    if extent is None:
        return 1
    for width in (2 * VECTOR, VECTOR, 8, 4):
        if extent % width == 0:
            return width
    return 1


class _Guarded(ScheduleRule):
    """A rule whose schedule error means "does not apply" (the next rule is tried)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return self.schedule(func)
        except (s_tir.ScheduleError, tvm.error.InternalError, ValueError) as exc:
            log.debug("%s does not apply: %s", type(self).__name__, str(exc).splitlines()[0])
            return None

    def schedule(self, func: tirx.PrimFunc):
        raise NotImplementedError


class CpuMatmul(_Guarded):
    """Register-blocked, vectorized, parallel GEMM for matmul-like reduction blocks."""

    def schedule(self, func: tirx.PrimFunc):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = [info for info in infos if not info.is_injective()]
        if len(reductions) != 1 or reductions[0].dom_kind().count("R") != 1:
            return None
        info = reductions[0]
        kind = info.dom_kind()
        if not kind.endswith("R") or kind.count("S") < 2:
            return None
        block = info.block_rv
        role = _matmul_role(sch, block)
        if role is None:
            return None
        if role != DIRECT:
            copy = sch.cache_read(block, role, "global")
            sch.transform_layout(copy, ("write", 0), lambda *idx: (*idx[:-2], idx[-1], idx[-2]))
        loops = sch.get_loops(block)
        spatial, reduce_loop = loops[:-1], loops[-1]
        i_loop, j_loop = spatial[-2], spatial[-1]
        j_inner = _vector_split(_loop_extent(sch, j_loop))
        i_extent = _loop_extent(sch, i_loop)
        i_inner = next((t for t in (ROW_TILE, 2) if i_extent is not None and i_extent % t == 0), 1)
        jo, ji = sch.split(j_loop, [None, j_inner])
        io, ii = sch.split(i_loop, [None, i_inner])
        sch.reorder(*spatial[:-2], io, jo, reduce_loop, ii, ji)
        outer = sch.fuse(*spatial[:-2], io, jo)
        sch.parallel(outer)
        local = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(local, outer)
        for other in infos:  # epilogues (bias, scale, activation) fused into the write-back
            if other is not info:
                try:
                    sch.reverse_compute_inline(other.block_rv)
                except s_tir.ScheduleError:
                    _parallel_vectorize(sch, other.block_rv)
        if j_inner > 1:
            sch.vectorize(sch.get_loops(local)[-1])
        if i_inner > 1:
            sch.unroll(ii)
        if j_inner > 1:
            sch.vectorize(ji)
        sch.decompose_reduction(block, reduce_loop)
        if role != DIRECT:
            _parallel_vectorize(sch, copy)
        return sch


def _matmul_role(sch: s_tir.Schedule, block) -> str | int | None:
    """``None`` when not ``C[.., i, j] += A[.., i, k] * B[.., k|j, j|k]``; ``DIRECT`` when ``B``
    is read ``[k, j]``; else the index of the read buffer ``B`` to copy transposed."""
    stmt = sch.get(block)
    iters = [iv.var for iv in stmt.iter_vars]
    i_var, j_var, k_var = iters[-3], iters[-2], iters[-1]
    if len(stmt.writes) != 1 or len(stmt.reads) < 2:
        return None
    output = stmt.writes[0].source
    inputs = [n for n, r in enumerate(stmt.reads) if not r.source.same_as(output)]
    if len(inputs) != 2:
        return None

    def last_var(region):
        last = region.region[-1].min
        return last if isinstance(last, tirx.Var) else None

    def uses(region, var):
        return any(isinstance(r.min, tirx.Var) and r.min.same_as(var) for r in region.region)

    b_index = next((n for n in inputs if uses(stmt.reads[n], j_var) and uses(stmt.reads[n], k_var)), None)
    a_region = next((stmt.reads[n] for n in inputs if uses(stmt.reads[n], i_var) and uses(stmt.reads[n], k_var)),
                    None)
    if b_index is None or a_region is None:
        return None
    b_last = last_var(stmt.reads[b_index])
    if b_last is not None and b_last.same_as(j_var):
        return DIRECT
    if b_last is not None and b_last.same_as(k_var):
        return b_index
    return None


def _worth_threads(sch: s_tir.Schedule, loops) -> bool:
    """Whether a loop nest is big enough for the thread pool: waking the workers costs more
    than a small elementwise op itself (a decode step runs ~1000 of them on one token)."""
    total = 1
    for loop in loops:
        extent = _loop_extent(sch, loop)
        if extent is None:
            return True
        total *= extent
    return total >= PARALLEL_MIN_ITERATIONS


def _parallel_vectorize(sch: s_tir.Schedule, block) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    threads = _worth_threads(sch, loops)
    inner_extent = _loop_extent(sch, loops[-1])
    width = _vector_split(inner_extent) if len(loops) > 1 or (inner_extent or 0) > 64 else 1
    if any(str(region.source.dtype) == "bool" for region in [*sch.get(block).reads, *sch.get(block).writes]):
        width = 1  # TIR cannot vectorize stores of bool
    if width > 1 and _innermost_is_contiguous(sch, block, loops[-1]):
        outer, inner = sch.split(loops[-1], [None, width])
        sch.vectorize(inner)
        loops = [*loops[:-1], outer]
    else:
        loops = list(loops)
    if not threads:
        return
    if len(loops) > 1:
        fused = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        sch.parallel(fused)
    else:
        sch.parallel(loops[0])


def _innermost_is_contiguous(sch: s_tir.Schedule, block, loop) -> bool:
    """True when the innermost loop's variable indexes the last dimension of the output."""
    stmt = sch.get(block)
    if not stmt.iter_vars or any(iv.iter_type != tirx.IterVar.DataPar for iv in stmt.iter_vars):
        return False
    last_iter = stmt.iter_vars[-1].var
    write = stmt.writes[0].region[-1].min if stmt.writes else None
    return isinstance(write, tirx.Var) and write.same_as(last_iter)


class CpuRowReduction(_Guarded):
    """A single row's reductions with an elementwise epilogue (LayerNorm, RMSNorm, softmax of
    one token): each reduction once, then the epilogue vectorized.

    With one row the epilogue's only loop runs over the reduced axis, and dlight's
    ``cpu.Reduction`` puts the reduction inside it: each of the ``D`` outputs recomputed the
    whole ``D``-wide sum, ``D^2`` work (SmolLM2's 61 RMSNorms were two thirds of a decode
    step's kernel time). Several rows keep dlight's schedule, which measured as fast or
    faster there (softmax)."""

    def schedule(self, func: tirx.PrimFunc):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2 or not infos[-1].is_injective():
            return None
        reductions = [info for info in infos if not info.is_injective()]
        if not reductions:
            return None
        last = infos[-1]
        out_shape = [_extent(d) for d in sch.get(last.block_rv).writes[0].source.shape]
        if None in out_shape or int(np.prod(out_shape[:-1], dtype=np.int64)) != 1:
            return None
        for info in reductions:  # reduced over the last axis only, one value
            kind = info.dom_kind()
            if kind != "S" * (len(kind) - 1) + "R":
                return None
            if int(np.prod([_extent(d) or 0 for d in sch.get(info.block_rv).writes[0].source.shape])) != 1:
                return None
        reduction_blocks = [sch.get(info.block_rv) for info in reductions]
        for info in infos[:-1]:  # elementwise steps inlined where read, unless a reduction reads them
            consumers = [sch.get(b) for b in sch.get_consumers(info.block_rv)]
            if info.is_injective() and not any(c.same_as(r) for c in consumers for r in reduction_blocks):
                try:
                    sch.compute_inline(info.block_rv)
                except s_tir.ScheduleError:
                    pass
        for block in sch.get_child_blocks(sch.get_sblock("root")):  # what was not inlined
            if not _same(sch, block, last.block_rv) and not any(sch.get(block).same_as(r) for r in reduction_blocks):
                _vectorize_inner(sch, block)
        loops = sch.get_loops(last.block_rv)
        if len(loops) != 1 or _loop_extent(sch, loops[0]) != out_shape[-1]:
            return None
        _vectorize_inner(sch, last.block_rv)
        return sch


def _vectorize_inner(sch: s_tir.Schedule, block) -> None:
    loops = sch.get_loops(block)
    width = _vector_split(_loop_extent(sch, loops[-1]))
    if width > 1 and _innermost_is_contiguous(sch, block, loops[-1]):
        _, inner = sch.split(loops[-1], [None, width])
        sch.vectorize(inner)


def _same(sch: s_tir.Schedule, a, b) -> bool:
    return sch.get(a).same_as(sch.get(b))


class CpuFallback(_Guarded):
    """Parallel outer loops and a vectorized contiguous inner loop for every block."""

    def schedule(self, func: tirx.PrimFunc):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        for info in infos:
            if info.is_injective():
                _parallel_vectorize(sch, info.block_rv)
            else:
                loops = sch.get_loops(info.block_rv)
                spatial = [loop for loop, kind in zip(loops, info.dom_kind(), strict=False) if kind == "S"]
                if spatial and len(spatial) == len(loops) - info.dom_kind().count("R") and _worth_threads(sch, loops):
                    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
                    sch.parallel(fused)
        return sch


class CpuParallel(_Guarded):
    """Last resort: the outermost loop of every block in parallel, nothing else."""

    def schedule(self, func: tirx.PrimFunc):
        sch = s_tir.Schedule(func)
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            loops = sch.get_loops(block)
            if loops:
                sch.parallel(loops[0])
        return sch


def cpu_rules() -> list[ScheduleRule]:
    return [CpuMatmul(), dl.cpu.GEMV(), CpuRowReduction(), dl.cpu.Reduction(), CpuFallback(), CpuParallel()]


class Skipping(ScheduleRule):
    """A dlight rule whose failure means "does not apply": some of TVM 0.27's rules raise
    (e.g. ``gpu.GEMV``'s analysis asserts on the decode block of a 1-row quantized matmul)
    instead of returning ``None``, which would abort the whole build."""

    def __init__(self, rule: ScheduleRule) -> None:
        self.rule = rule

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        try:
            return self.rule.apply(func, target, tunable)
        except Exception as exc:  # noqa: BLE001 - any failure of a rule only skips it
            log.debug("%s does not apply: %s", type(self.rule).__name__, str(exc).strip().splitlines()[-1:])
            return None


def gpu_rules() -> list[ScheduleRule]:
    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    return [Skipping(rule) for rule in rules]
