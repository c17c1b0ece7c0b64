"""The torch executor against ONNX Runtime, per model family, on seeded inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cnn_feeds, cnn_model, make_model, mlp_feeds, mlp_model
from onnx import TensorProto, helper

from qcompile.errors import ExecutionError, UsageError
from qcompile.frontends import load_model
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.ir.runtime import make_session
from qcompile.ir.torch_exec import TorchGraph

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _assert_matches_ort(model: Model, feeds: dict[str, np.ndarray], atol: float = 1e-4) -> None:
    expected = make_session(model).run(None, feeds)
    with torch.no_grad():
        actual = TorchGraph(model)(feeds)
    assert list(actual) == [t.name for t in model.graph.outputs]
    for want, got in zip(expected, actual.values(), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=atol)


def test_mlp_and_cnn_test_models_match_onnx_runtime():
    _assert_matches_ort(canonicalize(Model.from_proto(mlp_model())), mlp_feeds(3))
    _assert_matches_ort(canonicalize(Model.from_proto(cnn_model())), cnn_feeds(2))


def test_digits_cnn_matches_onnx_runtime(tmp_path):
    """The digits CNN of examples/digits_cnn.py (Conv, BatchNorm, MaxPool, Flatten, Gemm), untrained."""
    from qcompile.frontends.torch import export_module

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    path = export_module(net, torch.zeros(2, 1, 8, 8), tmp_path / "digits.onnx", input_names=["image"],
                         output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                         fold=False)
    model = canonicalize(load_model(path), {})
    assert {"Conv", "BatchNormalization", "MaxPool", "Gemm"} <= {n.op for n in model.graph.nodes}
    image = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    _assert_matches_ort(model, {"image": image})


def _export_tiny(tmp_path: Path, config, kind: str) -> Model:
    folder = tmp_path / kind
    torch.manual_seed(0)
    if kind == "bert":
        from qcompile.frontends.hf import export_hf_encoder

        transformers.BertModel(config).eval().save_pretrained(folder)
        path = export_hf_encoder(folder, tmp_path / "bert.onnx")
    else:
        from qcompile.frontends.llm import cached_causal_lm_onnx

        model = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
        model.save_pretrained(folder)
        path = cached_causal_lm_onnx(folder, "prefill", cache_dir=tmp_path / "cache")
    return canonicalize(load_model(path), {})


def _ids_and_mask(vocab: int, left_padding: bool) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, vocab, (2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    if left_padding:
        mask[1, :4] = 0
    else:
        mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_bert_encoder_matches_onnx_runtime(tmp_path):
    """MiniLM's family (BERT: Erf GELU, LayerNormalization, the attention mask's Where/Expand)."""
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    model = _export_tiny(tmp_path, config, "bert")
    _assert_matches_ort(model, _ids_and_mask(120, left_padding=False))


@pytest.mark.heavy  # the dynamo export of even a one-layer Llama takes ~15-20 s
def test_llama_matches_onnx_runtime(tmp_path):
    """The tiny Llama family (RMSNorm as Pow/ReduceMean/Sqrt/Reciprocal, rotary Sin/Cos, SwiGLU, GQA)."""
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=96,
                                      tie_word_embeddings=True, max_position_embeddings=64)
    model = _export_tiny(tmp_path, config, "llama")
    _assert_matches_ort(model, _ids_and_mask(96, left_padding=True))


@pytest.mark.heavy
def test_minilm_matches_onnx_runtime():
    from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize
    from qcompile.frontends.text import english_sentences

    model = canonicalize(load_model(cached_minilm_onnx()), {})
    _assert_matches_ort(model, tokenize(minilm_path(), english_sentences(4, "eval"), max_length=32), atol=2e-4)


def test_gradients_reach_the_trainable_constants_only():
    model = canonicalize(Model.from_proto(mlp_model()))
    graph = TorchGraph(model, ["w1", "w2"])
    output = graph(mlp_feeds(2))["y"]
    output.square().sum().backward()
    assert graph.parameter("w1").grad is not None and graph.parameter("w1").grad.abs().sum() > 0
    assert graph.parameter("w2").grad is not None
    assert sorted(graph.trained_values()) == ["w1", "w2"]
    assert [p.shape for p in graph.parameters()] == [(64, 128), (96, 128)]


def _single_op_model(op: str, domain: str = "") -> Model:
    node = helper.make_node(op, ["x"], ["y"], name="odd", domain=domain or None)
    proto = helper.make_model(
        helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]),
        opset_imports=[helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else []))
    return Model.from_proto(proto)


@pytest.mark.parametrize("op, domain, named", [("Hardmax", "", "Hardmax"), ("Frobnicate", "com.example",
                                                                          "com.example.Frobnicate")])
def test_unknown_ops_are_one_usage_error_naming_the_op(op, domain, named):
    with pytest.raises(UsageError, match=f"does not implement op {named}$"):
        TorchGraph(_single_op_model(op, domain))


def test_bad_feeds_and_trainable_names_are_clear_errors():
    model = canonicalize(Model.from_proto(mlp_model()))
    with pytest.raises(UsageError, match="no constant named 'nope'"):
        TorchGraph(model, ["nope"])
    with pytest.raises(UsageError, match="not float"):
        TorchGraph(model, ["shape2d"])
    graph = TorchGraph(model)
    with pytest.raises(UsageError, match="missing model input 'ids'"):
        graph({})
    with pytest.raises(ExecutionError, match="torch executor failed at Gather node 'embed'"):
        graph({"ids": np.full((1, 4), 1000, np.int64)})


def test_shape_ops_follow_onnx_semantics():
    """Slice with negative steps, Reshape with 0 and -1, Expand, Split, ReduceSum with axes as input."""
    f = np.float32
    inits = [onnx.numpy_helper.from_array(np.array(v, np.int64), n) for n, v in [
        ("starts", [-1, 0]), ("ends", [-1000, 100]), ("axes", [1, 0]), ("steps", [-2, 1]),
        ("shape", [0, -1]), ("expand", [3, 1, 1]), ("split", [1, 2]), ("raxes", [1])]]
    nodes = [
        helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["s"]),
        helper.make_node("Reshape", ["s", "shape"], ["r"]),
        helper.make_node("Expand", ["r", "expand"], ["e"]),
        helper.make_node("Split", ["x", "split"], ["a", "b"], axis=0),
        helper.make_node("ReduceSum", ["b", "raxes"], ["rs"], keepdims=0),
        helper.make_node("Softmax", ["x"], ["sm"], axis=0),
    ]
    value = helper.make_tensor_value_info
    proto = make_model(nodes, [value("x", TensorProto.FLOAT, [3, 5])],
                       [value("e", TensorProto.FLOAT, [3, 3, 3]), value("a", TensorProto.FLOAT, [1, 5]),
                        value("rs", TensorProto.FLOAT, [2]), value("sm", TensorProto.FLOAT, [3, 5])], inits)
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(f)
    _assert_matches_ort(Model.from_proto(proto), {"x": x}, atol=1e-6)
