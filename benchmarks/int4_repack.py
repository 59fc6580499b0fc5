"""K2-Thinking's INT4 experts into the int4-g32 store by repacking, against K2-Instruct's FP8 dequantize + quantize.

    python benchmarks/int4_repack.py [--repeat 5] [--json out.json]

One routed expert at K2's widths (gate and up [2048, 7168], down [7168, 2048]), per expert as `hybrid convert` and
the loader handle it, in memory (no disk): the repack (hybrid/read/int4.py `to_store`: byte moves into row tiles and
bf16 -> float32 scales) from pack-quantized words, and the FP8 path (convert.py `_expert_matrix`: fp8 x block scale
rounded to bf16, then cpu_kernels' int4 quantizer) into int4-g128 (convert's default for FP8) and int4-g32. Prints
ms per expert, experts/s and checkpoint bytes read per second for each, best of `--repeat`, and the ratios.
"""

import argparse
import json
import platform
import subprocess
import time

import numpy as np
import torch

from cpu_kernels.floats import dequantize_fp8, f32_to_bf16
from cpu_kernels.formats import parse_format
from cpu_kernels.quantize import quantize_matrix
from hybrid.read import fp8, int4

H, I = 7168, 2048  # K2's hidden size and expert width
SHAPES = ((I, H), (I, H), (H, I))  # gate, up, down


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def sources(seed=0):
    """One expert as both checkpoints store it: pack-quantized INT4 parts and block-FP8 (uint8 bytes, scales)."""
    gen = torch.Generator().manual_seed(seed)
    packed, fp8s = [], []
    for shape in SHAPES:
        w = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        p, s, _ = int4.quantize(w, 32)
        packed.append((p.numpy(), s.view(torch.int16).numpy().view(np.uint16)))
        q, scale_inv = fp8.quantize(w)
        fp8s.append((q.view(torch.uint8).numpy(), scale_inv.numpy()))
    return packed, fp8s


def best_s(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    packed, fp8s = sources()
    paths = {
        "INT4 repack -> int4-g32": (lambda: [int4.to_store(p, s, 32) for p, s in packed],
                                    sum(p.nbytes + s.nbytes + 16 for p, s in packed)),
    }
    for fmt in ("int4-g128", "int4-g32"):
        f = parse_format(fmt)
        paths[f"FP8 dequant + quantize -> {fmt}"] = (
            lambda f=f: [quantize_matrix(f32_to_bf16(dequantize_fp8(q, s)), f) for q, s in fp8s],
            sum(q.nbytes + s.nbytes for q, s in fp8s))
    rows = {}
    for name, (fn, source_bytes) in paths.items():
        s = best_s(fn, args.repeat)
        rows[name] = {"ms_per_expert": 1e3 * s, "experts_per_s": 1 / s, "source_gbps": source_bytes / s / 1e9}
    base = rows["INT4 repack -> int4-g32"]["experts_per_s"]
    print(f"CPU: {cpu_model()}, one thread (numpy), K2 widths H {H} x I {I}, best of {args.repeat}")
    print(f"{'path':<36} {'ms/expert':>10} {'experts/s':>10} {'GB/s read':>10} {'repack is':>10}")
    for name, r in rows.items():
        ratio = base / r["experts_per_s"]
        print(f"{name:<36} {r['ms_per_expert']:>10.1f} {r['experts_per_s']:>10.1f} {r['source_gbps']:>10.2f} "
              f"{ratio:>9.1f}x")
    n_experts = 384 * 60
    print(f"all {n_experts} K2 experts: repack {n_experts / base / 60:.1f} min, FP8 -> int4-g128 "
          f"{n_experts / rows['FP8 dequant + quantize -> int4-g128']['experts_per_s'] / 60:.1f} min (compute only)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "repeat": args.repeat, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
