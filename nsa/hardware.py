"""Hardware facts used by MFU and pre-flight: device name, memory, bf16 peak FLOPs.

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
