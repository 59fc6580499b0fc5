"""The IQ formats' lookup tables, as flat arrays the kernels read as numba globals (frozen into the compiled code).

The grids are part of each format's definition; they are built here at import from gguf-py's own copy
(`gguf.quants.<TYPE>.init_grid()`), never written out in our source. Grid entry e of an 8-wide grid is
GRID[8e : 8e + 8]; of a 4-wide grid GRID[4e : 4e + 4]. Grid values are small integers, kept as int8 (lanes.load8
converts them): the 2-32 KB tables then stay in L1/L2 beside x (28 KB at n_in = 7168), where float32 copies (up to
64 KB) did not and cost 20 % on IQ1_S. The sign tables turn a sign code into 8 float32 lanes of +-1.0:
SIGNS[8s : 8s + 8], lane j negative when bit j of s is set. IQ2_XXS, IQ2_XS and IQ3_XXS store 7 sign bits per 8
weights and keep an even number of minus signs, so the eighth bit is the parity of the seven (llama.cpp's
`ksigns`): SIGNS7 maps those 7-bit codes to lanes through that rule.
"""

import numpy as np
from gguf import quants


def _flat_grid(cls) -> np.ndarray:
    cls.init_grid()
    grid = np.ascontiguousarray(cls.grid).reshape(-1)
    assert np.array_equal(grid, grid.astype(np.int8)), f"{cls.__name__} grid holds non-integers"
    return grid.astype(np.int8)


def _sign_lanes(codes: np.ndarray) -> np.ndarray:
    bits = (codes[:, None] >> np.arange(8)) & 1
    return np.where(bits == 1, np.float32(-1.0), np.float32(1.0)).astype(np.float32).reshape(-1)


def _with_parity(codes: np.ndarray) -> np.ndarray:
    parity = np.bitwise_xor.reduce((codes[:, None] >> np.arange(7)) & 1, axis=1)
    return codes | (parity << 7)


GRID_IQ2_XXS = _flat_grid(quants.IQ2_XXS)  # 256 x 8, values 8, 25, 43
GRID_IQ2_XS = _flat_grid(quants.IQ2_XS)  # 512 x 8
GRID_IQ2_S = _flat_grid(quants.IQ2_S)  # 1024 x 8
GRID_IQ3_XXS = _flat_grid(quants.IQ3_XXS)  # 256 x 4, values 4 .. 62
GRID_IQ3_S = _flat_grid(quants.IQ3_S)  # 512 x 4, odd values 1 .. 15
GRID_IQ1 = _flat_grid(quants.IQ1_S)  # 2048 x 8, values -1, 0, 1 (IQ1_M uses the same grid)
# 8 x (grid row + 1/8) for rows 0..2047, 8 x (grid row - 1/8) for rows 2048..4095: IQ1_M's shift sign as bit 11
GRID_IQ1_EIGHTHS = np.concatenate([8 * GRID_IQ1 + 1, 8 * GRID_IQ1 - 1]).astype(np.int8)
SIGNS8 = _sign_lanes(np.arange(256))  # a full sign byte (IQ2_S, IQ3_S)
SIGNS7 = _sign_lanes(_with_parity(np.arange(128)))  # 7 sign bits + parity (IQ2_XXS, IQ2_XS, IQ3_XXS)
IQ4_LEVELS = np.array(quants.IQ4_NL.kvalues, np.int8)  # IQ4's 16 non-uniform levels, -127 .. 113
