"""Shared benchmark plumbing: device naming, timing sync, peak-memory measurement, one measurement
per subprocess on CPU (ru_maxrss is a process-wide high-water mark, so each CPU measurement gets a
fresh process; PyTorch keeps no CPU allocator statistics)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


# the environment switches that pick kernel paths (nsa/attention/triton, layer.py, rope.py)
KERNEL_SWITCHES = ("NSA_COMBINE", "NSA_LOSS", "NSA_ROPE", "NSA_SELECT", "NSA_SLC_DKV", "NSA_SLC_DKV_ROWS",
                   "NSA_SLC_QTILE", "NSA_TUNE", "NSA_WINDOW")


def nsa_env() -> dict:
    """The kernel switches set in the environment, for the rows: a measurement with a candidate
    switched on must say so."""
    return {k: os.environ[k] for k in KERNEL_SWITCHES if k in os.environ}


def tuned() -> dict:
    """The kernel variants the layer's tuning chose in this process (nsa/attention/triton/tune.py)."""
    from nsa.attention.triton import tune

    return tune.choices()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Memory a measured region needs above what was allocated when it started, in MiB."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_mib()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.base
        self.mib = max(self.mib, 0.0)
        return False


def run_isolated(script: str, args: list[str]) -> dict:
    """Run `script args` in a fresh interpreter and return the JSON object on its last stdout line."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def idle_gaps(kernels, top: int = 5) -> dict:
    """Where a GPU waited between kernels: kernels = [(start_us, end_us, name)] in any order -> idle_ms (the
    time inside the span no kernel ran) and the `top` longest gaps, each with the kernels before and after it
    (a gap before a kernel is the host issuing it late: launch-bound code)."""
    gaps, idle, end, prev = [], 0.0, None, None
    for start, stop, name in sorted(kernels):
        if end is not None and start > end:
            idle += start - end
            gaps.append((start - end, prev, name))
        if end is None or stop > end:
            end, prev = stop, name
    gaps.sort(key=lambda g: -g[0])
    return {"idle_ms": round(idle / 1e3, 3),
            "gaps": [{"us": round(us, 1), "after": a[:60], "before": b[:60]} for us, a, b in gaps[:top]]}


def profile_top(fn, device: str, top: int) -> dict:
    """Run `fn` once under torch.profiler; return where the time went: the `top` kernels (CUDA) or
    operators (CPU, self time) by total time, their launch counts, and the totals. On CUDA,
    busy_ms < the wall time of the pass means the pass is launch/host bound, not kernel bound, and
    idle_ms / gaps (idle_gaps) say where the GPU waited (the profiler's own overhead included)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    by_name: dict[str, list] = {}
    for e in prof.key_averages():
        if device == "cuda":
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = e.self_cuda_time_total
            # kernels and memcpy/memset only: CPU-side operators also carry their kernels' time
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            us = e.self_cpu_time_total
        if us <= 0:
            continue
        name = e.key if len(e.key) <= 90 else e.key[:87] + "..."
        t = by_name.setdefault(name, [0.0, 0])
        t[0] += us / 1e3
        t[1] += e.count
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    gaps = {}
    if device == "cuda":
        try:
            gaps = idle_gaps([(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                              if e.device_type == torch.autograd.DeviceType.CUDA])
        except Exception as e:  # noqa: BLE001 - an extra; the ranking above stands without it
            gaps = {"gaps_error": f"{type(e).__name__}: {e}"[:200]}
    return {
        "busy_ms": round(sum(v[0] for v in by_name.values()), 3),
        "launches": sum(v[1] for v in by_name.values()),
        "top": [{"name": k, "ms": round(v[0], 3), "calls": v[1]} for k, v in ranked[:top]],
        **gaps,
    }
