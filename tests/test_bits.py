"""The bits pass: exact multiple-choice knapsack, plans in metadata, quant/shiftadd following them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import mlp_model
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.errors import UsageError
from qcompile.ir import qops
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.passes import knapsack, registry
from qcompile.passes.calibration import random_calibration
from qcompile.passes.context import PassContext
from qcompile.passes.manager import PassManager
from qcompile.passes.plan import PLAN_KEY, read_plan


def _canonical(proto) -> Model:
    return canonicalize(Model.from_proto(proto))


def _run(model, spec, calib):
    return PassManager(registry.parse_pipeline(spec), eval_samples=calib).run(model, PassContext(calib=calib))


@st.composite
def _instances(draw):
    items = draw(st.integers(1, 5))
    widths = [2, 3, 4]
    params = [draw(st.integers(1, 40)) for _ in range(items)]
    costs = [sorted((draw(st.floats(0, 10)) for _ in widths), reverse=True) for _ in range(items)]
    weights = [[p * b for b in widths] for p in params]
    budget = draw(st.integers(sum(w[0] for w in weights) - 5, sum(w[-1] for w in weights) + 5))
    return costs, weights, budget


@given(_instances())
@settings(max_examples=200, deadline=None)
def test_knapsack_is_optimal_and_meets_the_budget(instance):
    costs, weights, budget = instance
    solution = knapsack.solve(costs, weights, budget)
    reference = knapsack.brute_force(costs, weights, budget)
    if reference is None:
        assert solution is None
        return
    assert solution is not None
    choice, exact = solution
    assert exact
    assert sum(w[i] for w, i in zip(weights, choice, strict=True)) <= budget
    assert sum(c[i] for c, i in zip(costs, choice, strict=True)) == pytest.approx(reference[0], abs=1e-9)


def test_knapsack_with_rounded_units_still_meets_the_budget():
    rng = np.random.default_rng(0)
    params = rng.integers(1000, 100000, 30).tolist()
    costs = [[float(rng.random()) * 4.0 ** -b for b in (2, 3, 4)] for _ in params]
    weights = [[p * b for b in (2, 3, 4)] for p in params]
    budget = int(2.5 * sum(params))
    choice, exact = knapsack.solve(costs, weights, budget, max_units=500)
    assert not exact
    assert sum(w[i] for w, i in zip(weights, choice, strict=True)) <= budget


@given(_instances())
@settings(max_examples=100, deadline=None)
def test_more_budget_never_gives_a_worse_plan(instance):
    costs, weights, budget = instance
    low, high = knapsack.solve(costs, weights, budget), knapsack.solve(costs, weights, budget + 7)
    if low is not None:
        assert high is not None
        cost = [sum(c[i] for c, i in zip(costs, s[0], strict=True)) for s in (low, high)]
        assert cost[1] <= cost[0] + 1e-12


@pytest.mark.parametrize("score", ["output", "paper"])
def test_bits_plan_meets_the_average_and_shiftadd_follows_it(score):
    model = _canonical(mlp_model())
    calib = random_calibration(model, 4)
    result, (plan_record, shift_record) = _run(model, f"bits(avg=2.5,score={score},min_size=0),"
                                               "shiftadd(min_size=0,group_size=32)", calib)
    plan = plan_record.stats["plan"]
    params = plan["params"]
    assert set(plan["layers"]) == {"embed", "fc1", "fc2", "fc3"}
    average = sum(params[n] * b for n, b in plan["layers"].items()) / sum(params.values())
    assert average <= 2.5 and plan["average_bits"] == pytest.approx(average, abs=1e-4)
    assert read_plan(result)["layers"] == plan["layers"]
    for node in result.quantized_nodes():
        assert qops.read_weight(node).bits == plan["layers"][node.name]
    assert shift_record.stats["plan"] == "model metadata"


def test_higher_average_gives_a_lower_total_cost():
    model = _canonical(mlp_model())
    calib = random_calibration(model, 4)
    totals = []
    for avg in (2.0, 2.5, 3.0, 4.0):
        _, (record,) = _run(model.copy(), f"bits(avg={avg},min_size=0)", calib)
        plan = record.stats["plan"]
        totals.append(sum(plan["costs"][n][str(b)] for n, b in plan["layers"].items()))
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]


def test_plan_file_is_applied_and_quant_follows_it(tmp_path):
    model = _canonical(mlp_model())
    calib = random_calibration(model, 4)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"layers": {"fc1": 2, "fc2": 8}}))
    result, (record, _) = _run(model, f"bits(plan={path}),quant(bits=4,min_size=0)", calib)
    bits = {n.name: qops.read_weight(n).bits for n in result.quantized_nodes()}
    assert bits == {"embed": 4, "fc1": 2, "fc2": 8, "fc3": 4}
    assert PLAN_KEY in Model.from_proto(result.to_proto()).metadata  # travels with saved models


def test_bad_plans_and_budgets_are_one_line_errors(tmp_path):
    model = _canonical(mlp_model())
    calib = random_calibration(model, 2)
    with pytest.raises(UsageError, match="give a budget"):
        registry.parse_pipeline("bits")
    with pytest.raises(UsageError, match="outside the candidates"):
        registry.parse_pipeline("bits(avg=1.5)")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": {"nope": 3}}))
    with pytest.raises(UsageError, match="does not have: nope"):
        _run(model.copy(), f"bits(plan={bad})", calib)
    bad.write_text("{")
    with pytest.raises(UsageError, match="not valid JSON"):
        _run(model.copy(), f"bits(plan={bad})", calib)
    bad.write_text(json.dumps({"layers": {"fc1": 1}}))
    with pytest.raises(UsageError, match="supports 2..8"):
        _run(model.copy(), f"bits(plan={bad}),quant(min_size=0)", calib)


@pytest.mark.parametrize("options", ["", "layout=block,apot_terms=2", "group_size=0,outliers=0",
                                     "group_size=32,table_group=16,outliers=0.05,outlier_terms=3",
                                     "layout=row,table_group=32"])
def test_shiftadd_stored_bytes_equal_the_fitted_weights(options):
    """What a max_mb budget counts for a layer is exactly what shiftadd then stores."""
    from qcompile.passes.shiftadd import ShiftAdd

    rng = np.random.default_rng(0)
    shiftadd = registry.parse_pipeline(f"shiftadd({options})" if options else "shiftadd")[0]
    assert isinstance(shiftadd, ShiftAdd)
    for rows, cols in ((70, 45), (33, 130), (256, 64)):
        matrix = rng.standard_normal((rows, cols)).astype(np.float32)
        x = rng.standard_normal((200, cols))
        gram = x.T @ x
        for kind, hessian in (("linear", gram), ("tied", gram), ("table", None)):
            for bits in (1, 3):
                fitted = shiftadd.fit(kind, matrix, bits, hessian)
                assert shiftadd.stored_bytes(kind, rows, cols, bits) == fitted.nbytes, (kind, rows, cols, bits)


@pytest.mark.parametrize("options", ["bits=4", "bits=3,group_size=64", "bits=2,group_size=0", "bits=8,act_bits=8"])
def test_quant_stored_bytes_equal_the_quantized_weights(options):
    from qcompile.passes.quant import Quant

    rng = np.random.default_rng(1)
    quant = registry.parse_pipeline(f"quant({options})")[0]
    assert isinstance(quant, Quant)
    for rows, cols in ((70, 45), (33, 130), (96, 128)):
        matrix = rng.standard_normal((rows, cols)).astype(np.float32)
        quantized = quant._quantize(matrix, None, quant.bits)
        assert quant.stored_bytes("linear", rows, cols, quant.bits) == quantized.nbytes, (rows, cols)


@pytest.mark.parametrize(("follower", "budgets"), [("shiftadd(min_size=0)", (0.02, 0.025, 0.03)),
                                                   ("quant(method=gptq,min_size=0)", (0.016, 0.019, 0.022))])
def test_max_mb_bounds_the_whole_models_weights(follower, budgets):
    """max_mb: the weights of the model the next pass produces, not only the planned codes; the
    plan's model_mb is exactly what that pass then stores (other initializers included)."""
    model = _canonical(mlp_model())
    calib = random_calibration(model, 4)
    sizes = {}
    for budget in budgets:
        result, (record, _) = _run(model.copy(), f"bits(max_mb={budget},min_size=0),{follower}", calib)
        plan = record.stats["plan"]
        assert plan["stored_as"] == follower.split("(")[0]
        assert result.constant_bytes() == pytest.approx(plan["model_mb"] * 1e6, abs=1)
        assert result.constant_bytes() <= budget * 1e6
        sizes[budget] = (result.constant_bytes(), plan["average_bits"])
    assert sizes[budgets[0]] < sizes[budgets[1]] < sizes[budgets[2]]


def test_max_mb_below_what_the_model_needs_is_one_line_error():
    model = _canonical(mlp_model())
    calib = random_calibration(model, 2)
    with pytest.raises(UsageError, match=r"no plan fits the budget \(max_mb=0.001\).*left out of the plan"):
        _run(model, "bits(max_mb=0.001,min_size=0),shiftadd(min_size=0)", calib)
    with pytest.raises(UsageError, match="not both"):
        registry.parse_pipeline("bits(avg=3,max_mb=1)")
