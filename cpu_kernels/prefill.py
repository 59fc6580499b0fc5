"""Many-token path: group (token, expert) pairs by expert, so each expert's weights are read once per call.

Dimension legend: T tokens, K top-k, P = T * K pairs, E experts.

`sort_by_expert` is a counting sort of the P pairs by expert, stable in token order, so each expert's tokens are
one contiguous run and its weights are read once per call however many tokens chose it. The run then goes through
the format's four-token kernel (`tile4`, formats/spec.py) in blocks of BLOCK_TOKENS, the rest one token at a time.
"""

from numba import njit

# Tokens per four-token kernel call (tile4's four accumulators; formats/tiled.py says why four).
BLOCK_TOKENS = 4


@njit(nogil=True, cache=True)
def sort_by_expert(ids, weights, counts, starts, pair_token, pair_weight, used):
    """Counting sort of the pairs (t, k) by expert ids[t, k]; returns the number of distinct experts.

    ids int64 [T, K] (values in [0, E), or -1: a pair computed elsewhere, skipped), weights float32 [T, K].
    Outputs, preallocated: counts int64 [E]
    (scratch), starts int64 [E + 1] (expert e's pairs are sorted positions starts[e] .. starts[e + 1]),
    pair_token int64 [P] and pair_weight float32 [P] per sorted position, used int64 [E] (experts with
    pairs, ascending, first n_used entries).
    """
    n_tokens, top_k = ids.shape
    n_experts = counts.shape[0]
    for e in range(n_experts):
        counts[e] = 0
    for t in range(n_tokens):
        for k in range(top_k):
            if ids[t, k] >= 0:
                counts[ids[t, k]] += 1
    starts[0] = 0
    n_used = 0
    for e in range(n_experts):
        starts[e + 1] = starts[e] + counts[e]
        if counts[e] > 0:
            used[n_used] = e
            n_used += 1
        counts[e] = starts[e]  # now the next free position of expert e
    for t in range(n_tokens):
        for k in range(top_k):
            e = ids[t, k]
            if e < 0:
                continue
            p = counts[e]
            pair_token[p] = t
            pair_weight[p] = weights[t, k]
            counts[e] = p + 1
    return n_used
