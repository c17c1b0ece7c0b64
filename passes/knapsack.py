"""Multiple-choice knapsack: one option per item, minimal total cost under a weight budget.

The ``bits`` pass picks one bit width per layer: cost = the layer's measured (or scored)
error at that width, weight = its parameters times the width (or its bytes). Solved
exactly by dynamic programming over the budget in integer units: item weights are
divided by their greatest common divisor when that keeps the table small (then the
optimum is exact); otherwise they are rounded *up* to ``max_units`` units of the budget,
so the answer always meets the budget and is optimal for the rounded weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MAX_UNITS = 200_000


def solve(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]], budget: int,
          max_units: int = MAX_UNITS) -> tuple[list[int], bool] | None:
    """Indices of the chosen option per item minimising the total cost with total weight <= ``budget``.

    Returns ``(choice, exact)`` -- ``exact`` is False when weights had to be rounded up -- or
    None when no choice fits. Ties go to the lighter total weight.
    """
    base = [min(w) for w in weights]
    spare = budget - sum(base)
    if spare < 0:
        return None
    extras = [[int(w) - b for w in item] for item, b in zip(weights, base, strict=True)]
    divisor = math.gcd(*[e for item in extras for e in item if e]) or 1
    exact = spare // divisor <= max_units
    if exact:
        units = [[e // divisor for e in item] for item in extras]
        capacity = spare // divisor
    else:  # round up: never exceeds the budget
        unit = spare / max_units
        units = [[math.ceil(e / unit - 1e-9) for e in item] for item in extras]
        capacity = max_units
    return _dp(costs, units, int(capacity)), exact


def _dp(costs, units, capacity) -> list[int]:
    """best[c] = least cost of the items so far with total units <= c."""
    best = np.zeros(capacity + 1)
    choices = np.zeros((len(costs), capacity + 1), np.int16)
    for item, (item_costs, item_units) in enumerate(zip(costs, units, strict=True)):
        new = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, np.int16)
        for option, (cost, size) in enumerate(zip(item_costs, item_units, strict=True)):
            if size > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[size:] = best[: capacity + 1 - size] + cost
            better = candidate < new
            new = np.where(better, candidate, new)
            pick = np.where(better, option, pick)
        best, choices[item] = new, pick
    chosen = []
    remaining = int(np.argmin(best))  # the least-cost capacity (the lightest among equals)
    for item in range(len(costs) - 1, -1, -1):
        option = int(choices[item, remaining])
        chosen.append(option)
        remaining -= units[item][option]
    return chosen[::-1]


def brute_force(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]], budget: int
                ) -> tuple[float, list[int]] | None:
    """The optimum by enumeration (for tests on small cases)."""
    import itertools

    best: tuple[float, list[int]] | None = None
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        weight = sum(w[i] for w, i in zip(weights, combo, strict=True))
        if weight > budget:
            continue
        cost = sum(c[i] for c, i in zip(costs, combo, strict=True))
        if best is None or cost < best[0]:
            best = (cost, list(combo))
    return best
