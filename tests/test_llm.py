"""Causal LMs on a tiny randomly initialised Llama (GQA, RMSNorm, SwiGLU, tied embeddings).

The two exports (prefill, decode) take ~15 s each and are made once per module.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qcompile  # noqa: E402
from qcompile import compile as compile_model  # noqa: E402
from qcompile.cli import main  # noqa: E402
from qcompile.errors import UsageError  # noqa: E402
from qcompile.frontends import load_model  # noqa: E402
from qcompile.frontends.llm import cached_causal_lm_onnx, is_causal_lm_folder  # noqa: E402
from qcompile.ir import io, qops  # noqa: E402
from qcompile.ir.canonicalize import canonicalize  # noqa: E402
from qcompile.ir.runtime import make_session  # noqa: E402
from qcompile.llm_eval import open_lm, perplexity, token_windows  # noqa: E402
from qcompile.passes.calibration import CalibrationSet  # noqa: E402
from qcompile.passes.context import PassContext  # noqa: E402
from qcompile.passes.patterns import activation_matmuls, rmsnorms, swiglus  # noqa: E402
from qcompile.passes.registry import parse_pipeline  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 16, 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny Llama folder, its PyTorch model, and both cached exports (in a private HOME)."""
    home = tmp_path_factory.mktemp("home")
    folder = home / "tiny-llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                                      tie_word_embeddings=True, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # real gammas are not all ones: make them differ per norm
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    cache = home / ".cache" / "qcompile"
    paths = {kind: cached_causal_lm_onnx(folder, kind, cache_dir=cache) for kind in ("prefill", "decode")}
    return {"folder": folder, "model": model, "home": home, **paths}


def _ids(seed: int = 0, batch: int = 2, length: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int64)


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


def _empty_past(batch: int) -> dict[str, np.ndarray]:
    return {f"past_key_values.{i}.{kind}": np.zeros((batch, KV_HEADS, 0, HEAD_DIM), np.float32)
            for i in range(LAYERS) for kind in ("key", "value")}


def _calibration(n: int = 4, length: int = 24, decode: bool = False) -> dict[str, np.ndarray]:
    ids = _ids(seed=1, batch=n, length=length)
    arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return {**arrays, **(_empty_past(n) if decode else {})}


def test_folder_detection(tiny, tmp_path):
    assert is_causal_lm_folder(tiny["folder"])
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert not is_causal_lm_folder(tmp_path)
    (tmp_path / "model.gguf").write_bytes(b"")
    assert is_causal_lm_folder(tmp_path)


