"""``tune``: recover accuracy after pruning or quantization by knowledge distillation, masks and codes fixed.

One-shot pruning (``prune``) leaves an error that no per-layer method removes on a small
model (MiniLM 50% Wanda: cosine 0.87). Production sparsity tools (NNCF, SparseML) retrain
with the sparsity masks fixed; ``tune`` does that with the calibration data the user gave:
the current (pruned, still float) model is the student, the model as it entered the
pipeline the teacher (``ctx.reference``, FP32; distillation as in Hinton et al., 2015, on
the outputs themselves: no labels needed).

The graph runs in torch (:class:`qcompile.ir.torch_exec.TorchGraph`) with the weights of
every MatMul/Gemm/Conv layer as parameters (and, with ``train``, their biases and the
normalisation parameters). The loss is the squared error of each float output against the
teacher's on the same batch, summed over real tokens only (with an ``attention_mask``
input, padding positions are left out, as in :func:`~.context.token_rows`) and divided by
the teacher's output energy over the same positions. Adam with a linear warm-up and cosine
decay of the learning rate. Weights that are exactly zero stay exactly zero: their
gradients are masked and the mask is re-applied after every step, so unstructured, per-row
and N:M patterns are kept bit for bit (stats check it per layer).

After ``quant`` or ``shiftadd`` the quantized layers' codes stay fixed and their group
scales (``int``) or alphas (``bcq``) are trained as relative changes at ``scale_lr``, then
stored in their format again (float16 scales; alphas rounded to sums of powers of two),
see :mod:`.tunequant`; the student runs their decoded weights, computed from those scales
at every step. Float layers (left by ``skip``/``min_size``) train as above.

Lossy (it changes the weights) but never worse on the calibration data: the relative
output error on the first calibration samples is measured before and after (after: with
the scales as stored), and the original weights are kept when training did not lower it.
Seeded by ``ctx.seed``. Needs calibration data.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs
import torch

from qcompile.errors import UsageError
from qcompile.ir import qops, runtime
from qcompile.ir.model import Model, constant_bias_add
from qcompile.ir.torch_exec import TorchGraph

from .base import Pass, PassResult, option
from .calibration import CalibrationSet
from .context import PassContext
from .layers import select_layers, weight_of
from .patterns import rmsnorms
from .tunequant import QuantScales, quant_scales

log = logging.getLogger(__name__)

EVAL_SAMPLES = 64  # calibration samples the before/after error is measured on
WARMUP_FRACTION = 0.05
NORM_OPS = ("LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization")


@dataclass(frozen=True)
class Tune(Pass):
    """Knowledge distillation toward the pipeline's input model, zeros and quantized codes kept."""

    name: ClassVar[str] = "tune"
    summary: ClassVar[str] = ("knowledge distillation toward the input model with sparsity masks and quantized "
                              "codes fixed (recovers accuracy after prune, quant, shiftadd; needs --calib)")
    requires_calibration: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = True

    steps: int = option(200, "optimizer steps", min=1, max=1_000_000)
    lr: float = option(3e-4, "peak learning rate of Adam (linear warm-up, cosine decay)", min=1e-8, max=1.0)
    batch: int = option(16, "calibration samples per step", min=1, max=65536)
    train: str = option("weights", "what is trained: weights = MatMul/Gemm/Conv weights; biases = also their "
                        "biases; all = also LayerNorm/BatchNorm scales and shifts",
                        choices=("weights", "biases", "all"))
    trim_padding: bool = option(True, "with an attention_mask (right padding): drop each batch's trailing "
                                "padding columns (exact for masked encoders; faster)")
    skip: tuple[str, ...] = option((), "node-name glob patterns whose weights stay as they are, separated by |")
    hidden: float = option(0.0, "weight of a second loss term matching the outputs of every LayerNormalization "
                           "(transformer block outputs) to the teacher's; 0 = model outputs only", min=0.0, max=100.0)
    threads: int = option(1, "CPU threads for training and the teacher (0 = every core); on a shared 2-core "
                          "machine one thread ran MiniLM steps 3-6x faster than two", min=0, max=1024)
    scale_lr: float = option(3e-3, "peak learning rate of the quantized layers' scales and alphas, trained as "
                             "relative changes (codes stay fixed)", min=0.0, max=1.0)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        calib, teacher = self._check(model, ctx)
        student_model = model
        if model.quantized_nodes():  # the student runs the decoded weights, computed from trainable scales
            student_model = model.copy()
            qops.decode_to_float(student_model.graph)
        scales, frozen = quant_scales(model, student_model, self.skip)
        masks = _weight_masks(model, self.skip)
        names = [*masks, *(_extra_parameters(student_model, self.train) if self.train != "weights" else [])]
        if not masks and not scales:
            return PassResult(False, {"trained": 0, "reason": "no MatMul/Gemm/Conv layer with a constant weight "
                                      "or quantized scales", "quantized_frozen": frozen})
        started = time.perf_counter()
        torch.manual_seed(ctx.seed)
        student = _Student(TorchGraph(student_model, dict.fromkeys(names)), scales)
        hidden = _hidden_tensors(model, teacher) if self.hidden > 0 else []
        session = runtime.make_session(teacher, threads=self.threads or None, extra_outputs=hidden)
        bool_masks = {name: torch.from_numpy(mask) for name, mask in masks.items()}
        evaluation = calib.head(min(EVAL_SAMPLES, calib.n_samples))
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads or os.cpu_count() or 1)
        try:
            before = self._evaluate(student, session, evaluation)
            losses = self._train(student, session, calib, bool_masks, hidden, ctx)
            for q in scales:  # evaluate what will be stored: scales in their dtype, alphas as powers of two
                q.round_to_stored()
            after = self._evaluate(student, session, evaluation)
        finally:
            torch.set_num_threads(previous_threads)
        kept = after["relative_error"] < before["relative_error"]
        layers = _write_back(model, student.graph, masks) if kept else {}
        quantized = _write_scales(model, scales) if kept else {}
        stats: dict[str, Any] = {
            "steps": len(losses), "hidden_matched": len(hidden), "trained_tensors": len(names), "trained_weights": len(masks),
            "trained_params": int(sum(student.graph.parameter(n).numel() for n in names) + sum(q.params for q in scales)),
            "quantized_trained": len(scales), "quantized_layers": quantized, "quantized_frozen": frozen,
            "loss_start": round(losses[0], 6), "loss_end": round(float(np.mean(losses[-max(1, len(losses) // 10):])), 6),
            "calib_error_before": before, "calib_error_after": after, "eval_samples": evaluation.n_samples,
            "kept": kept, "seconds": round(time.perf_counter() - started, 1), "layers": layers,
            "masks_preserved": all(layer["mask_preserved"] for layer in layers.values()),
        }
        if not kept:
            stats["reason"] = "training did not lower the calibration error: weights left as they were"
            log.warning("tune: %s", stats["reason"])
        return PassResult(kept, stats)

    def _check(self, model: Model, ctx: PassContext) -> tuple[CalibrationSet, Model]:
        if ctx.calib is None:
            raise UsageError("pass tune needs calibration data: add --calib FILE")
        if ctx.reference is None:
            raise UsageError("pass tune needs the pipeline's input model as its teacher: run it through "
                             "qcompile.compile or PassManager")
        student_outputs = [t.name for t in model.graph.outputs]
        teacher_outputs = [t.name for t in ctx.reference.graph.outputs]
        if student_outputs != teacher_outputs:
            raise UsageError(f"pass tune: the model's outputs {student_outputs} differ from the input model's "
                             f"{teacher_outputs}")
        return ctx.calib, ctx.reference

    # -- training ----------------------------------------------------------------------

    def _train(self, student: _Student, session, calib: CalibrationSet, masks: dict[str, torch.Tensor],
               hidden: list[str], ctx: PassContext) -> list[float]:
        groups = [{"params": list(student.graph.parameters()), "lr": self.lr},
                  {"params": [q.delta for q in student.scales], "lr": self.scale_lr}]
        optimizer = torch.optim.Adam([g for g in groups if g["params"]])
        warmup = max(1, round(WARMUP_FRACTION * self.steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, self.steps))
        batches = _batches(calib, self.batch, ctx.rng(self.name))
        ctx.progress.start(f"{self.name}: steps", self.steps)
        losses = []
        for _ in range(self.steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            feeds = next(batches)
            for feed in feeds:  # several only when samples cannot be batched (inputs without a batch axis)
                feed = self._trimmed(feed)
                outputs, targets = student(feed, hidden), _teacher(session, feed)
                loss = _distillation_loss(outputs, targets, feed, student.graph.output_names)
                if hidden:
                    loss = loss + self.hidden * _distillation_loss(outputs, targets, feed, hidden)
                loss = loss / len(feeds)
                loss.backward()
                total += loss.item()
            for name, mask in masks.items():
                grad = student.graph.parameter(name).grad
                if grad is not None:
                    grad.masked_fill_(~mask, 0.0)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for name, mask in masks.items():
                    student.graph.parameter(name).masked_fill_(~mask, 0.0)
            losses.append(total)
            ctx.progress.advance()
        return losses

    def _evaluate(self, student: _Student, session, samples: CalibrationSet) -> dict[str, float]:
        """Relative squared error (the loss) and cosine of the outputs on ``samples``, real tokens only."""
        noise = energy = cross = student_energy = 0.0
        with torch.no_grad():
            weights = student.weights()  # the scales do not change while evaluating
            for feed in _feeds(samples, list(range(samples.n_samples)), self.batch):
                feed = self._trimmed(feed)
                teacher = _teacher(session, feed)
                for name, value in student(feed, weights=weights).items():
                    if name not in teacher:
                        continue
                    s, t = _real_rows(value, teacher[name], feed)
                    s, t = s.double(), t.double()
                    noise += float((s - t).square().sum())
                    energy += float(t.square().sum())
                    cross += float((s * t).sum())
                    student_energy += float(s.square().sum())
        cosine = cross / math.sqrt(max(energy * student_energy, 1e-300))
        return {"relative_error": round(noise / max(energy, 1e-30), 6), "cosine": round(cosine, 6)}

    def _trimmed(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feed`` without the trailing columns that are padding in every sample (see ``trim_padding``)."""
        mask = feed.get("attention_mask")
        if not self.trim_padding or mask is None or mask.ndim != 2:
            return feed
        if any(value.shape != mask.shape for value in feed.values()):
            return feed  # only the [batch, seq] encoder convention
        columns = np.flatnonzero(mask.any(axis=0))
        length = int(columns[-1]) + 1 if columns.size else mask.shape[1]
        return {name: np.ascontiguousarray(value[:, :length]) for name, value in feed.items()}


class _Student:
    """The float graph in torch plus the quantized weights decoded from trainable scales."""

    def __init__(self, graph: TorchGraph, scales: list[QuantScales]) -> None:
        self.graph, self.scales = graph, scales

    def weights(self) -> dict[str, torch.Tensor]:
        """The decoded quantized weights for the current scales (the graph's constant overrides)."""
        overrides: dict[str, torch.Tensor] = {}
        for q in self.scales:
            overrides.update(q.overrides())
        return overrides

    def __call__(self, feed: dict[str, np.ndarray], extra_outputs: list[str] | tuple[str, ...] = (),
                 weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Outputs for ``feed``; ``weights``: :meth:`weights` computed once for several calls
        (while the scales do not change), else decoded here."""
        return self.graph(feed, extra_outputs, overrides=self.weights() if weights is None else weights)


def _write_scales(model: Model, scales: list[QuantScales]) -> dict[str, dict]:
    """Store the trained scales (alpha codes) in the model's constants; per weight, what changed."""
    tensors = model.tensors()
    trained = {}
    for q in scales:
        constant = tensors[q.name]
        assert isinstance(constant, gs.Constant)
        constant.values = q.stored()
        trained[q.name] = {"format": q.weight.format, "params": q.params, "mean_relative_change": round(q.change(), 6),
                           "codes": "unchanged"}
    return trained


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _teacher(session, feed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    names = [o.name for o in session.get_outputs()]
    values = runtime.run_batches(session, [feed], names)
    return {name: torch.from_numpy(np.asarray(value)) for name, value in values.items()
            if np.issubdtype(np.asarray(value).dtype, np.floating)}


def _real_rows(student: torch.Tensor, teacher: torch.Tensor, feed: dict[str, np.ndarray]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both outputs as ``[rows, last_dim]``, padding positions left out (transformer convention)."""
    mask = feed.get("attention_mask")
    if mask is not None and student.dim() == 3 and tuple(student.shape[:2]) == mask.shape:
        keep = torch.from_numpy(np.asarray(mask).reshape(-1) != 0)
        return student.reshape(-1, student.shape[-1])[keep], teacher.reshape(-1, teacher.shape[-1])[keep]
    return student.reshape(student.shape[0] if student.dim() else 1, -1), teacher.reshape(
        teacher.shape[0] if teacher.dim() else 1, -1)


def _distillation_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                       feed: dict[str, np.ndarray], names: list[str]) -> torch.Tensor:
    """Mean over the float tensors ``names`` of squared error / teacher energy, on real positions."""
    terms = []
    for name in names:
        if name not in teacher:
            continue  # not a float output
        s, t = _real_rows(student[name], teacher[name], feed)
        terms.append((s - t).square().sum() / t.square().sum().clamp_min(1e-30))
    return torch.stack(terms).mean()


# -- data ----------------------------------------------------------------------------------


def _batches(calib: CalibrationSet, batch: int, rng: np.random.Generator) -> Iterator[list[dict[str, np.ndarray]]]:
    """Endless steps; each step is a list of feeds (one feed of ``batch`` samples, or one per sample
    when some input has no batch axis), in a fresh random order every epoch."""
    while True:
        order = rng.permutation(calib.n_samples)
        for start in range(0, len(order), batch):
            chosen = order[start : start + batch]
            if len(chosen) < batch and len(order) >= batch:
                chosen = np.concatenate([chosen, order[: batch - len(chosen)]])
            yield list(_feeds(calib, [int(i) for i in chosen], batch))


def _feeds(calib: CalibrationSet, indices: list[int], batch: int) -> Iterator[dict[str, np.ndarray]]:
    if calib.stacked:
        for index in indices:
            yield {name: value[index] if name in calib.stacked else value[index : index + 1]
                   for name, value in calib.arrays.items()}
        return
    for start in range(0, len(indices), batch):
        chosen = np.asarray(indices[start : start + batch])
        yield {name: value[chosen] for name, value in calib.arrays.items()}


# -- what is trained -----------------------------------------------------------------------


def _hidden_tensors(model: Model, teacher: Model) -> list[str]:
    """Outputs of the student's LayerNormalization nodes that the teacher computes too (same name)."""
    known = teacher.tensors()
    outputs = {t.name for t in model.graph.outputs}
    return [node.outputs[0].name for node in model.graph.nodes if node.op == "LayerNormalization"
            and node.outputs[0].name in known and node.outputs[0].name not in outputs]


def _weight_masks(model: Model, skip: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per trainable weight constant (MatMul/Gemm/Conv, float32), where it is non-zero."""
    layers, _ = select_layers(model, skip=skip, embeddings=False, min_size=0)
    masks: dict[str, np.ndarray] = {}
    for node in layers:
        weight = weight_of(node)
        if weight is not None and weight.name not in masks:
            masks[weight.name] = np.asarray(weight.values) != 0
    return masks


def _extra_parameters(model: Model, train: str) -> list[str]:
    """Biases of the trained layers (and, for ``all``, normalisation scales and shifts, the
    gammas of decomposed RMSNorms included)."""
    names: list[str] = []
    if train == "all":
        names.extend(norm.gamma.name for norm in rmsnorms(model.graph) if norm.gamma.values.dtype == np.float32)
    for node in model.graph.nodes:
        candidates: list[gs.Tensor] = []
        if node.op in ("Gemm", "Conv") and len(node.inputs) > 2:
            candidates.append(node.inputs[2])
        elif node.op == "MatMul" and weight_of(node) is not None:
            found = constant_bias_add(model.graph, node)
            if found is not None:
                candidates.append(found[1])
        elif train == "all" and node.op in NORM_OPS:
            candidates.extend(node.inputs[1:3])
        names.extend(t.name for t in candidates if isinstance(t, gs.Constant) and np.asarray(t.values).dtype
                     == np.float32)
    return list(dict.fromkeys(names))


def _write_back(model: Model, student: TorchGraph, masks: dict[str, np.ndarray]) -> dict[str, dict]:
    """Store the trained values in the model's constants; per trained weight, its sparsity and
    whether every zero stayed zero."""
    tensors = model.tensors()
    layers: dict[str, dict] = {}
    for name, values in student.trained_values().items():
        constant = tensors[name]
        assert isinstance(constant, gs.Constant)
        original = np.asarray(constant.values)
        constant.values = values.astype(original.dtype)
        if name in masks:
            mask = masks[name]
            layers[name] = {"params": int(mask.size), "sparsity": round(float(1 - mask.mean()), 4),
                            "mask_preserved": bool(not values[~mask].any()),
                            "weight_change": round(float(np.linalg.norm(values - original))
                                                   / max(float(np.linalg.norm(original)), 1e-30), 6)}
    return layers
