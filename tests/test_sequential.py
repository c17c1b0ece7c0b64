"""Sequential calibration (passes/sequential.py): segment by segment equals whole-model runs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import mlp_model

from qcompile.ir import io, qops
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.ir.qformat import quantize_int
from qcompile.passes.calibration import CalibrationSet, random_calibration
from qcompile.passes.context import PassContext
from qcompile.passes.layers import layer_matrix, rewrite, select_layers
from qcompile.passes.registry import parse_pipeline
from qcompile.passes.sequential import layer_stages

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama's prefill graph (rotary, causal mask, GQA, RMSNorm, SwiGLU, tied embedding)."""
    from qcompile.frontends.llm import cached_causal_lm_onnx

    home = tmp_path_factory.mktemp("home")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      tie_word_embeddings=True, max_position_embeddings=256)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(home / "tiny")
    return cached_causal_lm_onnx(home / "tiny", "prefill", cache_dir=home / "cache")


def _llama_calib(n: int = 3, length: int = 20) -> CalibrationSet:
    ids = np.random.default_rng(1).integers(0, 256, (n, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :5] = 0  # a left-padded sample: its padding rows stay out of the Hessians
    return CalibrationSet({"input_ids": ids, "attention_mask": mask}, "<test>")


def _check_stage_by_stage(model: Model, ctx: PassContext) -> int:
    """Quantize stage after stage (RTN, 3 bits); before each stage, the sequential statistics of its
    inputs must equal those of a whole-model run on the model as rewritten so far."""
    candidates, _ = select_layers(model, skip=(), embeddings=False, min_size=0)
    stages = layer_stages(model, candidates)
    source = ctx.sequential()
    for stage in stages:
        names = [n.inputs[0].name for n in stage]
        grams, rows = source.statistics(model, gram_of=names, rows_of=names[:1])
        whole_grams, whole_rows = ctx.statistics(model, gram_of=names, rows_of=names[:1])
        assert grams.keys() == whole_grams.keys()
        for name, (gram, count, sums) in grams.items():
            whole_gram, whole_count, whole_sums = whole_grams[name]
            assert count == whole_count
            np.testing.assert_allclose(gram, whole_gram, rtol=1e-4, atol=1e-4 * np.abs(whole_gram).max())
            np.testing.assert_allclose(sums, whole_sums, rtol=1e-4, atol=1e-4 * np.abs(whole_sums).max())
        np.testing.assert_allclose(rows[names[0]], whole_rows[names[0]], rtol=1e-4, atol=1e-5)
        for node in stage:
            matrix, _, prefix = layer_matrix(node)
            weight = quantize_int(matrix, 3, 16)
            rewrite(model, node, weight, qops.weight_constants(prefix, weight), "test")
    assert source.segments == len(stages)
    assert all(not cache for cache in source.cache) or len(source.cache[0]) < 8  # consumed tensors are dropped
    return len(stages)


def test_segments_match_whole_model_runs_on_an_mlp():
    model = canonicalize(Model.from_proto(mlp_model()))
    assert _check_stage_by_stage(model, PassContext(calib=random_calibration(model, 6))) == 3


def test_segments_match_whole_model_runs_on_a_llama(llama):
    model = canonicalize(io.load(llama))
    assert _check_stage_by_stage(model, PassContext(calib=_llama_calib())) == 2 * 4 + 1  # 4 per block + LM head


@pytest.mark.parametrize("spec", ["quant(bits=3,method=gptq,min_size=0,sequential=true)",
                                  "shiftadd(bits=2,min_size=0,sequential=true)"])
def test_sequential_passes_keep_the_tied_weight_shared_and_change_the_later_layers(llama, spec):
    ctx = PassContext(calib=_llama_calib())
    plain, staged = canonicalize(io.load(llama)), canonicalize(io.load(llama))
    parse_pipeline(spec.replace("sequential=true", "sequential=false"))[0].run(plain, ctx)
    result = parse_pipeline(spec)[0].run(staged, ctx)
    assert result.stats["sequential"] == 2 * 4 + 1
    for model in (plain, staged):
        gather = next(n for n in model.quantized_nodes() if n.op == "QGather")
        head = next(n for n in model.quantized_nodes() if n.outputs[0].name == "logits")
        assert gather.inputs[0] is head.inputs[1]  # quantized once, with the LM head's statistics
    dequantized = {n.name: qops.read_weight(n).dequantize() for n in staged.quantized_nodes()}
    reference = {n.name: qops.read_weight(n).dequantize() for n in plain.quantized_nodes()}
    first = layer_stages(staged, staged.quantized_nodes())[0]
    assert dequantized.keys() == reference.keys()
    # the first block's Q/K/V see the same inputs either way; layers after it do not
    for node in first:
        if node.op == "QMatMul":
            np.testing.assert_array_equal(dequantized[node.name], reference[node.name])
    assert sum(not np.array_equal(dequantized[k], reference[k]) for k in dequantized) >= 6


def test_bits_plans_a_tied_weight_once_and_shiftadd_stores_it_once(llama):
    """The tied embedding / LM head: one choice, its weights counted once in the budget."""
    model = canonicalize(io.load(llama))
    ctx = PassContext(calib=_llama_calib())
    plan_result, shift_result = (p.run(model, ctx) for p in parse_pipeline("bits(avg=2.5,min_size=0),"
                                                                             "shiftadd(min_size=0,group_size=32)"))
    plan = plan_result.stats["plan"]
    ((member, owner),) = plan["shared"].items()
    assert plan["layers"][member] == plan["layers"][owner] and plan["params"][member] == 0
    assert plan["params"][owner] == 256 * 64
    average = sum(plan["params"][n] * b for n, b in plan["layers"].items()) / sum(plan["params"].values())
    assert average <= 2.5 and plan["average_bits"] == pytest.approx(average, abs=1e-4)
    gather = next(n for n in model.quantized_nodes() if n.op == "QGather")
    head = next(n for n in model.quantized_nodes() if n.outputs[0].name == "logits")
    assert gather.inputs[0] is head.inputs[1]
    assert shift_result.stats["weight_bytes"] == sum(
        qops.read_weight(n).nbytes for n in {id(n.inputs[0] if n.op == "QGather" else n.inputs[1]): n
                                             for n in model.quantized_nodes()}.values())


def test_a_graph_that_cannot_be_cut_falls_back_to_whole_model_runs(monkeypatch):
    model = canonicalize(Model.from_proto(mlp_model()))
    ctx = PassContext(calib=random_calibration(model, 6))
    source = ctx.sequential()

    def refuse(*_args, **_kwargs):
        raise TypeError("'seq' is not a tensor")

    monkeypatch.setattr(source, "_run_segment", refuse)
    candidates, _ = select_layers(model, skip=(), embeddings=False, min_size=0)
    names = [n.inputs[0].name for n in layer_stages(model, candidates)[1]]
    grams, _ = source.statistics(model, gram_of=names)
    expected, _ = ctx.statistics(model, gram_of=names)
    assert source.whole_model and grams.keys() == expected.keys()
    for name in names:
        np.testing.assert_array_equal(grams[name][0], expected[name][0])
