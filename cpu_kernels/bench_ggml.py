"""Peer row for cpu_kernels.bench: llama.cpp's CPU MoE op on the same GGUF type and shapes, run in llama's interpreter.

Dimension legend: T tokens, H hidden (7168), I expert width (2048), E experts, K top-k (8). ggml shapes list ne0
(the contiguous dimension) first.

Run by `python -m cpu_kernels.bench --llama-python /path/to/venv/bin/python` as a subprocess of an interpreter with
llama-cpp-python built from source (never a dependency of hybrid, never in tests or CI):

    python3 -m venv /work/scratch/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" /work/scratch/llama-venv/bin/pip install --no-binary llama-cpp-python \
        llama-cpp-python numpy gguf==0.19.0

The workload is the one cpu_kernels.bench times, built the way llama.cpp's build_moe_ffn (llama-graph.cpp) builds
a MoE FFN: ffn_gate_exps / ffn_up_exps [H, I, E] and ffn_down_exps [I, H, E] in TYPE, filled with random valid
blocks (formats/gguf/samples.py: the speed of a block kernel does not depend on the values), and one graph

    gate, up = mul_mat_id(gate_exps, x, ids), mul_mat_id(up_exps, x, ids)    x [H, 1, T], ids int32 [K, T]
    y = mul(mul_mat_id(down_exps, swiglu_split(gate, up), ids), weights)     [H, K, T] * [1, K, T]
    out = y[:, 0, :] + ... + y[:, K-1, :]                                    [H, T]

computed by the CPU backend on N threads, with fresh random expert ids for every decoded token (the E-expert
working set is far beyond L3). Each expert tensor goes where llama.cpp's loader would put it by default
(use_extra_bufts): into the CPU_REPACK buffer (interleaved rows for the gemv/gemm kernels of this ISA) when the CPU
device takes MUL_MAT_ID on it so, else the plain CPU buffer; the row says which were repacked. Timed: setting x,
ids and weights and the graph compute (which includes quantizing x to Q8_K / Q8_0); not timed: building the
graph, filling and repacking the weights.

Prints one JSON object: {"impl": "llama.cpp", "format", "threads", "decode_tok_s", "decode_gbps", "repacked",
"prefill{T}_tok_s", "prefill{T}_gflops"}.
Usage: python bench_ggml.py TYPE N_EXPERTS N_THREADS PREFILL_TOKENS   (PREFILL_TOKENS: "32,128" or "-")

`Ggml` (the ctypes bindings) also serves benchmarks/ggml_ref.py, the oracle that quantizes with ggml. Signatures
follow ggml.h / ggml-cpu.h / ggml-backend.h / ggml-alloc.h of llama-cpp-python 0.3.36's llama.cpp; only opaque
pointers cross the boundary (plus ggml_init_params, three plain fields), so no ggml_tensor layout is assumed.
"""

import ctypes
import importlib.util
import json
import os
import sys
import time
from ctypes import POINTER, c_bool, c_char_p, c_float, c_int, c_int64, c_size_t, c_void_p
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

H, I, K = 7168, 2048, 8
MIN_SECONDS = 1.5  # as cpu_kernels.bench: each decode measurement runs at least this long
F32, I32 = int(GGMLQuantizationType.F32), int(GGMLQuantizationType.I32)
P = c_void_p


class _InitParams(ctypes.Structure):  # struct ggml_init_params
    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


