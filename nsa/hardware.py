"""Hardware facts used by MFU and pre-flight: device name, memory, bf16 peak FLOPs, and the GPU check
(`cuda_unavailable`, `check_gpus`) shared by scripts/verify_env.py and nsa/preflight.py.

The peak table holds vendor dense (non-sparse) bf16 tensor-core numbers per device. Override with
the environment variable NSA_PEAK_TFLOPS (it describes the machine, not the run) or runtime.peak_tflops.
"""

from __future__ import annotations

import os
import platform

import torch

# Dense bf16 peak TFLOP/s per device, matched by substring of torch.cuda.get_device_name (first match wins,
# so more specific names come first).
BF16_PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / NVL
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A6000", 155.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16 tensor cores (no bf16); MFU still meaningful for fp16 runs
    ("T4", 65.0),
]


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """bf16 peak TFLOP/s of one device, or None when unknown (CPU, unlisted GPU)."""
    env = os.environ.get("NSA_PEAK_TFLOPS")
    if env:
        try:
            return float(env)
        except ValueError:
            pass
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in BF16_PEAK_TFLOPS:
        if key in name:
            return value
    return None


def describe(device: torch.device) -> dict:
    """JSON-able facts for metrics.json and the startup banner. Units in the names."""
    info = {
        "device_type": device.type,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_name=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_GiB=round(props.total_memory / 2**30, 2),
            cuda_version=torch.version.cuda,
            bf16_supported=torch.cuda.is_bf16_supported(),
            capability=f"{props.major}.{props.minor}",
        )
    return info


def memory_stats_GiB(device: torch.device) -> dict:
    """Peak allocated/reserved accelerator memory in GiB (empty on CPU)."""
    if device.type != "cuda":
        return {}
    return {
        "max_mem_allocated_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
        "max_mem_reserved_GiB": round(torch.cuda.max_memory_reserved(device) / 2**30, 3),
    }


# ------------------------------------------------------------------------------ GPU verification
# Shared by scripts/verify_env.py (bootstrap) and nsa/preflight.py (before every run).

CPU_FALLBACK_FIX = "run on a GPU node, or use CONFIG=configs/m7c_cpu.yaml (runtime.device=auto trains on CPU)"


def _visible_devices_note() -> str:
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "" if cvd is None else f" (CUDA_VISIBLE_DEVICES={cvd!r})"


def cuda_unavailable(expect_gpus: int = 0) -> tuple[str, str] | None:
    """Why torch cannot use a GPU here, as (what is wrong, the fix); None when a CUDA device is usable.

    `expect_gpus` is what nvidia-smi reported (0: unknown or none). It separates the three causes an
    operator meets: a CPU-only torch wheel, a driver too old for the wheel's CUDA, and no GPU at all."""
    if torch.cuda.is_available():
        return None
    v = torch.__version__
    if torch.version.cuda is None:
        if expect_gpus > 0:
            return (f"nvidia-smi shows {expect_gpus} GPU(s) but torch {v} is a CPU-only build",
                    "rm -rf .venv && bash scripts/prime_bootstrap.sh (installs requirements-gpu.txt); check that "
                    "`pip config list` does not point at a CPU-only index")
        return f"none is visible (torch {v} is a CPU-only build)", CPU_FALLBACK_FIX
    if expect_gpus > 0:
        return (f"torch {v} (CUDA {torch.version.cuda}) cannot use the {expect_gpus} GPU(s) nvidia-smi shows"
                f"{_visible_devices_note()}: the NVIDIA driver is probably older than that CUDA runtime needs",
                "compare `nvidia-smi` (CUDA Version) with the torch CUDA version; use a node with a newer driver")
    return (f"none is visible to torch {v} (CUDA {torch.version.cuda}){_visible_devices_note()}", CPU_FALLBACK_FIX)


def check_gpus(expect_gpus: int = 0) -> tuple[list[str], list[str]]:
    """A real op on every visible GPU: an fp32 matmul compared with the CPU result, and a bf16 matmul that
    must be finite. Returns (lines, problems): `lines` are facts, "label: text" ("cudnn: 91002", "gpu 0: NVIDIA
    H100 80GB HBM3, 79.1 GiB, sm_90, fp32+bf16 matmul OK (412 ms)", "warning: ..."); `problems` are one
    sentence each, ending in ". Fix: ...". No problems means every visible GPU computed correctly."""
    import time

    lines: list[str] = []
    why = cuda_unavailable(expect_gpus)
    if why is not None:
        what, fix = why
        return lines, [f"{what}. Fix: {fix}"]
    problems: list[str] = []
    n = torch.cuda.device_count()
    if expect_gpus > 0 and n != expect_gpus:
        lines.append(f"warning: torch sees {n} GPU(s), nvidia-smi {expect_gpus}"
                     f" (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    lines.append(f"cudnn: {torch.backends.cudnn.version()}")
    x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    ref = x @ x.T
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        try:
            t0 = time.perf_counter()
            d = torch.device("cuda", i)
            y = x.to(d)
            got = (y @ y.T).cpu()
            torch.cuda.synchronize(d)
            bf = (y.bfloat16() @ y.bfloat16().T).float()
            torch.cuda.synchronize(d)
            ok = torch.allclose(got, ref, rtol=1e-3, atol=1e-2) and bool(torch.isfinite(bf).all())
            ms = (time.perf_counter() - t0) * 1e3
            lines.append(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
                         f"fp32+bf16 matmul {'OK' if ok else 'WRONG RESULT'} ({ms:.0f} ms)")
            if not ok:
                problems.append(f"GPU {i} ({p.name}) computed a wrong matmul result. Fix: do not train on this node; "
                                "report it to the provider")
        except Exception as e:  # noqa: BLE001 - a broken GPU shows up as any kind of error
            problems.append(f"GPU {i} ({p.name}) failed a matmul: {type(e).__name__}: {e}. Fix: check nvidia-smi for "
                            "errors (Xid) or use another node")
    return lines, problems
