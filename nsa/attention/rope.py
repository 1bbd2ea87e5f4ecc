"""Rotary position embedding (RoPE), "rotate-half" convention as in LLaMA.

Tables are built lazily and grown on demand, so any sequence length works."""

from __future__ import annotations

import torch
from torch import nn


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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, bound: int) -> torch.Tensor:
        """Rotate `x` [..., P, head_dim] at integer `positions` [P], all < `bound` (a Python int,
        so no device sync is needed to size the tables)."""
        # rotate in >= fp32: bf16 angles at position ~1e4 would be off by whole radians
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self.tables(bound, x.device, work)
        cos, sin = cos[positions], sin[positions]
        xw = x.to(work)
        half = x.shape[-1] // 2
        rotated = torch.cat([-xw[..., half:], xw[..., :half]], dim=-1)
        return (xw * cos + rotated * sin).to(x.dtype)

    def _apply(self, fn, recurse=True):  # drop cached tables when moved between devices / dtypes
        self._cache = {}
        return super()._apply(fn, recurse)
