"""Hardware: what the planner plans for, detected here or described for a machine one does not have.

Every value can come from detection, a hardware YAML (`hybrid plan --hardware hw.yaml`, also what
`hybrid profile` writes with measured bandwidths), or flags. Memory sizes are binary (GiB), as DIMMs and GPUs
are sold: "768GB" of RAM means 768 GiB. Bandwidths are achievable read rates in GB/s (1e9 bytes/s).

GPUs are numbered as torch.cuda numbers them; GPU i is the plan device `gpu_device(i)`. The planner plans for
the first (one GPU today: attention, cache and the GPU weights on it); the others are described, not used.

hardware YAML keys (all optional but gpu/ram when not detected):
  gpu: "RTX 4090"            # a GPU_TABLE name, or a mapping {name, memory_gib, bandwidth_gbps, bf16_tflops,
                             # pcie_gbps}, or a list of those for several GPUs, in device order
  gpu_memory_gib: 24         # the first GPU's memory, overriding the table
  ram_gib: 768               # total system memory
  ram_available_gib: 740     # what the runtime may use (default: total minus RAM_RESERVE_GIB)
  memory: DDR5-4800x8        # type and channels -> ram_bandwidth_gbps, unless given
  ram_bandwidth_gbps: 250
  cores: 32                  # physical cores
  numa_nodes: 1
  cpu_features: [avx2, avx512f]
  cpu_gflops: 2000           # achievable fp32 FMA rate of all cores
  disk_read_gbps: 6          # for experts memory-mapped beyond RAM
  layer_overhead_us: 60      # fixed cost per layer per token (launches, sync, Python), measured by the profiler
  cpu_kernel_efficiency: 0.85  # share of ram bandwidth the expert kernels reach (cpu_kernels.bench)
  cpu_torch_efficiency: 0.4    # share of it CPU torch reaches on bf16 projections (no-GPU plans)
"""

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from hybrid.errors import PlanError

# name: (memory GiB, memory bandwidth GB/s, dense bf16 TFLOP/s, achievable PCIe GB/s)
GPU_TABLE = {
    "RTX 3060": (12, 360, 25, 12), "RTX 3090": (24, 936, 71, 24), "RTX 4070 Ti": (12, 504, 80, 24),
    "RTX 4080": (16, 717, 97, 24), "RTX 4090": (24, 1008, 165, 24), "RTX 5090": (32, 1792, 209, 48),
    "RTX A6000": (48, 768, 155, 24), "RTX 6000 Ada": (48, 960, 365, 24), "L40S": (48, 864, 362, 24),
    "RTX PRO 6000": (96, 1792, 500, 48), "A100 40GB": (40, 1555, 312, 24), "A100 80GB": (80, 2039, 312, 24),
    "H100 PCIe": (80, 2000, 756, 48), "H100": (80, 3350, 989, 48), "H200": (141, 4800, 989, 48),
    "H20": (96, 4000, 148, 48),
}
MEMORY_MTS = {"DDR4-2400": 2400, "DDR4-2666": 2666, "DDR4-2933": 2933, "DDR4-3200": 3200, "DDR5-4800": 4800,
              "DDR5-5600": 5600, "DDR5-6000": 6000, "DDR5-6400": 6400}
MEMORY_EFFICIENCY = 0.75  # a read stream reaches ~75 % of the channels' theoretical peak
RAM_RESERVE_GIB = 8.0  # OS, Python, torch and page tables
FLOPS_PER_CYCLE = {"avx512f": 32, "avx2": 16}  # fp32 per core per cycle with two FMA units
ASSUMED_GHZ = 2.5
COMPUTE_EFFICIENCY = 0.5


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bandwidth_gbps: float
    bf16_tflops: float
    pcie_gbps: float = 24.0


def gpu_device(index: int) -> str:
    """The plan (and torch) device name of GPU number `index`: the one place that spells it."""
    return f"cuda:{index}"


def gpu_index(device: str) -> int | None:
    """GPU number of a plan device name (`gpu_device`'s inverse); None for cpu or anything else."""
    m = re.fullmatch(r"cuda:(\d+)", device)
    return int(m[1]) if m else None


def device_here(device: str, n_gpus: int) -> str:
    """Where a plan device runs on a machine with `n_gpus` GPUs: the GPU itself when the machine has it, else
    the CPU. Plan files are shared and written for other machines, so a GPU this one lacks is not an error:
    `hybrid plan --check` and the loader both apply this rule, and the check says so in one note."""
    index = gpu_index(device)
    return device if index is None or index < n_gpus else "cpu"


