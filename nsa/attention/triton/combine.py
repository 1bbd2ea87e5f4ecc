"""Gate-and-combine (NSA Eq. 5) in Triton, forward and backward, one kernel each.

    y[b, t, h*D + d] = sum_c sigmoid(logits[b, t, 3h + c]) * o_c[b, h, t, d],   c = cmp, slc, win

logits [B, S, 3H] come from the gate MLP (any float dtype), the branch outputs o_c [B, H, S, D] from
the attention kernels; y [B, S, H*D] is written directly in the layout of the output projection.
The PyTorch version (NSAttention.combine) takes ~10 kernels forward (fp32 cast, sigmoid, cast back,
three products, two sums, the transpose copy) and ~15 backward, each a pass over [B, H, S, D]; here
it is one read of the three outputs and one write (forward), and one read of dy and the outputs and
one write of the three output gradients plus the logits' gradient (backward):
    d o_c = g_c * dy,    d logits_c = g_c (1 - g_c) * sum_d (dy * o_c).
The backward also leaves each branch the flash-attention delta rowsum(d o_c * o_c) its own backward needs
(attached to d o_c, _common.attach_delta / branch_delta): three passes over [B, H, S, D] fewer.
Gates and sums are fp32; the results are rounded once to the output dtype (the PyTorch path rounds
the gates and every partial product to bf16, so the two agree to bf16 precision, not bitwise).

One program per (tile of BT tokens, batch x head).

Inference (a decode step: no gradients) can also take the gate MLP's last layers into the kernel,
`gate_mlp_combine`: from the first Linear's output h [B, S, hidden], each program computes its head's
three logits silu(h) . w2[3h + c] + b2[3h + c] itself (w2 is [3H, hidden], a few KB), rounded where
nn.SiLU and nn.Linear round theirs (to h's dtype). At batch 1 a replayed decode step is a chain of
few-microsecond kernels: this drops two of them per layer (the SiLU and the second Linear).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa.attention.triton._common import attach_delta, cdiv, check_inputs, device_function, needs_grad, pad_pow2

BT = 64  # tokens per program


@device_function
def _program_tile(LG, s_lb, s_lt, s_lc, H, S, D: tl.constexpr, D_PAD: tl.constexpr, BT: tl.constexpr):
    """This program's (batch, head), token and dim offsets, masks and the three fp32 gates [BT]."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_t = pid_t.to(tl.int64) * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, D_PAD)
    tmask = offs_t < S
    mask = tmask[:, None] & (offs_d < D)[None, :]
    base = LG + b * s_lb + offs_t * s_lt + (3 * h) * s_lc
    g0 = tl.sigmoid(tl.load(base, mask=tmask, other=0.0).to(tl.float32))
    g1 = tl.sigmoid(tl.load(base + s_lc, mask=tmask, other=0.0).to(tl.float32))
    g2 = tl.sigmoid(tl.load(base + 2 * s_lc, mask=tmask, other=0.0).to(tl.float32))
    return b, h, offs_t, offs_d, tmask, mask, g0, g1, g2


@triton.jit
def _combine_fwd_kernel(
    LG, O0, O1, O2, Y,
    s_lb, s_lt, s_lc,
    s_ob, s_oh, s_ot, s_od,
    s_yb, s_yt, s_yc,
    H, S,
    D: tl.constexpr, D_PAD: tl.constexpr, BT: tl.constexpr,
):
    b, h, offs_t, offs_d, tmask, mask, g0, g1, g2 = _program_tile(LG, s_lb, s_lt, s_lc, H, S, D, D_PAD, BT)
    o_off = b * s_ob + h * s_oh + offs_t[:, None] * s_ot + offs_d[None, :] * s_od
    y = g0[:, None] * tl.load(O0 + o_off, mask=mask, other=0.0).to(tl.float32)
    y += g1[:, None] * tl.load(O1 + o_off, mask=mask, other=0.0).to(tl.float32)
    y += g2[:, None] * tl.load(O2 + o_off, mask=mask, other=0.0).to(tl.float32)
    y_off = b * s_yb + offs_t[:, None] * s_yt + (h * D + offs_d[None, :]) * s_yc
    tl.store(Y + y_off, y.to(Y.dtype.element_ty), mask=mask)


@device_function
def _branch_grads(O, o_off, DO, do_off, dlg, DELTA, row, dy, g, mask, tmask):
    # one branch: d o_c = g_c dy (stored rounded), d logits_c, and the branch backward's delta = rowsum(d o_c * o_c)
    # from the rounded d o_c, as rowsum_do_o would compute it
    o = tl.load(O + o_off, mask=mask, other=0.0).to(tl.float32)
    do = (g[:, None] * dy).to(DO.dtype.element_ty)
    tl.store(DO + do_off, do, mask=mask)
    tl.store(dlg, (g * (1.0 - g) * tl.sum(dy * o, 1)).to(dlg.dtype.element_ty), mask=tmask)
    tl.store(DELTA + row, tl.sum(do.to(tl.float32) * o, 1), mask=tmask)


