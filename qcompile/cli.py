"""The ``qcompile`` command line.

    qcompile MODEL [--passes SPEC] [--target cpu|cuda|edge|arm64] [--backend auto|ort|tvm] [-o OUT] ...
    qcompile passes [--json]
    qcompile run ARTIFACT --inputs x.npz [--output y.npz] [--json]
    qcompile diff BEFORE.onnx AFTER.onnx [--calib SRC] [--json]
    qcompile inspect MODEL.onnx [--calib SRC] [--json]
    qcompile report ARTIFACT [-o report.html]
    qcompile eval ppl|generate MODEL [--text FILE] [--tokenizer FOLDER] ...

Exit codes: 0 success, 2 bad usage or bad input, 1 compilation failed. Every error
is one line on stderr; ``-v`` adds the traceback of unexpected failures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qcompile.errors import QCompileError, UsageError

SUBCOMMANDS = ("passes", "run", "diff", "inspect", "report", "eval")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
WIDE_OUTPUT = 200  # columns for diff / inspect tables when stdout is not a terminal


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _compile_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="qcompile",
        description="Compile a model through compression passes into a deployable artifact. "
        "Other commands: `qcompile passes`, `qcompile run`, `qcompile diff`, `qcompile inspect`, "
        "`qcompile report` (each with --help).",
    )
    parser.add_argument("model", help="ONNX file, or hf:FOLDER for a Hugging Face model folder")
    parser.add_argument("--passes", default="quant", help='ordered passes, e.g. "quant(bits=4,group_size=32)"')
    parser.add_argument("--target", default="cpu", choices=["cpu", "cuda", "edge", "arm64"],
                        help="cpu, cuda, edge (ort: .ort format) or arm64 (tvm: aarch64 cross-compiled)")
    parser.add_argument("--backend", default="auto", choices=["auto", "ort", "tvm"],
                        help="auto = ort unless the model holds formats only TVM runs fast (or --target arm64)")
    parser.add_argument("--arch", help="tvm + cuda: compute capabilities, e.g. sm_80,sm_90 (default)")
    parser.add_argument("-o", "--output", help="artifact folder (default: MODEL.qcompile next to the model)")
    parser.add_argument("--calib", help="samples.npz, a folder of .npy, or random:N")
    parser.add_argument("--input-shape", action="append", metavar="NAME=DxD", help="static input shape (repeatable); NAME may be a glob, e.g. 'past_key_values.*=1x3x127x64'")
    parser.add_argument("--verify", action="store_true", help="check numerically that exact passes kept the outputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                        help="processes for per-layer work (quant, shiftadd, prune); 0 = every core. "
                        "The artifact is the same for any N")
    parser.add_argument("--ort-accuracy-level", type=int, default=4, choices=range(5),
                        help="MatMulNBits accuracy_level (4 = int8 activations, fastest on CPU)")
    parser.add_argument("--no-ort-fusion", dest="ort_fusion", action="store_false",
                        help="ONNX Runtime backend: keep RMSNorm and attention as exported (no fused kernels)")
    parser.add_argument("--dump-dir", metavar="DIR",
                        help="write the model after canonicalization and after every pass (NN-pass.onnx/.json)")
    parser.add_argument("--report", metavar="FILE.html", help="write a self-contained HTML report with plots")
    parser.add_argument("--explain", action="store_true", help="after the summary, why each skipped layer was skipped")
    _common(parser)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging and tracebacks")


def _passes_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="qcompile passes", description="List every pass with its options.")
    _common(parser)
    return parser


def _run_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="qcompile run", description="Run a compiled artifact.")
    parser.add_argument("artifact", help="artifact folder written by qcompile")
    parser.add_argument("--inputs", required=True, help=".npz with one array per model input")
    parser.add_argument("--output", help="write the outputs to this .npz")
    _common(parser)
    return parser


def _diff_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="qcompile diff", description="Structural and numerical diff of two ONNX models.")
    parser.add_argument("before", help="ONNX file (e.g. the input, or a --dump-dir model)")
    parser.add_argument("after", help="ONNX file")
    parser.add_argument("--calib", help="samples.npz, a folder of .npy, or random:N: adds the numerical diff")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=40, help="rows per table in the terminal (default 40)")
    _common(parser)
    return parser


def _inspect_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="qcompile inspect", description="Per-layer table of an ONNX model.")
    parser.add_argument("model", help="ONNX file: a plain model, or one with qcompile quantized layers")
    parser.add_argument("--calib", help="samples.npz, a folder of .npy, or random:N: adds the activation sparsity "
                        "of ReLU/GELU/SiLU feed-forward layers")
    parser.add_argument("--cett", type=float, default=0.2,
                        help="truncation error (CETT) the activation sparsity is measured at (default 0.2)")
    parser.add_argument("--seed", type=int, default=0)
    _common(parser)
    return parser


def _report_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="qcompile report",
                             description="HTML report of an artifact folder, from its manifest.json.")
    parser.add_argument("artifact", help="artifact folder written by qcompile")
    parser.add_argument("-o", "--output", help="HTML file (default: ARTIFACT/report.html)")
    _common(parser)
    return parser


def _eval_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="qcompile eval", description="Evaluate a causal LM (ONNX file or artifact folder).")
    kinds = parser.add_subparsers(dest="what", required=True, metavar="ppl|generate")
    ppl = kinds.add_parser("ppl", help="perplexity over windows of a text")
    ppl.add_argument("model", help="artifact folder or ONNX file of a causal LM (prefill or decode graph)")
    ppl.add_argument("--text", help="UTF-8 text file (default: the built-in English eval split, "
                     "disjoint from the calibration split)")
    ppl.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    ppl.add_argument("--windows", type=int, default=None, help="use the first N windows (default: all)")
    generate = kinds.add_parser("generate", help="greedy answer to a chat prompt (sanity check)")
    generate.add_argument("model", help="artifact folder or ONNX file of a causal LM")
    generate.add_argument("--prompt", default="What is the capital of France?")
    generate.add_argument("--max-new-tokens", type=int, default=24)
    for sub in (ppl, generate):
        sub.add_argument("--tokenizer", help="Hugging Face folder of the tokenizer (default: the folder the "
                         "model was exported from, recorded in its metadata)")
        _common(sub)
    return parser


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from qcompile import llm_eval

    if args.what == "generate" and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: expected at least 1")
    if args.what == "ppl" and args.window < 2:
        raise UsageError(f"--window {args.window}: expected at least 2 tokens")
    if args.what == "ppl" and args.windows is not None and args.windows < 1:
        raise UsageError(f"--windows {args.windows}: expected at least 1")
    lm = llm_eval.open_lm(args.model)
    tokenizer = llm_eval.tokenizer_for(lm, args.tokenizer)
    if args.what == "generate":
        answer = llm_eval.generate(lm, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens)
        if args.json:
            print(json.dumps({"prompt": args.prompt, "answer": answer}))
        else:
            console.print(answer, markup=False, highlight=False)
        return EXIT_OK
    text = _read_text(args.text)
    windows = llm_eval.token_windows(tokenizer, text, window=args.window, count=args.windows)
    result = {"model": args.model, "text": args.text or "builtin:eval", **llm_eval.perplexity(lm, windows)}
    if args.json:
        print(json.dumps(result))
    else:
        console.print(f"perplexity {result['perplexity']:.3f} over {result['windows']} windows of "
                      f"{args.window} tokens ({result['tokens']} predicted tokens, {result['text']})",
                      highlight=False)
    return EXIT_OK


def _read_text(path: str | None) -> str:
    if path is None:
        from qcompile.frontends.text import english_text

        return english_text("eval")
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--text {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--text {path}: unreadable ({str(exc).splitlines()[0]})") from None


# ----------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------


class _RichProgress:
    """Adapts the pass context's progress protocol to a rich progress bar."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = None

    def start(self, description: str, total: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total)

    def advance(self, amount: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, amount)


