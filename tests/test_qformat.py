"""The int format: packing round trips and the quantizer against a NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.ir.qformat import effective_group_size, pack_codes, quantize_int, unpack_codes


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(7, 64)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (7, 64 * bits // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_codes(packed, bits), codes)


def test_pack_layout_is_low_bits_first():
    # MatMulNBits' layout: for 4 bits, code 0 is the low nibble of byte 0.
    codes = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], np.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0x87]]


def test_pack_2bit_exact_bytes():
    codes = np.array([[0, 1, 2, 3, 3, 2, 1, 0]], np.uint8)
    assert pack_codes(codes, 2).tolist() == [[0 | 1 << 2 | 2 << 4 | 3 << 6, 3 | 2 << 2 | 1 << 4 | 0 << 6]]


def _reference_minmax(weight, bits, group_size, sym):
    """Plain min/max RTN written independently, per group, with loops."""
    rows, cols = weight.shape
    out = np.zeros_like(weight)
    qmax = 2**bits - 1
    for r in range(rows):
        for g in range(0, cols, group_size):
            w = weight[r, g : g + group_size]
            if sym:
                half = 2 ** (bits - 1)
                scale = max(-w.min() / half, w.max() / (half - 1))
                zp = half
            else:
                lo, hi = min(w.min(), 0.0), max(w.max(), 0.0)
                scale = (hi - lo) / qmax
                zp = np.clip(np.round(-lo / np.float16(scale).astype(np.float32)), 0, qmax)
            scale = np.float32(np.float16(scale))
            q = np.clip(np.round(w / scale) + zp, 0, qmax)
            out[r, g : g + group_size] = (q - zp) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_minmax_matches_reference(bits, sym):
    weight = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    quantized = quantize_int(weight, bits, 32, sym=sym, clip_search=0, refine_rounds=0)
    np.testing.assert_allclose(quantized.dequantize(), _reference_minmax(weight, bits, 32, sym), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_range_search_never_worse_than_minmax(bits):
    weight = np.random.default_rng(1).standard_t(3, size=(64, 256)).astype(np.float32)
    plain = quantize_int(weight, bits, 32, clip_search=0, refine_rounds=0).dequantize()
    searched = quantize_int(weight, bits, 32, clip_search=20).dequantize()
    per_group = lambda recon: np.square(recon - weight).reshape(64, -1, 32).sum(-1)  # noqa: E731
    assert (per_group(searched) <= per_group(plain) + 1e-6).all()
    assert per_group(searched).sum() < per_group(plain).sum()


def test_error_shrinks_with_bits():
    weight = np.random.default_rng(2).standard_normal((32, 128)).astype(np.float32)
    errors = [np.square(quantize_int(weight, b, 32).dequantize() - weight).mean() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))


def test_padding_and_per_channel():
    weight = np.random.default_rng(3).standard_normal((5, 40)).astype(np.float32)
    grouped = quantize_int(weight, 4, 32)
    assert grouped.n_groups == 2 and grouped.packed.shape == (5, 64 * 4 // 8)
    assert grouped.dequantize().shape == (5, 40)
    per_channel = quantize_int(weight, 8, 0)
    assert per_channel.group_size == effective_group_size(40, 0) == 64 and per_channel.n_groups == 1
    np.testing.assert_allclose(per_channel.dequantize(), weight, atol=np.abs(weight).max() / 100)


def test_scales_fall_back_to_float32_outside_float16_range():
    tiny = np.random.default_rng(4).standard_normal((4, 32)).astype(np.float32) * 1e-6
    quantized = quantize_int(tiny, 4, 32)
    assert quantized.scales.dtype == np.float32
    assert np.abs(quantized.dequantize() - tiny).max() < 2e-7
    normal = quantize_int(tiny * 1e6, 4, 32)
    assert normal.scales.dtype == np.float16


def test_zero_weights_quantize_to_zero():
    quantized = quantize_int(np.zeros((3, 32), np.float32), 4, 32)
    np.testing.assert_array_equal(quantized.dequantize(), 0.0)
