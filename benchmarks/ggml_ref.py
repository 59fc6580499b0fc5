"""llama.cpp's own quantizers and CPU mat-vec, through ctypes, as an outside oracle and benchmark peer.

Not a dependency of hybrid and never used in CI: it needs a scratch llama-cpp-python built from source, e.g.

    python3 -m venv /work/scratch/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON" /work/scratch/llama-venv/bin/pip install --no-binary llama-cpp-python \
        llama-cpp-python numpy gguf==0.19.0
    /work/scratch/llama-venv/bin/python benchmarks/ggml_ref.py        # self-check

The ggml libraries are found in llama_cpp's package directory (llama_cpp/lib), or in $HYBRID_GGML_LIB_DIR. The
ctypes bindings are cpu_kernels/bench_ggml.py's `Ggml` (the MoE peer row of `hybrid bench --llama-python` runs
the same ones), loaded by path: the cpu_kernels package itself needs numba, which llama's interpreter lacks.
Signatures follow ggml.h / ggml-cpu.h / ggml-backend.h / ggml-alloc.h of llama-cpp-python 0.3.36's vendored
llama.cpp; only opaque pointers cross the boundary, so no ggml_tensor layout is assumed here.
"""

import importlib.util
import os
import time
from ctypes import POINTER, c_float
from pathlib import Path

import numpy as np

try:
    from gguf import GGMLQuantizationType
except ImportError as e:  # one clear line rather than a traceback from deep inside
    raise ImportError("benchmarks/ggml_ref.py needs the `gguf` package (pip install gguf==0.19.0)") from e