@triton.jit
def _combine_bwd_kernel(
    LG, O0, O1, O2, DY, DLG, DO0, DO1, DO2, DELTA,
    s_lb, s_lt, s_lc,
    s_ob, s_oh, s_ot, s_od,
    s_yb, s_yt, s_yc,
    H, S, BHS,
    D: tl.constexpr, D_PAD: tl.constexpr, BT: tl.constexpr,
):
    """DLG has LG's strides; DO0..2 are contiguous [B, H, S, D]; DELTA contiguous fp32 [3, B, H, S]."""
    b, h, offs_t, offs_d, tmask, mask, g0, g1, g2 = _program_tile(LG, s_lb, s_lt, s_lc, H, S, D, D_PAD, BT)
    dy = tl.load(DY + b * s_yb + offs_t[:, None] * s_yt + (h * D + offs_d[None, :]) * s_yc,
                 mask=mask, other=0.0).to(tl.float32)
    o_off = b * s_ob + h * s_oh + offs_t[:, None] * s_ot + offs_d[None, :] * s_od
    row = (b * H + h) * S + offs_t
    do_off = row[:, None] * D + offs_d[None, :]
    dlg = DLG + b * s_lb + offs_t * s_lt + (3 * h) * s_lc
    _branch_grads(O0, o_off, DO0, do_off, dlg, DELTA, row, dy, g0, mask, tmask)
    _branch_grads(O1, o_off, DO1, do_off, dlg + s_lc, DELTA + BHS, row, dy, g1, mask, tmask)
    _branch_grads(O2, o_off, DO2, do_off, dlg + 2 * s_lc, DELTA + 2 * BHS, row, dy, g2, mask, tmask)


