"""One self-contained HTML report of a compilation, built from its ``manifest.json``.

The page opens offline: no scripts, no external files; plots are PNG images drawn with
matplotlib (Agg, through ``Figure`` directly: no pyplot, no global backend state) and
embedded as base64. Sections: the before/after summary, the pass pipeline with time
and output error after each pass, bits and error (weight and output SQNR) per layer,
the size breakdown, the layer table, and the layers passes left alone with the reason.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from qcompile.errors import UsageError

from .inspection import final_layer_stats, short_names, skipped_layers

SIZE_KINDS = (  # key in the breakdown, legend label, colour
    ("packed", "packed weights", "#4c78a8"),
    ("scales_zero_points", "scales + zero points", "#f58518"),
    ("embeddings", "embeddings", "#54a24b"),
    ("other", "other float weights", "#9d9d9d"),
)
BITS_COLOURS = {2: "#d62728", 3: "#ff7f0e", 4: "#2ca02c", 5: "#17becf", 6: "#1f77b4", 7: "#9467bd", 8: "#8c564b"}
FLOAT_COLOUR = "#c7c7c7"


def write_report(manifest: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Write the report of ``manifest`` to ``path`` (atomically); return the path."""
    path = Path(path)
    text = render_report(manifest, title=title)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    except OSError as exc:
        raise UsageError(f"--report {path}: cannot write it ({exc.strerror})") from None
    return path


def render_report(manifest: dict[str, Any], *, title: str | None = None) -> str:
    """The report as one HTML string."""
    title = title or f"qcompile report: {manifest.get('input', {}).get('description', 'model')}"
    layers = layer_rows(manifest)
    passes = manifest.get("passes", [])
    sections = [
        f"<h1>{_e(title)}</h1>",
        _meta(manifest),
        "<h2>Summary</h2>",
        _summary_table(manifest, layers),
        "<h2>Pass pipeline</h2>",
        _pipeline_table(passes),
        _figure(_plot_passes(passes), "time and output error after each pass"),
        "<h2>Bits and error per layer</h2>",
        _figure(_plot_layers(layers), "bits, weight SQNR and output SQNR per layer"),
        "<h2>Size breakdown</h2>",
        _figure(_plot_sizes(manifest), "size breakdown before and after"),
        _sizes_table(manifest),
        "<h2>Layers</h2>",
        _layers_table(layers),
        "<h2>Layers left alone</h2>",
        _skipped_table(passes),
    ]
    body = "\n".join(s for s in sections if s)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1150px;
       color: #222; background: #fff; font-size: 14px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; } th, td { padding: 3px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.meta { color: #666; font-size: 12px; } figure { margin: 8px 0; } img { max-width: 100%; }
