"""Block-FP8 dequantization against the elementwise formula, including ragged blocks."""

import math

import torch

from hybrid.read import fp8
from reference import fp8_dequant_reference, fp8_e4m3_value


def test_every_e4m3_byte_decodes_to_the_formats_value():
    decoded = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    for byte in range(256):
        want = fp8_e4m3_value(byte)
        got = float(decoded[byte])
        assert (math.isnan(want) and math.isnan(got)) or want == got, byte


def test_dequantize_matches_elementwise_formula_with_ragged_blocks():
    gen = torch.Generator().manual_seed(0)
    rows, cols = 200, 300  # 2 x 3 blocks, both dims ragged
    w = torch.randint(0, 256, (rows, cols), generator=gen, dtype=torch.uint8)
    w[w == 0x7F] = 0  # keep NaN codes out: they never occur in real weights
    w[w == 0xFF] = 0
    w = w.view(torch.float8_e4m3fn)
    scale_inv = torch.rand(2, 3, generator=gen) * 1e-2 + 1e-4
    want = fp8_dequant_reference(w, scale_inv)
    assert torch.equal(fp8.dequantize(w, scale_inv, dtype=torch.float32), want)
    assert torch.equal(fp8.dequantize(w, scale_inv), want.to(torch.bfloat16))  # the reference's final rounding


def test_quantize_keeps_e4m3_precision():
    w = torch.randn(576, 320, generator=torch.Generator().manual_seed(1))  # kv_a_proj_with_mqa's ragged 576 rows
    q, s = fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == fp8.scale_shape((576, 320), (128, 128)) == (5, 3)
    back = fp8.dequantize(q, s, dtype=torch.float32)
    assert float((back - w).norm() / w.norm()) < 0.04  # 3 mantissa bits: ~2-3 % relative error
