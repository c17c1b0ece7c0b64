"""What a pass is: a frozen dataclass whose fields are its options.

    @dataclass(frozen=True)
    class Quant(Pass):
        name: ClassVar[str] = "quant"
        bits: int = option(4, "weight bits", min=2, max=8)

        def run(self, model, ctx) -> PassResult: ...

The CLI spec ``quant(bits=3)`` parses into ``Quant(bits=3)`` and ``str()`` prints the
same spec back. ``run`` reports ``PassResult(changed, stats)``; ``changed`` is exact,
so a second run of the same pass reports ``False``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qcompile.errors import UsageError

_NO_LIMIT = None


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           choices: tuple | None = None) -> Any:
    """A pass option: a dataclass field with its help text and valid values."""
    return field(default=default, metadata={"help": help, "min": min, "max": max, "choices": choices})


@dataclass
class PassResult:
    """What a pass did: ``changed`` is exact; ``stats`` is JSON-serialisable."""

    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptionInfo:
    name: str
    type: type
    default: Any
    help: str
    min: float | None
    max: float | None
    choices: tuple | None

    def describe_valid(self) -> str:
        if self.choices:
            return "one of " + ", ".join(_format_value(c) for c in self.choices)
        if self.type is bool:
            return "true or false"
        if self.min is not None and self.max is not None:
            return f"in [{_format_value(self.min)}, {_format_value(self.max)}]"
        if self.min is not None:
            return f">= {_format_value(self.min)}"
        if self.max is not None:
            return f"<= {_format_value(self.max)}"
        names: dict[type, str] = {tuple: "list separated by |", str: "text"}
        return names.get(self.type, self.type.__name__)


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses set the class variables and implement ``run``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    exact: ClassVar[bool] = False  # outputs unchanged up to float round-off
    requires_calibration: ClassVar[bool] = False
    runs_after: ClassVar[tuple[str, ...]] = ()  # these passes, when present, must come first
    # Reads the model as it entered the pipeline (``ctx.reference``, e.g. a distillation
    # teacher): the manager keeps it only when some pass of the pipeline says so.
    needs_reference: ClassVar[bool] = False

    def run(self, model, ctx) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def needs_calibration(self) -> str | None:
        """Why this configuration of the pass needs calibration data, or None.

        Defaults to the class's ``requires_calibration``; passes whose options decide it
        (``quant(method=gptq)``) override this. The manager asks before anything runs.
        """
        return f"pass {self.name} needs calibration data" if self.requires_calibration else None

    # -- options -----------------------------------------------------------------------

    @classmethod
    def options(cls) -> list[OptionInfo]:
        hints = typing.get_type_hints(cls)
        return [
            OptionInfo(
                f.name,
                _base_type(hints[f.name]),
                f.default,
                f.metadata.get("help", ""),
                f.metadata.get("min"),
                f.metadata.get("max"),
                f.metadata.get("choices"),
            )
            for f in dataclasses.fields(cls)
        ]

    @classmethod
    def from_options(cls, raw: dict[str, str]) -> Pass:
        """Build the pass from ``{option: text}``, validating every value."""
        infos = {info.name: info for info in cls.options()}
        values = {}
        for key, text in raw.items():
            if key not in infos:
                valid = ", ".join(infos) or "none"
                raise UsageError(f"{cls.name}: unknown option {key!r} (options: {valid})")
            values[key] = _parse_value(cls.name, infos[key], text)
        return cls(**values)

    def __post_init__(self) -> None:
        for info in self.options():
            _check_range(self.name, info, getattr(self, info.name))

    def __str__(self) -> str:
        changed = [
            f"{info.name}={_format_value(getattr(self, info.name))}"
            for info in self.options()
            if getattr(self, info.name) != info.default
        ]
        return f"{self.name}({','.join(changed)})" if changed else self.name

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "spec": str(self), "options": dataclasses.asdict(self)}


def matches_any(name: str, patterns: tuple[str, ...]) -> str | None:
    """The first glob pattern that ``name`` matches, or None."""
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def _base_type(hint: Any) -> type:
    origin = typing.get_origin(hint)
    return tuple if origin is tuple else hint


def _parse_value(pass_name: str, info: OptionInfo, text: str) -> Any:
    text = text.strip()
    where = f"{pass_name}: {info.name}={text}"
    try:
        if info.type is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if info.type is int:
            return int(text)
        if info.type is float:
            return float(text)
        if info.type is tuple:
            return tuple(part.strip() for part in text.split("|") if part.strip())
        return text
    except ValueError:
        raise UsageError(f"{where} is not valid: expected {info.describe_valid()}") from None


def _check_range(pass_name: str, info: OptionInfo, value: Any) -> None:
    where = f"{pass_name}: {info.name}={_format_value(value)}"
    if info.choices is not None and value not in info.choices:
        raise UsageError(f"{where} is not valid: expected {info.describe_valid()}")
    if info.type in (int, float) and not isinstance(value, bool):
        if (info.min is not None and value < info.min) or (info.max is not None and value > info.max):
            raise UsageError(f"{where} is out of range: expected {info.describe_valid()}")


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "|".join(str(v) for v in value)
    return str(value)