def cmd_compile(args: argparse.Namespace, out: Console) -> int:
    from qcompile.api import compile as compile_model

    console = Console(stderr=True)
    show = not (args.quiet or args.json)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not (show and console.is_terminal),
    )
    with progress if show and console.is_terminal else contextlib.nullcontext():
        result = compile_model(
            args.model,
            passes=args.passes,
            target=args.target,
            backend=args.backend,
            calib=args.calib,
            output=args.output,
            input_shapes=args.input_shape or [],
            verify=args.verify,
            seed=args.seed,
            accuracy_level=args.ort_accuracy_level,
            ort_fusion=args.ort_fusion,
            progress=_RichProgress(progress),
            on_pass=lambda i, p: show and console.print(f"pass {i + 1}: [bold]{escape(str(p))}[/]"),
            dump_dir=args.dump_dir,
            report=args.report,
            arch=args.arch,
            jobs=args.jobs,
        )
    if args.json:
        report: dict[str, Any] = {"output": str(result.path), "manifest": result.manifest}
        if args.explain:
            report["skipped"] = result.explain()
        print(json.dumps(report, default=str))
    elif show:
        _print_summary(out, result, dump_dir=args.dump_dir, report=args.report)
        if args.explain:
            from qcompile import views

            out.print(views.skipped_table(result.explain()))
    return EXIT_OK


