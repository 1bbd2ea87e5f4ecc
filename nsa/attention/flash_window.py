"""The NSA window branch through flash-attn's sliding-window kernels, where the package is installed.

flash-attn is not a dependency (it needs a CUDA build matching the installed torch), but rented GPU
nodes often have it, and its kernels are the reference for sliding-window attention. Two packages
expose the same call, `flash_attn_func(q, k, v, softmax_scale=, causal=True, window_size=(left, 0))`
on [B, S, heads, D] tensors with fewer K/V heads allowed (GQA):

* "flash":  flash-attn 2, module `flash_attn` (Ampere and Hopper);
* "flash3": flash-attn 3, module `flash_attn_interface` (Hopper; some versions also return the LSE).

With causal=True and seqlen_q != seqlen_k flash-attn aligns the last query with the last key, and query i
sees keys [i + N - Sq - left, i + N - Sq]. The window branch's query at position q_start + i sees the keys
at positions (t - window, t], key j sitting at k_start + j; the two agree when left = window - 1 and
q_start - k_start = N - Sq: training and prefill (q_start = k_start = 0, Sq = N) and a decode step over
the window cache. Other calls, fp32 inputs and head dims above 256 are not flash-shaped (`unusable`)
and stay on the Triton kernel. Which one runs where both can is decided by timing
(nsa/attention/triton/window.py, `implementation`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys

import torch

MODULES = {"flash": "flash_attn", "flash3": "flash_attn_interface"}
MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=None)
def load(name: str):
    """flash_attn_func of package `name` ("flash" / "flash3"), or None when it is not installed or does
    not import (a build for another torch or CUDA fails here: warned once, then the Triton kernel runs)."""
    module = MODULES[name]
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.import_module(module).flash_attn_func
    except Exception as e:  # noqa: BLE001 - e.g. an undefined symbol from a wheel built for another torch
        print(f"[nsa] WARNING: {module} is installed but does not import ({type(e).__name__}: {str(e)[:200]}); "
              "the window branch uses the Triton kernel", file=sys.stderr, flush=True)
        return None


def installed() -> list[str]:
    """The flash-attn packages that import here, in MODULES order."""
    return [name for name in MODULES if load(name) is not None]


def unusable(q: torch.Tensor, k: torch.Tensor, q_start: int, k_start: int) -> str | None:
    """Why flash-attn cannot compute this window call (None: it can): q [B,H,Sq,D], k [B,G,N,D]."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes fp16/bf16 inputs, got {q.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] % 8:
        return f"flash-attn takes head dims up to {MAX_HEAD_DIM} in multiples of 8, got {q.shape[-1]}"
    Sq, N = q.shape[2], k.shape[2]
    if Sq == 0 or N == 0 or q_start - k_start != N - Sq:
        return "the queries do not end at the last key (flash-attn's causal alignment)"
    return None


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, name: str = "flash") -> torch.Tensor:
    """q [B,H,Sq,D], k/v [B,G,N,D] (a call `unusable` accepts) -> [B,H,Sq,D] contiguous, differentiable
    through flash-attn's own backward. The [B, S, heads, D] views flash-attn takes are free here: the
    layer's projections produce that layout (only the last dim must be contiguous)."""
    fn = load(name)
    if fn is None:
        raise RuntimeError(f"nsa flash_window: {MODULES[name]} is not available")
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=1.0 / math.sqrt(q.shape[-1]),
             causal=True, window_size=(int(window) - 1, 0))
    if isinstance(out, tuple):  # some flash-attn 3 versions: (out, lse)
        out = out[0]
    # the fused gate-and-combine reads the three branch outputs with one set of strides: [B, H, S, D]
    return out.transpose(1, 2).contiguous()
