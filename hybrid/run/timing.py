"""Timing enters the runtime through one recorder object (a no-op by default); the profiler consumes it.

Modules mark what they are doing with `with self.rec.section("attention", layer):`. The TimelineRecorder
attributes every instant between `start()` and `stop()` to exactly one label: the innermost open section, or
"other" when none is open (Python between sections). So the parts always add up to the measured whole, and
nested sections (the host copy inside the routed-expert wait) are exclusive, never counted twice.

On a GPU the clock is CUDA events on the current stream, resolved after one synchronize at `stop()`; a gap
where the GPU idles (waiting for the CPU experts) lands in the section open at that moment. On the CPU it is
the wall clock.
"""

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

_NULL = nullcontext()


class Recorder:
    """The default: records nothing and costs one attribute lookup per section."""

    enabled = False

    def section(self, name: str, layer: int | None = None):
        return _NULL


NULL_RECORDER = Recorder()


class WallClock:
    def now(self):
        return time.perf_counter()

    def finish(self):
        pass

    def elapsed(self, a, b) -> float:
        return b - a


class CudaClock:
    def __init__(self, torch):
        self.torch = torch

    def now(self):
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def finish(self):
        self.torch.cuda.synchronize()

    def elapsed(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3


class TimelineRecorder(Recorder):
    enabled = True

    def __init__(self, clock=None):
        self.clock = clock or WallClock()
        self._stack: list[tuple[str, int | None]] = []
        self._marks: list = []  # (stamp, label of the interval that ends at this stamp)
        self.totals: dict[tuple[str, int | None], float] = defaultdict(float)

    def _label(self):
        return self._stack[-1] if self._stack else ("other", None)

    def _mark(self):
        self._marks.append((self.clock.now(), self._label()))

    @contextmanager
    def section(self, name: str, layer: int | None = None):
        if layer is None and self._stack:
            layer = self._stack[-1][1]  # inner sections belong to the enclosing layer
        self._mark()
        self._stack.append((name, layer))
        try:
            yield
        finally:
            self._mark()
            self._stack.pop()

    def start(self):
        self._stack.clear()
        self._marks = [(self.clock.now(), None)]

    def stop(self) -> float:
        """End the timeline; add its intervals to `totals`; returns its length in seconds."""
        self._mark()
        self.clock.finish()
        for (a, _), (b, label) in zip(self._marks, self._marks[1:]):
            self.totals[label] += self.clock.elapsed(a, b)
        total = self.clock.elapsed(self._marks[0][0], self._marks[-1][0])
        self._marks = []
        return total

    def by_component(self) -> dict[str, float]:
        out = defaultdict(float)
        for (name, _), s in self.totals.items():
            out[name] += s
        return dict(out)

    def by_layer(self) -> dict[int, dict[str, float]]:
        out = defaultdict(lambda: defaultdict(float))
        for (name, layer), s in self.totals.items():
            if layer is not None:
                out[layer][name] += s
        return {k: dict(v) for k, v in sorted(out.items())}
