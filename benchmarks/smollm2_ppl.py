"""SmolLM2 perplexity of pipelines, quickly: the passes alone, then the quantized layers decoded.

For accuracy sweeps: no artifact is emitted and no latency is measured. Each pipeline's
passes run on the cached decode export (``PassManager``, no error measurement); the IR's
quantized layers are then decoded to float with NumPy (``ir.qops.decode_to_float``: exactly
the values their reference functions compute, so what any backend's artifact computes) and
the model is scored like ``benchmarks/smollm2.py``: perplexity on 256-token windows of the
built-in English eval text, and whether the greedy chat answer names Paris.

    python benchmarks/smollm2_ppl.py "shiftadd(bits=3)" "quant(bits=3,method=gptq)" [--calib-windows 32]
"""

from __future__ import annotations

import argparse
import sys
import time

from qcompile.frontends import load_model
from qcompile.frontends.llm import cached_causal_lm_onnx, smollm2_path
from qcompile.frontends.text import english_text
from qcompile.ir import qops
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.runtime import make_session
from qcompile.llm_eval import (
    LanguageModel,
    calibration_arrays,
    generate,
    open_lm,
    perplexity,
    token_windows,
    tokenizer_for,
)
from qcompile.passes.calibration import load_calibration
from qcompile.passes.context import PassContext
from qcompile.passes.manager import PassManager
from qcompile.passes.registry import parse_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipelines", nargs="+", help="qcompile pipelines, e.g. \"shiftadd(bits=3)\"")
    parser.add_argument("--windows", type=int, default=8, help="eval windows of 256 tokens (default 8)")
    parser.add_argument("--calib-windows", type=int, default=32, help="calibration windows of 256 tokens")
    args = parser.parse_args(argv)

    source = cached_causal_lm_onnx(None, "decode")
    fp32 = open_lm(source)
    tokenizer = tokenizer_for(fp32, smollm2_path())
    windows = token_windows(tokenizer, english_text("eval"), count=args.windows)
    past = {i.name: (int(i.shape[1]), int(i.shape[3])) for i in fp32.past_inputs}
    calib = calibration_arrays(fp32.input_names, tokenizer, samples=args.calib_windows, past_shapes=past)
    reference = perplexity(fp32, windows)["perplexity"]
    del fp32
    print(f"FP32 perplexity {reference:.2f} ({args.windows} x 256 eval tokens; calibration {args.calib_windows} x 256)")
    print("| pipeline | quantized weight MB | perplexity | x FP32 | Paris? | passes s |")
    print("|---|---:|---:|---:|:---:|---:|")
    for spec in args.pipelines:
        started = time.perf_counter()
        canonical = canonicalize(load_model(str(source)), {})
        model, _ = PassManager(parse_pipeline(spec)).run(canonical, PassContext(calib=load_calibration(calib, canonical)))
        seconds = time.perf_counter() - started
        shared = {tuple(t.name for t in qops.weight_inputs(n)): n for n in model.quantized_nodes()}
        weight_mb = sum(qops.read_weight(n).nbytes for n in shared.values()) / 1e6
        qops.decode_to_float(model.graph)
        lm = LanguageModel(source, make_session(model), None, source)
        ppl = perplexity(lm, windows)["perplexity"]
        paris = "yes" if "Paris" in generate(lm, tokenizer) else "no"
        print(f"| {spec} | {weight_mb:.1f} | {ppl:.2f} | {ppl / reference:.3f} | {paris} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
