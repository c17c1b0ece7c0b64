"""Static activation quantization as standard QDQ (QuantizeLinear -> DequantizeLinear).

Each quantized layer's input activation gets one per-tensor, asymmetric uint8
quantizer whose range comes from calibration data: the min/max range shrunk by the
factor (searched on the captured activations) that minimises the squared error.
Below 8 bits a ``Clip`` between the two nodes limits the codes to ``[0, 2^bits)``.
The pair is plain ONNX, so the IR model still runs in any runtime; the ONNX Runtime
backend turns ``QuantizeLinear`` + an 8-bit per-channel symmetric ``QMatMul`` into an
integer GEMM (``MatMulIntegerToFloat``). Per-channel activation scales are what
``fold`` (SmoothQuant) moves into the weights beforehand.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.ir.model import Model

SHRINKS = np.linspace(1.0, 0.3, 36)


def activation_range(rows: np.ndarray, bits: int) -> tuple[float, int]:
    """Scale and zero point (uint8) minimising the quantization error of ``rows``."""
    values = np.asarray(rows, np.float32).reshape(-1)
    if values.size > 1 << 21:  # an evenly spread subset is plenty for a 1-D search
        values = values[np.linspace(0, values.size - 1, 1 << 21).astype(np.int64)]
    qmax = (1 << bits) - 1
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    best = (np.inf, 1.0, 0)
    for shrink in SHRINKS:
        scale = max((high - low) * shrink / qmax, 1e-12)
        zero_point = int(np.clip(np.round(-low * shrink / scale), 0, qmax))
        codes = np.clip(np.round(values / scale) + zero_point, 0, qmax)
        error = float(np.square((codes - zero_point) * scale - values).sum())
        if error < best[0]:
            best = (error, scale, zero_point)
    return float(best[1]), int(best[2])


def insert_qdq(model: Model, tensor: gs.Variable, consumers: list[gs.Node], scale: float, zero_point: int,
               bits: int, pass_name: str) -> gs.Variable:
    """Route ``consumers`` of ``tensor`` (not its other readers) through a new quantize/dequantize pair."""
    base = tensor.name
    scale_c = gs.Constant(f"{base}.act_scale", np.array(scale, np.float32))
    zero_c = gs.Constant(f"{base}.act_zero_point", np.array(zero_point, np.uint8))
    quantized = gs.Variable(f"{base}/quantized", np.uint8, tensor.shape)
    nodes = [gs.Node("QuantizeLinear", f"{base}/quantize", inputs=[tensor, scale_c, zero_c], outputs=[quantized])]
    if bits < 8:
        clipped = gs.Variable(f"{base}/clipped", np.uint8, tensor.shape)
        nodes.append(gs.Node("Clip", f"{base}/clip", inputs=[
            quantized, gs.Constant(f"{base}.act_min", np.array(0, np.uint8)),
            gs.Constant(f"{base}.act_max", np.array((1 << bits) - 1, np.uint8))], outputs=[clipped]))
        quantized = clipped
    dequantized = gs.Variable(f"{base}/dequantized", np.float32, tensor.shape)
    nodes.append(gs.Node("DequantizeLinear", f"{base}/dequantize", inputs=[quantized, scale_c, zero_c],
                         outputs=[dequantized]))
    model.splice(nodes, consumers, tensor, dequantized, pass_name)
    return dequantized