# name -> (restype, argtypes...); bound as attributes of Ggml without the "ggml_" prefix
SIGNATURES = {
    "ggml_init": (P, _InitParams), "ggml_free": (None, P), "ggml_tensor_overhead": (c_size_t,),
    "ggml_graph_overhead": (c_size_t,), "ggml_new_tensor_2d": (P, P, c_int, c_int64, c_int64),
    "ggml_new_tensor_3d": (P, P, c_int, c_int64, c_int64, c_int64), "ggml_mul_mat": (P, P, P, P),
    "ggml_mul_mat_id": (P, P, P, P, P), "ggml_swiglu_split": (P, P, P, P), "ggml_mul": (P, P, P, P),
    "ggml_add": (P, P, P, P), "ggml_view_2d": (P, P, P, c_int64, c_int64, c_size_t, c_size_t),
    "ggml_new_graph": (P, P), "ggml_build_forward_expand": (None, P, P), "ggml_row_size": (c_size_t, c_int, c_int64),
    "ggml_quantize_init": (None, c_int), "ggml_quantize_requires_imatrix": (c_bool, c_int),
    "ggml_quantize_chunk": (c_size_t, c_int, POINTER(c_float), P, c_int64, c_int64, c_int64, POINTER(c_float)),
    "ggml_cpu_init": (None,), "ggml_backend_cpu_init": (P,), "ggml_backend_cpu_set_n_threads": (None, P, c_int),
    "ggml_backend_free": (None, P), "ggml_backend_graph_compute": (c_int, P, P),
    "ggml_backend_cpu_buffer_type": (P,), "ggml_backend_alloc_ctx_tensors_from_buft": (P, P, P),
    "ggml_backend_buffer_free": (None, P), "ggml_backend_tensor_set": (None, P, P, c_size_t, c_size_t),
    "ggml_backend_tensor_get": (None, P, P, c_size_t, c_size_t), "ggml_backend_dev_by_type": (P, c_int),
    "ggml_backend_dev_backend_reg": (P, P), "ggml_backend_reg_get_proc_address": (P, P, c_char_p),
    "ggml_backend_buft_name": (c_char_p, P), "ggml_backend_dev_supports_op": (c_bool, P, P),
    "ggml_log_set": (None, P, P),
}


_LOG_CB = ctypes.CFUNCTYPE(None, c_int, c_char_p, P)


def lib_dir() -> Path:
    """Where libggml*.so are: $HYBRID_GGML_LIB_DIR, else llama_cpp/lib of this interpreter's llama-cpp-python."""
    if os.environ.get("HYBRID_GGML_LIB_DIR"):
        return Path(os.environ["HYBRID_GGML_LIB_DIR"])
    spec = importlib.util.find_spec("llama_cpp")  # find_spec, not import: importing would load libllama too
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("needs llama-cpp-python built from source (see cpu_kernels/bench_ggml.py) or "
                          "HYBRID_GGML_LIB_DIR pointing at libggml*.so")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


class Ggml:
    """The ggml C API through ctypes (functions as attributes: `g.mul_mat_id(...)`), the CPU device and backend
    buffer types, and llama.cpp's CPU_REPACK buffer type (None when this build has none)."""

    def __init__(self, directory: Path | None = None):
        self.dir = directory or lib_dir()
        # base first: the others resolve their ggml_* symbols against it
        libs = [ctypes.CDLL(str(self.dir / n)) for n in ("libggml-base.so", "libggml-cpu.so", "libggml.so")]
        for name, (restype, *argtypes) in SIGNATURES.items():
            lib = next((lib for lib in libs if hasattr(lib, name)), None)
            if lib is None:
                raise ImportError(f"{name} not found in {self.dir}: ggml too old or too new for bench_ggml.py")
            f = getattr(lib, name)
            f.restype, f.argtypes = restype, argtypes
            setattr(self, name.removeprefix("ggml_"), f)
        self._log_pass = False
        self._log_cb = _LOG_CB(self._log)  # kept alive here: ggml calls it for the life of the process
        self.log_set(ctypes.cast(self._log_cb, P), None)
        self.cpu_init()  # fills the fp16 tables the CPU kernels read; idempotent
        self.cpu_dev = self.backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        self.cpu_buft = self.backend_cpu_buffer_type()
        self.repack_buft = self._extra_buft(b"CPU_REPACK")

    def _log(self, level, text, _user):
        # keep WARN/ERROR and their CONT lines (level 5); drop INFO such as CPU_REPACK's "repack tensor ..." lines
        if level != 5:
            self._log_pass = level >= 3
        if self._log_pass:
            os.write(2, text)

    def _extra_buft(self, name: bytes):
        """The CPU device's extra buffer type `name`. Only CPU_REPACK is ever taken: AMX's has crashed on
        deepseek2 MoE graphs (../shared/gguf-notes.md), and KleidiAI etc. are not x86."""
        get = self.backend_reg_get_proc_address(self.backend_dev_backend_reg(self.cpu_dev),
                                                b"ggml_backend_dev_get_extra_bufts")
        if not get:
            return None
        bufts = ctypes.CFUNCTYPE(POINTER(P), P)(get)(self.cpu_dev)  # NULL-terminated array
        i = 0
        while bufts and bufts[i]:
            if self.backend_buft_name(bufts[i]) == name:
                return bufts[i]
            i += 1
        return None

    def context(self, n_tensors: int):
        """A no_alloc context for n_tensors tensor headers and one graph; its tensors get memory from a buffer."""
        size = n_tensors * self.tensor_overhead() + self.graph_overhead() + 4096
        return self.init(_InitParams(size, None, True))

    def cpu_backend(self, n_threads: int):
        backend = self.backend_cpu_init()
        self.backend_cpu_set_n_threads(backend, n_threads)
        return backend