def _print_summary(console: Console, result, *, dump_dir: str | None = None, report: str | None = None) -> None:
    manifest = result.manifest
    table = Table(title="passes", title_justify="left")
    for column in ("pass", "kind", "layers changed", "time (s)", "output cosine vs FP32"):
        table.add_column(column, justify="left" if column in ("pass", "kind") else "right")
    for record in result.records:
        layers = record.stats.get("quantized", "-") if record.changed else 0
        cosine = _worst(record.output_error, "cosine")
        table.add_row(record.spec, "exact" if record.exact else "lossy", str(layers), f"{record.seconds:.2f}",
                      "-" if cosine is None else f"{cosine:.5f}")
    console.print(table)
    sizes, errors = manifest["sizes"], manifest["errors"]
    summary = Table(title="artifact", title_justify="left", show_header=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_row("weights before", _mb(sizes["input_weight_bytes"]))
    summary.add_row("artifact on disk", _mb(sizes["artifact_bytes"]))
    summary.add_row("compression", f"{sizes['input_weight_bytes'] / max(sizes['artifact_bytes'], 1):.1f}x")
    cosine = _worst(errors.get("artifact_vs_fp32", {}), "cosine")
    sqnr = _worst(errors.get("artifact_vs_fp32", {}), "sqnr_db")
    data = "synthetic inputs" if errors.get("synthetic") else errors.get("calibration", "")
    if cosine is not None:
        summary.add_row(f"output cosine vs FP32 ({data})", f"{cosine:.5f}")
        summary.add_row("output SQNR vs FP32", f"{sqnr:.1f} dB")
    kernels = Counter(layer["kernel"].split(" (")[0] for layer in manifest["layers"].values())
    summary.add_row("kernels", ", ".join(f"{name} x{count}" for name, count in sorted(kernels.items())) or "-")
    fusion = manifest.get("backend", {}).get("fusion")
    if fusion and not fusion.get("disabled"):
        summary.add_row("fused", ", ".join(f"{kind} {n}" for kind, n in fusion["fused"].items() if n) or "nothing")
    for record in result.records:  # a bits plan (the full JSON is in the manifest)
        plan = record.stats.get("plan")
        if isinstance(plan, dict) and plan.get("layers"):
            widths = Counter(plan["layers"].values())
            size = f", weights {plan['model_mb']:.2f} MB" if "model_mb" in plan else ""
            summary.add_row("bits plan", f"average {plan.get('average_bits', '-')} bits{size}: " + ", ".join(
                f"{count} layers at {bits}" for bits, count in sorted(widths.items())))
    summary.add_row("written to", str(result.path))
    if dump_dir:
        summary.add_row("models after each pass", str(dump_dir))
    if report:
        summary.add_row("report", str(report))
    console.print(summary)


def _worst(errors: dict[str, dict], key: str) -> float | None:
    values = [metrics[key] for metrics in errors.values() if key in metrics]
    return min(values) if values else None


def _mb(count: int) -> str:
    return f"{count / 1e6:.2f} MB"


def cmd_passes(args: argparse.Namespace, console: Console) -> int:
    from qcompile.passes import registry

    listing = []
    for name in registry.available():
        cls = registry.get(name)
        listing.append({
            "name": name,
            "summary": cls.summary,
            "exact": cls.exact,
            "requires_calibration": cls.requires_calibration,
            "options": [
                {"name": o.name, "default": _text(o.default), "valid": o.describe_valid(), "help": o.help}
                for o in cls.options()
            ],
        })
    if args.json:
        print(json.dumps(listing, indent=2))
        return EXIT_OK
    for item in listing:
        kind = "exact" if item["exact"] else "lossy"
        console.print(f"[bold]{item['name']}[/] ({kind}) - {item['summary']}")
        table = Table(show_edge=False, box=None, padding=(0, 2))
        for column in ("option", "default", "valid", "description"):
            table.add_column(column)
        for o in item["options"]:
            table.add_row(o["name"], o["default"], o["valid"], o["help"])
        console.print(table)
        console.print()
    return EXIT_OK


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "|".join(value) or "-"
    return str(value)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    import numpy as np

    from qcompile.api import load
    from qcompile.passes.calibration import CalibrationError, _load_files

    artifact = load(args.artifact)
    feeds = _load_files(Path(args.inputs)).arrays
    outputs = artifact.run(feeds)
    if args.output:
        try:
            np.savez(args.output, **outputs)
        except OSError as exc:
            raise CalibrationError(f"{args.output}: cannot write ({exc.strerror})") from None
    if args.json:
        print(json.dumps({name: {"shape": list(v.shape), "dtype": str(v.dtype), "values": v.reshape(-1)[:8].tolist()}
                          for name, v in outputs.items()}))
    elif not args.quiet:
        table = Table("output", "shape", "dtype", "first values")
        for name, value in outputs.items():
            table.add_row(name, str(list(value.shape)), str(value.dtype),
                          np.array2string(value.reshape(-1)[:4], precision=4))
        console.print(table)
    return EXIT_OK


def cmd_diff(args: argparse.Namespace, console: Console) -> int:
    from qcompile import views
    from qcompile.diff import numerical_diff, structural_diff
    from qcompile.ir import io
    from qcompile.passes.calibration import load_calibration

    console = _wide(console)
    before, after = io.load(args.before), io.load(args.after)
    result: dict[str, Any] = {"before": args.before, "after": args.after,
                              "structural": structural_diff(before, after)}
    if args.calib:
        samples = load_calibration(args.calib, before, seed=args.seed)
        result["numerical"] = numerical_diff(before, after, samples)
    if args.json:
        print(json.dumps(result, default=str))
        return EXIT_OK
    console.print(views.structural(result["structural"], args.limit))
    if "numerical" in result:
        console.print(views.numerical(result["numerical"], args.limit))
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    from qcompile import views
    from qcompile.inspection import layer_table
    from qcompile.ir import io

    console = _wide(console)
    model = io.load(args.model)
    table = layer_table(model)
    if args.calib:
        from qcompile.activations import activation_sparsity
        from qcompile.passes.calibration import load_calibration

        if not 0.0 < args.cett < 1.0:
            raise UsageError(f"--cett {args.cett}: expected a fraction in (0, 1)")
        samples = load_calibration(args.calib, model, seed=args.seed)
        table["activation_sparsity"] = activation_sparsity(model, samples, cett=args.cett)
    if args.json:
        print(json.dumps(table, default=str))
    else:
        console.print(views.layer_table(table, title=str(args.model)))
        if "activation_sparsity" in table:
            console.print(views.activation_sparsity(table["activation_sparsity"]))
    return EXIT_OK


def _wide(console: Console) -> Console:
    """Wide tables stay whole when piped to a file or a tool (COLUMNS still wins)."""
    if console.is_terminal or "COLUMNS" in os.environ:
        return console
    return Console(width=WIDE_OUTPUT, quiet=console.quiet)


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from qcompile.backends.artifact import MANIFEST
    from qcompile.errors import ModelLoadError
    from qcompile.report import write_report

    folder = Path(args.artifact)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ModelLoadError(f"{folder}: not a qcompile artifact (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("passes"), list):
            raise ValueError("no passes")
    except ValueError as exc:
        raise ModelLoadError(f"{manifest_path}: unreadable manifest ({str(exc).splitlines()[0]})") from None
    name = Path(str(manifest.get("input", {}).get("description", folder.name))).name
    path = write_report(manifest, args.output or folder / "report.html", title=f"qcompile report: {name}")
    if args.json:
        print(json.dumps({"report": str(path)}))
    else:
        console.print(f"report written to {path}")
    return EXIT_OK


# ----------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------


def _terminate(signum, frame):  # SIGTERM behaves like Ctrl-C: staging folders are removed
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    err = Console(stderr=True)
    verbose = "-v" in argv or "--verbose" in argv
    _configure_logging(verbose, err)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            parser = {"passes": _passes_parser, "run": _run_parser, "diff": _diff_parser,
                      "inspect": _inspect_parser, "report": _report_parser, "eval": _eval_parser}[argv[0]]()
            args = parser.parse_args(argv[1:])
            command: Callable[[argparse.Namespace, Console], int] = {"passes": cmd_passes, "run": cmd_run, "diff": cmd_diff, "inspect": cmd_inspect,
                       "report": cmd_report, "eval": cmd_eval}[argv[0]]
        else:
            args = _compile_parser().parse_args(argv)
            command = cmd_compile
        if args.quiet:
            logging.getLogger("qcompile").setLevel(logging.ERROR)
        return command(args, Console(quiet=args.quiet))
    except QCompileError as exc:
        err.print(f"[red]qcompile: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("qcompile: interrupted; nothing was written", highlight=False)
        return 130
    except Exception as exc:  # an unexpected failure is still one line unless -v
        if verbose:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err.print(f"qcompile: internal error: {type(exc).__name__}: {first} (rerun with -v for details)",
                  highlight=False, markup=False, soft_wrap=True)
        return EXIT_FAILED


def _configure_logging(verbose: bool, console: Console) -> None:
    if not verbose:
        warnings.filterwarnings("ignore")
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    logger = logging.getLogger("qcompile")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.propagate = False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