@dataclass(frozen=True)
class Hardware:
    ram_gib: float
    ram_available_gib: float
    cores: int
    gpus: tuple[GPU, ...] = ()  # in device order: gpus[i] is gpu_device(i)
    numa_nodes: int = 1
    cpu_features: tuple[str, ...] = ("avx2",)
    ram_bandwidth_gbps: float = 50.0
    cpu_gflops: float = 0.0  # 0: derived from cores and features
    disk_read_gbps: float = 3.0
    layer_overhead_us: float = 60.0
    cpu_kernel_efficiency: float = 0.85
    cpu_torch_efficiency: float = 0.4
    source: str = "flags"
    notes: tuple[str, ...] = field(default=())

    @property
    def gpu(self) -> GPU | None:
        """The GPU the planner plans for: the first one (None without a GPU)."""
        return self.gpus[0] if self.gpus else None

    @property
    def gpu_device(self) -> str | None:
        """The plan device name of `gpu`."""
        return gpu_device(0) if self.gpus else None

    @property
    def cpu_flops(self) -> float:
        if self.cpu_gflops:
            return self.cpu_gflops * 1e9
        per_cycle = FLOPS_PER_CYCLE["avx512f" if "avx512f" in self.cpu_features else "avx2"]
        return self.cores * ASSUMED_GHZ * 1e9 * per_cycle * COMPUTE_EFFICIENCY


# Hardware values a flag or a hardware YAML may give, and what each must be: a whole number (cores, nodes), or a
# finite number above 0, or one that may also be 0 (0 GiB available; cpu_gflops 0: derive it from the cores).
WHOLE_KEYS = {"cores", "numa_nodes"}
MAY_BE_ZERO = {"ram_available_gib", "cpu_gflops", "layer_overhead_us"}


def checked_number(what: str, key: str, value):
    """`value` for the Hardware field or GPU key `key`, refused in one line naming `what` (a flag, or a file and
    its key) when it is not a number the planner can divide by: the one rule for flags and hardware YAML."""
    whole = key in WHOLE_KEYS
    number = isinstance(value, int) if whole else isinstance(value, (int, float))
    if isinstance(value, bool) or not number or not math.isfinite(value) or value < 0 or (
            value == 0 and key not in MAY_BE_ZERO):
        kind = "a whole number, 1 or more" if whole else (
            "a number, 0 or more" if key in MAY_BE_ZERO else "a number above 0")
        raise PlanError(f"{what} must be {kind}, got {value!r}")
    return value


