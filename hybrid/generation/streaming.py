"""Text out of a token stream: never half a UTF-8 character, never part of a stop string.

Tokens are byte sequences; a character may span two tokens (an emoji, a CJK character split by BPE), so bytes
go through an incremental UTF-8 decoder that holds an incomplete tail back. Text that could still become a
stop string is held back too, until it either completes the stop string (generation ends, the stop string and
what follows are dropped) or can no longer do so.
"""

import codecs


class TextStream:
    def __init__(self, tokenizer, stop_strings=()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self._hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.text = ""  # everything emitted so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Feed one token; returns the text that is now safe to show (possibly empty)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(self.tokenizer.token_bytes(token))
        for s in self.stop_strings:
            at = self._pending.find(s)
            if at >= 0:
                self.stopped = True
                return self._emit(self._pending[:at])
        cut = max(len(self._pending) - self._hold, 0)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return self._emit(out)

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (an unfinished character becomes U+FFFD)."""
        if self.stopped:
            return ""
        rest = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return self._emit(rest)

    def _emit(self, s: str) -> str:
        self.text += s
        return s
