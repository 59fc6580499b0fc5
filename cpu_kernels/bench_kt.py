"""Peer row for cpu_kernels.bench: kt-kernel's CPU MoE operator on the same shapes, run in kt's own interpreter.

Run by `python -m cpu_kernels.bench --kt-python /path/to/venv/bin/python` as a subprocess of that interpreter
(kt-kernel pins an older torch, so it never enters this project's environment). Uses only numpy and the
kt_kernel_ext extension loaded straight from its .so, because importing the kt_kernel package pulls in torch.
Prints one JSON object: {"impl": "kt-kernel", "format", "threads", "decode_tok_s", "decode_gbps", ...}.
Usage: python bench_kt.py METHOD N_EXPERTS N_THREADS REF_EXPERTS   (METHOD: AMXINT8 or AMXINT4)
"""

import glob
import importlib.util
import json
import os
import sys
import shutil
import tempfile
import time

import numpy as np

H, I, K = 7168, 2048, 8
MIN_SECONDS = 1.5


def find_extension():
    spec = importlib.util.find_spec("kt_kernel")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("kt_kernel is not installed in this interpreter")
    folder = list(spec.submodule_search_locations)[0]
    # kt's best build for this CPU, chosen by kt's own detector (AMX where the CPU has it: the fair peer there);
    # loaded by path like the extension, since importing the package pulls in torch.
    detect_spec = importlib.util.spec_from_file_location("kt_cpu_detect", os.path.join(folder, "_cpu_detect.py"))
    detect = importlib.util.module_from_spec(detect_spec)
    detect_spec.loader.exec_module(detect)
    variant = detect.detect_cpu_features()
    paths = glob.glob(os.path.join(folder, f"_kt_kernel_ext_{variant}.*.so"))
    if not paths:
        raise RuntimeError(f"kt_kernel in {folder} has no {variant} build, the one its detector picks for this CPU")
    path = paths[0]
    ext_spec = importlib.util.spec_from_file_location("kt_kernel_ext", path)
    ext = importlib.util.module_from_spec(ext_spec)
    ext_spec.loader.exec_module(ext)
    return ext, variant


def main(method: str, n_experts: int, n_threads: int, ref_experts: int) -> dict:
    ext, variant = find_extension()
    pool_config = ext.WorkerPoolConfig()
    pool_config.subpool_count = 1
    pool_config.subpool_numa_map = [0]
    pool_config.subpool_thread_count = [n_threads]
    cpu_infer = ext.CPUInfer(pool_config)
    rng = np.random.default_rng(0)
    # bf16 bits with a normal exponent, as in cpu_kernels.bench
    weights = [((rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) & 0x807F) | 0x3C00)
               for shape in ((n_experts, I, H), (n_experts, I, H), (n_experts, H, I))]
    mask = np.zeros(n_experts, np.bool_)
    config = ext.moe.MOEConfig(n_experts, K, H, I, mask.ctypes.data)
    config.layer_idx = 0
    config.pool = cpu_infer.backend_
    config.max_len = 512
    config.save, config.load = True, False
    config.gate_proj, config.up_proj, config.down_proj = (w.ctypes.data for w in weights)
    config.path = tempfile.mkdtemp(prefix="kt-bench-")
    moe = {"AMXINT8": ext.moe.AMXInt8_MOE, "AMXINT4": ext.moe.AMXInt4_MOE}[method](config)
    phys = np.arange(n_experts, dtype=np.int64)
    cpu_infer.submit(moe.load_weights_task(phys.ctypes.data))
    cpu_infer.sync()
    del weights  # kt keeps its own quantized copy

    def forward(n_tokens):
        x = (rng.integers(0, 1 << 16, size=(n_tokens, H), dtype=np.uint16) & 0x807F) | 0x3F00
        ids = np.stack([rng.choice(n_experts, K, replace=False) for _ in range(n_tokens)]).astype(np.int64)
        w = rng.random((n_tokens, K), dtype=np.float32)
        out = np.zeros((n_tokens, H), np.uint16)
        bsz = np.array([n_tokens], np.int32)
        t0 = time.perf_counter()
        cpu_infer.submit(moe.forward_task(bsz.ctypes.data, K, ids.ctypes.data, w.ctypes.data, x.ctypes.data,
                                          out.ctypes.data, False))
        cpu_infer.sync()
        return time.perf_counter() - t0

    forward(1), forward(1)
    s_tok = float("inf")
    for _ in range(3):  # best of three segments, as cpu_kernels.bench.time_decode
        n, total = 0, 0.0
        while n < 4 or total < MIN_SECONDS / 3:
            total += forward(1)
            n += 1
        s_tok = min(s_tok, total / n)
    elem_bytes = 1 if method == "AMXINT8" else 0.5
    row = {"impl": "kt-kernel", "format": f"{method} ({variant})", "threads": n_threads, "decode_tok_s": 1 / s_tok,
           "decode_gbps": K * 3 * H * I * elem_bytes / s_tok / 1e9, "experts": n_experts}
    for t in (32, 128, 512):
        t_here = max(1, t * n_experts // ref_experts)  # as many tokens per expert as the E = ref_experts runs
        secs = min(forward(t_here) for _ in range(1 if t >= 512 else 2))
        row[f"prefill{t}_tok_s"] = t_here / secs
        row[f"prefill{t}_gflops"] = 2 * 3 * H * I * K * t_here / secs / 1e9
    shutil.rmtree(config.path, ignore_errors=True)  # kt writes its quantized copy there
    return row


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