def _load_bench_ggml():
    path = Path(__file__).resolve().parents[1] / "cpu_kernels" / "bench_ggml.py"
    spec = importlib.util.spec_from_file_location("bench_ggml", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_ggml = _load_bench_ggml()
_g = bench_ggml.Ggml()
_DIR, _REPACK = _g.dir, _g.repack_buft
_F32 = bench_ggml.F32


def qtype(type_name: str) -> int:
    return int(GGMLQuantizationType[type_name])  # gguf's enum values are ggml's


def quantize(w: np.ndarray, type_name: str) -> np.ndarray:
    """ggml's reference quantizer (the one llama-quantize uses), rows of n_per_row floats -> packed bytes."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    n_rows, n_per_row = w.shape
    t = qtype(type_name)
    out = np.empty((n_rows, _g.row_size(t, n_per_row)), dtype=np.uint8)
    _g.quantize_init(t)
    # IQ2_XXS / IQ2_XS / IQ1_S abort without one; all-ones = "every column equally important"
    imat = np.ones(n_per_row, np.float32) if _g.quantize_requires_imatrix(t) else None
    f32p = POINTER(c_float)
    n = _g.quantize_chunk(t, w.ctypes.data_as(f32p), out.ctypes.data, 0, n_rows, n_per_row,
                          imat.ctypes.data_as(f32p) if imat is not None else None)
    assert n == out.nbytes, (n, out.nbytes)
    return out


class _MulMat:
    """y = W @ x.T as one ggml graph on the CPU backend. Weight and activations live in separate ggml contexts so
    the weight can sit in a different buffer type (CPU_REPACK) from the activations, as in llama.cpp."""

    def __init__(self, wq, t, n_rows, n_per_row, n_tokens, n_threads, buft):  # wq None: probe only
        self.ctx_w, self.ctx_g = _g.context(1), _g.context(2)
        self.w = _g.new_tensor_2d(self.ctx_w, t, n_per_row, n_rows)  # ggml: ne0 = contiguous (row) dimension
        self.x = _g.new_tensor_2d(self.ctx_g, _F32, n_per_row, n_tokens)
        self.y = _g.mul_mat(self.ctx_g, self.w, self.x)  # ne = [n_rows, n_tokens]
        self.graph = _g.new_graph(self.ctx_g)
        _g.build_forward_expand(self.graph, self.y)
        self.buf_w = _g.backend_alloc_ctx_tensors_from_buft(self.ctx_w, buft)
        self.buf_g = _g.backend_alloc_ctx_tensors_from_buft(self.ctx_g, _g.cpu_buft)
        # llama.cpp's own test before putting a weight in an extra buffer type: does the device take this op so?
        self.ok = bool(_g.backend_dev_supports_op(_g.cpu_dev, self.y))
        if self.ok and wq is not None:
            _g.backend_tensor_set(self.w, wq.ctypes.data, 0, wq.nbytes)  # CPU_REPACK re-lays the blocks out here
        self.backend = _g.backend_cpu_init()
        _g.backend_cpu_set_n_threads(self.backend, n_threads)

    def __call__(self, x):
        _g.backend_tensor_set(self.x, x.ctypes.data, 0, x.nbytes)
        st = _g.backend_graph_compute(self.backend, self.graph)
        if st != 0:
            raise RuntimeError(f"ggml_backend_graph_compute returned status {st}")

    def result(self, n_tokens, n_rows):
        y = np.empty((n_tokens, n_rows), np.float32)
        _g.backend_tensor_get(self.y, y.ctypes.data, 0, y.nbytes)
        return y

    def close(self):
        _g.backend_free(self.backend)
        for b in (self.buf_w, self.buf_g):
            if b:
                _g.backend_buffer_free(b)
        _g.free(self.ctx_w)
        _g.free(self.ctx_g)


def repacks(type_name: str, n_rows: int, n_per_row: int) -> bool:
    """Whether llama.cpp on this CPU would run this weight from the CPU_REPACK layout (decided by ISA and shape)."""
    if _REPACK is None:
        return False
    mm = _MulMat(None, qtype(type_name), n_rows, n_per_row, 1, 1, _REPACK)
    ok = mm.ok
    mm.close()
    return ok


def mul_mat_time(wq: np.ndarray, type_name: str, x: np.ndarray, n_threads: int = 0, repeats: int = 10,
                 repack: bool = True):
    """Time ggml's CPU mul_mat of a quantized weight [n_rows, bytes_per_row] by float activations
    [n_tokens, n_per_row]; returns (y [n_tokens, n_rows] of the last call, median seconds per call).

    repack=True mirrors what llama.cpp runs by default (use_extra_bufts): types with a repacked kernel for this
    ISA (on AVX2: Q4_0, Q4_K, IQ4_NL, MXFP4, ...) use it, the rest fall back to the plain layout. repack=False
    always times the plain vec_dot kernels. Timed: setting x, graph compute (incl. ggml's per-call plan and x's
    quantization to Q8_0/Q8_K); not timed: graph building, weight upload/repack."""
    t = qtype(type_name)
    x = np.ascontiguousarray(x, dtype=np.float32)
    wq = np.ascontiguousarray(wq, dtype=np.uint8)
    n_tokens, n_per_row = x.shape
    n_rows = wq.shape[0]
    assert wq.shape[1] == _g.row_size(t, n_per_row), "weight bytes_per_row does not match x's n_per_row"
    n_threads = n_threads or os.cpu_count()
    mm = None
    if repack and _REPACK is not None:
        mm = _MulMat(wq, t, n_rows, n_per_row, n_tokens, n_threads, _REPACK)
        if not mm.ok:
            mm.close()
            mm = None
    if mm is None:
        mm = _MulMat(wq, t, n_rows, n_per_row, n_tokens, n_threads, _g.cpu_buft)
        assert mm.ok, f"CPU backend does not support mul_mat for {type_name}"
    try:
        mm(x)  # warm-up: first touch of the work buffer, OpenMP thread start
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            mm(x)
            times.append(time.perf_counter() - t0)
        return mm.result(n_tokens, n_rows), float(np.median(times))
    finally:
        mm.close()


def moe_check(type_name: str, n_experts: int = 8, n_tokens: int = 2) -> tuple[float, list]:
    """(relative error, projections repacked) of bench_ggml's MoE graph (the peer row `hybrid bench
    --llama-python` times) against the MoE formula on gguf-py's dequantization of the same random blocks."""
    from gguf.quants import dequantize

    H, I = bench_ggml.H, bench_ggml.I
    shapes = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    random_blocks, rng = bench_ggml._random_blocks(), np.random.default_rng(0)  # the draws MoELayer makes
    blocks = {name: random_blocks(type_name, n_experts * n_out, n_in, rng) for name, (n_out, n_in) in shapes.items()}
    layer = bench_ggml.MoELayer(_g, type_name, n_experts, np.random.default_rng(0))
    backend = _g.cpu_backend(os.cpu_count())
    graph = bench_ggml.MoEGraph(layer, n_tokens, backend)
    x, ids, weights = bench_ggml.random_batch(np.random.default_rng(1), n_tokens, n_experts)
    graph(x, ids, weights)
    got = graph.output()
    graph.close(), _g.backend_free(backend), layer.close()
    ref = np.zeros_like(got)
    for e in np.unique(ids):
        w = {n: dequantize(b.reshape(n_experts, shapes[n][0], -1)[e], GGMLQuantizationType[type_name])
             for n, b in blocks.items()}
        for t, k in zip(*np.nonzero(ids == e)):
            gate, up = w["gate_proj"] @ x[t], w["up_proj"] @ x[t]
            silu = gate * 0.5 * (1 + np.tanh(gate / 2))  # gate * sigmoid(gate), no overflow for large |gate|
            ref[t] += weights[t, k] * (w["down_proj"] @ (silu * up))
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), layer.repacked


if __name__ == "__main__":
    from gguf.quants import dequantize

    rng = np.random.default_rng(0)
    types = ["Q8_0", "Q4_K", "Q2_K", "IQ2_XXS", "TQ1_0"]
    print(f"ggml libs: {_DIR}  CPU_REPACK available: {_REPACK is not None}")
    w = rng.standard_normal((256, 2048), dtype=np.float32)
    x = rng.standard_normal((3, 2048), dtype=np.float32)
    ok = True
    for name in types:
        q = quantize(w, name)
        ref = dequantize(q, GGMLQuantizationType[name]).reshape(w.shape) @ x.T  # [n_rows, n_tokens]
        y, _ = mul_mat_time(q, name, x, repeats=1, repack=False)
        y_rp, _ = mul_mat_time(q, name, x, repeats=1, repack=True)
        rel = float(np.linalg.norm(y.T - ref) / np.linalg.norm(ref))
        rel_rp = float(np.linalg.norm(y_rp - y) / np.linalg.norm(y))  # same Q8 activations: should be ~fp32 eps
        good = rel < 1e-2 and rel_rp < 1e-4
        ok &= good
        print(f"{name:8s} rel err vs gguf dequant @ x: {rel:.2e}   repacked vs plain: {rel_rp:.1e}"
              f"{' (repacked)' if repacks(name, *w.shape) else ' (no repack)'}  {'ok' if good else 'FAIL'}")
    # one token through a [2048 out, 7168 in] weight: one Kimi-K2 expert's gate (or up) projection. The same
    # <=15 MiB weight is re-read each repeat, so on a CPU with a large L3 this is cache-warm, not DRAM-bound.
    n_rows, n_per_row = 2048, 7168
    w = rng.standard_normal((n_rows, n_per_row), dtype=np.float32)
    x1 = rng.standard_normal((1, n_per_row), dtype=np.float32)
    print(f"\nmul_mat {n_rows}x{n_per_row} x 1 token, {os.cpu_count()} threads, median of 50:")
    for name in types:
        q = quantize(w, name)
        _, s_plain = mul_mat_time(q, name, x1, repeats=50, repack=False)
        line = f"{name:8s} {q.nbytes / 2**20:6.2f} MiB  plain {s_plain * 1e6:8.1f} us ({q.nbytes / s_plain / 1e9:5.1f} GB/s)"
        if repacks(name, n_rows, n_per_row):
            _, s_rp = mul_mat_time(q, name, x1, repeats=50, repack=True)
            line += f"  repacked {s_rp * 1e6:8.1f} us ({q.nbytes / s_rp / 1e9:5.1f} GB/s)"
        print(line)
    # the MoE decode graph of the benchmark's peer row, at K2 shapes: Q8_K activations twice (x and the SiLU
    # product) give ~1 % against float math
    for name in ("Q4_K", "IQ2_XXS"):
        rel, repacked = moe_check(name)
        ok &= rel < 3e-2
        print(f"MoE graph {name:8s} rel err vs gguf dequant: {rel:.2e} (repacked: {repacked or 'none'})"
              f"  {'ok' if rel < 3e-2 else 'FAIL'}")
    print("self-check", "passed" if ok else "FAILED")
    raise SystemExit(0 if ok else 1)
