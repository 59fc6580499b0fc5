"""Random valid GGUF blocks of any type the kernels read: for tests and the benchmark, where gguf-py has no quantizer.

Every byte pattern is a valid block once its f16 scale fields hold finite values (grid indices, signs and
sub-block scales take every value their bits allow), so a block is random bytes with those fields overwritten by
small finite halves. Offsets are from llama.cpp's block structs (ggml-common.h), as gguf-py's quants.py reads them.
"""

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# type -> byte offsets of its f16 scales inside one block (IQ1_M has none: its scale is spread, see below)
F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "IQ4_NL": (0,), "Q8_0": (0,), "Q2_K": (80, 82),
    "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "TQ1_0": (52,), "TQ2_0": (64,), "IQ4_XS": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ2_XXS": (0,),
    "IQ2_XS": (0,), "IQ2_S": (0,), "IQ1_S": (0,), "IQ1_M": (),
}


def small_halves(rng, n: int) -> np.ndarray:
    """n float16 bit patterns of magnitude 2^-10 .. 2^-6 with random signs: finite, and their products with any
    code stay far from float16's range."""
    h = (rng.uniform(2.0 ** -10, 2.0 ** -6, n) * rng.choice([-1.0, 1.0], n)).astype(np.float16)
    return h.view(np.uint16)


def random_blocks(type_name: str, n_rows: int, n_per_row: int, rng) -> np.ndarray:
    """uint8 [n_rows, n_per_row / QK * BB]: random valid blocks of ggml type `type_name`, row-major as in a GGUF."""
    qk, bb = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    if n_per_row % qk:
        raise ValueError(f"{type_name} rows are whole blocks of {qk}; got {n_per_row}")
    blocks = rng.integers(0, 256, (n_rows * n_per_row // qk, bb), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        blocks[:, off:off + 2] = small_halves(rng, len(blocks)).view(np.uint8).reshape(-1, 2)
    if type_name == "IQ1_M":
        # The block's f16 scale is the top nibbles of its four uint16 sub-block scale words (bytes 48..55).
        words = blocks[:, 48:56].copy().view("<u2")
        d = small_halves(rng, len(blocks)).astype(np.uint16)
        for i in range(4):
            words[:, i] = (words[:, i] & 0x0FFF) | (((d >> (4 * i)) & 0xF) << 12)
        blocks[:, 48:56] = words.view(np.uint8)
    return blocks.reshape(n_rows, -1)