figcaption { color: #666; font-size: 12px; } code { font-size: 12px; }
"""


# ----------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------


def layer_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every layer (quantized, or left in float by a pass) in graph order, with its stats."""
    quantized = manifest.get("layers", {})
    in_float = manifest.get("float_layers", {})
    stats = final_layer_stats(manifest.get("passes", []))
    skipped = {row["layer"]: row for row in skipped_layers(manifest.get("passes", []))}
    names = list(dict.fromkeys([*quantized, *stats, *skipped, *in_float]))
    order = {name: i for i, name in enumerate(manifest.get("layer_order", []))}
    names.sort(key=lambda n: (order.get(n, len(order)), _natural(n)))
    labels = short_names(names)
    rows = []
    for name in names:
        row: dict[str, Any] = {"name": name, "label": labels[name], **stats.get(name, {})}
        if name in quantized:
            row.update({k: v for k, v in quantized[name].items() if k not in ("op",)})
            row["op"] = stats.get(name, {}).get("op", quantized[name].get("op"))
            row["quantized"] = True
        else:
            row.update(in_float.get(name, {}))
            row.update(quantized=False, bits=None, reason=skipped.get(name, {}).get("reason", ""))
        rows.append(row)
    return rows


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def size_breakdown(manifest: dict[str, Any]) -> dict[str, dict[str, int]]:
    """``{"before": {...}, "after": {...}}`` bytes per kind (see :data:`SIZE_KINDS`).

    Recorded by ``compile``; for an older manifest, estimated from its layers: the
    packed bytes of a layer follow from its shape, bits and group size.
    """
    sizes = manifest.get("sizes", {})
    if "breakdown" in sizes:
        return sizes["breakdown"]
    after = {"packed": 0, "scales_zero_points": 0, "embeddings": 0, "other": 0}
    for layer in manifest.get("layers", {}).values():
        rows, cols = layer["shape"][0], math.prod(layer["shape"][1:])
        group = layer["group_size"] or cols
        packed = rows * math.ceil(cols / group) * group * layer["bits"] // 8
        if layer["op"] == "QGather":
            after["embeddings"] += layer["bytes"]
        else:
            after["packed"] += packed
            after["scales_zero_points"] += layer["bytes"] - packed
    after["other"] = max(0, sizes.get("ir_weight_bytes", 0) - sum(after.values()))
    before = {"packed": 0, "scales_zero_points": 0, "embeddings": 0, "other": sizes.get("input_weight_bytes", 0)}
    return {"before": before, "after": after}


def _worst(errors: dict[str, dict], key: str) -> float | None:
    values = [m[key] for m in (errors or {}).values() if m.get(key) is not None]
    if not values:
        return None
    return max(values) if key == "max_abs" else min(values)


# ----------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot_layers(layers: list[dict[str, Any]]) -> str | None:
    if not layers:
        return None
    height = 1.2 + 0.24 * len(layers)
    figure = _new_figure(11.0, height)
    grid = figure.add_gridspec(1, 3, width_ratios=[1.0, 1.2, 1.2], wspace=0.08)
    axes = [figure.add_subplot(grid[0, 0])]
    axes += [figure.add_subplot(grid[0, i], sharey=axes[0]) for i in (1, 2)]
    positions = list(range(len(layers)))
    max_bits = max([8] + [row["bits"] for row in layers if row.get("bits")])
    bits_axis = axes[0]
    for y, row in zip(positions, layers, strict=True):
        if row.get("quantized"):
            bits_axis.barh(y, row["bits"], color=BITS_COLOURS.get(row["bits"], "#4c78a8"), height=0.7)
            bits_axis.text(row["bits"] + 0.1, y, f"{row['bits']}", va="center", fontsize=7)
        else:
            bits_axis.barh(y, max_bits, color=FLOAT_COLOUR, height=0.7, hatch="///", edgecolor="white")
            bits_axis.text(0.1, y, "float", va="center", fontsize=7)
    bits_axis.set_xlim(0, max_bits + 1)
    bits_axis.set_title("bits per weight", fontsize=10)
    bits_axis.set_yticks(positions, [row["label"] for row in layers], fontsize=7)
    bits_axis.set_ylim(len(layers) - 0.5, -0.5)  # first layer on top, no empty margins
    for axis, key, title, colour in ((axes[1], "weight_sqnr_db", "weight SQNR (dB)", "#4c78a8"),
                                     (axes[2], "output_sqnr_db", "layer output SQNR (dB)", "#e45756")):
        values = [row.get(key) for row in layers]
        for y, value in zip(positions, values, strict=True):
            if value is not None and math.isfinite(value):
                axis.barh(y, value, color=colour, height=0.7)
                axis.text(value, y, f" {value:.1f}", va="center", fontsize=7)
        known = [v for v in values if v is not None and math.isfinite(v)]
        axis.set_xlim(min(0.0, *known) if known else 0.0, (max(known) * 1.18) if known else 1.0)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="y", left=False, labelleft=False)
        if not known:
            axis.text(0.5, 0.5, "not measured", transform=axis.transAxes, ha="center", color="#888")
    for axis in axes:
        axis.tick_params(axis="x", labelsize=8)
        axis.grid(axis="x", color="#eee")
        axis.set_axisbelow(True)
    return _png(figure)


