"""Prefix reuse: which tokens each slot of the engine's cache holds, so a request that resends a conversation
prefills only what is new.

A coding agent resends the whole conversation every turn. When a request retires, its slot keeps its
contents (the prompt and the generated tokens that were fed back into the cache) and this table records them.
A new request takes, among the free slots, the one whose tokens share the longest prefix with its prompt; the
engine truncates that slot to the shared length and prefills only the rest. Truncating is exact: MLA cache
positions < n depend only on tokens < n (causal attention), so a cached prefix equals a fresh prefill of it.

At least one prompt token is always left to prefill, since sampling needs the last prompt position's logits:
a prompt that the slot holds entirely reuses all of it but its last token. When no free slot shares at least
MIN_REUSE tokens, the least recently used free slot is taken (an empty one first), so the conversations used
last stay cached longest: every chat prompt starts with the same few template tokens, and matching on those
alone would make a new conversation evict the longest history instead of taking an empty slot.

No memory is added: the cache is the engine's own slots (max_batch x max_context positions, which the plan
reserved); this table holds only token ids, one list per slot.
"""

import numpy as np

# Fewer shared tokens than this is no reason to take a slot (and evict what it holds): a chat template's opening
# markers, not a conversation. A shared system prompt (agents send thousands of tokens of it) is well above it.
MIN_REUSE = 64


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])  # vectorised: a 100K-token context is compared in microseconds
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """Token ids held by each of n_slots cache slots, and when each was last released (for LRU)."""

    def __init__(self, n_slots: int, min_reuse: int = MIN_REUSE):
        self.min_reuse = min_reuse
        self.tokens = [np.zeros(0, dtype=np.int64) for _ in range(n_slots)]
        self.released = [0] * n_slots  # a logical clock: higher = released later; 0 = never used
        self._clock = 0

    def choose(self, free, prompt: list[int]) -> tuple[int, int]:
        """(slot, n_reused) for a prompt: among the `free` slots the one sharing the longest prefix with it
        (ties: the least recently released), n_reused at most len(prompt) - 1; when that is under MIN_REUSE
        tokens (and under the whole prompt but one), the least recently released free slot and what it shares. The caller truncates the slot to n_reused (`take`)."""
        free = list(free)
        if not free:
            raise ValueError("choose: no free slot")
        ids = np.asarray(prompt, dtype=np.int64)
        limit = max(len(ids) - 1, 0)  # leave the last prompt token to prefill: its logits are sampled
        shared = {s: min(common_prefix(self.tokens[s], ids), limit) for s in free}
        best = min(free, key=lambda s: (-shared[s], self.released[s]))
        if shared[best] >= min(self.min_reuse, limit) and shared[best] > 0:
            return best, shared[best]
        oldest = min(free, key=lambda s: self.released[s])
        return oldest, shared[oldest]

    def take(self, slot: int, n_reused: int):
        """The slot now holds only its first n_reused tokens (a request is about to extend them)."""
        self.tokens[slot] = self.tokens[slot][:n_reused]

    def release(self, slot: int, tokens: list[int]):
        """A request left the slot, which holds exactly `tokens` (its prompt and the generated tokens fed
        into the cache); they stay reusable until the slot is taken again."""
        self._clock += 1
        self.tokens[slot] = np.asarray(tokens, dtype=np.int64)
        self.released[slot] = self._clock

    def forget(self, slot: int):
        """The slot's contents can't be trusted (a prefill that failed part way): nothing is reused from it."""
        self.tokens[slot] = np.zeros(0, dtype=np.int64)
