"""Evaluating causal LMs in any form qcompile produces: perplexity, generation, decode latency.

A model is an ONNX file (the FP32 export, a ``--dump-dir`` model, an ORT baseline) or
an artifact folder (run with the session options its manifest records). Both graph
kinds of :mod:`qcompile.frontends.llm` work: a decode graph (``past_key_values.*``
inputs) is fed a zero-length past for whole-sequence scoring, and carries its cache
from step to step when generating.

* :func:`perplexity`: ``exp(mean NLL)`` of each next token over non-overlapping windows
  of ``window`` tokens (256 by default) of a text; the first token of a window is
  context only.
* :func:`generate`: greedy decoding of a chat prompt through the tokenizer's chat
  template (the sanity check: "What is the capital of France?" → "... Paris ...").
* :func:`decode_latency`: per-token latency at batch 1 with the KV cache, several
  models interleaved round by round (the machine's load drifts: only ratios from
  interleaved runs mean anything), plus the memory-bandwidth ideal.

Calibration and evaluation text stay apart: :func:`calibration_arrays` tokenizes the
``calib`` split of :mod:`qcompile.frontends.text`, evaluation uses the ``eval`` split
(or a user's file).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from qcompile.backends import ort as ort_backend
from qcompile.backends.artifact import MANIFEST
from qcompile.errors import CalibrationError, ModelLoadError, UsageError
from qcompile.frontends.llm import METADATA_FOLDER, PAST_PREFIX, PRESENT_PREFIX
from qcompile.ir.runtime import SEMANTICS_CHANGING_OPTIMIZERS

log = logging.getLogger(__name__)

__all__ = ["LanguageModel", "calibration_arrays", "decode_latency", "generate", "open_lm", "perplexity",
           "token_windows"]

DEFAULT_WINDOW = 256
CHECK_PROMPT = "What is the capital of France?"


@dataclass
class LanguageModel:
    """An ONNX Runtime session of a causal LM graph, with what is needed to feed it."""

    path: Path
    session: ort.InferenceSession
    hf_folder: str | None
    model_file: Path

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def past_inputs(self) -> list[ort.NodeArg]:
        return [i for i in self.session.get_inputs() if i.name.startswith(PAST_PREFIX)]

    @property
    def has_cache(self) -> bool:
        return bool(self.past_inputs)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length past for every cache input (``[batch, kv_heads, 0, head_dim]``)."""
        feeds = {}
        for item in self.past_inputs:
            heads, head_dim = item.shape[1], item.shape[3]
            if not isinstance(heads, int) or not isinstance(head_dim, int):
                raise ModelLoadError(f"{self.path}: cache input {item.name} has no fixed head count/size")
            feeds[item.name] = np.zeros((batch, heads, 0, head_dim), np.float32)
        return feeds

    def run(self, input_ids: np.ndarray, past: dict[str, np.ndarray] | None = None,
            past_length: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits for ``input_ids`` [batch, sequence] after ``past_length`` cached tokens, and the new cache."""
        batch, sequence = input_ids.shape
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids.astype(np.int64)}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones((batch, past_length + sequence), np.int64)
        if self.has_cache:
            feeds.update(past if past is not None else self.empty_past(batch))
        outputs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        values = dict(zip(names, outputs, strict=True))
        present = {name.replace(PRESENT_PREFIX, PAST_PREFIX, 1): value for name, value in values.items()
                   if name.startswith(PRESENT_PREFIX)}
        return values["logits"], present

    def weight_bytes(self) -> int:
        """Bytes of the model's initializers (what a decode step streams from memory)."""
        proto = onnx.load(str(self.model_file), load_external_data=False)
        total = 0
        for tensor in proto.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                total += int(next((e.value for e in tensor.external_data if e.key == "length"), 0))
            else:
                total += len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
        return total


def open_lm(path: str | Path, *, threads: int | None = None) -> LanguageModel:
    """Open an ONNX file or an artifact folder as a :class:`LanguageModel`.

    Raises:
        ModelLoadError: when the path is neither, or the graph has no ``input_ids``/``logits``.
    """
    path = Path(path)
    if path.is_dir():
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ModelLoadError(f"{path}: not a qcompile artifact (no {MANIFEST})")
        try:
            backend = json.loads(manifest_path.read_text())["backend"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{manifest_path}: unreadable manifest ({exc})") from None
        model_file = path / backend.get("model_file", "model.onnx")
        session = ort_backend.make_session(model_file, backend, threads=threads)
    elif path.is_file():
        model_file = path
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                           disabled_optimizers=list(SEMANTICS_CHANGING_OPTIMIZERS))
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
    else:
        raise ModelLoadError(f"{path}: no such file or artifact folder")
    names = {i.name for i in session.get_inputs()}
    if "input_ids" not in names or "logits" not in {o.name for o in session.get_outputs()}:
        raise ModelLoadError(f"{path}: not a causal LM graph (needs an input_ids input and a logits output)")
    folder = session.get_modelmeta().custom_metadata_map.get(METADATA_FOLDER)
    return LanguageModel(path, session, folder, model_file)


def tokenizer_for(lm: LanguageModel, folder: str | Path | None = None) -> Any:
    """The tokenizer of ``folder``, else of the Hugging Face folder the model was exported from."""
    from qcompile.frontends.llm import load_tokenizer

    source = folder or lm.hf_folder
    if not source:
        raise UsageError(f"{lm.path}: the model does not say which tokenizer it uses; pass --tokenizer FOLDER")
    if not folder and not Path(source).is_dir():  # exported elsewhere (another environment) and moved
        raise UsageError(f"{lm.path}: its tokenizer folder {source} no longer exists; pass --tokenizer FOLDER")
    return load_tokenizer(source)


def token_windows(tokenizer: Any, text: str, *, window: int = DEFAULT_WINDOW, count: int | None = None) -> np.ndarray:
    """Non-overlapping windows of ``window`` tokens of ``text``: int64 ``[count, window]``.

    Raises:
        CalibrationError: when the text holds fewer than ``window`` tokens (or ``count`` windows).
    """
    if window < 2:
        raise UsageError(f"window must be at least 2 tokens, got {window}")
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
    available = len(ids) // window
    if available == 0 or (count is not None and count > available):
        wanted = count or 1
        raise CalibrationError(f"the text holds {len(ids)} tokens: fewer than {wanted} windows of {window}")
    used = available if count is None else count
    return ids[: used * window].reshape(used, window)


def perplexity(lm: LanguageModel, windows: np.ndarray) -> dict[str, float]:
    """Perplexity of ``lm`` over token windows (one forward pass each, batch 1)."""
    total_nll, total_tokens = 0.0, 0
    for row in windows:
        logits, _ = lm.run(row[None, :])
        logits = logits[0, :-1].astype(np.float64)
        targets = row[1:]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=-1))
        total_nll += float((log_norm - shifted[np.arange(len(targets)), targets]).sum())
        total_tokens += len(targets)
    mean = total_nll / max(total_tokens, 1)
    return {"perplexity": float(np.exp(mean)), "nll": mean, "tokens": total_tokens, "windows": len(windows)}