def _random_blocks():
    """formats/gguf/samples.py's random_blocks, loaded by path: the cpu_kernels package needs numba, which
    llama's interpreter lacks, and samples.py needs only numpy and gguf."""
    path = Path(__file__).resolve().parent / "formats" / "gguf" / "samples.py"
    spec = importlib.util.spec_from_file_location("gguf_samples", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.random_blocks


class MoELayer:
    """E experts of one GGUF type as llama.cpp loads ffn_{gate,up,down}_exps: gate/up [H, I, E], down [I, H, E],
    each in CPU_REPACK where the CPU device takes MUL_MAT_ID on it from there (llama.cpp's default), else CPU."""

    def __init__(self, g: Ggml, type_name: str, n_experts: int, rng):
        self.g, self.buffers, self.contexts, self.repacked = g, [], [], []
        random_blocks, code = _random_blocks(), int(GGMLQuantizationType[type_name])
        self.tensors = {}
        for name, (n_out, n_in) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            blocks = random_blocks(type_name, n_experts * n_out, n_in, rng)  # [E * n_out, B]: expert outermost
            t, repacked = self._place(code, n_in, n_out, n_experts)
            g.backend_tensor_set(t, blocks.ctypes.data, 0, blocks.nbytes)  # the whole tensor: CPU_REPACK asks it
            self.tensors[name] = t
            if repacked:
                self.repacked.append(name)
            del blocks

    def _place(self, code, n_in, n_out, n_experts):
        g = self.g
        for buft in ([g.repack_buft] if g.repack_buft else []) + [g.cpu_buft]:
            ctx = g.context(1)
            t = g.new_tensor_3d(ctx, code, n_in, n_out, n_experts)
            buf = g.backend_alloc_ctx_tensors_from_buft(ctx, buft)
            # llama.cpp's own test before putting a weight in a buffer type: does the device take the op so?
            probe = g.context(3)
            op = g.mul_mat_id(probe, t, g.new_tensor_3d(probe, F32, n_in, 1, 1), g.new_tensor_2d(probe, I32, K, 1))
            ok = bool(g.backend_dev_supports_op(g.cpu_dev, op))
            g.free(probe)
            if ok or buft == g.cpu_buft:
                self.buffers.append(buf)
                self.contexts.append(ctx)
                return t, buft != g.cpu_buft
            g.backend_buffer_free(buf)
            g.free(ctx)

    def close(self):
        for b in self.buffers:
            self.g.backend_buffer_free(b)
        for c in self.contexts:
            self.g.free(c)


class MoEGraph:
    """build_moe_ffn's graph (module docstring) for T tokens over `layer`, with its own activations buffer."""

    def __init__(self, layer: MoELayer, n_tokens: int, backend):
        g, w = layer.g, layer.tensors
        self.g, self.backend = g, backend
        self.ctx = g.context(3 * K + 16)
        self.x = g.new_tensor_3d(self.ctx, F32, H, 1, n_tokens)
        self.ids = g.new_tensor_2d(self.ctx, I32, K, n_tokens)
        self.weights = g.new_tensor_3d(self.ctx, F32, 1, K, n_tokens)
        gate = g.mul_mat_id(self.ctx, w["gate_proj"], self.x, self.ids)  # [I, K, T]
        up = g.mul_mat_id(self.ctx, w["up_proj"], self.x, self.ids)
        y = g.mul_mat_id(self.ctx, w["down_proj"], g.swiglu_split(self.ctx, gate, up), self.ids)  # [H, K, T]
        y = g.mul(self.ctx, y, self.weights)
        row_bytes = H * 4  # y is float32 [H, K, T], contiguous: nb1 = H * 4, nb2 = H * K * 4
        out = g.view_2d(self.ctx, y, H, n_tokens, K * row_bytes, 0)
        for k in range(1, K):
            out = g.add(self.ctx, out, g.view_2d(self.ctx, y, H, n_tokens, K * row_bytes, k * row_bytes))
        self.out, self.n_tokens = out, n_tokens
        self.graph = g.new_graph(self.ctx)
        g.build_forward_expand(self.graph, out)
        self.buf = g.backend_alloc_ctx_tensors_from_buft(self.ctx, g.cpu_buft)

    def __call__(self, x, ids, weights) -> float:
        """Seconds for one call on x float32 [T, H], ids int32 [T, K], weights float32 [T, K]."""
        g = self.g
        t0 = time.perf_counter()
        for tensor, a in ((self.x, x), (self.ids, ids), (self.weights, weights)):
            g.backend_tensor_set(tensor, a.ctypes.data, 0, a.nbytes)
        status = g.backend_graph_compute(self.backend, self.graph)
        if status != 0:
            raise RuntimeError(f"ggml_backend_graph_compute returned status {status}")
        return time.perf_counter() - t0

    def output(self) -> np.ndarray:
        """The last call's result, float32 [T, H]."""
        out = np.empty((self.n_tokens, H), np.float32)
        self.g.backend_tensor_get(self.out, out.ctypes.data, 0, out.nbytes)
        return out

    def close(self):
        self.g.backend_buffer_free(self.buf)
        self.g.free(self.ctx)


def random_batch(rng, n_tokens: int, n_experts: int):
    ids = np.stack([rng.choice(n_experts, K, replace=False) for _ in range(n_tokens)]).astype(np.int32)
    return rng.standard_normal((n_tokens, H), dtype=np.float32), ids, rng.random((n_tokens, K), dtype=np.float32)


def decode_seconds(graph: MoEGraph, rng, n_experts: int) -> float:
    """Seconds per token, fresh random experts per call: best of three segments (as cpu_kernels.bench.time_decode)."""
    batches = [random_batch(rng, 1, n_experts) for _ in range(200)]
    graph(*batches[0]), graph(*batches[1])
    best, n = float("inf"), 0
    for _ in range(3):
        count, total = 0, 0.0
        while count < 4 or total < MIN_SECONDS / 3:
            total += graph(*batches[n % len(batches)])
            n, count = n + 1, count + 1
        best = min(best, total / count)
    return best


def main(type_name: str, n_experts: int, n_threads: int, prefill_tokens) -> dict:
    g = Ggml()
    rng = np.random.default_rng(0)
    layer = MoELayer(g, type_name, n_experts, rng)
    backend = g.cpu_backend(n_threads)
    qk, bb = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    expert_bytes = 3 * H * I // qk * bb
    graph = MoEGraph(layer, 1, backend)
    s_tok = decode_seconds(graph, rng, n_experts)
    graph.close()
    row = {"impl": "llama.cpp", "format": type_name, "threads": n_threads, "decode_tok_s": 1 / s_tok,
           "decode_gbps": K * expert_bytes / s_tok / 1e9, "repacked": layer.repacked}
    for t in prefill_tokens:
        graph = MoEGraph(layer, t, backend)
        batch = random_batch(rng, t, n_experts)
        secs = min(graph(*batch) for _ in range(1 if t >= 512 else 2))  # as cpu_kernels.bench.time_prefill
        graph.close()
        row[f"prefill{t}_tok_s"], row[f"prefill{t}_gflops"] = t / secs, 2 * 3 * H * I * K * t / secs / 1e9
    g.backend_free(backend)
    layer.close()
    return row


if __name__ == "__main__":
    tokens = [] if sys.argv[4] == "-" else [int(t) for t in sys.argv[4].split(",")]
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), tokens)))