def parse_size_gib(text, what: str, key: str = "ram_gib") -> float:
    """'768GB', '512 GiB', '24G', 1.5 (GiB) -> GiB, as checked_number allows for `key`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(checked_number(what, key, text))
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(t|tb|tib|g|gb|gib|m|mb|mib)?\s*", str(text).lower())
    if not m:
        raise PlanError(f"{what}: {text!r} is not a size like 768GB or 24GiB")
    scale = {"t": 1024, "tb": 1024, "tib": 1024, "m": 1 / 1024, "mb": 1 / 1024, "mib": 1 / 1024}.get(m[2] or "g", 1)
    return checked_number(what, key, float(m[1]) * scale)


def gpu_from_name(name: str, memory_gib: float | None = None) -> GPU:
    key = match_gpu(name)
    if key is None:
        known = ", ".join(GPU_TABLE)
        raise PlanError(f"GPU {name!r} is not in the table ({known}); describe it in a hardware YAML "
                        f"(memory_gib, bandwidth_gbps, bf16_tflops)")
    mem, bw, tflops, pcie = GPU_TABLE[key]
    return GPU(key, float(memory_gib or mem), bw, tflops, pcie)


def match_gpu(name: str):
    norm = re.sub(r"[^a-z0-9]", "", name.lower())
    best = None
    for key in GPU_TABLE:
        k = re.sub(r"[^a-z0-9]", "", key.lower())
        if k in norm and (best is None or len(k) > len(best[1])):
            best = (key, k)
    return best[0] if best else None


def memory_bandwidth(spec: str) -> float:
    """'DDR5-4800x8' -> achievable GB/s (MT/s x 8 bytes x channels x MEMORY_EFFICIENCY)."""
    m = re.fullmatch(r"\s*(DDR\d-\d+)\s*[xX*]\s*(\d+)\s*", spec)
    if not m or m[1].upper() not in MEMORY_MTS or int(m[2]) == 0:
        raise PlanError(f"memory {spec!r}: expected TYPE-SPEEDxCHANNELS with TYPE-SPEED one of "
                        f"{', '.join(MEMORY_MTS)}, e.g. DDR5-4800x8")
    return MEMORY_MTS[m[1].upper()] * 8 * int(m[2]) * MEMORY_EFFICIENCY / 1000


def describe(gpu=None, gpu_memory=None, ram=None, memory=None, ram_bandwidth=None, cores=None, numa_nodes=None,
             disk_bandwidth=None, base: Hardware | None = None, source="flags") -> Hardware:
    """A Hardware from flag values, each overriding `base` (detected hardware) when given; a value no machine
    has (0 cores, negative bandwidth) is one PlanError naming its flag."""
    for flag, key, value in (("--gpu-memory", "memory_gib", gpu_memory), ("--ram-bandwidth", "ram_bandwidth_gbps",
                             ram_bandwidth), ("--cores", "cores", cores), ("--numa-nodes", "numa_nodes", numa_nodes),
                             ("--disk-bandwidth", "disk_read_gbps", disk_bandwidth)):
        if value is not None:
            checked_number(flag, key, value)
    hw = base or Hardware(ram_gib=0.0, ram_available_gib=0.0, cores=_physical_cores(), source=source)
    changes = {"source": source if base is None else f"{base.source} + {source}"}
    if gpu is not None:
        changes["gpus"] = () if str(gpu).lower() in ("none", "no", "0") else (gpu_from_name(gpu, gpu_memory),)
    elif gpu_memory is not None and hw.gpus:
        changes["gpus"] = (replace(hw.gpus[0], memory_gib=float(gpu_memory)),) + hw.gpus[1:]
    if ram is not None:
        total = parse_size_gib(ram, "--ram")
        changes.update(ram_gib=total, ram_available_gib=max(total - RAM_RESERVE_GIB, 0.0))
    if memory is not None:
        changes["ram_bandwidth_gbps"] = memory_bandwidth(memory)
    if ram_bandwidth is not None:
        changes["ram_bandwidth_gbps"] = float(ram_bandwidth)
    if cores is not None:
        changes["cores"] = cores
    if numa_nodes is not None:
        changes["numa_nodes"] = numa_nodes
    if disk_bandwidth is not None:
        changes["disk_read_gbps"] = float(disk_bandwidth)
    hw = replace(hw, **changes)
    if hw.ram_gib <= 0:
        raise PlanError("system RAM unknown: give --ram (e.g. --ram 768GB) or a hardware YAML")
    return hw


HW_KEYS = {"gpu", "gpu_memory_gib", "ram_gib", "ram_available_gib", "memory", "ram_bandwidth_gbps", "cores",
           "numa_nodes", "cpu_features", "cpu_gflops", "disk_read_gbps", "layer_overhead_us",
           "cpu_kernel_efficiency", "cpu_torch_efficiency"}


def read_yaml_keys(path: Path, what: str, keys: set[str]) -> dict:
    """A hand-written YAML file of `keys`: a typo in a key is an error naming it, never a silently ignored line."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"{path}: cannot read {what} YAML ({e})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: a {what} YAML is a mapping of keys ({', '.join(sorted(keys))})")
    unknown = set(raw) - keys
    if unknown:
        raise PlanError(f"{path}: unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(keys))})")
    return raw


def load_hardware(path) -> Hardware:
    path = Path(path)
    raw = read_yaml_keys(path, "hardware", HW_KEYS)
    try:
        return _hardware_from_dict(raw, str(path))
    except (TypeError, ValueError, KeyError) as e:
        raise PlanError(f"{path}: bad value ({e})") from None


def _gpu_from_yaml(gpu, source: str) -> GPU | None:
    if isinstance(gpu, dict):
        numbers = {k: checked_number(f"{source}: gpu {k}", k, gpu[k] if k != "pcie_gbps" else gpu.get(k, 24.0))
                   for k in ("memory_gib", "bandwidth_gbps", "bf16_tflops", "pcie_gbps")}
        return GPU(str(gpu["name"]), **{k: float(v) for k, v in numbers.items()})
    return None if gpu is None or str(gpu).lower() == "none" else gpu_from_name(str(gpu))


