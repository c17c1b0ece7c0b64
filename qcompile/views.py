"""Rich tables for the inspection commands (``diff``, ``inspect``, ``--explain``).

Each function turns the JSON-serialisable data of :mod:`qcompile.diff` or
:mod:`qcompile.inspection` into renderables; only the CLI prints them.
"""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .inspection import short_names


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    if abs(count) >= 1e6:
        return f"{count / 1e6:.2f} MB"
    if abs(count) >= 1e3:
        return f"{count / 1e3:.1f} kB"
    return f"{count} B"


def _number(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def _shape(shape: list | None) -> str:
    if shape is None:
        return "-"
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _table(title: str) -> Table:
    """A compact table: no outer frame, one space between columns, a rule under the header."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                 collapse_padding=True)


def _count(value: int) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:.1f}k"
    return str(value)


def _more(table: Table, shown: int, total: int) -> None:
    if total > shown:
        table.caption = f"{total - shown} more not shown (--limit, or --json for everything)"


# ----------------------------------------------------------------------------------
# diff
# ----------------------------------------------------------------------------------


def structural(diff: dict[str, Any], limit: int) -> RenderableType:
    parts: list[RenderableType] = []
    weights = diff["weight_bytes"]
    headline = (f"weights {_size(weights['before'])} -> {_size(weights['after'])}; "
                f"{len(diff['nodes'])} nodes changed, {len(diff['initializers'])} initializers changed")
    parts.append(Text("structurally identical" if diff["unchanged"] else headline, style="bold"))
    for key in ("graph_inputs", "graph_outputs"):
        for change, names in diff[key].items():
            if names:
                parts.append(Text(f"{key.replace('_', ' ')} {change}: {', '.join(names)}"))
    if diff["by_op"]:
        table = _table("node changes by op type")
        table.add_column("change")
        table.add_column("nodes", justify="right")
        for transition, count in diff["by_op"].items():
            table.add_row(transition, str(count))
        parts.append(table)
    if diff["nodes"]:
        parts.append(_node_table(diff["nodes"], limit))
    if diff["quantized"]:
        parts.append(_quantized_table(diff["quantized"], limit))
    if diff["initializers"]:
        parts.append(_initializer_table(diff["initializers"], limit))
    return Group(*parts)


def _node_table(nodes: list[dict[str, Any]], limit: int) -> Table:
    table = _table("node changes by layer")
    for column in ("layer", "node", "change", "op", "detail"):
        table.add_column(column, overflow="fold")
    for change in nodes[:limit]:
        node = "" if change["node"] == change["layer"] else change["node"]
        op = {"added": f"+ {change['op_after']}", "removed": f"- {change['op_before']}"}.get(
            change["change"], f"{change['op_before']} -> {change['op_after']}"
            if change["op_before"] != change["op_after"] else change["op_after"])
        detail = ""
        if "inputs" in change:
            before, after = change["inputs"]["before"], change["inputs"]["after"]
            gone = [n for n in before if n not in after]
            new = [n for n in after if n not in before]
            detail = "; ".join(filter(None, [f"inputs - {', '.join(gone)}" if gone else "",
                                              f"+ {', '.join(_compact(gone, new))}" if new else ""]))
        if "attributes" in change and not detail:
            before, after = change["attributes"]["before"], change["attributes"]["after"]
            keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            detail = "attributes " + ", ".join(keys)
        table.add_row(change["layer"], node, change["change"], op, detail)
    _more(table, min(limit, len(nodes)), len(nodes))
    return table


def _compact(gone: list[str], new: list[str]) -> list[str]:
    """``w.qweight, w.scales, w.zero_points`` -> ``w.{qweight,scales,zero_points}`` when ``w`` is gone."""
    result, used = [], set()
    for old in gone:
        derived = [n for n in new if n.startswith(old + ".") and n not in used]
        if len(derived) > 1:
            result.append(f"{old}.{{{','.join(n[len(old) + 1:] for n in derived)}}}")
            used.update(derived)
    return result + [n for n in new if n not in used]


def _quantized_table(layers: list[dict[str, Any]], limit: int) -> Table:
    table = _table("quantized layers")
    for column in ("layer", "was", "now", "format", "bits", "group", "shape", "bytes", "weight SQNR (dB)"):
        table.add_column(column, justify="right" if column in ("bits", "group", "bytes", "weight SQNR (dB)")
                         else "left", overflow="fold")
    labels = short_names([layer["node"] for layer in layers])
    for layer in layers[:limit]:
        size = _size(layer["bytes"])
        if "bytes_before" in layer:
            size = f"{_size(layer['bytes_before'])} -> {size}"
        table.add_row(labels[layer["node"]], layer.get("was", "(new)"), layer["op"], layer["format"], str(layer["bits"]),
                      str(layer["group_size"]), _shape(layer["shape"]), size,
                      _number(layer.get("weight_sqnr_db"), ".1f"))
    _more(table, min(limit, len(layers)), len(layers))
    return table


def _initializer_table(initializers: list[dict[str, Any]], limit: int) -> Table:
    table = _table("initializers")
    for column in ("name", "change", "shape", "dtype", "bytes", "min / max", "mean / std", "error"):
        table.add_column(column, justify="right" if column == "bytes" else "left", overflow="fold")
    for item in initializers[:limit]:
        stats = item.get("stats", {})
        error = item.get("error")
        shape, dtype, size = _shape(item["shape"]), item["dtype"], _size(item["bytes"])
        if item["change"] in ("changed", "replaced"):
            before = item["before"]
            if before["shape"] != item["shape"]:
                shape = f"{_shape(before['shape'])} -> {shape}"
            if before["dtype"] != dtype:
                dtype = f"{before['dtype']} -> {dtype}"
            if before["bytes"] != item["bytes"]:
                size = f"{_size(before['bytes'])} -> {size}"
        name = f"{item['was']} -> {item['name']}" if "was" in item else item["name"]
        table.add_row(
            name, item["change"], shape, dtype, size,
            f"{_number(stats.get('min'), '.4g')} / {_number(stats.get('max'), '.4g')}" if stats else "-",
            f"{_number(stats.get('mean'), '.4g')} / {_number(stats.get('std'), '.4g')}" if stats else "-",
            f"SQNR {_number(error['sqnr_db'], '.1f')} dB, max abs {_number(error['max_abs'], '.3g')}"
            if error else "",
        )
    _more(table, min(limit, len(initializers)), len(initializers))
    return table


def numerical(diff: dict[str, Any], limit: int) -> RenderableType:
    data = f"{diff['n_samples']} samples from {diff['samples']}" + (" (synthetic)" if diff["synthetic"] else "")
    parts: list[RenderableType] = [Text(f"numerical diff on {data}", style="bold")]
    for key, title in (("outputs", "model outputs"), ("tensors", "intermediate tensors, worst first")):
        rows = diff[key]
        table = _table(f"{title} ({len(rows)})")
        table.add_column("tensor", overflow="fold")
        for column in ("max abs", "cosine", "SQNR (dB)"):
            table.add_column(column, justify="right")
        for row in rows[:limit]:
            table.add_row(row["tensor"], _number(row["max_abs"], ".4g"), _number(row["cosine"], ".6f"),
                          _number(row["sqnr_db"], ".1f") if "note" not in row else row["note"])
        _more(table, min(limit, len(rows)), len(rows))
        parts.append(table)
    return Group(*parts)


# ----------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------


def layer_table(inspection: dict[str, Any], title: str) -> RenderableType:
    layers = inspection["layers"]
    has_float = any("kurtosis" in row for row in layers.values())  # float layers carry weight statistics
    table = _table("layers")
    columns = ["layer", "op", "shape", "params", "format", "bits", "group", "sparsity", "bytes", "share"]
    if has_float:
        columns += ["kurtosis", "max/std", "quantize?"]
    for column in columns:  # numbers never wrap; long names and reasons fold
        left = column in ("layer", "op", "format", "quantize?")
        table.add_column(column, justify="left" if left else "right", overflow="fold",
                         no_wrap=column != "layer", min_width=16 if column == "layer" else None)
    labels = short_names(list(layers))
    not_quantizable = []
    for name, row in layers.items():
        cells = [labels[name], row["op"], _shape(row["shape"]), _count(row["params"]), row["format"], str(row["bits"]),
                 "-" if row["group_size"] is None else str(row["group_size"]), f"{row['sparsity']:.1%}",
                 _size(row["bytes"]), f"{row['share']:.1%}"]
        if has_float:
            if "kurtosis" not in row:  # quantized, any format
                cells += ["", "", ""]
            else:
                cells += [_number(row["kurtosis"], ".1f"), _number(row["max_over_std"], ".1f"),
                          "yes" if row["quantizable"] == "yes" else f"no ({len(not_quantizable) + 1})"]
                if row["quantizable"] != "yes":
                    not_quantizable.append(f"({len(not_quantizable) + 1}) {labels[name]}: {row['quantizable'][4:]}")
        table.add_row(*cells, style="yellow" if row.get("outlier") else None)
    totals = inspection["totals"]
    sizes = totals["sizes"]
    lines = [
        f"{totals['layers']} layers ({totals['quantized_layers']} quantized), {totals['params']:,} parameters; "
        f"weights {_size(totals['weight_bytes'])}: layers {_size(totals['layer_bytes'])}, "
        f"other initializers {_size(totals['other_bytes'])}",
        f"by kind: packed weights {_size(sizes['packed'])}, scales + zero points {_size(sizes['scales_zero_points'])}, "
        f"embeddings {_size(sizes['embeddings'])}, other float {_size(sizes['other'])}",
    ]
    lines += not_quantizable
    if inspection["outliers"]:
        names = ", ".join(labels[name] for name in inspection["outliers"][:8])
        lines.append(f"outliers (kurtosis > 10 or max/std > 12, in yellow), worst first: {names}"
                     + (" ..." if len(inspection["outliers"]) > 8 else ""))
    if any(label != name for name, label in labels.items()):
        lines.append("layer names shortened (common prefix, trailing op name); --json has them in full")
    return Group(Text(title, style="bold"), table, *(Text(line) for line in lines))


def activation_sparsity(report: dict[str, dict[str, Any]]) -> RenderableType:
    """``qcompile inspect --calib``: activation sparsity per feed-forward layer (Sparsing Law's CETT)."""
    if not report:
        return Text("no ReLU/GELU/SiLU feed-forward layer found: no activation sparsity to report")
    table = _table("activation sparsity of feed-forward layers (calibration data)")
    for column in ("layer", "activation", "width", "tokens", "exact zeros", "sparsity at CETT"):
        table.add_column(column, justify="left" if column in ("layer", "activation") else "right", overflow="fold")
    labels = short_names(list(report))
    for name, row in report.items():
        table.add_row(labels[name], row["activation"], str(row["width"]), str(row["tokens"]),
                      f"{row['zero_fraction']:.1%}", f"{row['cett_sparsity']:.1%}")
    cett = next(iter(report.values()))["cett"]
    note = (f"sparsity at CETT = share of neuron activations a kernel could skip with a truncation error of "
            f"{cett:g} (|a_i|·||W_down[i]|| below a per-layer threshold; Sparsing Law)")
    return Group(table, Text(note))


def skipped_table(skipped: list[dict[str, str]]) -> RenderableType:
    if not skipped:
        return Text("every candidate layer was rewritten: no pass left a layer alone")
    table = _table("layers left alone")
    for column in ("pass", "layer", "reason"):
        table.add_column(column, overflow="fold")
    for row in skipped:
        table.add_row(row["pass"], row["layer"], row["reason"])
    return table
