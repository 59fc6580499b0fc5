"""GPU prefill: in a long prefill chunk each MoE layer's routed experts are streamed to the GPU and computed there.

Dimension legend: T tokens, K top-k, H hidden, E experts, n_group experts per slot.

A chunk of T prompt tokens costs the CPU T x K x 6 H I FLOPs per MoE layer; streaming the layer's experts over
PCIe costs their bytes once, whatever T is. Past a token count the copy wins: the planner computes it from the
PCIe bandwidth and the CPU's FLOP/s (placement.planner, setting gpu_prefill_tokens) and reserves the staging
memory. At such counts every expert of a layer is used (K2, 512 tokens: each expert misses with probability
(1 - 8/384)^512 < 1e-4), so the copy schedule does not depend on the routing: layer after layer, experts in
groups of n_group (one slot's worth), in the store's own bytes (int4 crosses PCIe at a quarter of bf16's size)
and unpacked on the GPU (`unpack`: q * scale in float32, as the store's numpy dequantizer computes it, then
rounded once to the activations' dtype).

Double buffering: a copier thread walks that schedule ahead of the model, two slots deep. For each group it
copies the store's bytes into the slot's pinned host buffer (numpy's copy releases the GIL) and from there to the
slot's device buffer on a side stream; the model's thread, at that layer, waits for the group's copy, computes
its experts' pairs and hands the slot back. So the copy of group g + 1 (the next layer's first group, at a
layer's end) overlaps the compute of group g. The schedule is cyclic over the layers: after the last layer the
copier fetches the first layer's groups for the next chunk. If the model asks for another group than the one
ready (a chunk that started anew, a short chunk in between that skipped streaming), the copier restarts there.

On a CPU device (a plan's cuda:N on a machine without one, and the tests) the same steps run with the host
buffer as the device buffer and no streams: the results are the same as on a GPU, up to GEMM rounding.
"""

import queue
import threading

import numpy as np
import torch
import torch.nn.functional as F

from cpu_kernels.store import PROJECTIONS, projection_shape
from hybrid.run.routed import add_routed

ARRAYS = tuple(f"{name}.{part}" for name in PROJECTIONS for part in ("values", "scales"))
TILED = ("bf16", "int8", "int4")  # the formats unpacked in torch (a GGUF's blocks decode in the numba kernels only)


