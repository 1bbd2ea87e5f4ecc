"""Rotary position embedding (RoPE), "rotate-half" convention as in LLaMA.

Tables are built lazily and grown on demand, so any sequence length works. On CUDA (eager) the
rotation runs as one Triton kernel each way (nsa/attention/triton/rope.py) instead of ~9 PyTorch
kernels over an fp32 copy; NSA_ROPE=torch keeps the PyTorch version, which is also the reference,
the CPU path and what torch.compile traces (Inductor fuses it itself)."""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

_TRITON_OK: dict[tuple, bool] = {}


def rope_impl() -> str:
    impl = os.environ.get("NSA_ROPE", "triton")
    if impl not in ("triton", "torch"):
        raise ValueError(f"NSA_ROPE={impl!r}: expected triton or torch")
    return impl


def _triton_rope_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """One check per (device, dtype) that the kernel matches the PyTorch rotation here (a new GPU or
    Triton build can miscompile); on failure the PyTorch path is used, with a warning."""
    key = (device.type, device.index, dtype)
    if key not in _TRITON_OK:
        from nsa.attention import triton as tk

        ok, why = tk.available(), "triton unavailable"
        if ok:
            try:
                from nsa.attention.triton.rope import apply_rope

                rope = RotaryEmbedding(64).to(device)
                gen = torch.Generator().manual_seed(0)  # not the global RNG: training draws from it
                x = torch.randn(2, 3, 100, 64, generator=gen).to(device=device, dtype=dtype)
                pos = torch.arange(7, 107, device=device)
                cos, sin = rope.tables(107, device, torch.float32)
                err = (apply_rope(x, pos, cos, sin).float() - rope.rotate(x, pos, cos, sin).float()).abs().max().item()
                ok, why = err <= 2e-2, f"max error {err:.2e}"
            except Exception as e:  # noqa: BLE001 - any failure (compile, launch) means "don't use it"
                ok, why = False, f"{type(e).__name__}: {e}"
        if not ok and why != "triton unavailable":
            print(f"[nsa] WARNING: the Triton RoPE kernel failed its self-check on {device} {dtype} ({why[:200]}); "
                  "using the PyTorch rotation.", file=sys.stderr, flush=True)
        _TRITON_OK[key] = ok
    return _TRITON_OK[key]


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0, max_seq_len: int = 4096):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._max_seq_len = max_seq_len

    def tables(self, n: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables [n', head_dim] with n' >= n, in `dtype` (computed in float64)."""
        key = (device, dtype)
        cached = self._cache.get(key)
        if cached is None or cached[0].shape[0] < n:
            length = max(self._max_seq_len, 1 << (n - 1).bit_length())  # grow geometrically
            pos = torch.arange(length, dtype=torch.float64, device=device)
            freqs = torch.outer(pos, self.inv_freq.to(device))
            emb = torch.cat([freqs, freqs], dim=-1)
            cached = (emb.cos().to(dtype), emb.sin().to(dtype))
            self._cache[key] = cached
        return cached

    @staticmethod
    def work_dtype(dtype: torch.dtype) -> torch.dtype:
        """The dtype of the tables and the rotation for inputs of `dtype`: at least fp32, since bf16
        angles at position ~1e4 would be off by whole radians."""
        return torch.float64 if dtype == torch.float64 else torch.float32

    def reserve(self, bound: int, device, dtype: torch.dtype) -> None:
        """Build the tables for positions < bound for inputs of `dtype` now: a step traced by
        torch.compile that found them missing would build them inside its graph, store them as a
        side effect, and be compiled again on the next call."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # the key forward() will look up: x.device
            device = torch.device("cuda", torch.cuda.current_device())
        self.tables(bound, device, self.work_dtype(dtype))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, bound: int) -> torch.Tensor:
        """Rotate `x` [..., P, head_dim] at integer `positions` [P], all < `bound` (a Python int,
        so no device sync is needed to size the tables)."""
        work = self.work_dtype(x.dtype)
        cos, sin = self.tables(bound, x.device, work)
        if (x.is_cuda and x.dim() == 4 and work == torch.float32 and not torch.compiler.is_compiling()
                and rope_impl() == "triton" and _triton_rope_ok(x.device, x.dtype)):
            from nsa.attention.triton.rope import apply_rope

            return apply_rope(x, positions, cos, sin)
        return self.rotate(x, positions, cos, sin)

    @staticmethod
    def rotate(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The PyTorch rotation with full tables cos/sin [L, head_dim] in the working dtype."""
        cos, sin = cos[positions], sin[positions]
        xw = x.to(cos.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-xw[..., half:], xw[..., :half]], dim=-1)
        return (xw * cos + rotated * sin).to(x.dtype)

    def _apply(self, fn, recurse=True):  # drop cached tables when moved between devices / dtypes
        self._cache = {}
        return super()._apply(fn, recurse)
