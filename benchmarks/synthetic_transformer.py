"""A synthetic transformer-shaped ONNX model of any size, written streamed to disk.

Pre-LayerNorm encoder blocks (single-head attention: Q, K, V and output projections;
SiLU feed-forward with biases) over a token embedding, every weight in one external-data
file. Each tensor is generated (seeded, N(0, 0.02)) and written before the next one, so
writing a 2 GB model holds one tensor at a time; the ``.onnx`` file itself is a few KB.

    python benchmarks/synthetic_transformer.py OUT.onnx --gigabytes 2.2
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17


@dataclass(frozen=True)
class Shape:
    hidden: int = 2048
    ffn: int = 8192
    vocab: int = 8192
    layers: int = 2

    @property
    def params(self) -> int:
        per_layer = 4 * self.hidden * self.hidden + 2 * self.hidden * self.ffn + self.ffn + 5 * self.hidden
        return self.vocab * self.hidden + self.layers * per_layer + 2 * self.hidden

    @classmethod
    def for_bytes(cls, target: float, **dims: int) -> Shape:
        """The shape with as many layers as bring its float32 weights closest to ``target`` bytes."""
        base = cls(layers=0, **dims)
        per_layer = cls(layers=1, **dims).params - base.params
        layers = max(1, round((target / 4 - base.params) / per_layer))
        return cls(layers=layers, **dims)


class _Writer:
    """Appends tensors to the data file and returns their external-data initializers."""

    def __init__(self, data_path: Path, seed: int) -> None:
        self.handle = open(data_path, "wb")
        self.location = data_path.name
        self.rng = np.random.default_rng(seed)
        self.initializers: list[TensorProto] = []

    def tensor(self, name: str, shape: tuple[int, ...], kind: str = "weight") -> str:
        if kind == "weight":
            values = (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
        elif kind == "ones":
            values = np.ones(shape, np.float32)
        else:
            values = np.zeros(shape, np.float32)
        offset = -(-self.handle.tell() // 4096) * 4096
        self.handle.seek(offset)
        self.handle.write(values.tobytes())
        proto = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape),
                            data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(values.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(proto)
        return name

    def close(self) -> None:
        self.handle.close()


def write_transformer(path: str | Path, shape: Shape, *, seed: int = 0) -> Path:
    """Write the model to ``path`` (+ ``path.data``); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _Writer(path.with_name(f"{path.name}.data"), seed)
    nodes: list[onnx.NodeProto] = []
    h, f = shape.hidden, shape.ffn
    scale = helper.make_tensor("attn_scale", TensorProto.FLOAT, [], [1.0 / np.sqrt(h)])
    try:
        nodes.append(helper.make_node("Gather", [writer.tensor("embed.weight", (shape.vocab, h)), "input_ids"],
                                      ["x0"], name="embed"))
        x = "x0"
        for i in range(shape.layers):
            p = f"layer{i}"

            def norm(inp: str, tag: str, p: str = p) -> str:
                out = f"{p}.{tag}.out"
                nodes.append(helper.make_node(
                    "LayerNormalization", [inp, writer.tensor(f"{p}.{tag}.weight", (h,), "ones"),
                                           writer.tensor(f"{p}.{tag}.bias", (h,), "zeros")],
                    [out], name=f"{p}/{tag}", axis=-1, epsilon=1e-5))
                return out

            def linear(inp: str, tag: str, rows: int, cols: int, bias: bool = False, p: str = p) -> str:
                out = f"{p}.{tag}.out"
                nodes.append(helper.make_node("MatMul", [inp, writer.tensor(f"{p}.{tag}.weight", (rows, cols))],
                                              [out if not bias else f"{out}.mm"], name=f"{p}/{tag}"))
                if bias:
                    nodes.append(helper.make_node("Add", [f"{out}.mm", writer.tensor(f"{p}.{tag}.bias", (cols,),
                                                                                     "zeros")],
                                                  [out], name=f"{p}/{tag}/bias"))
                return out

            normed = norm(x, "ln1")
            q, k, v = (linear(normed, t, h, h) for t in ("q", "k", "v"))
            nodes.extend([
                helper.make_node("Transpose", [k], [f"{p}.kt"], perm=[0, 2, 1], name=f"{p}/kt"),
                helper.make_node("MatMul", [q, f"{p}.kt"], [f"{p}.scores"], name=f"{p}/scores"),
                helper.make_node("Mul", [f"{p}.scores", "attn_scale"], [f"{p}.scaled"], name=f"{p}/scale"),
                helper.make_node("Softmax", [f"{p}.scaled"], [f"{p}.probs"], axis=-1, name=f"{p}/softmax"),
                helper.make_node("MatMul", [f"{p}.probs", v], [f"{p}.ctx"], name=f"{p}/context"),
            ])
            attn = linear(f"{p}.ctx", "o", h, h)
            nodes.append(helper.make_node("Add", [x, attn], [f"{p}.res1"], name=f"{p}/res1"))
            up = linear(norm(f"{p}.res1", "ln2"), "up", h, f, bias=True)
            nodes.extend([helper.make_node("Sigmoid", [up], [f"{p}.gate"], name=f"{p}/sigmoid"),
                          helper.make_node("Mul", [up, f"{p}.gate"], [f"{p}.act"], name=f"{p}/silu")])
            down = linear(f"{p}.act", "down", f, h, bias=True)
            nodes.append(helper.make_node("Add", [f"{p}.res1", down], [f"{p}.res2"], name=f"{p}/res2"))
            x = f"{p}.res2"
        nodes.append(helper.make_node(
            "LayerNormalization", [x, writer.tensor("final_ln.weight", (h,), "ones"),
                                   writer.tensor("final_ln.bias", (h,), "zeros")],
            ["hidden_states"], name="final_ln", axis=-1, epsilon=1e-5))
    finally:
        writer.close()
    graph = helper.make_graph(
        nodes, "synthetic_transformer",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["batch", "sequence", h])],
        [*writer.initializers, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qcompile-bench")
    onnx.save_model(model, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--gigabytes", type=float, default=2.2, help="float32 weight bytes, in 1e9")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    shape = Shape.for_bytes(args.gigabytes * 1e9, hidden=args.hidden, ffn=args.ffn, vocab=args.vocab)
    write_transformer(args.output, shape)
    print(f"{args.output}: {shape} = {shape.params / 1e6:.1f} M params, {shape.params * 4 / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
