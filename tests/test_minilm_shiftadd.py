"""shiftadd and bits on the real model (heavy): the first encoder layer and the position table only,
so the test stays near a minute; the full model is benchmarks/shiftadd_minilm.py."""

from __future__ import annotations

import numpy as np
import pytest

import qcompile
from qcompile.frontends.hf import cached_minilm_onnx, minilm_path, tokenize
from qcompile.frontends.text import english_sentences
from qcompile.ir.runtime import make_session

pytestmark = pytest.mark.heavy

SKIP = "*layer.[1-5]/*|*word_embeddings*"


def _pooled(hidden, mask):
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_minilm_first_layer_shiftadd_with_a_bits_plan(tmp_path_factory):
    minilm = cached_minilm_onnx(tmp_path_factory.mktemp("cache"))
    folder = minilm_path()
    calib = tokenize(folder, english_sentences(32, "calib"), max_length=64)
    evals = tokenize(folder, english_sentences(64, "eval"), max_length=64)
    spec = f"bits(avg=3,skip={SKIP}),shiftadd(layout=block,skip={SKIP})"
    result = qcompile.compile(minilm, passes=spec, calib=calib, output=tmp_path_factory.mktemp("out") / "a")
    layers = result.manifest["layers"]
    assert len(layers) == 7 and all(layer["format"] == "bcq_outliers" for layer in layers.values())
    plan = result.manifest["passes"][0]["stats"]["plan"]
    assert plan["average_bits"] <= 3.0 and {layers[n]["bits"] for n in layers} <= {2, 3, 4}
    assert all(layers[name]["bits"] == bits for name, bits in plan["layers"].items())
    reference, artifact = make_session(minilm), qcompile.load(result.path)
    fp32 = _pooled(reference.run(None, evals)[0], evals["attention_mask"])
    quantized = _pooled(artifact.run(evals)["last_hidden_state"], evals["attention_mask"])
    cosine = (fp32 * quantized).sum(1)
    assert cosine.mean() >= 0.98, cosine.mean()  # measured 0.986 (block layout, one layer, 32 calib sentences)
