"""Runs an ordered pipeline of passes with checks around each one.

Before anything runs: every pass's requirements (calibration data, passes that must
come before it). After each pass: structural :func:`verify`; for passes declared
exact and ``verify_exact`` on, the outputs on the evaluation samples must match the
model before the pass; for every pass that changed the model, the output error
against the FP32 input model is measured and recorded. An ``after_pass`` callback
sees the model and its record after each pass (``--dump-dir`` writes them out).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qcompile.errors import ExecutionError, UsageError, VerificationError
from qcompile.ir import qops, runtime
from qcompile.ir.model import Model
from qcompile.ir.verify import verify

from .base import Pass
from .calibration import CalibrationSet
from .context import PassContext

log = logging.getLogger(__name__)

AfterPass = Callable[[int, Pass, Model, "PassRecord"], None]
"""``after_pass(index, pass, model, record)``: the model as the pass left it (verified,
not to be modified; it keeps changing in later passes, so copy what must be kept)."""

# An exact pass may change outputs by float32 round-off only: ``|after - before| <= EXACT_RTOL *
# |before| + EXACT_ATOL * max(1, max |before|)``. The absolute floor scales with the output's
# range because round-off does: SmolLM2's logits span ±32, and after 30 layers an exact
# rotation of its residual stream moves logits near zero by 1e-4.
EXACT_RTOL = 1e-4
EXACT_ATOL = 1e-5


@dataclass
class PassRecord:
    """What one pass did, for the summary and the manifest."""

    name: str
    spec: str
    exact: bool
    changed: bool
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    output_error: dict[str, dict] = field(default_factory=dict)  # vs the FP32 input model

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec,
            "exact": self.exact,
            "changed": self.changed,
            "seconds": round(self.seconds, 3),
            "stats": self.stats,
            "output_error": self.output_error,
        }


def check_requirements(pipeline: list[Pass], ctx: PassContext) -> None:
    names = [p.name for p in pipeline]
    for index, pass_ in enumerate(pipeline):
        reason = pass_.needs_calibration()
        if reason and ctx.calib is None:
            raise UsageError(f"{reason}: add --calib FILE (or random:N)")
        for earlier in pass_.runs_after:
            if earlier in names[index + 1 :]:
                raise UsageError(f"pass {earlier} must come before {pass_.name} in --passes")


class PassManager:
    def __init__(self, pipeline: list[Pass], *, verify_exact: bool = False,
                 eval_samples: CalibrationSet | None = None, max_reference_bytes: int | None = None) -> None:
        self.pipeline = pipeline
        # IR reference sessions decode every quantized weight to float (ONNX Runtime schedules the
        # decodes first): past this many decoded bytes the per-pass output errors are not measured
        self.max_reference_bytes = max_reference_bytes
        self.ir_unmeasured: str | None = None
        self.verify_exact = verify_exact
        self.eval_samples = eval_samples
        self.reference_outputs: dict[str, np.ndarray] | None = None  # FP32 input model
        self.final_outputs: dict[str, np.ndarray] | None = None  # after the last pass
        self.unmeasured: str | None = None  # why output errors could not be measured

    def run(self, model: Model, ctx: PassContext,
            on_pass: Callable[[int, Pass], None] | None = None,
            after_pass: AfterPass | None = None) -> tuple[Model, list[PassRecord]]:
        """Run every pass on (a copy of) ``model``; return the result and one record per pass.

        ``on_pass(index, pass)`` is called before each pass, ``after_pass`` after it.
        """
        check_requirements(self.pipeline, ctx)
        if any(pass_.needs_reference for pass_ in self.pipeline):
            ctx.reference = model  # passes edit only ``current``, a copy
        reference = self._outputs(model)
        previous = reference
        current = model.copy()
        records = []
        for index, pass_ in enumerate(self.pipeline):
            if on_pass:
                on_pass(index, pass_)
            start = time.perf_counter()
            ctx.later = tuple(self.pipeline[index + 1 :])
            result = pass_.run(current, ctx)
            seconds = time.perf_counter() - start
            try:
                verify(current)
            except VerificationError as exc:
                raise VerificationError(f"after pass {pass_.name}: {exc}") from None
            record = PassRecord(pass_.name, str(pass_), pass_.exact, result.changed, seconds, result.stats)
            if result.changed and previous is not None and self._too_large(current):
                previous = None  # no IR outputs from here on; the artifact's error is still measured
            if result.changed and reference is not None and previous is not None:
                outputs = self._outputs(current) or {}
                record.output_error = runtime.compare_outputs(reference, outputs)
                if pass_.exact and self.verify_exact:
                    self._check_exact(pass_, previous, outputs)
                previous = outputs
            records.append(record)
            if after_pass:
                after_pass(index, pass_, current, record)
            log.info("pass %s: changed=%s in %.2fs", pass_, result.changed, seconds)
        ctx.later = ()
        self.reference_outputs, self.final_outputs = reference, previous
        return current, records

    def _too_large(self, model: Model) -> bool:
        if self.max_reference_bytes is None:
            return False
        decoded = sum(4 * w.rows * w.cols for w in (qops.read_weight(n) for n in model.quantized_nodes()))
        if decoded <= self.max_reference_bytes:
            return False
        self.ir_unmeasured = (f"IR output errors not measured: its quantized weights decode to "
                              f"{decoded / 2**20:.0f} MiB of float, over the {self.max_reference_bytes / 2**20:.0f} MiB "
                              "reference limit")
        log.warning("%s", self.ir_unmeasured)
        return True

    def _outputs(self, model: Model) -> dict[str, np.ndarray] | None:
        """Outputs on the evaluation samples; None when there are none, or when synthetic samples
        are not valid inputs (shape tensors, sequence lengths...): then errors go unmeasured."""
        if self.eval_samples is None or self.unmeasured:
            return None
        session = runtime.make_session(model)
        try:
            return runtime.run_batches(session, self.eval_samples.batches(1))
        except ExecutionError as exc:
            if not self.eval_samples.synthetic:
                raise ExecutionError(f"on the calibration data ({self.eval_samples.source}): {exc}") from None
            self.unmeasured = f"synthetic inputs are not valid for this model ({exc}); give --calib to measure"
            log.warning("output errors not measured: %s", self.unmeasured)
            return None

    @staticmethod
    def _check_exact(pass_: Pass, before: dict, after: dict) -> None:
        for name, value in before.items():
            scale = max(1.0, float(np.abs(value).max())) if np.size(value) else 1.0
            if not np.allclose(after[name], value, rtol=EXACT_RTOL, atol=EXACT_ATOL * scale):
                worst = float(np.abs(np.asarray(after[name], np.float64) - value).max())
                raise VerificationError(
                    f"pass {pass_.name} is declared exact but changed output {name!r} (max abs diff {worst:.3g})"
                )