def chat_prompt_ids(tokenizer: Any, question: str) -> np.ndarray:
    """The question as a one-turn chat, with the generation prompt, as int64 ``[1, n]``."""
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return np.asarray([tokenizer(text, add_special_tokens=False)["input_ids"]], np.int64)


def generate(lm: LanguageModel, tokenizer: Any, question: str = CHECK_PROMPT, *, max_new_tokens: int = 24) -> str:
    """Greedy answer to a chat question (with the KV cache when the graph has one)."""
    ids = chat_prompt_ids(tokenizer, question)
    stop = {t for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if t is not None}
    produced: list[int] = []
    logits, past = lm.run(ids)
    length = ids.shape[1]
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits[0, -1]))
        if token in stop:
            break
        produced.append(token)
        if lm.has_cache:
            logits, past = lm.run(np.array([[token]], np.int64), past, past_length=length)
            length += 1
        else:
            logits, _ = lm.run(np.concatenate([ids, np.array([produced], np.int64)], axis=1))
    return str(tokenizer.decode(produced, skip_special_tokens=True))


def calibration_arrays(lm_inputs: list[str], tokenizer: Any, *, samples: int, window: int = DEFAULT_WINDOW,
                       past_shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Calibration samples from the ``calib`` text split: ``input_ids`` windows, masks of ones, and
    zero-length past for a decode graph (``past_shapes``: name -> (kv_heads, head_dim))."""
    from qcompile.frontends.text import english_text

    ids = token_windows(tokenizer, english_text("calib"), window=window, count=samples)
    arrays: dict[str, np.ndarray] = {"input_ids": ids}
    if "attention_mask" in lm_inputs:
        arrays["attention_mask"] = np.ones_like(ids)
    for name, (heads, head_dim) in (past_shapes or {}).items():
        arrays[name] = np.zeros((samples, heads, 0, head_dim), np.float32)
    return arrays


# Pause before timing each model: the previous model's thread pool (ONNX Runtime's spin-waits
# after every run, TVM's too) otherwise keeps both cores of a small machine busy for a while
# and slows the next model: a SmolLM2 decode step measured 9.6 ms right after another
# runtime's run and 6.5 ms after this pause.
SETTLE_SECONDS = 0.3


def decode_latency(models: dict[str, LanguageModel], *, prompt_tokens: int = 32, new_tokens: int = 32,
                   rounds: int = 3, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per-token decode latency at batch 1 with the KV cache, models interleaved round by round.

    Each round runs, for every model in turn (after :data:`SETTLE_SECONDS` of quiet), a
    prompt of ``prompt_tokens`` random ids (prefill, timed separately) and then
    ``new_tokens`` single-token steps. Reported per
    model: the median over rounds of the mean step time and of the prefill time (ms).
    """
    missing = [name for name, lm in models.items() if not lm.has_cache]
    if missing:
        raise UsageError(f"decode latency needs KV-cache (decode) graphs; without one: {', '.join(missing)}")
    rng = np.random.default_rng(seed)
    vocab = _vocab_size(next(iter(models.values())))
    prompt = rng.integers(0, vocab, size=(1, prompt_tokens)).astype(np.int64)
    steps = rng.integers(0, vocab, size=new_tokens).astype(np.int64)
    timings: dict[str, dict[str, list[float]]] = {name: {"step": [], "prefill": []} for name in models}
    for _ in range(rounds):
        for name, lm in models.items():
            time.sleep(SETTLE_SECONDS)
            started = time.perf_counter()
            _, past = lm.run(prompt)
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            for index, token in enumerate(steps):
                _, past = lm.run(np.array([[token]], np.int64), past, past_length=prompt_tokens + index)
            timings[name]["step"].append((time.perf_counter() - started) / new_tokens)
            timings[name]["prefill"].append(prefill)
    return {name: {"step_ms": 1e3 * float(np.median(t["step"])), "prefill_ms": 1e3 * float(np.median(t["prefill"]))}
            for name, t in timings.items()}


def _vocab_size(lm: LanguageModel) -> int:
    size = lm.session.get_outputs()[0].shape[-1]
    return int(size) if isinstance(size, int) else 1000


def memory_bandwidth_gbs(size: int = 4096, repeats: int = 20, threads: int | None = None) -> float:
    """Measured weight-streaming bandwidth (GB/s): an ONNX Runtime FP32 GEMV ``1 x size . size x size``.

    A GEMV reads every weight once, so bytes / time is the bandwidth a decode step can
    use (the memory-bound regime); the best of ``repeats`` runs.
    """
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])],
        [numpy_helper.from_array(weight, "w")])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"x": np.ones((1, size), np.float32)}
    session.run(None, feeds)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - started)
    return weight.nbytes / best / 1e9