def _plot_passes(passes: list[dict[str, Any]]) -> str | None:
    if not passes:
        return None
    figure = _new_figure(10.0, 0.9 + 0.35 * len(passes))
    time_axis, error_axis = figure.subplots(1, 2, sharey=True)
    labels = [f"{i + 1}. {p.get('spec', p.get('name'))}" for i, p in enumerate(passes)]
    positions = list(range(len(passes)))
    seconds = [p.get("seconds", 0.0) for p in passes]
    time_axis.barh(positions, seconds, color="#72b7b2", height=0.6)
    for y, value in zip(positions, seconds, strict=True):
        time_axis.text(value, y, f" {value:.2f} s", va="center", fontsize=8)
    time_axis.set_xlim(0, max(seconds + [0.01]) * 1.3)
    time_axis.set_title("time (s)", fontsize=10)
    time_axis.set_yticks(positions, labels, fontsize=8)
    time_axis.invert_yaxis()
    sqnr = [_worst(p.get("output_error", {}), "sqnr_db") for p in passes]
    cosine = [_worst(p.get("output_error", {}), "cosine") for p in passes]
    finite = [v for v in sqnr if v is not None and math.isfinite(v)]
    for y, value, cos in zip(positions, sqnr, cosine, strict=True):
        if value is None:
            error_axis.text(0.2, y, "unchanged / not measured", va="center", fontsize=8, color="#888")
        elif not math.isfinite(value):
            error_axis.text(0.2, y, "exact (no error)", va="center", fontsize=8, color="#888")
        else:
            error_axis.barh(y, value, color="#e45756", height=0.6)
            error_axis.text(value, y, f" {value:.1f} dB, cosine {cos:.5f}", va="center", fontsize=8)
    error_axis.set_xlim(0, max(finite + [1.0]) * 2.2)
    error_axis.set_title("model output SQNR vs FP32 after the pass (dB)", fontsize=10)
    for axis in (time_axis, error_axis):
        axis.tick_params(axis="x", labelsize=8)
        axis.grid(axis="x", color="#eee")
        axis.set_axisbelow(True)
    return _png(figure)


def _plot_sizes(manifest: dict[str, Any]) -> str | None:
    breakdown = size_breakdown(manifest)
    stages = [("before (input)", breakdown.get("before", {})), ("after (IR)", breakdown.get("after", {}))]
    if not any(sum(sizes.values()) for _, sizes in stages):
        return None
    figure = _new_figure(10.0, 2.2)
    axis = figure.add_subplot()
    total = max(sum(sizes.values()) for _, sizes in stages) / 1e6
    for y, (_, sizes) in enumerate(stages):
        left = 0.0
        for key, label, colour in SIZE_KINDS:
            width = sizes.get(key, 0) / 1e6
            axis.barh(y, width, left=left, color=colour, height=0.6, label=label if y == 0 else None)
            if width > 0.06 * total:
                axis.text(left + width / 2, y, f"{width:.2f}", ha="center", va="center", fontsize=8, color="white")
            left += width
        axis.text(left, y, f"  {left:.2f} MB", va="center", fontsize=9)
    axis.set_yticks([0, 1], [label for label, _ in stages], fontsize=9)
    axis.invert_yaxis()
    axis.set_xlim(0, total * 1.15)
    axis.set_xlabel("MB (10^6 bytes)", fontsize=9)
    axis.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)
    axis.tick_params(axis="x", labelsize=8)
    return _png(figure)


# ----------------------------------------------------------------------------------
# HTML pieces
# ----------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value))


