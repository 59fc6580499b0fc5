"""Independent reference implementations the tests compare against.

Kept in one module so that every test measures the project against the same plain formula, never against
itself. Nothing here imports the project.
"""

import math

import torch
import torch.nn.functional as F

FP8_BLOCK = 128


def int8_rounded(v):
    """v [..., n] as int8 inputs with one scale per 32 (cpu_kernels/formats/activations.py) represent it:
    d = max|v| / 127 per block, v -> round(v / d) * d. Written here from that description, in float64."""
    blocks = v.double().reshape(*v.shape[:-1], -1, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    return (torch.round(blocks / torch.where(d > 0, d, torch.ones_like(d))) * d).reshape(v.shape)


def routed_experts_reference(hidden, ids, weights, gate, up, down, int8_inputs=False):
    """Plain per-token, per-slot loop: sum_k w[t,k] * down_e(silu(gate_e(x)) * up_e(x)).

    hidden [T, H] float, ids [T, K] int, weights [T, K] float, gate/up [E, I, H], down [E, H, I].
    Computed in float64 so that it is a reference for every float format. int8_inputs: each projection's input
    (x, and the weighted w * silu(g) * u the down projection gets) rounded as int8_rounded does, as the integer
    kernels of formats with quantized_inputs multiply it.
    """
    rounded = int8_rounded if int8_inputs else (lambda v: v)
    x = hidden.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        xt = rounded(x[t])
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            g = gate[e].double() @ xt
            u = up[e].double() @ xt
            out[t] += down[e].double() @ rounded(float(weights[t, k]) * F.silu(g) * u)
    return out


def fp8_dequant_reference(weight_u8_or_fp8, scale_inv):
    """Elementwise block-FP8 dequantization: w[i, j] * s[i // 128, j // 128], one element at a time."""
    w = weight_u8_or_fp8
    if w.dtype != torch.float8_e4m3fn:
        w = w.view(torch.float8_e4m3fn)
    wf = w.float()
    out = torch.empty_like(wf)
    rows, cols = wf.shape
    for i in range(rows):
        for j in range(cols):
            out[i, j] = wf[i, j] * scale_inv[i // FP8_BLOCK, j // FP8_BLOCK]
    return out


def fp8_e4m3_value(byte):
    """The e4m3fn value of one byte, from the format's definition (bias 7, no infinities, 0x7f/0xff NaN)."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp = (byte >> 3) & 0xF
    mant = byte & 0x7
    if exp == 0xF and mant == 0x7:
        return math.nan
    if exp == 0:
        return sign * (mant / 8.0) * 2.0 ** -6
    return sign * (1.0 + mant / 8.0) * 2.0 ** (exp - 7)