@triton.jit
def _gate_mlp_combine_kernel(
    HID, W2, B2, O0, O1, O2, Y,
    s_hb, s_ht, s_hk,
    s_wc, s_wk,
    s_ob, s_oh, s_ot, s_od,
    s_yb, s_yt, s_yc,
    H, S, N_HID,
    D: tl.constexpr, D_PAD: tl.constexpr, HID_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """One program per (batch x token, head): the head's three gates from the hidden row, then the sum."""
    pid_bt = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = (pid_bt // S).to(tl.int64)
    t = (pid_bt % S).to(tl.int64)
    offs_k = tl.arange(0, HID_PAD)
    kmask = offs_k < N_HID
    a = tl.load(HID + b * s_hb + t * s_ht + offs_k * s_hk, mask=kmask, other=0.0).to(tl.float32)
    a = (a * tl.sigmoid(a)).to(HID.dtype.element_ty).to(tl.float32)  # SiLU, rounded as nn.SiLU's output
    offs_c = tl.arange(0, 4)  # the head's gates c = 0, 1, 2 (and a padding row)
    cmask = offs_c < 3
    w = tl.load(W2 + (3 * h + offs_c)[:, None] * s_wc + offs_k[None, :] * s_wk,
                mask=cmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
    logits = tl.sum(w * a[None, :], 1)
    if HAS_BIAS:
        logits += tl.load(B2 + 3 * h + offs_c, mask=cmask, other=0.0).to(tl.float32)
    g = tl.sigmoid(logits.to(HID.dtype.element_ty).to(tl.float32))  # the Linear's output dtype, then fp32
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    o_off = b * s_ob + h * s_oh + t * s_ot + offs_d * s_od
    y = tl.sum(tl.where(offs_c == 0, g, 0.0), 0) * tl.load(O0 + o_off, mask=dmask, other=0.0).to(tl.float32)
    y += tl.sum(tl.where(offs_c == 1, g, 0.0), 0) * tl.load(O1 + o_off, mask=dmask, other=0.0).to(tl.float32)
    y += tl.sum(tl.where(offs_c == 2, g, 0.0), 0) * tl.load(O2 + o_off, mask=dmask, other=0.0).to(tl.float32)
    tl.store(Y + b * s_yb + t * s_yt + (h * D + offs_d) * s_yc, y.to(Y.dtype.element_ty), mask=dmask)


def _grid(B, H, S):
    return (cdiv(S, BT), B * H)


def _combine_forward(logits, o0, o1, o2):
    """(y, the inputs as the kernels read them: logits contiguous, o_* with one set of strides)."""
    logits = logits.contiguous()  # the backward writes d logits with these strides
    if not o0.stride() == o1.stride() == o2.stride():  # the kernels index all three with one set of strides
        o0, o1, o2 = o0.contiguous(), o1.contiguous(), o2.contiguous()
    B, H, S, D = o0.shape
    y = torch.empty(B, S, H * D, dtype=o0.dtype, device=o0.device)
    if y.numel():
        _combine_fwd_kernel[_grid(B, H, S)](
            logits, o0, o1, o2, y, *logits.stride(), *o0.stride(), *y.stride(), H, S,
            D=D, D_PAD=pad_pow2(D), BT=BT, num_warps=4)
    return y, (logits, o0, o1, o2)


class GateCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, o0, o1, o2):
        y, saved = _combine_forward(logits, o0, o1, o2)
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        logits, o0, o1, o2 = ctx.saved_tensors
        B, H, S, D = o0.shape
        dlg = torch.empty_like(logits)
        do = [torch.empty(B, H, S, D, dtype=o0.dtype, device=o0.device) for _ in range(3)]
        if dy.numel():
            delta = torch.empty(3, B, H, S, dtype=torch.float32, device=o0.device)
            _combine_bwd_kernel[_grid(B, H, S)](
                logits, o0, o1, o2, dy, dlg, *do, delta, *logits.stride(), *o0.stride(), *dy.stride(), H, S,
                B * H * S, D=D, D_PAD=pad_pow2(D), BT=BT, num_warps=4)
            for grad, o, d in zip(do, (o0, o1, o2), delta):
                attach_delta(grad, d, o)
        return dlg, *do


def gate_combine(logits: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    """sum_c sigmoid(logits[..., 3h + c]) * o_c, as y [B, S, H*D] in the branch outputs' dtype.

    logits [B, S, 3H] (gate MLP output, any float dtype, e.g. fp32 outside autocast); o_* [B, H, S, D]
    of one shape, dtype and device (any strides). Same value as NSAttention's PyTorch combine."""
    check_inputs("gate_combine", o_cmp, o_slc, o_win)
    B, H, S, D = o_cmp.shape
    if o_slc.shape != o_cmp.shape or o_win.shape != o_cmp.shape:
        raise ValueError(f"nsa triton gate_combine: branch outputs differ in shape: {tuple(o_cmp.shape)}, "
                         f"{tuple(o_slc.shape)}, {tuple(o_win.shape)}")
    if logits.shape != (B, S, 3 * H) or logits.device != o_cmp.device or not logits.is_floating_point():
        raise ValueError(f"nsa triton gate_combine: logits must be a float [B, S, 3H] = {(B, S, 3 * H)} tensor on "
                         f"{o_cmp.device}, got {logits.dtype} {tuple(logits.shape)} on {logits.device}")
    if not needs_grad(logits, o_cmp, o_slc, o_win):
        return _combine_forward(logits, o_cmp, o_slc, o_win)[0]
    return GateCombine.apply(logits, o_cmp, o_slc, o_win)


def gate_warps(hidden: int) -> int:
    """num_warps of the gate kernel: one warp up to a hidden layer of 256 (M7C: 192), more for wider ones, so
    that the [4, hidden] fp32 weight tile stays at <= 32 registers per thread."""
    return max(1, min(8, pad_pow2(hidden) // 256))


def gate_mlp_combine(hidden: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None, o_cmp: torch.Tensor,
                     o_slc: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    """gate_combine(linear(silu(hidden), w2, b2), o_cmp, o_slc, o_win) in one kernel, for inference (no
    gradients): hidden [B, S, N] (the gate MLP's first Linear's output), w2 [3H, N] and b2 [3H] (or None)
    its last Linear's; o_* [B, H, S, D] of one shape, dtype and device (any strides)."""
    check_inputs("gate_mlp_combine", o_cmp, o_slc, o_win)
    B, H, S, D = o_cmp.shape
    if o_slc.shape != o_cmp.shape or o_win.shape != o_cmp.shape:
        raise ValueError(f"nsa triton gate_mlp_combine: branch outputs differ in shape: {tuple(o_cmp.shape)}, "
                         f"{tuple(o_slc.shape)}, {tuple(o_win.shape)}")
    N = hidden.shape[-1]
    if hidden.shape != (B, S, N) or w2.shape != (3 * H, N) or (b2 is not None and b2.shape != (3 * H,)):
        raise ValueError(f"nsa triton gate_mlp_combine: expected hidden [B, S, N] = [{B}, {S}, N], w2 [3H, N] = "
                         f"[{3 * H}, N], b2 [{3 * H}]; got {tuple(hidden.shape)}, {tuple(w2.shape)}, "
                         f"{None if b2 is None else tuple(b2.shape)}")
    if needs_grad(*(x for x in (hidden, w2, b2, o_cmp, o_slc, o_win) if x is not None)):
        raise ValueError("nsa triton gate_mlp_combine: inference only (no gradients); use gate_combine")
    if not o_slc.stride() == o_win.stride() == o_cmp.stride():
        o_cmp, o_slc, o_win = o_cmp.contiguous(), o_slc.contiguous(), o_win.contiguous()
    y = torch.empty(B, S, H * D, dtype=o_cmp.dtype, device=o_cmp.device)
    if y.numel():
        _gate_mlp_combine_kernel[(B * S, H)](
            hidden, w2, w2 if b2 is None else b2, o_cmp, o_slc, o_win, y, *hidden.stride(), *w2.stride(),
            *o_cmp.stride(), *y.stride(), H, S, N, D=D, D_PAD=pad_pow2(D), HID_PAD=pad_pow2(N),
            HAS_BIAS=b2 is not None, num_warps=gate_warps(N))
    return y
