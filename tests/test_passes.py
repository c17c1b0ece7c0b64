"""Pass manager, pipeline syntax, registry, and the quant pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
from conftest import cnn_feeds, cnn_model, mlp_feeds, mlp_model

from qcompile.errors import UsageError, VerificationError
from qcompile.ir import qops
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.model import Model
from qcompile.ir.qformat import quantize_int
from qcompile.ir.runtime import make_session
from qcompile.passes import registry
from qcompile.passes.base import Pass, PassResult, option
from qcompile.passes.calibration import CalibrationSet, random_calibration
from qcompile.passes.context import PassContext
from qcompile.passes.manager import PassManager
from qcompile.passes.quant import Quant


def _canonical(proto) -> Model:
    return canonicalize(Model.from_proto(proto))


def _run(model: Model, spec: str, calib: CalibrationSet | None = None, **kwargs):
    manager = PassManager(registry.parse_pipeline(spec), eval_samples=calib, **kwargs)
    return manager.run(model, PassContext(calib=calib))


# -- pipeline syntax ------------------------------------------------------------------


def test_spec_round_trips():
    pipeline = registry.parse_pipeline("quant(bits=3, group_size=64,skip=fc1|embed*), quant")
    assert [str(p) for p in pipeline] == ["quant(bits=3,group_size=64,skip=fc1|embed*)", "quant"]
    assert pipeline[0] == Quant(bits=3, group_size=64, skip=("fc1", "embed*"))
    assert registry.parse_pipeline(str(pipeline[0]))[0] == pipeline[0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", r"unknown pass 'nope' \(available: .*fold, .*quant"),
        ("quant(bitz=3)", r"unknown option 'bitz' \(options: bits, group_size"),
        ("quant(bits=99)", r"bits=99 is out of range: expected in \[2, 8\]"),
        ("quant(bits=four)", r"bits=four is not valid: expected in \[2, 8\]"),
        ("quant(group_size=48)", r"group_size=48 is not valid: expected one of -1, 0, 16, 32"),
        ("quant(sym=maybe)", "expected one of auto, true, false"),
        ("quant(embeddings=maybe)", "expected true or false"),
        ("quant(method=awq)", "expected one of rtn"),
        ("quant(bits=3", "unbalanced"),
        ("quant,,quant", "empty pass name"),
        ("quant(bits)", "should look like option=value"),
        ("quant(bits=2,bits=3)", "given twice"),
        ("", "empty pass name"),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(UsageError, match=message):
        registry.parse_pipeline(spec)


def test_every_registered_pass_lists_documented_options():
    for name in registry.available():
        cls = registry.get(name)
        assert cls.name == name and cls.summary and cls.__doc__
        for info in cls.options():
            assert info.help, f"{name}.{info.name} has no help"


@dataclass(frozen=True)
class Scale(Pass):
    """Test plug-in: multiplies every float initializer named w* by ``factor`` (lossy)."""

    name: ClassVar[str] = "scale"
    summary: ClassVar[str] = "test plug-in"
    factor: float = option(1.0, "multiplier", min=0.0)

    def run(self, model, ctx):
        return PassResult(False, {})


@dataclass(frozen=True)
class BreakExactness(Pass):
    """Test pass that claims to be exact but perturbs a weight."""

    name: ClassVar[str] = "breaker"
    summary: ClassVar[str] = "test"
    exact: ClassVar[bool] = True

    def run(self, model, ctx):
        for tensor in model.tensors().values():
            if tensor.name == "w1":
                tensor.values = np.asarray(tensor.values) * 1.5
        return PassResult(True, {})


class _EntryPoint:
    def __init__(self, name, value):
        self.name, self.value = name, value


def test_plugins_come_from_entry_points(monkeypatch):
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: [_EntryPoint("scale", f"{__name__}:Scale"), _EntryPoint("quant", "x:y")])
    assert "scale" in registry.available() and registry.available()["quant"] == registry.BUILTIN_PASSES["quant"]
    (pass_,) = registry.parse_pipeline("scale(factor=2.5)")
    assert isinstance(pass_, Scale) and pass_.factor == 2.5


def test_requirements_and_ordering_are_checked_before_running(monkeypatch):
    @dataclass(frozen=True)
    class NeedsData(Pass):
        name: ClassVar[str] = "needs"
        requires_calibration: ClassVar[bool] = True
        runs_after: ClassVar[tuple[str, ...]] = ("quant",)

    model = _canonical(mlp_model())
    with pytest.raises(UsageError, match="needs calibration data"):
        PassManager([NeedsData()]).run(model, PassContext())
    calib = random_calibration(model, 2)
    with pytest.raises(UsageError, match="quant must come before needs"):
        PassManager([NeedsData(), Quant()]).run(model, PassContext(calib=calib))


def test_exact_passes_are_checked_numerically():
    model = _canonical(mlp_model())
    calib = random_calibration(model, 2)
    with pytest.raises(VerificationError, match="declared exact but changed output 'y'"):
        PassManager([BreakExactness()], verify_exact=True, eval_samples=calib).run(model, PassContext(calib=calib))


def test_exactness_tolerates_round_off_in_proportion_to_the_output_range():
    """Logits spanning ±32 after 30 float32 layers move by ~1e-4 under an exact rewrite."""
    rng = np.random.default_rng(0)
    logits = (32 * np.tanh(rng.standard_normal((4, 100)))).astype(np.float32)
    logits[0, 0] = 1e-3  # a logit near zero: its own relative tolerance is nothing
    PassManager._check_exact(BreakExactness(), {"logits": logits}, {"logits": logits + 1e-4})
    with pytest.raises(VerificationError, match="declared exact but changed output 'logits'"):
        PassManager._check_exact(BreakExactness(), {"logits": logits}, {"logits": logits + 1e-2})
    small = np.full(8, 0.5, np.float32)  # below 1 the floor stays EXACT_ATOL
    with pytest.raises(VerificationError):
        PassManager._check_exact(BreakExactness(), {"y": small}, {"y": small + 1e-4})


# -- quant ----------------------------------------------------------------------------


def test_quant_rewrites_every_layer_kind_and_reports_errors():
    model = _canonical(mlp_model())
    calib = random_calibration(model, 4)
    result, (record,) = _run(model, "quant(bits=4,min_size=0)", calib)
    ops = {n.name: n.op for n in result.graph.nodes}
    assert ops["embed"] == "QGather" and ops["fc1"] == "QMatMul" and ops["fc2"] == "QMatMul"
    assert ops["fc3"] == "QMatMul" and ops["fc3/bias"] == "Add"
    assert record.changed and record.stats["quantized"] == 4
    layer = record.stats["layers"]["fc1"]
    assert layer["bits"] == 4 and layer["weight_sqnr_db"] > 15 and layer["output_cosine"] > 0.98
    assert record.output_error["y"]["cosine"] > 0.97
    assert all(result.provenance[n.name] == "quant" for n in result.quantized_nodes())
    assert not any(t.name in ("w1", "w2", "w3", "emb") for t in result.tensors().values())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_matches_numpy_reference(bits):
    """The quantized model equals the float model with every weight replaced by its
    NumPy-dequantized version (Gemm alpha folded into the weight, beta into C)."""
    proto = mlp_model()
    model = _canonical(proto)
    result, _ = _run(model, f"quant(bits={bits},min_size=0)")
    weights = {t.name: np.asarray(t.values) for t in model.tensors().values() if hasattr(t, "values")}
    expected_model = Model.from_proto(proto)
    replaced = {
        "emb": quantize_int(weights["emb"], bits, 32).dequantize(),
        "w1": quantize_int(weights["w1"].T, bits, 32).dequantize().T,
        "w2": quantize_int(weights["w2"], bits, 32).dequantize(),
        "w3": quantize_int(weights["w3"].T * 0.5, bits, 32).dequantize().T / 0.5,
    }
    for tensor in expected_model.tensors().values():
        if tensor.name in replaced:
            tensor.values = replaced[tensor.name].astype(np.float32)
    feeds = mlp_feeds()
    np.testing.assert_allclose(make_session(result).run(None, feeds)[0],
                               make_session(expected_model).run(None, feeds)[0], rtol=1e-4, atol=1e-4)


def test_quant_twice_changes_nothing_the_second_time():
    model = _canonical(mlp_model())
    once, (first,) = _run(model, "quant(min_size=0)")
    twice, (second,) = _run(once, "quant(min_size=0)")
    assert first.changed and not second.changed
    assert [n.op for n in once.graph.nodes] == [n.op for n in twice.graph.nodes]


def test_quant_skips_with_reasons():
    model = _canonical(mlp_model())
    _, (record,) = _run(model, "quant(skip=fc2|fc3,embeddings=false,min_size=9000)")
    skipped = record.stats["skipped"]
    assert skipped["fc2"] == "excluded by skip pattern 'fc2'"
    assert skipped["embed"] == "embeddings=false"
    assert "min_size" in skipped["fc1"]
    assert not record.changed


def test_quant_conv_model():
    model = _canonical(cnn_model())
    calib = CalibrationSet(cnn_feeds(3), "test")
    result, (record,) = _run(model, "quant(bits=8,min_size=0)", calib)
    assert [n.op for n in result.graph.nodes].count("QConv") == 2
    assert record.output_error["y"]["cosine"] > 0.999
    conv2 = next(n for n in result.graph.nodes if n.name == "conv2")
    assert conv2.attrs["group"] == 2 and conv2.attrs["weight_shape"] == [32, 8, 3, 3]


def test_shared_weights_are_quantized_once():
    import onnx_graphsurgeon as gs

    model = _canonical(mlp_model())
    fc1 = next(n for n in model.graph.nodes if n.name == "fc1")
    twin_out = gs.Variable("twin", np.float32, fc1.outputs[0].shape)
    model.graph.nodes.append(gs.Node("MatMul", "fc1_twin", inputs=[fc1.inputs[0], fc1.inputs[1]], outputs=[twin_out]))
    model.graph.outputs.append(twin_out)
    result, (record,) = _run(model, "quant(min_size=0)")
    nodes = {n.name: n for n in result.quantized_nodes()}
    assert nodes["fc1"].inputs[1] is nodes["fc1_twin"].inputs[1]
    assert record.stats["quantized"] == 5
    assert sum(1 for t in result.tensors() if t.endswith(".qweight")) == 4


def test_format_attributes_are_recorded():
    model = _canonical(mlp_model())
    result, _ = _run(model, "quant(bits=3,group_size=16,sym=true,min_size=0)")
    node = next(n for n in result.quantized_nodes() if n.name == "fc1")
    assert {k: node.attrs[k] for k in ("format", "bits", "group_size", "cols", "sym")} == {
        "format": "int", "bits": 3, "group_size": 16, "cols": 64, "sym": 1}
    assert qops.read_weight(node).sym


def test_option_dependent_calibration_needs_are_checked_before_anything_runs():
    model = _canonical(mlp_model())
    ran = []

    @dataclass(frozen=True)
    class Recorder(Pass):
        name: ClassVar[str] = "recorder"

        def run(self, model, ctx):
            ran.append(True)
            return PassResult(False, {})

    with pytest.raises(UsageError, match=r"quant\(method=gptq\) needs calibration data: add --calib"):
        PassManager([Recorder(), Quant(method="gptq")]).run(model, PassContext())
    assert not ran
    assert Quant().needs_calibration() is None
