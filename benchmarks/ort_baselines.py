"""ONNX Runtime's own quantizers as baselines for qcompile, plus measuring helpers.

Run as a script to print a baseline table for all-MiniLM-L6-v2::

    python benchmarks/ort_baselines.py [--sentences 256] [--cache-dir DIR] [--out DIR]

The builders take an FP32 ONNX file and write a quantized copy:

* ``ort_int8_dynamic``: ``onnxruntime.quantization.quantize_dynamic`` (int8 weights,
  activations quantized at run time; MatMul -> MatMulInteger / DynamicQuantizeMatMul).
* ``ort_matmulnbits``: ``MatMulNBitsQuantizer`` (weight-only, blockwise) with the RTN,
  HQQ or DEFAULT algorithm. Note ORT's quirks (onnxruntime 1.32):

  - ``RTNWeightOnlyQuantConfig`` takes no ``bits`` or ``block_size``: the block size is
    the quantizer's, the bit width is hard-coded to 4 and can only be changed through
    ``customized_weight_config`` per MatMul node name (done here). For bits other than
    4 and 8 the RTN path does *not* emit ``MatMulNBits``; it writes fake-quantized FP32
    weights back into the plain MatMul, so a 2-bit RTN model is as large as FP32.
  - ``HQQWeightOnlyQuantConfig`` and ``DefaultWeightOnlyQuantConfig`` pack 2-bit weights
    into real ``MatMulNBits(bits=2)`` nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qcompile.llm_eval import SETTLE_SECONDS

logger = logging.getLogger("ort_baselines")

_TWO_GB = 2**31 - 1
_MB = 1e6
ALGOS = ("rtn", "hqq", "default")


# ------------------------------------------------------------------------- builders


def _save_model(model: Any, dst: str | os.PathLike[str], src: str | os.PathLike[str]) -> Path:
    """Save an ORT ``ONNXModel`` wrapper; external data only when the source is >= 2 GB."""
    out = Path(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    external = file_mb(src) * _MB >= _TWO_GB
    model.save_model_to_file(str(out), external)
    return out


def ort_int8_dynamic(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, per_channel: bool = False
) -> Path:
    """Quantize ``src`` with ORT dynamic quantization (QInt8 weights) into ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        model_input=str(src),
        model_output=str(out),
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        use_external_data_format=file_mb(src) * _MB >= _TWO_GB,
    )
    return out


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """Swallow ORT's stdout progress bar and torch's non-writable-array warning (HQQ)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", UserWarning)
        yield


def _matmul_names(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose second input is an initializer (weights)."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def _algo_config(
    algo: str, model: onnx.ModelProto, bits: int, block_size: int, accuracy_level: int | None
) -> Any:
    """The ``WeightOnlyQuantConfig`` for ``algo`` at ``bits`` and ``block_size``."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if algo == "rtn":
        per_node = {name: {"bits": bits} for name in _matmul_names(model)}
        return mnq.RTNWeightOnlyQuantConfig(customized_weight_config=per_node)
    if algo == "hqq":
        return mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    if algo == "default":
        return mnq.DefaultWeightOnlyQuantConfig(
            block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level, bits=bits
        )
    raise ValueError(f"unknown algo {algo!r}; expected one of {ALGOS}")


def ort_matmulnbits(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    bits: int,
    algo: str = "rtn",
    block_size: int = 32,
    *,
    accuracy_level: int | None = None,
) -> Path:
    """Weight-only quantize the MatMul weights of ``src`` with ORT's ``MatMulNBitsQuantizer``.

    Args:
        bits: 2, 4 or 8 (ORT rejects anything else).
        algo: ``"rtn"`` (RTNWeightOnlyQuantConfig), ``"hqq"`` (HQQWeightOnlyQuantConfig)
            or ``"default"`` (DefaultWeightOnlyQuantConfig, asymmetric min-max RTN).
        block_size: weights per scale along the reduction axis.
        accuracy_level: MatMulNBits compute type (None/0 unset, 1 fp32, 2 fp16, 3 bf16,
            4 int8 activations); used by the RTN and DEFAULT paths, ignored by HQQ.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    model = onnx.load(str(src))
    config = _algo_config(algo, model, bits, block_size, accuracy_level)
    if algo == "rtn" and bits not in (4, 8):
        logger.warning("ORT RTN has no %d-bit MatMulNBits kernel path: weights stay FP32", bits)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=False,
        accuracy_level=accuracy_level,
        algo_config=config,
    )
    with _quiet_ort():
        quantizer.process()
    return _save_model(quantizer.model, dst, src)


# ------------------------------------------------------------------------ measuring


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Attention-mask-weighted mean over the sequence axis, then L2-normalised rows.

    ``hidden`` is ``[batch, sequence, dim]`` and ``mask`` ``[batch, sequence]``.
    """
    weights = mask.astype(np.float64)[..., None]
    summed = (hidden.astype(np.float64) * weights).sum(axis=1)
    pooled = summed / np.clip(weights.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.clip(norms, 1e-12, None)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of two ``[n, dim]`` arrays."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    dots = np.einsum("ij,ij->i", a64, b64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return dots / np.clip(norms, 1e-12, None)


def latency_ms(
    session: Any, feeds: Mapping[str, np.ndarray], *, warmup: int = 3, repeats: int = 20
) -> float:
    """Median wall-clock milliseconds of ``session.run(None, feeds)`` after ``warmup`` runs."""
    for _ in range(warmup):
        session.run(None, dict(feeds))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, dict(feeds))
        times.append((time.perf_counter() - start) * 1e3)
    return float(statistics.median(times))