def _figure(png: str | None, caption: str) -> str:
    if png is None:
        return f"<p class=\"meta\">no data for: {_e(caption)}</p>"
    return (f"<figure><img alt=\"{_e(caption)}\" src=\"data:image/png;base64,{png}\">"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _table(header: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class=\"n\">{_e(c)}</td>" if i in numeric else f"<td>{_e(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _meta(manifest: dict[str, Any]) -> str:
    versions = manifest.get("versions", {})
    parts = [f"qcompile {versions.get('qcompile', '?')}"]
    if "sha256" in manifest.get("input", {}):
        parts.append(f"input sha256 {manifest['input']['sha256'][:16]}…")
    backend = manifest.get("backend", {})
    if backend:
        parts.append(f"backend {backend.get('backend')} / target {backend.get('target')}")
    if "seconds" in manifest:
        parts.append(f"compiled in {manifest['seconds']} s")
    return f"<p class=\"meta\">{_e(' · '.join(parts))}</p>"


def _mb(count: float | None) -> str:
    if count is None:
        return "-"
    if count == 0 or count >= 1e5:
        return f"{count / 1e6:.2f} MB" if count else "0"
    return f"{count / 1e3:.1f} kB"


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "exact" if value > 0 else str(value)
    return format(value, spec)


def _summary_table(manifest: dict[str, Any], layers: list[dict[str, Any]]) -> str:
    sizes, errors = manifest.get("sizes", {}), manifest.get("errors", {})
    before, after = sizes.get("input_weight_bytes"), sizes.get("artifact_bytes")
    data = "synthetic inputs" if errors.get("synthetic") else errors.get("calibration", "")
    fp32 = errors.get("artifact_vs_fp32", {})
    quantized = [row for row in layers if row.get("quantized")]
    bits = sorted({row["bits"] for row in quantized})
    rows = [
        ["weights before", _mb(before)],
        ["weights in the IR after the passes", _mb(sizes.get("ir_weight_bytes"))],
        ["artifact on disk", _mb(after)],
        ["compression", f"{before / after:.1f}x" if before and after else "-"],
        ["layers quantized", f"{len(quantized)} of {len(layers)} ({', '.join(f'{b}-bit' for b in bits) or '-'})"],
        [f"output cosine vs FP32 ({data})", _fmt(_worst(fp32, "cosine"), ".5f")],
        ["output SQNR vs FP32", _fmt(_worst(fp32, "sqnr_db"), ".1f") + " dB"],
        ["output max abs error vs FP32", _fmt(_worst(fp32, "max_abs"), ".4g")],
        ["backend kernels vs IR (SQNR)", _fmt(_worst(errors.get("artifact_vs_ir", {}), "sqnr_db"), ".1f") + " dB"],
    ]
    return _table(["", "value"], rows, numeric={1})


def _pipeline_table(passes: list[dict[str, Any]]) -> str:
    rows = []
    for i, record in enumerate(passes):
        stats = record.get("stats", {})
        errors = record.get("output_error", {})
        rows.append([
            i + 1, record.get("spec", record.get("name")), "exact" if record.get("exact") else "lossy",
            "yes" if record.get("changed") else "no", len(stats.get("layers") or {}), len(stats.get("skipped") or {}),
            f"{record.get('seconds', 0.0):.2f}", _fmt(_worst(errors, "cosine"), ".5f"),
            _fmt(_worst(errors, "sqnr_db"), ".1f"), _fmt(_worst(errors, "max_abs"), ".4g"),
        ])
    header = ["#", "pass", "kind", "changed", "layers rewritten", "layers skipped", "time (s)",
              "output cosine", "output SQNR (dB)", "max abs"]
    return _table(header, rows, numeric={0, 4, 5, 6, 7, 8, 9})


def _sizes_table(manifest: dict[str, Any]) -> str:
    breakdown = size_breakdown(manifest)
    rows = [[label, _mb(breakdown.get("before", {}).get(key, 0)), _mb(breakdown.get("after", {}).get(key, 0))]
            for key, label, _ in SIZE_KINDS]
    rows.append(["total", _mb(sum(breakdown.get("before", {}).values())), _mb(sum(breakdown.get("after", {}).values()))])
    return _table(["kind", "before", "after"], rows, numeric={1, 2})


def _layers_table(layers: list[dict[str, Any]]) -> str:
    rows = []
    for row in layers:
        shape = "x".join(str(d) for d in row.get("shape", [])) or "-"
        rows.append([
            row["label"], row.get("op", "-"), shape, row["bits"] if row.get("quantized") else "float",
            row.get("group_size", "-") if row.get("quantized") else "-", row.get("bytes", "-"),
            row.get("kernel", "-"), _fmt(row.get("weight_sqnr_db"), ".1f"), _fmt(row.get("output_sqnr_db"), ".1f"),
            _fmt(row.get("output_cosine"), ".5f"),
        ])
    header = ["layer", "op", "shape", "bits", "group", "bytes", "kernel", "weight SQNR", "output SQNR", "output cosine"]
    return _table(header, rows, numeric={3, 4, 5, 7, 8, 9})


def _skipped_table(passes: list[dict[str, Any]]) -> str:
    rows = [[row["pass"], row["layer"], row["reason"]] for row in skipped_layers(passes)]
    if not rows:
        return "<p>none: every candidate layer was rewritten.</p>"
    return _table(["pass", "layer", "reason"], rows)