class ExpertStreamer:
    """Streams the experts of `stores` ({layer: ExpertStore}, in layer order) to `device` in slots of n_group
    experts; `takes(T)` says whether a call of T tokens uses it (T >= min_tokens)."""

    def __init__(self, stores: dict, device, min_tokens: int, n_group: int):
        if any(store.format_of(n).name not in TILED for store in stores.values() for n in PROJECTIONS):
            raise ValueError(f"GPU prefill streams experts in {', '.join(TILED)}; a GGUF layer's blocks are not unpacked "
                             "on the GPU")
        self.stores, self.device, self.min_tokens = dict(stores), torch.device(device), min_tokens
        self.layers = list(self.stores)
        first = next(iter(self.stores.values()))
        self.n_group = max(1, min(n_group, first.n_experts))
        self.n_groups = -(-first.n_experts // self.n_group)
        self.cuda = self.device.type == "cuda"
        self._slots = [_Slot(list(self.stores.values()), self.n_group, self.device, self.cuda) for _ in range(2)]
        self._free = queue.Queue()
        for slot in self._slots:
            self._free.put(slot)
        self._ready = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.layer_calls = 0  # MoE layer calls computed from streamed experts (profile, tests)

    def takes(self, n_tokens: int) -> bool:
        return n_tokens >= self.min_tokens

    def compute(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routed experts of `layer` for hidden [T, H] (on the device), ids [T, K] (SKIP: left out), weights
        [T, K] -> [T, H] in hidden's dtype, computed on the device from the streamed weights."""
        store, first = self.stores[layer], self.layers.index(layer) * self.n_groups
        ids, weights = ids.to(hidden.device), weights.to(hidden.device, torch.float32)
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        for g in range(self.n_groups):
            slot = self._take(first + g)
            e0 = g * self.n_group

            def expert(e, rows):
                gate, up, down = slot.matrices(store, e - e0, hidden.dtype)
                return F.linear(F.silu(F.linear(rows, gate)) * F.linear(rows, up), down)

            used = torch.unique(ids[(ids >= e0) & (ids < e0 + slot.n_experts)]).tolist()
            add_routed(out, hidden, ids, weights, used, expert)
            self._give_back(slot)
        self.layer_calls += 1
        return out.to(hidden.dtype)

    # The copier's side ---------------------------------------------------------------------------------------

    def _take(self, position: int):
        """The slot holding schedule position `position`, waiting for its copy; restarts the copier there when
        it is not among the next two positions it will deliver."""
        with self._lock:
            if self._thread is None:
                self._start(position)
        n = len(self.layers) * self.n_groups
        while True:
            got, slot, error = self._ready.get()
            if error is not None:
                self._thread = None
                raise error
            if got == position:
                if self.cuda:
                    torch.cuda.current_stream(self.device).wait_event(slot.copied)
                return slot
            self._free.put(slot)  # a group nobody waits for any more: the schedule moved on
            if not 0 < (position - got) % n <= 2:
                self._restart(position)

    def _give_back(self, slot):
        if self.cuda:
            slot.computed.record(torch.cuda.current_stream(self.device))
        self._free.put(slot)

    def _start(self, position: int):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._copy_loop, args=(position, self._stop), daemon=True,
                                        name="hybrid-expert-copier")
        self._thread.start()

    def _restart(self, position: int):
        self._stop.set()
        self._free.put(None)  # wakes a copier waiting for a slot
        self._thread.join()
        slots = []
        while not self._ready.empty():
            item = self._ready.get()
            if item[1] is not None:
                slots.append(item[1])
        while not self._free.empty():
            item = self._free.get()
            if item is not None:
                slots.append(item)
        for slot in slots:
            self._free.put(slot)
        self._start(position)

    def _copy_loop(self, position: int, stop: threading.Event):
        n = len(self.layers) * self.n_groups
        while not stop.is_set():
            slot = self._free.get()
            if slot is None or stop.is_set():
                if slot is not None:
                    self._free.put(slot)
                return
            layer, g = self.layers[position // self.n_groups], position % self.n_groups
            try:
                slot.fill(self.stores[layer], g * self.n_group, self.copy_stream)
            except Exception as e:  # reaches the model's thread at its next _take; the slot stays usable
                self._free.put(slot)
                self._ready.put((-1, None, e))
                return
            self._ready.put((position, slot, None))
            position = (position + 1) % n


class _Slot:
    """One group's buffers, as raw bytes per store array (layers may differ in format): pinned host staging and
    device buffers (the same on a CPU device)."""

    def __init__(self, stores, n_group: int, device, cuda: bool):
        self.device, self.cuda, self.capacity, self.n_experts = device, cuda, n_group, n_group
        self.host, self.dev = {}, {}
        for key in ARRAYS:
            n_bytes = n_group * max(_array(store, key)[0].nbytes for store in stores)
            self.host[key] = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=cuda)
            self.dev[key] = torch.empty(n_bytes, dtype=torch.uint8, device=device) if cuda else self.host[key]
        self.copied = torch.cuda.Event() if cuda else None
        self.computed = torch.cuda.Event() if cuda else None

    def fill(self, store, e0: int, stream):
        """Copy experts e0 .. e0 + n_group of `store` in (fewer at the end of the layer)."""
        self.n_experts = min(self.capacity, store.n_experts - e0)
        if self.cuda:
            self.copied.synchronize()  # the previous copy out of the pinned buffer has finished
        sizes = {}
        for key in ARRAYS:
            src = _array(store, key)[e0:e0 + self.n_experts].reshape(-1).view(np.uint8)
            sizes[key] = src.size
            np.copyto(self.host[key][:src.size].numpy(), src)
        if self.cuda:
            with torch.cuda.stream(stream):
                stream.wait_event(self.computed)  # the model is done with what the device buffer held
                for key, n in sizes.items():
                    self.dev[key][:n].copy_(self.host[key][:n], non_blocking=True)
                self.copied.record(stream)

    def matrices(self, store, i: int, dtype) -> tuple[torch.Tensor, ...]:
        """Expert i of the slot as (gate [I, H], up [I, H], down [H, I]) in `dtype`, unpacked on the device."""
        parts = {}
        for key in ARRAYS:
            a = _array(store, key)
            per = a[0].nbytes
            torch_dtype = torch.int16 if a.dtype == np.uint16 else getattr(torch, a.dtype.name)
            parts[key] = self.dev[key][i * per:(i + 1) * per].view(torch_dtype).view(a.shape[1:])
        out = []
        for name in PROJECTIONS:
            n_out, _ = projection_shape(name, store.hidden, store.width)
            out.append(unpack(store.format_of(name).name, parts[f"{name}.values"], parts[f"{name}.scales"], n_out, dtype))
        return tuple(out)


def _array(store, key: str) -> np.ndarray:
    name, part = key.split(".")
    return (store.values if part == "values" else store.scales)[name]


def unpack(fmt_name: str, values: torch.Tensor, scales: torch.Tensor, n_out: int, dtype) -> torch.Tensor:
    """One expert's tiled values and scales (torch tensors, on any device) -> [n_out, n_in] in `dtype`.

    bf16 values [nt, n_in, R] (bf16 bits as int16); int8 values [nt, ng, G, R] and int4 [nt, ng, G/2, R] (two
    codes per byte: low nibble column 2k, high nibble 2k + 1, each minus 8) with scales [nt, ng, R]."""
    if fmt_name == "bf16":
        w = values.view(torch.bfloat16).transpose(1, 2)  # [nt, R, n_in]
        return w.reshape(-1, w.shape[-1])[:n_out].to(dtype)
    if fmt_name == "int8":
        q = values.to(torch.float32)
    elif fmt_name == "int4":
        codes = values.to(torch.int16)  # uint8 has no right shift on every device; int16 does
        q = torch.stack(((codes & 15) - 8, (codes >> 4) - 8), dim=3).to(torch.float32)  # [nt, ng, G/2, 2, R]
        q = q.flatten(2, 3)
    else:
        raise ValueError(f"format {fmt_name} is not unpacked in torch (one of {TILED})")
    w = (q * scales[:, :, None, :]).permute(0, 3, 1, 2)  # [nt, R, ng, G]
    return w.reshape(w.shape[0] * w.shape[1], -1)[:n_out].to(dtype)


def group_size(store, slot_bytes: int) -> int:
    """Experts per slot: as many whole experts of `store` as fit in slot_bytes (at least one)."""
    per_expert = sum(a.nbytes for a in (*store.values.values(), *store.scales.values())) // store.n_experts
    return max(1, slot_bytes // max(per_expert, 1))


__all__ = ["ExpertStreamer", "group_size", "unpack"]
