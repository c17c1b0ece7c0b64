"""The bit plan: per-layer bit widths chosen by ``bits`` and honoured by ``quant`` and ``shiftadd``.

The plan travels in the model's metadata (``qcompile.bits_plan``, JSON), so it survives
``--dump-dir`` dumps and reaches every later pass without global state:

    {"budget": {"avg": 2.5}, "candidates": [2, 3, 4], "score": "output",
     "layers": {"<node name>": 3, ...}, ...}

Only ``layers`` is read back; the rest documents how the plan was made.
"""

from __future__ import annotations

import json
from typing import Any

from qcompile.errors import UsageError
from qcompile.ir.model import Model

PLAN_KEY = "qcompile.bits_plan"


def read_plan(model: Model) -> dict[str, Any] | None:
    """The plan stored in ``model``, or None."""
    text = model.metadata.get(PLAN_KEY)
    if text is None:
        return None
    try:
        plan = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"model metadata {PLAN_KEY} is not valid JSON ({exc})") from None
    check_plan(plan, f"model metadata {PLAN_KEY}")
    return plan


def write_plan(model: Model, plan: dict[str, Any]) -> None:
    model.metadata[PLAN_KEY] = json.dumps(plan, sort_keys=True)


def check_plan(plan: Any, where: str) -> None:
    """A plan needs ``layers``: node name -> integer bits."""
    layers = plan.get("layers") if isinstance(plan, dict) else None
    if not isinstance(layers, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in layers.items()):
        raise UsageError(f"{where}: a bit plan needs \"layers\": {{node name: bits}}")


def planned_bits(plan: dict[str, Any] | None, node_name: str, default: int, low: int, high: int,
                 pass_name: str) -> int:
    """Bits for ``node_name``: the plan's when it names the layer, else ``default``."""
    if plan is None or node_name not in plan["layers"]:
        return default
    bits = int(plan["layers"][node_name])
    if not low <= bits <= high:
        raise UsageError(f"{pass_name}: the bit plan gives {node_name} {bits} bits; {pass_name} supports {low}..{high}")
    return bits
