"""ONNX Runtime backend fusions (residual + RMSNorm, attention) on a tiny random Llama decode graph.

The artifact with fusions must compute what the one without computes (logits and the
present KV cache, prefill and decode steps, padded masks) with an unchanged interface.
``accuracy_level=0`` keeps MatMulNBits in float: with int8 activations, float-rounding
differences of 1e-7 in a layer's input can move an activation across an int8 step.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import make_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qcompile import compile as compile_model  # noqa: E402
from qcompile.backends import ort_fusion  # noqa: E402
from qcompile.cli import main  # noqa: E402
from qcompile.frontends.llm import cached_causal_lm_onnx  # noqa: E402
from qcompile.ir import io  # noqa: E402
from qcompile.llm_eval import open_lm  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 4, 2, 16, 256


@pytest.fixture(scope="module")
def decode_graph(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=HEADS * HEAD_DIM, intermediate_size=128, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                                      tie_word_embeddings=True, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
    model.save_pretrained(root / "tiny-llama")
    return cached_causal_lm_onnx(root / "tiny-llama", "decode", cache_dir=root / "cache")


def _calibration() -> dict[str, np.ndarray]:
    ids = np.random.default_rng(1).integers(0, VOCAB, (4, 24)).astype(np.int64)
    past = {f"past_key_values.{i}.{kind}": np.zeros((4, KV_HEADS, 0, HEAD_DIM), np.float32)
            for i in range(LAYERS) for kind in ("key", "value")}
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), **past}


@pytest.fixture(scope="module")
def artifacts(decode_graph, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    results = {}
    for fuse in (True, False):
        results[fuse] = compile_model(str(decode_graph), passes="quant(bits=4,min_size=0)", calib=_calibration(),
                                      output=root / f"fused-{fuse}", ort_fusion=fuse, accuracy_level=0)
    return results


def _run_all(folder) -> list[dict[str, np.ndarray]]:
    """Prefill (7 tokens), one decode step with its cache, and a left-padded 10-token prefill."""
    lm = open_lm(folder)
    names = [o.name for o in lm.session.get_outputs()]
    ids = np.random.default_rng(5).integers(0, VOCAB, (2, 10)).astype(np.int64)
    prefill = dict(zip(names, lm.session.run(None, {"input_ids": ids[:, :7], "attention_mask": np.ones((2, 7), np.int64),
                                                    **lm.empty_past(2)}), strict=True))
    past = {name.replace("present", "past_key_values"): value for name, value in prefill.items()
            if name.startswith("present")}
    step = dict(zip(names, lm.session.run(None, {"input_ids": ids[:, 7:8], "attention_mask": np.ones((2, 8), np.int64),
                                                 **past}), strict=True))
    mask = np.ones((2, 10), np.int64)
    mask[0, :3] = 0
    padded = dict(zip(names, lm.session.run(None, {"input_ids": ids, "attention_mask": mask, **lm.empty_past(2)}),
                      strict=True))
    return [prefill, step, padded]


def test_fused_artifact_computes_what_the_unfused_one_does(artifacts):
    fused, plain = (_run_all(artifacts[flag].path) for flag in (True, False))
    for fused_outputs, plain_outputs in zip(fused, plain, strict=True):
        assert fused_outputs.keys() == plain_outputs.keys()
        for name, value in plain_outputs.items():
            assert fused_outputs[name].shape == value.shape
            np.testing.assert_allclose(fused_outputs[name], value, atol=1e-4, rtol=1e-4, err_msg=name)
    assert fused[1]["present.0.key"].shape == (2, KV_HEADS, 8, HEAD_DIM)


def test_fusions_are_recorded_and_the_interface_is_unchanged(artifacts):
    fusion = artifacts[True].manifest["backend"]["fusion"]
    # every norm but the first layer's (of the embedding, no residual Add before it)
    assert fusion["fused"] == {"rmsnorm": 2 * LAYERS, "attention": LAYERS}
    assert fusion["skipped"] == {"rmsnorm: input is not a residual Add of two activations": 1}
    assert artifacts[False].manifest["backend"]["fusion"]["disabled"]
    fused, plain = (io.load(artifacts[flag].path / "model.onnx").graph for flag in (True, False))
    ops = [node.op for node in fused.nodes]
    assert ops.count("GroupQueryAttention") == LAYERS and ops.count("SkipSimplifiedLayerNormalization") == 2 * LAYERS
    assert "Softmax" not in ops and "Neg" not in ops
    assert len(plain.nodes) - len(fused.nodes) >= 30 * LAYERS  # ~35 small ops per layer become 2 kernels
    for mine, theirs in ((fused.inputs, plain.inputs), (fused.outputs, plain.outputs)):
        assert [(t.name, t.shape) for t in mine] == [(t.name, t.shape) for t in theirs]


def test_cli_turns_fusion_off(decode_graph, tmp_path):
    np.savez(tmp_path / "calib.npz", **_calibration())
    assert main([str(decode_graph), "--passes", "quant(bits=4,min_size=0)", "--calib", str(tmp_path / "calib.npz"),
                 "-o", str(tmp_path / "out"), "--no-ort-fusion", "--quiet"]) == 0
    ops = {node.op for node in io.load(tmp_path / "out" / "model.onnx").graph.nodes}
    assert "GroupQueryAttention" not in ops and "Softmax" in ops


def _rmsnorm_graph(residual: bool) -> onnx.ModelProto:
    """``y = rmsnorm(a + b)`` (or of ``a`` alone) * gamma, in the exported decomposed form."""
    helper = onnx.helper
    nodes = [helper.make_node("Add", ["a", "b"], ["s"])] if residual else [helper.make_node("Identity", ["a"], ["s"])]
    nodes += [
        helper.make_node("Pow", ["s", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"]),
        helper.make_node("Add", ["mean", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["std"]),
        helper.make_node("Reciprocal", ["std"], ["inv"]),
        helper.make_node("Mul", ["s", "inv"], ["normed"]),
        helper.make_node("Mul", ["gamma", "normed"], ["y"]),
        helper.make_node("Relu", ["s"], ["r"]),
    ]
    shape = [1, 3, 8]
    inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape) for n in ("a", "b")[: 1 + residual]]
    outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shape) for n in ("y", "r")]
    rng = np.random.default_rng(0)
    constants = {"two": np.array(2.0, np.float32), "axes": np.array([-1], np.int64),
                 "eps": np.array(1e-5, np.float32), "gamma": rng.standard_normal(8).astype(np.float32)}
    return make_model(nodes, inputs, outputs, [onnx.numpy_helper.from_array(v, k) for k, v in constants.items()],
                      opset=18)


def test_residual_rmsnorm_fuses_exactly_and_a_lone_one_is_left(tmp_path):
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    feeds = {"a": rng.standard_normal((1, 3, 8)).astype(np.float32), "b": rng.standard_normal((1, 3, 8)).astype(np.float32)}
    proto = _rmsnorm_graph(residual=True)
    graph = gs.import_onnx(proto)
    result = ort_fusion.fuse(graph)
    assert result["fused"] == {"rmsnorm": 1, "attention": 0}
    fused = gs.export_onnx(graph)
    fused.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    assert [n.op_type for n in fused.graph.node] == ["SkipSimplifiedLayerNormalization", "Relu"]

    def run(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

    for got, want in zip(run(fused), run(proto), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    lone = gs.import_onnx(_rmsnorm_graph(residual=False))
    before = [n.op for n in lone.nodes]
    assert ort_fusion.fuse(lone)["fused"] == {"rmsnorm": 0, "attention": 0}
    assert [n.op for n in lone.nodes] == before


def test_graph_without_the_patterns_is_untouched():
    from conftest import mlp_model

    graph = gs.import_onnx(mlp_model())
    before = [(n.op, n.name) for n in graph.nodes]
    result = ort_fusion.fuse(graph)
    assert result == {"fused": {"rmsnorm": 0, "attention": 0}, "skipped": {}}
    assert [(n.op, n.name) for n in graph.nodes] == before