def file_mb(path: str | os.PathLike[str]) -> float:
    """Size in MB (10**6 bytes) of an ONNX file plus the external data files it references."""
    model_path = Path(path)
    model = onnx.load(str(model_path), load_external_data=False)
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    extra = sum((model_path.parent / loc).stat().st_size for loc in sorted(locations))
    return (model_path.stat().st_size + extra) / _MB


# ----------------------------------------------------------------------------- main


def make_session(path: str | os.PathLike[str]) -> Any:
    """An ORT CPU session with default graph optimizations and one thread per core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed(session: Any, feeds: Mapping[str, np.ndarray], batch: int = 32) -> np.ndarray:
    """Mean-pooled, normalised sentence embeddings of all rows in ``feeds``."""
    n = len(feeds["input_ids"])
    chunks = []
    for start in range(0, n, batch):
        part = {k: v[start : start + batch] for k, v in feeds.items()}
        hidden = session.run(None, part)[0]
        chunks.append(mean_pooled(hidden, part["attention_mask"]))
    return np.concatenate(chunks, axis=0)


def _variants() -> list[tuple[str, Callable[[Path, Path], Path]]]:
    """(label, builder) for every baseline model; the FP32 builder just returns ``src``."""

    def nbits(bits: int, algo: str) -> Callable[[Path, Path], Path]:
        return lambda src, dst: ort_matmulnbits(src, dst, bits, algo=algo, block_size=32)

    return [
        ("ORT FP32", lambda src, dst: src),
        ("ORT int8 dynamic", ort_int8_dynamic),
        (
            "ORT int8 dynamic per-chan",
            lambda src, dst: ort_int8_dynamic(src, dst, per_channel=True),
        ),
        ("MatMulNBits RTN 4-bit", nbits(4, "rtn")),
        ("MatMulNBits RTN 2-bit", nbits(2, "rtn")),
        ("MatMulNBits HQQ 4-bit", nbits(4, "hqq")),
        ("MatMulNBits HQQ 2-bit", nbits(2, "hqq")),
        ("MatMulNBits DEFAULT 2-bit", nbits(2, "default")),
    ]


def _accuracy_row(path: Path, emb: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Size on disk and embedding cosines against the FP32 reference."""
    cos = cosine_rows(emb, reference)
    return {"mb": file_mb(path), "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}


def interleaved_latency_ms(
    sessions: list[Any], feeds: Mapping[str, np.ndarray], *, rounds: int = 5, repeats: int = 20
) -> list[float]:
    """Median latency of each session, measured round-robin so that background load on a
    shared machine affects every model alike (``repeats`` runs per model in total)."""
    per_round = max(1, repeats // rounds)
    samples: list[list[float]] = [[] for _ in sessions]
    for index in range(rounds):
        for session, times in zip(sessions, samples, strict=True):
            warmup = 3 if index == 0 else 1
            time.sleep(SETTLE_SECONDS)  # the previous session's spinning threads go quiet first
            times.append(latency_ms(session, feeds, warmup=warmup, repeats=per_round))
    return [float(statistics.median(times)) for times in samples]


def _op_summary(path: Path) -> str:
    """The quantization-relevant op types in a model, e.g. ``MatMulNBits(bits=2) x36``."""
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul"):
            bits = [a.i for a in node.attribute if a.name == "bits"]
            key = f"{node.op_type}(bits={bits[0]})" if bits else node.op_type
            counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options of the baseline script."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256, help="eval sentences to embed")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--cache-dir", default=None, help="MiniLM export cache (~/.cache/qcompile)")
    parser.add_argument("--out", default="out/ort_baselines", help="folder for quantized models")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Export MiniLM, build every baseline, and print the comparison table."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parse_args(argv)
    from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize
    from qcompile.frontends.text import english_sentences

    start = time.perf_counter()
    fp32 = cached_minilm_onnx(args.cache_dir)
    print(f"MiniLM ONNX: {fp32} ({time.perf_counter() - start:.1f} s incl. export if not cached)")
    sentences = english_sentences(args.sentences, "eval")
    feeds = tokenize(minilm_path(), sentences, max_length=args.max_length)
    bench = {k: v[:8] for k, v in feeds.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    built: list[tuple[str, Path, float]] = []
    for label, build in _variants():
        t0 = time.perf_counter()
        path = build(fp32, out / (label.lower().replace(" ", "_") + ".onnx"))
        built.append((label, path, time.perf_counter() - t0))
    sessions = [make_session(path) for _, path, _ in built]
    embeddings = [embed(session, feeds) for session in sessions]
    latencies = interleaved_latency_ms(sessions, bench)
    rows = []
    for (label, path, built_s), emb, ms in zip(built, embeddings, latencies, strict=True):
        row = {**_accuracy_row(path, emb, embeddings[0]), "ms": ms}
        rows.append((label, row, built_s, _op_summary(path)))

    base_ms = rows[0][1]["ms"]
    print(
        f"\n{len(sentences)} eval sentences, max_length {args.max_length}; latency at batch 8 x "
        f"seq {args.max_length}, {os.cpu_count()} threads; MB = 10^6 bytes"
    )
    print(
        f"{'model':<27}{'MB':>8}{'cos mean':>10}{'cos min':>9}{'ms':>9}{'x FP32':>8}{'build s':>9}  ops"
    )
    for label, row, built_s, ops in rows:
        print(
            f"{label:<27}{row['mb']:>8.1f}{row['cos_mean']:>10.4f}{row['cos_min']:>9.4f}"
            f"{row['ms']:>9.2f}{row['ms'] / base_ms:>8.2f}{built_s:>9.1f}  {ops}"
        )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(main())