def _hardware_from_dict(raw: dict, source: str) -> Hardware:
    listed = raw.get("gpu") if isinstance(raw.get("gpu"), list) else [raw.get("gpu")]
    gpus = tuple(g for g in (_gpu_from_yaml(g, source) for g in listed) if g is not None)
    if gpus and "gpu_memory_gib" in raw:
        memory = checked_number(f"{source}: gpu_memory_gib", "memory_gib", raw["gpu_memory_gib"])
        gpus = (replace(gpus[0], memory_gib=float(memory)),) + gpus[1:]
    if "ram_gib" not in raw:
        raise PlanError(f"{source}: key 'ram_gib' is missing")
    ram = parse_size_gib(raw["ram_gib"], f"{source}: ram_gib")
    bw = raw["ram_bandwidth_gbps"] if "ram_bandwidth_gbps" in raw else (
        memory_bandwidth(raw["memory"]) if "memory" in raw else 50.0)
    available = parse_size_gib(raw.get("ram_available_gib", max(ram - RAM_RESERVE_GIB, 0.0)),
                               f"{source}: ram_available_gib", "ram_available_gib")
    defaults = {"cores": _physical_cores(), "numa_nodes": 1,
                "ram_bandwidth_gbps": bw, "cpu_gflops": 0.0, "disk_read_gbps": 3.0, "layer_overhead_us": 60.0,
                "cpu_kernel_efficiency": 0.85, "cpu_torch_efficiency": 0.4}
    values = {k: checked_number(f"{source}: {k}", k, raw.get(k, default)) for k, default in defaults.items()}
    return Hardware(gpus=gpus, ram_gib=ram, ram_available_gib=available, source=source,
                    cpu_features=tuple(raw.get("cpu_features", ("avx2",))),
                    **{k: v if k in WHOLE_KEYS else float(v) for k, v in values.items()})


def hardware_to_dict(hw: Hardware) -> dict:
    out = {"ram_gib": round(hw.ram_gib, 2), "ram_available_gib": round(hw.ram_available_gib, 2), "cores": hw.cores,
           "numa_nodes": hw.numa_nodes, "cpu_features": list(hw.cpu_features),
           "ram_bandwidth_gbps": round(hw.ram_bandwidth_gbps, 2), "cpu_gflops": round(hw.cpu_flops / 1e9, 1),
           "disk_read_gbps": hw.disk_read_gbps, "layer_overhead_us": hw.layer_overhead_us,
           "cpu_kernel_efficiency": hw.cpu_kernel_efficiency, "cpu_torch_efficiency": hw.cpu_torch_efficiency}
    gpus = [{"name": g.name, "memory_gib": g.memory_gib, "bandwidth_gbps": g.bandwidth_gbps,
             "bf16_tflops": g.bf16_tflops, "pcie_gbps": g.pcie_gbps} for g in hw.gpus]
    if gpus:
        out["gpu"] = gpus[0] if len(gpus) == 1 else gpus  # one GPU: the mapping files have always held
    return out


def detect() -> Hardware:
    """This machine: GPUs through torch.cuda (when present), RAM, physical cores, NUMA nodes, CPU features.
    Bandwidths are estimates until `hybrid profile` measures them."""
    total, available = _meminfo_gib()
    features = _cpu_flags()
    cores = _physical_cores()
    return Hardware(gpus=_detect_gpus(), ram_gib=total,
                    ram_available_gib=max(min(available, total - RAM_RESERVE_GIB), 0),
                    cores=cores, numa_nodes=_numa_nodes(), cpu_features=features,
                    ram_bandwidth_gbps=min(12.0 * cores, 400.0), source="detected",
                    notes=("ram bandwidth estimated at 12 GB/s per core; run `hybrid profile` to measure it",))


def _detect_gpus() -> tuple[GPU, ...]:
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    return tuple(_detect_gpu(torch, i) for i in range(torch.cuda.device_count()))


def _detect_gpu(torch, index: int) -> GPU:
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    key = match_gpu(props.name)
    bw, tflops, pcie = GPU_TABLE[key][1:] if key else (1000.0, 100.0, 24.0)
    return GPU(props.name, free / 2**30, bw, tflops, pcie)


def _meminfo_gib():
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) / 2**20
    except OSError:
        return 0.0, 0.0
    return info.get("MemTotal", 0.0), info.get("MemAvailable", info.get("MemFree", 0.0))


def _cpu_flags() -> tuple[str, ...]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    flags = set(m[1].split()) if m else set()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
    return tuple(f for f in wanted if f in flags)


def _physical_cores() -> int:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.cpu_count() or 1
    pairs = set(re.findall(r"physical id\s*:\s*(\d+).*?core id\s*:\s*(\d+)", text, re.S))
    return len(pairs) or os.cpu_count() or 1


def _numa_nodes() -> int:
    nodes = list(Path("/sys/devices/system/node").glob("node[0-9]*"))
    return max(len(nodes), 1)