def test_prefill_export_matches_pytorch(tiny):
    ids = _ids()
    session = make_session(tiny["prefill"])
    (logits,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    np.testing.assert_allclose(logits, _torch_logits(tiny["model"], ids), atol=1e-4)
    meta = onnx.load(str(tiny["prefill"]), load_external_data=False).metadata_props
    assert {p.key: p.value for p in meta}["qcompile.graph"] == "prefill"


def test_decode_graph_with_cache_matches_prefill_logits(tiny):
    """Prompt with a zero-length past, then token by token with the cache == one prefill pass."""
    ids = _ids(length=10)
    lm = open_lm(tiny["decode"])
    assert lm.has_cache
    prompt, rest = ids[:, :6], ids[:, 6:]
    logits, past = lm.run(prompt)
    steps = [logits]
    for position in range(rest.shape[1]):
        logits, past = lm.run(rest[:, position : position + 1], past, past_length=6 + position)
        steps.append(logits)
    assert past["past_key_values.0.key"].shape == (2, KV_HEADS, 10, HEAD_DIM)
    decoded = np.concatenate(steps, axis=1)
    (prefill,) = make_session(tiny["prefill"]).run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    np.testing.assert_allclose(decoded, prefill, atol=1e-4)


def test_export_is_cached(tiny):
    before = tiny["decode"].stat().st_mtime_ns
    again = cached_causal_lm_onnx(tiny["folder"], "decode", cache_dir=tiny["home"] / ".cache" / "qcompile")
    assert again == tiny["decode"] and again.stat().st_mtime_ns == before


def test_hf_route_loads_the_cached_prefill_graph(tiny, monkeypatch):
    monkeypatch.setenv("HOME", str(tiny["home"]))
    model = load_model(f"hf:{tiny['folder']}")
    assert [t.name for t in model.graph.inputs] == ["input_ids", "attention_mask"]
    assert [t.name for t in model.graph.outputs] == ["logits"]


def test_llm_patterns_are_matched(tiny):
    graph = canonicalize(io.load(tiny["prefill"])).graph
    assert len(rmsnorms(graph)) == 2 * LAYERS + 1
    found = swiglus(graph)
    assert len(found) == LAYERS
    assert all(s.gate.inputs[0] is s.up.inputs[0] and s.down.inputs[0] is s.product.outputs[0] for s in found)
    assert len(activation_matmuls(graph)) == 2 * LAYERS  # Q.K^T and P.V per layer


def _run_passes(model, spec: str, calib: dict):
    ctx = PassContext(calib=CalibrationSet(calib, "<test>"))
    results = []
    for p in parse_pipeline(spec):
        result = p.run(model, ctx)
        results.append(result)
    return results


def test_fold_smooths_rmsnorm_exactly(tiny):
    model = canonicalize(io.load(tiny["prefill"]))
    calib = _calibration()
    reference = make_session(model).run(None, {k: v[:2] for k, v in calib.items()})[0]
    (result,) = _run_passes(model, "fold", calib)
    stats = result.stats
    assert result.changed and stats["matched"]["RMSNorm"] == 2 * LAYERS + 1
    kinds = [s["kind"] for s in stats["smoothed"].values()]
    # the final norm feeds only the tied LM head; every SwiGLU's up/down pair is smoothed too
    assert sorted(kinds) == ["RMSNorm"] * (2 * LAYERS) + ["SwiGLU"] * LAYERS
    assert stats["matched"]["SwiGLU"] == LAYERS
    assert any("tied" in reason for reason in stats["skipped"].values())
    assert max(s["max_scale"] for s in stats["smoothed"].values()) != 1.0
    after = make_session(model).run(None, {k: v[:2] for k, v in calib.items()})[0]
    np.testing.assert_allclose(after, reference, atol=2e-4, rtol=1e-4)
    again = _run_passes(model, "fold", calib)[0]
    assert not again.changed  # idempotent


def test_fold_on_a_decode_graph_without_calibration_says_why_it_smoothed_nothing(tiny, tmp_path):
    """Synthetic stand-ins are not valid inputs of a decode graph (its position ids index a
    table): fold skips smoothing with a reason instead of failing."""
    result = compile_model(str(tiny["decode"]), passes="fold", output=tmp_path / "out")
    stats = result.records[0].stats
    assert stats["activation_statistics"] == "none" and not stats["smoothed"]
    assert sum("give --calib" in reason for reason in stats["skipped"].values()) == 3 * LAYERS


def test_tvm_compiles_a_decode_step_at_a_fixed_past_length(tiny, tmp_path):
    """TVM artifacts have static shapes: one decode step at a fixed past length, exact for fold."""
    pytest.importorskip("tvm")
    past = 5
    shapes = {"input_ids": (1, 1), "attention_mask": (1, past + 1),
              **{name: (1, KV_HEADS, past, HEAD_DIM) for name in _empty_past(1)}}
    specs = ["input_ids=1x1", f"attention_mask=1x{past + 1}", f"past_key_values.*=1x{KV_HEADS}x{past}x{HEAD_DIM}"]
    rng = np.random.default_rng(2)
    feeds = {"input_ids": np.array([[11]], np.int64), "attention_mask": np.ones((1, past + 1), np.int64),
             **{name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()
                if name.startswith("past")}}
    calib = {name: np.concatenate([value, value]) for name, value in feeds.items()}
    with pytest.raises(UsageError, match="past_values.*matches no input"):
        compile_model(str(tiny["decode"]), passes="fold", backend="tvm", input_shapes=["past_values.*=1x2"],
                      output=tmp_path / "bad")
    result = compile_model(str(tiny["decode"]), passes="fold", calib=calib, backend="tvm", input_shapes=specs,
                           output=tmp_path / "tvm")
    assert result.manifest["backend"]["input_shapes"] == {name: list(shape) for name, shape in shapes.items()}
    expected = make_session(str(tiny["decode"])).run(None, feeds)
    outputs = qcompile.load(result.path).run(feeds)
    for name, want in zip([o.name for o in onnx.load(str(tiny["decode"]), load_external_data=False).graph.output],
                          expected, strict=True):
        np.testing.assert_allclose(outputs[name], want, atol=1e-4, rtol=1e-4)


def test_quant_shares_the_tied_embedding(tiny, tmp_path):
    calib = _calibration(decode=True)
    result = compile_model(str(tiny["decode"]), passes="fold,quant(bits=4,min_size=0)", calib=calib,
                           output=tmp_path / "out")
    stats = result.records[1].stats
    assert stats["patterns"] == {"swiglu": LAYERS, "activation_matmuls_left_alone": 2 * LAYERS,
                                 "tied_embeddings": 1}
    (group,) = stats["shared"].values()
    assert len(group) == 2
    model = io.load(tmp_path / "out" / "model.onnx")
    kernels = {n.op for n in model.graph.nodes if n.name in group}
    assert kernels == {"GatherBlockQuantized", "MatMulNBits"}
    gather = next(n for n in model.graph.nodes if n.op == "GatherBlockQuantized")
    tied = [n for n in model.graph.nodes if n.op == "Reshape" and n.inputs[0] is gather.inputs[0]]
    assert len(tied) == 1  # the LM head reads a view of the embedding's packed bytes
    packed = [t for t in model.tensors().values() if getattr(t, "shape", None) == [VOCAB, 64 * 4 // 8]]
    assert len(packed) == 1
    # the artifact computes what the IR does, and is close to FP32
    fp32 = perplexity(open_lm(tiny["decode"]), _ids(seed=3, batch=3, length=32))
    quantized = perplexity(open_lm(tmp_path / "out"), _ids(seed=3, batch=3, length=32))
    assert abs(np.log(quantized["perplexity"] / fp32["perplexity"])) < 0.05


def test_quantized_ir_keeps_one_copy_of_the_tied_weight(tiny):
    model = canonicalize(io.load(tiny["prefill"]))
    _run_passes(model, "quant(bits=4,min_size=0)", _calibration())
    nodes = {n.op: n for n in model.quantized_nodes()}
    gather, head = nodes["QGather"], next(n for n in model.quantized_nodes() if n.outputs[0].name == "logits")
    assert qops.read_weight(gather).bits == 4
    assert gather.inputs[0] is head.inputs[1] and gather.inputs[2:] == head.inputs[2:]


def test_embedding_bits_apply_to_the_table_and_its_tied_head(tiny):
    model = canonicalize(io.load(tiny["prefill"]))
    _run_passes(model, "quant(bits=3,embedding_bits=4,min_size=0)", _calibration())
    bits = {n.name: qops.read_weight(n).bits for n in model.quantized_nodes()}
    gather, head = [n for n in model.quantized_nodes() if n.op == "QGather" or n.outputs[0].name == "logits"]
    assert bits[gather.name] == bits[head.name] == 4 and gather.inputs[0] is head.inputs[1]
    assert {b for name, b in bits.items() if name not in (gather.name, head.name)} == {3}


@pytest.mark.parametrize("spec, table, body", [
    ("quant(bits=3,min_size=0)", 8, 3), ("quant(bits=3,embedding_bits=0,min_size=0)", 3, 3),
    ("quant(bits=4,min_size=0)", 4, 4),
    ("shiftadd(bits=2,min_size=0)", 4, 2), ("shiftadd(bits=3,embedding_bits=0,min_size=0)", 3, 3),
    ("shiftadd(bits=2,embedding_bits=3,min_size=0)", 3, 2)])
def test_a_table_tied_to_the_lm_head_keeps_more_bits_below_4_by_default(tiny, spec, table, body):
    """quant keeps it at 8 bits, shiftadd at 4 planes (its most)."""
    model = canonicalize(io.load(tiny["prefill"]))
    _run_passes(model, spec, _calibration())
    bits = {n.name: qops.read_weight(n).bits for n in model.quantized_nodes()}
    gather, head = [n for n in model.quantized_nodes() if n.op == "QGather" or n.outputs[0].name == "logits"]
    assert bits[gather.name] == bits[head.name] == table and gather.inputs[0] is head.inputs[1]
    assert {b for name, b in bits.items() if name not in (gather.name, head.name)} == {body}


def test_tune_trains_a_tied_table_once(tiny):
    """quant then tune: the embedding and the LM head still read one set of codes and scales."""
    from qcompile.passes.manager import PassManager

    model = canonicalize(io.load(tiny["prefill"]))
    pipeline = parse_pipeline("quant(bits=4,min_size=0),tune(steps=3,batch=4)")
    result, records = PassManager(pipeline).run(model, PassContext(calib=CalibrationSet(_calibration(), "<test>")))
    gather, head = [n for n in result.quantized_nodes() if n.op == "QGather" or n.outputs[0].name == "logits"]
    assert gather.inputs[0] is head.inputs[1] and gather.inputs[2:] == head.inputs[2:]
    stats = records[-1].stats
    scales = {n.inputs[2].name for n in result.quantized_nodes()}  # QMatMul: x, codes, scales; QGather: codes, ids, scales
    assert stats["kept"] and stats["quantized_trained"] == len(scales)
    assert gather.inputs[2].name in stats["quantized_layers"]


def test_tune_trains_decomposed_rmsnorm_gammas_with_train_all(tiny):
    from qcompile.passes.manager import PassManager

    model = canonicalize(io.load(tiny["prefill"]))
    gammas = {norm.gamma.name: np.asarray(norm.gamma.values).copy() for norm in rmsnorms(model.graph)}
    pipeline = parse_pipeline("quant(bits=4,min_size=0),tune(steps=3,batch=4,train=all)")
    result, records = PassManager(pipeline).run(model, PassContext(calib=CalibrationSet(_calibration(), "<test>")))
    stats = records[-1].stats
    assert stats["kept"] and stats["trained_tensors"] == len(gammas) == 2 * LAYERS + 1
    tensors = result.tensors()
    assert all(not np.array_equal(np.asarray(tensors[name].values), values) for name, values in gammas.items())


class _CharTokenizer:
    """One token per byte (a tokenizer for the tiny vocabulary)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}


def test_perplexity_matches_pytorch(tiny):
    text = "The quick brown fox jumps over the lazy dog. " * 4
    windows = token_windows(_CharTokenizer(), text, window=32)
    assert windows.shape == (len(text) // 32, 32)
    result = perplexity(open_lm(tiny["prefill"]), windows)
    logits = torch.from_numpy(_torch_logits(tiny["model"], windows))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), torch.from_numpy(windows[:, 1:]).reshape(-1))
    assert result["tokens"] == windows.shape[0] * 31
    assert result["perplexity"] == pytest.approx(float(torch.exp(loss)), rel=1e-4)
    assert perplexity(open_lm(tiny["decode"]), windows)["perplexity"] == pytest.approx(result["perplexity"], rel=1e-4)


def test_token_windows_reject_short_text():
    from qcompile.errors import CalibrationError

    with pytest.raises(CalibrationError, match="fewer than"):
        token_windows(_CharTokenizer(), "short", window=256)


def test_cli_eval_errors_are_one_line(tiny, tmp_path, capsys):
    assert main(["eval", "ppl", str(tmp_path / "missing")]) == 2
    assert main(["eval", "ppl", str(tiny["prefill"]), "--text", str(tmp_path / "none.txt")]) == 2
    assert main(["eval", "ppl", str(tiny["prefill"]), "--window", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line]) == 3


def test_tied_head_views_the_packed_bytes_of_an_embedding_left_as_reference(tiny, tmp_path):
    """Group 128 > 64 columns: GatherBlockQuantized cannot take the table, MatMulNBits still shares it."""
    result = compile_model(str(tiny["prefill"]), passes="quant(bits=4,group_size=128,min_size=0)",
                           calib=_calibration(), output=tmp_path / "out")
    model = io.load(tmp_path / "out" / "model.onnx")
    gather = next(n for n in model.graph.nodes if n.op == "QGather")
    views = [n for n in model.graph.nodes if n.op == "Reshape" and n.inputs[0] is gather.inputs[0]]
    assert len(views) == 1 and views[0].outputs[0].outputs[0].op == "MatMulNBits"
    assert result.manifest["errors"]["artifact_vs_ir"]["logits"]["sqnr_db"] > 30


def test_rotate_is_exact_on_a_decode_graph_and_keeps_the_tied_table_once(tiny, tmp_path):
    """The table is tied to the LM head: it stays as it is, Q is applied after the lookup and
    Qᵀ before the final norm (both left in float by the weight passes that follow); with
    ``down``, each down projection's input is rotated online too."""
    model = canonicalize(io.load(tiny["decode"]))
    rng = np.random.default_rng(4)
    ids = _ids(seed=5, length=3)
    feeds = {"input_ids": ids, "attention_mask": np.ones((2, 7), np.int64),
             **{name: rng.standard_normal((2, KV_HEADS, 4, HEAD_DIM)).astype(np.float32) for name in _empty_past(2)}}
    reference = make_session(model).run(None, feeds)
    (result,) = _run_passes(model, "rotate(down=32)", _calibration(decode=True))
    stats = result.stats
    assert stats["matched"] == {"RMSNorm": 2 * LAYERS + 1}
    assert stats["down"] == {"block": 32, "rotated": LAYERS, "skipped": {}}
    assert (stats["readers_rotated"], stats["writers_rotated"]) == (5 * LAYERS, 2 * LAYERS)  # qkv+gate/up; o+down
    assert [entry.split()[0] for entry in stats["online"]] == ["after", "before"]
    for got, want in zip(make_session(model).run(None, feeds), reference, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    # then 4-bit: the tied table is still stored once, the rotations stay float, the artifact runs
    calib = _calibration(decode=True)
    result = compile_model(str(tiny["decode"]), passes="rotate(down=32),quant(bits=4,min_size=0)", calib=calib,
                           output=tmp_path / "out")
    stats = result.records[1].stats
    assert stats["patterns"]["tied_embeddings"] == 1
    artifact = io.load(tmp_path / "out" / "model.onnx")
    rotations = [t for t in artifact.tensors().values() if t.name.startswith("qcompile.rotation.")]
    assert sorted(t.name for t in rotations) == ["qcompile.rotation.down32", "qcompile.rotation.q",
                                                 "qcompile.rotation.q_t"]
    fp32 = perplexity(open_lm(tiny["decode"]), _ids(seed=3, batch=3, length=32))
    quantized = perplexity(open_lm(tmp_path / "out"), _ids(seed=3, batch=3, length=32))
    assert abs(np.log(quantized["perplexity"] / fp32["perplexity"])) < 0.05
