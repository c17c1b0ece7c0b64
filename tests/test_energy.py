"""Energy estimate from operation counts."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import mlp_model

from qcompile.ir import energy
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.passes import registry
from qcompile.passes.bcqfit import bcq_gptq
from qcompile.passes.calibration import random_calibration
from qcompile.passes.context import PassContext
from qcompile.passes.manager import PassManager


def test_block_layout_counts():
    rng = np.random.default_rng(0)
    weight = bcq_gptq(rng.standard_normal((32, 64)), np.eye(64), 3, terms=2, layout="block", group_size=16)
    ops = energy.bcq_operations(weight)
    blocks = 64 // 8
    assert ops.lut8 == 32 * 3 * blocks
    assert ops.int16_shift == 32 * 3 * blocks * 2
    assert ops.fp16_add == blocks * 256 + 32 * 3 * blocks + 32 * 3 * blocks * 2
    assert ops.fp32_mul == ops.fp16_mul == 0


def test_fp32_is_one_and_shiftadd_is_cheaper():
    model = canonicalize(Model.from_proto(mlp_model(hidden=256)))
    assert energy.model_energy(model)["ratio"] == pytest.approx(1.0)
    calib = random_calibration(model, 4)
    result, _ = PassManager(registry.parse_pipeline("shiftadd(bits=3,layout=block,min_size=0)")).run(
        model, PassContext(calib=calib))
    estimate = energy.model_energy(result)
    assert 0 < estimate["ratio"] < 0.5 and estimate["ratio_fp16"] < 1.0
