"""Triton kernels for Native Sparse Attention (arXiv 2502.11089), with the PyTorch functions in
nsa.attention.ops as the reference and CPU fallback.

Public functions (same layouts as ops: q [B,H,Sq,D], k/v [B,G,N,D], H = G*r, query head h in
KV group h // r, queries at absolute positions q_start .. q_start + Sq - 1):

* selected_attention(q, k, v, idx, slc_block, q_start=0, chunk=None) -> [B,H,Sq,D]
  group-centric selected-block attention, Triton forward + backward (autograd.Function);
* compressed_attention(q, k_cmp, v_cmp, block, stride, q_start=0, chunk=None) -> (out, lse)
  compressed-branch attention, Triton forward + backward; lse [B,H,Sq] fp32 (-inf = no block);
* window_attention(q, k, v, window, q_start=0, k_start=0, chunk=None, impl="triton") -> [B,H,Sq,D]
  sliding-window attention over keys at positions (t - window, t], Triton forward + backward;
* select_blocks(q, k_cmp, cmp_block, cmp_stride, slc_block, n_selected, q_start=0, chunk=None,
  *, lse=None) -> int64 [B,G,Sq,n], identical to ops.select_blocks; the top-n is picked inside
  the scoring kernel (NSA_SELECT=fused, default) or from a score buffer by torch.topk (topk);
* gate_combine(logits, o_cmp, o_slc, o_win) -> [B,S,H*D]: the gated sum of the three branch
  outputs (Eq. 5) in the output projection's layout, from the gate MLP's logits [B,S,3H];
  gate_mlp_combine(hidden, w2, b2, o_cmp, o_slc, o_win): the same from the gate MLP's hidden layer
  (its SiLU and last Linear in the kernel too), inference only (decode steps);
* decode.static_decode / decode.static_write: the static-cache decode step's three branches in one
  kernel (torch op nsa::static_decode) and its cache writes, used by nsa.attention.static_decode;
* available() -> bool: triton importable and (CUDA present or TRITON_INTERPRET=1).

`chunk` is accepted for signature compatibility with ops (ignored by the attention kernels).
`python -m nsa.attention.triton.aot_check` compiles every kernel for sm80/sm90 without a GPU.
Run the kernels on CUDA tensors in production; the interpreter is for tiny CPU parity tests only
(dispatch on `q.is_cuda and available()`, not on available() alone).
Inputs: float32, bfloat16 or float16 (fp32 accumulation); anything else raises TypeError and the
caller should use ops. Set TRITON_INTERPRET=1 *before* triton is first imported to run on CPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["available", "selected_attention", "compressed_attention", "window_attention", "select_blocks",
           "gate_combine", "gate_mlp_combine"]


def available() -> bool:
    """True when the kernels can run here: triton importable and CUDA present or the interpreter on."""
    if importlib.util.find_spec("triton") is None:
        return False
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def __getattr__(name):  # lazy: importing this package never requires triton
    if name == "selected_attention":
        from nsa.attention.triton.selected import selected_attention
        return selected_attention
    if name == "compressed_attention":
        from nsa.attention.triton.compressed import compressed_attention
        return compressed_attention
    if name == "window_attention":
        from nsa.attention.triton.window import window_attention
        return window_attention
    if name == "gate_combine":
        from nsa.attention.triton.combine import gate_combine
        return gate_combine
    if name == "gate_mlp_combine":
        from nsa.attention.triton.combine import gate_mlp_combine
        return gate_mlp_combine
    if name == "select_blocks":
        from nsa.attention.triton.select import select_blocks
        return select_blocks
    raise AttributeError(f"module 'nsa.attention.triton' has no attribute {name!r}")
