"""Process-group setup for `torchrun` (and plain single-process runs), rank helpers, and the
per-step agreement on flags (stop signal, non-finite loss) so every rank takes the same branch."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device_pref: str, backend_pref: str, timeout_s: int) -> tuple[DistInfo, torch.device]:
    """Read torchrun's env (RANK/WORLD_SIZE/LOCAL_RANK), pick the device, init the process group."""
    info = DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            from nsa.errors import UserError

            raise UserError("runtime.device=cuda but no CUDA device is visible. Use runtime.device=auto or cpu.")
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if info.enabled and not dist.is_initialized():
        backend = backend_pref if backend_pref != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return info, device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _all_reduce(values: list[float], device: torch.device, op) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise max over ranks (flags: any rank saw a signal / a NaN)."""
    return _all_reduce(values, device, dist.ReduceOp.MAX)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (token counts, losses)."""
    return _all_reduce(values, device, dist.ReduceOp.SUM)


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order (on every rank; small objects only: RNG and data states)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
