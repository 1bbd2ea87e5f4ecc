"""Rotary position embedding (rotate-half, as nsa/attention/rope.py) in one Triton kernel each way.

    y[..., :h] = x1 cos - x2 sin,   y[..., h:] = x2 cos + x1 sin     (x1 = x[..., :h], x2 = x[..., h:])

with cos/sin the fp32 rows of RotaryEmbedding's tables at each token's position. The PyTorch version
takes ~9 kernels forward (two table gathers, an fp32 copy of x, the rotate-half slices, negation and
concatenation, two products, a sum, the cast back) and as many backward, most of them passes over an
fp32 copy of x; here it is one read of x and one write of y. The backward is the rotation by the
opposite angle (dx1 = dy1 cos + dy2 sin, dx2 = dy2 cos - dy1 sin), the same kernel with SIGN = -1.
The arithmetic is the PyTorch path's in fp32, so results agree to the output dtype's rounding.

x [B, H, P, D] (any strides, D even), positions [P] (int), y contiguous [B, H, P, D].
One program per (tile of BP positions, batch x head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa.attention.triton._common import cdiv, needs_grad, pad_pow2

BP = 64  # positions per program


@triton.jit
def _rope_kernel(
    X, Y, POS, COS, SIN,
    s_xb, s_xh, s_xp, s_xd,
    H, P, s_tab,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BP: tl.constexpr, SIGN: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_p = pid_p.to(tl.int64) * BP + tl.arange(0, BP)
    offs_d = tl.arange(0, HALF_PAD)
    pmask = offs_p < P
    mask = pmask[:, None] & (offs_d < HALF)[None, :]
    pos = tl.load(POS + offs_p, mask=pmask, other=0).to(tl.int64)
    tab = pos[:, None] * s_tab + offs_d[None, :]
    c = tl.load(COS + tab, mask=mask, other=0.0)
    s = tl.load(SIN + tab, mask=mask, other=0.0) * SIGN
    x_ptr = X + b * s_xb + h * s_xh + offs_p[:, None] * s_xp + offs_d[None, :] * s_xd
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF * s_xd, mask=mask, other=0.0).to(tl.float32)
    y_ptr = Y + ((b * H + h) * P + offs_p[:, None]) * (2 * HALF) + offs_d[None, :]
    tl.store(y_ptr, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + HALF, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    B, H, P, D = x.shape
    y = torch.empty(B, H, P, D, dtype=x.dtype, device=x.device)
    if y.numel():
        _rope_kernel[(cdiv(P, BP), B * H)](
            x, y, positions, cos, sin, *x.stride(), H, P, cos.stride(0),
            HALF=D // 2, HALF_PAD=pad_pow2(D // 2, 1), BP=BP, SIGN=sign, num_warps=4)
    return y


class Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, cos, sin):
        ctx.save_for_backward(positions, cos, sin)
        return _rotate(x, positions, cos, sin, 1)

    @staticmethod
    def backward(ctx, dy):
        positions, cos, sin = ctx.saved_tensors
        return _rotate(dy, positions, cos, sin, -1), None, None, None


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, P, D] at positions [P] with fp32 tables cos/sin [L, D] (L > every position;
    RotaryEmbedding.tables). Differentiable in x."""
    if x.dim() != 4 or x.shape[-1] % 2 or positions.shape != (x.shape[2],):
        raise ValueError(f"nsa triton rope: expected x [B, H, P, D] with D even and positions [P], got x "
                         f"{tuple(x.shape)}, positions {tuple(positions.shape)}")
    if (cos.dtype != torch.float32 or cos.shape != sin.shape or cos.shape[1] != x.shape[-1]
            or not (cos.is_contiguous() and sin.is_contiguous())):
        raise ValueError("nsa triton rope: cos/sin must be contiguous fp32 [L, D] tables")
    if not needs_grad(x):
        return _rotate(x, positions.contiguous(), cos, sin, 1)
    return Rope.apply(x, positions.contiguous(), cos, sin)
