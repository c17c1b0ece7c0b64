"""Pass registry and the ``--passes`` pipeline syntax.

Built-in passes are imported lazily by name; third-party packages add passes through
the ``qcompile.passes`` entry-point group (``name = "package.module:PassClass"``).
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points

from qcompile.errors import UsageError

from .base import Pass

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "qcompile.passes"
BUILTIN_PASSES = {
    "bits": "qcompile.passes.bits:Bits",
    "fold": "qcompile.passes.fold:Fold",
    "prune": "qcompile.passes.prune:Prune",
    "quant": "qcompile.passes.quant:Quant",
    "rotate": "qcompile.passes.rotate:Rotate",
    "shiftadd": "qcompile.passes.shiftadd:ShiftAdd",
    "split": "qcompile.passes.split:Split",
    "tune": "qcompile.passes.tune:Tune",
}


def available() -> dict[str, str]:
    """Pass name -> ``module:Class`` for built-in and plug-in passes, sorted by name."""
    found = dict(BUILTIN_PASSES)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in BUILTIN_PASSES:
            log.warning("plug-in pass %r ignored: a built-in pass has that name", entry.name)
            continue
        found[entry.name] = entry.value
    return dict(sorted(found.items()))


def get(name: str) -> type[Pass]:
    """The pass class registered as ``name``."""
    passes = available()
    if name not in passes:
        raise UsageError(f"unknown pass {name!r} (available: {', '.join(passes)})")
    module_name, _, class_name = passes[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"pass {name!r} could not be loaded from {passes[name]} ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise UsageError(f"pass {name!r}: {passes[name]} is not a qcompile Pass")
    return cls


def parse_pipeline(spec: str | list[str | Pass]) -> list[Pass]:
    """``"fold(alpha=0.5),quant(bits=4)"`` (or a list of specs / passes) -> pass objects."""
    items = _split_top_level(spec) if isinstance(spec, str) else spec
    pipeline: list[Pass] = []
    for item in items:
        pipeline.append(item if isinstance(item, Pass) else _parse_one(item))
    if not pipeline:
        raise UsageError("--passes is empty: name at least one pass (see `qcompile passes`)")
    return pipeline


def _split_top_level(spec: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in spec:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise UsageError(f"--passes {spec!r}: unbalanced ')'")
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if depth:
        raise UsageError(f"--passes {spec!r}: unbalanced '('")
    items.append("".join(current).strip())
    if any(not item for item in items):
        raise UsageError(f"--passes {spec!r}: empty pass name")
    return items


def _parse_one(item: str) -> Pass:
    name, paren, rest = item.partition("(")
    name = name.strip()
    if paren and not rest.endswith(")"):
        raise UsageError(f"--passes: {item!r} should look like name(option=value,...)")
    cls = get(name)
    raw: dict[str, str] = {}
    body = rest[:-1].strip() if paren else ""
    for pair in filter(None, (p.strip() for p in body.split(","))):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"{name}: {pair!r} should look like option=value")
        if key.strip() in raw:
            raise UsageError(f"{name}: option {key.strip()!r} given twice")
        raw[key.strip()] = value
    return cls.from_options(raw)
