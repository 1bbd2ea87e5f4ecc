"""Sliding-window attention (NSA window branch) in Triton, forward and backward.

Query t (absolute position q_start + i) attends to the keys at positions p with
t - window < p <= t that exist: k/v [B,G,N,D] hold positions k_start .. k_start + N - 1
(k_start > 0 for a bounded decode cache). A query with no such key gets a zero output, LSE = -inf
and zero gradients (as nsa.attention.ops.window_attention).

Kernels (flash-attention style, fp32 softmax statistics, same conventions as compressed.py):
* forward: one program per (query tile of BM queries, batch x query head); loops over key tiles
  of BN over the tile's band only, key indices [max(0, t_first - window + 1 - k_start),
  min(N, t_last + 1 - k_start)); writes O and LSE [B,H,Sq] fp32, kept for the backward;
* backward dQ: same grid and band, recomputes p = exp(s - LSE); delta = rowsum(dO * O). For head dim > 64
  (2-byte inputs) its tile is tuned per shape (DQ_TILES, backward_dq_tile): 64 or 128 queries per program;
* backward dK/dV: one program per (key tile of BN keys, batch x KV group), looping over the r
  query heads of the group and the query tiles that can see the tile (query positions
  [p_first, p_last + window - 1]); accumulates in fp32 registers, no atomics (deterministic).
  Its tile is tuned per shape (DKV_TILES, backward_dkv_tile): 64 or 128 keys per program, and the
  "key rows" form of compressed.py (scores computed as k q^T, no transposed dot operand).
* every kernel walks its band in two loops (_common.band_split): the interior tiles, where every query
  of the program sees every key of the step, without a mask, then the edge tiles (the causal diagonal,
  the window's far end, the ends of the sequence) with one. With the paper's window of 512 and 128-query
  tiles, 6 of a forward program's 10 key steps are interior; there a key step is 358 instead of 591
  SASS instructions (sm_90, head dim 128), the mask being ~40% of them.

Tiles (`tile_sizes`): BM = BN = 64, each capped at the next power of two >= 16 of Sq / N so
that tiny and decode calls do not pad to 64. A program touches about (BM + window) / BN key tiles,
so with the paper's window 512 the band dominates; 64 x 64 keeps the fully masked part of the two
diagonal tiles small while the dots still fill the tensor cores (the flash-attention 2 size).
fp32 with head dim > 64 uses 32 x 32: at 64 x 64 the backward kernels need ~214 KB of shared
memory on sm80 (aot_check), above the A100's 163 KB per block. Measured on an H100 (bf16,
bench/bench_kernels.py): 64 x 64 is the fastest for head dim 64 in both directions; for head dim
128 the forward ran 30% faster with 128-query tiles (5.7 vs 8.2 ms at 64k, paper layout; the dK/dV
kernel cannot step 128 queries: 262 KB of shared memory; the dQ kernel's 128-query tiles take 160 KB for
sm_90 and 128 KB for sm_80 without spills, `aot_check --ptxas-info --only _win_`). Not the untuned default
(WIDE_FWD_TILE): the one GPU run that used them had a failing kernel test it could not name before its time
ran out (BENCHMARKS.md); the GPU tests run both settings, and tuning (tune.py, forward_wide_tile,
backward_dq_tile) times them per shape and keeps the 128-query tiles only where their output matches the
64-query one.

Where flash-attn is installed (nsa/attention/flash_window.py), `window_attention(..., impl="auto")`, the
layer's default (NSA_WINDOW), times its sliding-window kernels against these on the first call per shape
and uses the faster (`implementation`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nsa.attention import flash_window
from nsa.attention.triton import _common, tune
from nsa.attention.triton._common import (
    LOG2E, DkvTile, band_split, branch_delta, cdiv, check_inputs, device_function, dot_config, lse_delta, needs_grad,
    key_tile, num_warps, online_softmax, pad_pow2, query_rows, score_grads, softmax_output,
)
from nsa.errors import UserError

BM_MAX, BN_MAX = 64, 64
WIDE_FWD_TILE = False  # True: 2 x BM_MAX forward query tiles for head dim > 64 when not tuning (tuning tries both)


def wide_applies(elem_bytes: int, head_dim: int) -> bool:
    """Can the forward use 2 x BM_MAX query tiles here (head dim > 64, not the small fp32 tiles)?"""
    return elem_bytes * pad_pow2(head_dim) <= 256 and pad_pow2(head_dim) > 64


def small_tiles(elem_bytes: int, head_dim: int) -> bool:
    """fp32 above head dim 64: 32 x 32 tiles only (the register budget), no tile variants."""
    return elem_bytes * pad_pow2(head_dim) > 256


def tile_sizes(elem_bytes: int, head_dim: int, forward: bool = False, wide: bool | None = None) -> tuple[int, int]:
    """(BM, BN) caps before clamping to the problem size; see the module docstring. wide: the
    forward's 128-query tiles where they apply (default WIDE_FWD_TILE)."""
    if small_tiles(elem_bytes, head_dim):
        return 32, 32
    if forward and (WIDE_FWD_TILE if wide is None else wide) and wide_applies(elem_bytes, head_dim):
        return min(2 * BM_MAX, 128), BN_MAX
    return BM_MAX, BN_MAX


@device_function
def _query_band(pid_m, q_start, k_start, Sq, N, window, BM: tl.constexpr, BN: tl.constexpr, INTERIOR: tl.constexpr):
    """The band of query tile pid_m in key-index space, [n_lo, n_hi), as band_split's tiles of BN: (n_lo, n_hi,
    tiles, first interior, end of interior); the interior keys [t_last - window + 1, t_first] (positions) are
    those every query of the tile sees."""
    t_first = q_start + pid_m * BM
    t_last = q_start + tl.minimum((pid_m + 1) * BM, Sq) - 1
    n_lo = tl.maximum(t_first - window + 1 - k_start, 0)
    n_hi = tl.minimum(t_last + 1 - k_start, N)
    tiles, j_fs, j_fe = band_split(n_lo, n_hi, t_last - window + 1 - k_start, tl.minimum(t_first + 1 - k_start, N), BN,
                                   INTERIOR)
    return n_lo, n_hi, tiles, j_fs, j_fe


@device_function
def _win_fwd_steps(q, k_ptrs, v_ptrs, s_kn, s_vn, m_i, l_i, acc, i_lo, i_hi, skip_at, skip, n_lo, n_hi, t, k_start,
                   window, qk_scale, offs_n, dmask, BN: tl.constexpr, MASKED: tl.constexpr,
                   IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """The forward's key tiles n_lo + j*BN, j = i (plus `skip` from i = skip_at on) for i in [i_lo, i_hi);
    MASKED: edge tiles (clipped at the window's far end, the causal diagonal and the last key), else interior
    tiles, read and scored without a mask."""
    for i in range(i_lo, i_hi):
        n0 = n_lo + (i + (i >= skip_at).to(tl.int32) * skip) * BN
        nin, k, v = key_tile(k_ptrs, v_ptrs, s_kn, s_vn, n0, offs_n, n_hi, dmask, DOT_T)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)  # log2 units times qk_scale
        if MASKED:
            kpos = k_start + n0 + offs_n
            valid = nin[None, :] & (kpos[None, :] <= t[:, None]) & (kpos[None, :] > t[:, None] - window)
            s = tl.where(valid, s, float("-inf"))
        m_i, l_i, acc = online_softmax(s, qk_scale, v, m_i, l_i, acc, IN_T, DOT_T, PREC)
    return m_i, l_i, acc


@triton.jit
def _win_fwd_kernel(
    Q, K, V, O, LSE,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kg, s_kn, s_kd,
    s_vb, s_vg, s_vn, s_vd,
    s_ob, s_oh, s_ot, s_od,
    H, Sq, N, q_start, k_start, window, scale,
    R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr, INTERIOR: tl.constexpr = True,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    g = h // R
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D_PAD)
    mmask = offs_m < Sq
    dmask = offs_d < D
    t = q_start + offs_m  # [BM] absolute query positions
    n_lo, n_hi, tiles, j_fs, j_fe = _query_band(pid_m, q_start, k_start, Sq, N, window, BM, BN, INTERIOR)

    md_mask = mmask[:, None] & dmask[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :] * s_qd,
                mask=md_mask, other=0.0).to(DOT_T)
    k_ptrs = K + b * s_kb + g * s_kg + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd
    v_ptrs = V + b * s_vb + g * s_vg + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D_PAD], tl.float32)
    qk_scale = scale * LOG2E
    m_i, l_i, acc = _win_fwd_steps(q, k_ptrs, v_ptrs, s_kn, s_vn, m_i, l_i, acc, j_fs, j_fe, j_fe, 0, n_lo, n_hi, t,
                                   k_start, window, qk_scale, offs_n, dmask, BN, False, IN_T, DOT_T, PREC)
    m_i, l_i, acc = _win_fwd_steps(q, k_ptrs, v_ptrs, s_kn, s_vn, m_i, l_i, acc, 0, tiles - (j_fe - j_fs), j_fs,
                                   j_fe - j_fs, n_lo, n_hi, t, k_start, window, qk_scale, offs_n, dmask, BN, True,
                                   IN_T, DOT_T, PREC)

    out, lse = softmax_output(acc, m_i, l_i)
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :] * s_od,
             out.to(O.dtype.element_ty), mask=md_mask)
    tl.store(LSE + (b * H + h) * Sq + offs_m, lse, mask=mmask)  # LSE: contiguous [B, H, Sq]


@device_function
def _win_dq_steps(q, do, lse, delta, dq, k_ptrs, v_ptrs, s_kn, s_vn, i_lo, i_hi, skip_at, skip, n_lo, n_hi, t, mmask,
                  k_start, window, qk_scale, offs_n, dmask, BN: tl.constexpr, MASKED: tl.constexpr,
                  IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """The dQ kernel's key tiles, as _win_fwd_steps."""
    for i in range(i_lo, i_hi):
        n0 = n_lo + (i + (i >= skip_at).to(tl.int32) * skip) * BN
        nin, k, v = key_tile(k_ptrs, v_ptrs, s_kn, s_vn, n0, offs_n, n_hi, dmask, DOT_T)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            kpos = k_start + n0 + offs_n
            valid = (nin[None, :] & mmask[:, None] & (kpos[None, :] <= t[:, None])
                     & (kpos[None, :] > t[:, None] - window))
            p = tl.where(valid, p, 0.0)
        ds = score_grads(p, do, v, delta, IN_T, DOT_T, PREC)
        dq += tl.dot(ds, k, input_precision=PREC)
    return dq


@triton.jit
def _win_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kg, s_kn, s_kd,
    s_vb, s_vg, s_vn, s_vd,
    s_db, s_dh, s_dt, s_dd,
    H, Sq, N, q_start, k_start, window, scale,
    R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr, INTERIOR: tl.constexpr = True,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    g = h // R
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D_PAD)
    mmask = offs_m < Sq
    dmask = offs_d < D
    t = q_start + offs_m
    n_lo, n_hi, tiles, j_fs, j_fe = _query_band(pid_m, q_start, k_start, Sq, N, window, BM, BN, INTERIOR)

    md_mask = mmask[:, None] & dmask[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :] * s_qd,
                mask=md_mask, other=0.0).to(DOT_T)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dt + offs_d[None, :] * s_dd,
                 mask=md_mask, other=0.0).to(DOT_T)
    row = (b * H + h) * Sq + offs_m
    lse, delta = lse_delta(LSE, DELTA, row, mmask)
    k_ptrs = K + b * s_kb + g * s_kg + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd
    v_ptrs = V + b * s_vb + g * s_vg + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd

    dq = tl.zeros([BM, D_PAD], tl.float32)
    qk_scale = scale * LOG2E
    dq = _win_dq_steps(q, do, lse, delta, dq, k_ptrs, v_ptrs, s_kn, s_vn, j_fs, j_fe, j_fe, 0, n_lo, n_hi, t, mmask,
                       k_start, window, qk_scale, offs_n, dmask, BN, False, IN_T, DOT_T, PREC)
    dq = _win_dq_steps(q, do, lse, delta, dq, k_ptrs, v_ptrs, s_kn, s_vn, 0, tiles - (j_fe - j_fs), j_fs, j_fe - j_fs,
                       n_lo, n_hi, t, mmask, k_start, window, qk_scale, offs_n, dmask, BN, True, IN_T, DOT_T, PREC)
    tl.store(DQ + row[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=md_mask)


@device_function
def _win_dkdv_steps(k, v, dk, dv, q_base, do_base, s_qt, s_dt, LSE, DELTA, row0, i_lo, i_hi, skip_at, skip, m_lo, m_hi,
                    offs_m0, kpos, nmask, q_start, window, qk_scale, dmask, BM: tl.constexpr, MASKED: tl.constexpr,
                    KEY_ROWS: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """One head's query tiles m_lo + j*BM of the dK/dV kernel, j as in _win_fwd_steps; MASKED: edge tiles
    (the causal diagonal, the window's far end, the last queries), else tiles whose every query sees every key
    of the program's tile, without a mask."""
    for i in range(i_lo, i_hi):
        m0 = m_lo + (i + (i >= skip_at).to(tl.int32) * skip) * BM
        offs_m = m0 + offs_m0
        mmask, q, do, lse, delta = query_rows(q_base, do_base, s_qt, s_dt, LSE, DELTA, row0, offs_m, m_hi, dmask, DOT_T)
        if KEY_ROWS:  # transposed scores [BN, BM]
            s_t = tl.dot(k, tl.trans(q), input_precision=PREC)
            p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
            if MASKED:
                t = q_start + offs_m
                valid_t = (nmask[:, None] & mmask[None, :] & (kpos[:, None] <= t[None, :])
                           & (kpos[:, None] > t[None, :] - window))
                p_t = tl.where(valid_t, p_t, 0.0)
            dv += tl.dot(p_t.to(IN_T).to(DOT_T), do, input_precision=PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
            dk += tl.dot((p_t * (dp_t - delta[None, :])).to(IN_T).to(DOT_T), q, input_precision=PREC)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
            p = tl.math.exp2(s * qk_scale - lse[:, None])  # [BM, BN]
            if MASKED:
                t = q_start + offs_m
                valid = (mmask[:, None] & nmask[None, :] & (kpos[None, :] <= t[:, None])
                         & (kpos[None, :] > t[:, None] - window))
                p = tl.where(valid, p, 0.0)
            dv += tl.dot(tl.trans(p.to(IN_T).to(DOT_T)), do, input_precision=PREC)
            ds = score_grads(p, do, v, delta, IN_T, DOT_T, PREC)
            dk += tl.dot(tl.trans(ds), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _win_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kg, s_kn, s_kd,
    s_vb, s_vg, s_vn, s_vd,
    s_db, s_dh, s_dt, s_dd,
    G, Sq, N, q_start, k_start, window, scale,
    R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr, KEY_ROWS: tl.constexpr = False,
    INTERIOR: tl.constexpr = True,
):
    # KEY_ROWS: scores as k q^T, as compressed._cmp_bwd_dkdv_kernel (every dot has the keys as M)
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = (pid_bg % G).to(tl.int64)
    n0 = pid_n * BN
    offs_n = n0 + tl.arange(0, BN)
    offs_m0 = tl.arange(0, BM)
    offs_d = tl.arange(0, D_PAD)
    nmask = offs_n < N
    dmask = offs_d < D
    nd_mask = nmask[:, None] & dmask[None, :]
    k = tl.load(K + b * s_kb + g * s_kg + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
                mask=nd_mask, other=0.0).to(DOT_T)
    v = tl.load(V + b * s_vb + g * s_vg + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                mask=nd_mask, other=0.0).to(DOT_T)
    kpos = k_start + offs_n
    # query indices that see a key of the tile: positions [p_first, p_last + window - 1]; those that see all of
    # the tile's keys (p_last <= t < p_first + window) need no mask
    p_first = k_start + n0
    p_last = k_start + tl.minimum(n0 + BN, N) - 1
    m_lo = tl.maximum(p_first - q_start, 0)
    m_hi = tl.minimum(p_last + window - q_start, Sq)
    tiles, i_fs, i_fe = band_split(m_lo, m_hi, p_last - q_start, tl.minimum(p_first + window - q_start, m_hi), BM,
                                   INTERIOR)

    dk = tl.zeros([BN, D_PAD], tl.float32)
    dv = tl.zeros([BN, D_PAD], tl.float32)
    H = G * R
    qk_scale = scale * LOG2E
    for hh in range(0, R):
        h = g * R + hh
        q_base = Q + b * s_qb + h * s_qh + offs_d[None, :] * s_qd
        do_base = DO + b * s_db + h * s_dh + offs_d[None, :] * s_dd
        row0 = (b * H + h) * Sq
        dk, dv = _win_dkdv_steps(k, v, dk, dv, q_base, do_base, s_qt, s_dt, LSE, DELTA, row0, i_fs, i_fe, i_fe, 0,
                                 m_lo, m_hi, offs_m0, kpos, nmask, q_start, window, qk_scale, dmask, BM, False,
                                 KEY_ROWS, IN_T, DOT_T, PREC)
        dk, dv = _win_dkdv_steps(k, v, dk, dv, q_base, do_base, s_qt, s_dt, LSE, DELTA, row0, 0, tiles - (i_fe - i_fs),
                                 i_fs, i_fe - i_fs, m_lo, m_hi, offs_m0, kpos, nmask, q_start, window, qk_scale, dmask,
                                 BM, True, KEY_ROWS, IN_T, DOT_T, PREC)
    out_rows = (b * G + g) * N + offs_n  # DK/DV: contiguous [B, G, N, D]
    tl.store(DK + out_rows[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + out_rows[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=nd_mask)


# dQ tile variants (queries BM per program, keys BN per step, num_warps; 0 = num_warps(head dim)), tuned per shape on
# the device for 2-byte inputs above head dim 64, as the forward's 128-query tile (run K, H200, paper layout: the
# forward's 128-query tile was 1.5x faster at 4k-8k; the compressed dQ kernel's 128 x 64 tile 17% faster at 64k,
# where the window dQ ran at ~200 TFLOP/s); the first is the reference (tile_sizes), used untuned.
DQ_TILES = {"bm64_bn64": (BM_MAX, BN_MAX, 0), "bm128_bn64": (128, 64, 8), "bm128_bn32": (128, 32, 8)}

# dK/dV tile variants (DkvTile: queries BM per step, keys BN per program, num_warps, the KEY_ROWS score form),
# tuned per shape on the device for 2-byte inputs (backward_dkv_tile); the first is the reference
# (tile_sizes), used untuned and for fp32. A key tile reads the q and dO of its (BN + window)
# queries, so 128 keys read them ~1.8x less often per key than 64 at the paper's window of 512. The
# key-rows tiles compile with fewer register spills for sm_90 than the reference at head dim 128 and none
# at 64 (`python -m nsa.attention.triton.aot_check --ptxas-info --group 16 --only _win_bwd_dkdv`, 2026-11-27).
DKV_TILES = {"bm64_bn64": DkvTile(BM_MAX, BN_MAX, 0), "kr_bm64_bn64": DkvTile(64, 64, 0, key_rows=True),
             "kr_bm32_bn128": DkvTile(32, 128, 8, key_rows=True)}


def _meta(q, k, forward: bool = False, wide: bool | None = None):
    B, H, Sq, D = q.shape
    G, N = k.shape[1], k.shape[2]
    bm, bn = tile_sizes(q.element_size(), D, forward, wide)
    return dict(B=B, H=H, Sq=Sq, D=D, G=G, N=N, R=H // G, D_PAD=pad_pow2(D),
                BM=min(bm, pad_pow2(Sq)), BN=min(bn, pad_pow2(N)))


def _geom(m, window, q_start, k_start):
    return (m["Sq"], m["N"], int(q_start), int(k_start), int(window), 1.0 / math.sqrt(m["D"]))


def _consts(m, dtype):
    return dict(R=m["R"], D=m["D"], D_PAD=m["D_PAD"], BM=m["BM"], BN=m["BN"], **dot_config(dtype),
                INTERIOR=_common.INTERIOR_TILES, num_warps=num_warps(m["D"]))


def window_forward(q, k, v, window: int, q_start: int = 0, k_start: int = 0, wide: bool | None = None):
    """(out [B,H,Sq,D] q.dtype, lse [B,H,Sq] fp32, -inf where a query has no key); wide: see tile_sizes."""
    m = _meta(q, k, forward=True, wide=wide)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(m["B"], m["H"], m["Sq"], dtype=torch.float32, device=q.device)
    if m["N"] == 0 or m["Sq"] == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    grid = (cdiv(m["Sq"], m["BM"]), m["B"] * m["H"])
    _win_fwd_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        m["H"], *_geom(m, window, q_start, k_start), **_consts(m, q.dtype),
    )
    return out, lse


def window_backward(q, k, v, out, lse, grad_out, window: int, q_start: int = 0, k_start: int = 0,
                    dkv_tile: str | None = None, parts: str = "dq,dkv", dq_tile: str | None = None):
    """(dq, dk, dv); dq_tile / dkv_tile: DQ_TILES / DKV_TILES names (None: the references); parts: which
    kernels run ("dq", "dkv" or both; a gradient not computed is returned as zeros), for tuning."""
    m = _meta(q, k)
    run = parts.split(",")
    if m["N"] == 0 or m["Sq"] == 0:
        return tuple(torch.zeros(t.shape, dtype=t.dtype, device=q.device) for t in (q, k, v))
    # each kernel stores every element of its gradients (no memset); a gradient not computed is zeros
    dq = (torch.empty if "dq" in run else torch.zeros)(q.shape, dtype=q.dtype, device=q.device)
    dk = (torch.empty if "dkv" in run else torch.zeros)(k.shape, dtype=k.dtype, device=q.device)
    dv = (torch.empty if "dkv" in run else torch.zeros)(v.shape, dtype=v.dtype, device=q.device)
    do = grad_out
    delta = branch_delta(do, out)  # [B,H,Sq] fp32, from the gated sum's backward where it left one
    lse = lse.contiguous()  # the kernels index it as [B,H,Sq]; a tuning slice of it is a strided view
    geom, consts = _geom(m, window, q_start, k_start), _consts(m, q.dtype)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    if "dq" in run:
        dq_consts = dict(consts)
        if dq_tile is not None and not small_tiles(q.element_size(), m["D"]):
            bm, bn, warps = DQ_TILES[dq_tile]
            dq_consts.update(BM=min(bm, pad_pow2(m["Sq"])), BN=min(bn, pad_pow2(m["N"])),
                             num_warps=warps or consts["num_warps"])
        _win_bwd_dq_kernel[(cdiv(m["Sq"], dq_consts["BM"]), m["B"] * m["H"])](
            q, k, v, do, lse, delta, dq, *strides, m["H"], *geom, **dq_consts)
    if "dkv" in run:
        key_rows = False
        if dkv_tile is not None and not small_tiles(q.element_size(), m["D"]):
            spec = DKV_TILES[dkv_tile]
            key_rows = spec.key_rows
            consts.update(BM=min(spec.bm, pad_pow2(m["Sq"])), BN=min(spec.bn, pad_pow2(m["N"])),
                          num_warps=spec.warps or consts["num_warps"])
        _win_bwd_dkdv_kernel[(cdiv(m["N"], consts["BN"]), m["B"] * m["G"])](
            q, k, v, do, lse, delta, dk, dv, *strides, m["G"], *geom, KEY_ROWS=key_rows, **consts)
    return dq, dk, dv


def backward_dkv_tile(q, k, v, out, lse, grad_out, window: int, q_start: int, k_start: int) -> str | None:
    """The dK/dV kernel's tuned tile (None: the reference; also whenever nothing is tuned)."""
    if not (q.element_size() == 2 and tune.wanted(q)):
        return None
    b, n_keys = tune.slice_batch(q), max(0, min(k.shape[2], q_start + tune.slice_len(q) - k_start))
    qs, outs, lses, gos = tune.prefix(q, out, lse, grad_out)
    ks, vs = k[:b, :, :n_keys], v[:b, :, :n_keys]
    variants = {name: (lambda name=name: window_backward(qs, ks, vs, outs, lses, gos, window, q_start, k_start,
                                                         dkv_tile=name, parts="dkv")[1:]) for name in DKV_TILES}
    return tune.pick(tune.shape_key("window_dkv", q, k, f"w{window}"), variants, tune.differs, q.device)


def backward_dq_tile(q, k, v, out, lse, grad_out, window: int, q_start: int, k_start: int) -> str | None:
    """The dQ kernel's tuned tile where it is tuned (2-byte inputs above head dim 64, as the forward's wide
    tile), else None: the reference."""
    if not (wide_applies(q.element_size(), q.shape[-1]) and tune.wanted(q)):
        return None
    b, n_keys = tune.slice_batch(q), max(0, min(k.shape[2], q_start + tune.slice_len(q) - k_start))
    qs, outs, lses, gos = tune.prefix(q, out, lse, grad_out)
    ks, vs = k[:b, :, :n_keys], v[:b, :, :n_keys]
    variants = {name: (lambda name=name: window_backward(qs, ks, vs, outs, lses, gos, window, q_start, k_start,
                                                         dq_tile=name, parts="dq")[:1]) for name in DQ_TILES}
    return tune.pick(tune.shape_key("window_dq", q, k, f"w{window}"), variants, tune.differs, q.device)


def forward_wide_tile(q, k, v, window: int, q_start: int, k_start: int) -> bool | None:
    """Wide forward tiles or not: tuned where they apply and tuning is on, else None (the default)."""
    if not (wide_applies(q.element_size(), q.shape[-1]) and tune.wanted(q)):
        return None
    b, n_keys = tune.slice_batch(q), max(0, min(k.shape[2], q_start + tune.slice_len(q) - k_start))
    (qs,) = tune.prefix(q)
    ks, vs = k[:b, :, :n_keys], v[:b, :, :n_keys]
    variants = {f"bm{bm}": (lambda wide=wide: window_forward(qs, ks, vs, window, q_start, k_start, wide)[:1])
                for bm, wide in ((BM_MAX, False), (2 * BM_MAX, True))}
    key = tune.shape_key("window_fwd", q, k, f"w{window}")
    return tune.pick(key, variants, tune.differs, q.device) == f"bm{2 * BM_MAX}"


IMPLEMENTATIONS = ("auto", "triton", *flash_window.MODULES)


def implementation(impl: str, q, k, v, window: int, q_start: int, k_start: int) -> str:
    """Which implementation computes this call: "triton" or a flash-attn package (flash_window.MODULES).

    A named flash-attn package runs wherever it can compute the call (flash_window.unusable); it must
    import. "auto": flash-attn is a candidate where installed and usable, and the choice is timed by
    tune.pick on the tuning slice (forward and, for calls that need gradients, backward: flash-attn's
    backward comes with its forward), the Triton kernel being the reference a candidate must match;
    without tuning (NSA_TUNE=off, CPU, short calls), the Triton kernel."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"nsa triton window_attention: impl={impl!r}, expected one of {', '.join(IMPLEMENTATIONS)}")
    if impl == "triton":
        return impl
    if impl != "auto":
        if flash_window.load(impl) is None:
            raise UserError(
                f"NSA_WINDOW={impl}: the {flash_window.MODULES[impl]} package is not installed here (or does not "
                f"import). Install flash-attn for this torch and CUDA, or set NSA_WINDOW=auto.")
        return "triton" if flash_window.unusable(q, k, q_start, k_start) else impl
    candidates = [name for name in flash_window.installed() if not flash_window.unusable(q, k, q_start, k_start)]
    if not candidates or not tune.wanted(q):
        return "triton"
    grad = needs_grad(q, k, v)
    b, n_keys = tune.slice_batch(q), max(0, min(k.shape[2], q_start + tune.slice_len(q) - k_start))
    (qs,) = tune.prefix(q)
    ks, vs = k[:b, :, :n_keys], v[:b, :, :n_keys]
    grad_out = torch.randn(qs.shape, generator=torch.Generator().manual_seed(0)).to(qs) if grad else None

    def run(name):
        leaves = [t.detach().requires_grad_(grad) for t in (qs, ks, vs)]
        # a graph of its own inside the model's forward: identity hooks keep its saved tensors away from
        # an enclosing activation checkpoint's hooks (which would count them, and unpack by recomputing)
        with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(_same, _same):
            out = window_attention(*leaves, window, q_start, k_start, impl=name)
        if not grad:
            return (out,)
        return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))

    key = tune.shape_key("window_impl", q, k, f"w{window}", f"grad{int(grad)}")
    return tune.pick(key, {name: (lambda name=name: run(name)) for name in ("triton", *candidates)},
                     tune.differs, q.device)


def _same(t):
    return t


class WindowAttention(torch.autograd.Function):
    """Triton sliding-window attention; saves q, k, v, out and the fp32 LSE for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, window: int, q_start: int, k_start: int):
        wide = forward_wide_tile(q, k, v, window, q_start, k_start)
        out, lse = window_forward(q, k, v, window, q_start, k_start, wide)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.geom = (window, q_start, k_start)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq_tile = backward_dq_tile(q, k, v, out, lse, grad_out, *ctx.geom)
        dkv_tile = backward_dkv_tile(q, k, v, out, lse, grad_out, *ctx.geom)
        dq, dk, dv = window_backward(q, k, v, out, lse, grad_out, *ctx.geom, dkv_tile=dkv_tile, dq_tile=dq_tile)
        return dq, dk, dv, None, None, None


def window_attention(q, k, v, window: int, q_start: int = 0, k_start: int = 0, chunk: int | None = None,
                     impl: str = "triton"):
    """Same contract as nsa.attention.ops.window_attention (`chunk` is accepted and ignored).

    q [B,H,Sq,D] at positions q_start..; k/v [B,G,N,D] at positions k_start .. k_start + N - 1;
    query t attends to the keys at positions (t - window, t]; a query with none gets zeros.
    impl: "triton" (these kernels), "flash" / "flash3" (flash-attn 2 / 3 wherever it can compute the
    call, else these kernels) or "auto" (timed: see `implementation`)."""
    check_inputs("window_attention", q, k, v)
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"nsa triton window_attention: expected q [B,H,Sq,D] and k, v [B,G,N,D] of one shape, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"nsa triton window_attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} "
                         "in batch or head dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"nsa triton window_attention: {q.shape[1]} query heads not a multiple of "
                         f"{k.shape[1]} KV groups")
    if int(window) < 1:
        raise ValueError(f"nsa triton window_attention: window must be >= 1, got {window}")
    if int(q_start) < 0 or int(k_start) < 0:
        raise ValueError(f"nsa triton window_attention: q_start and k_start must be >= 0, "
                         f"got {q_start}, {k_start}")
    window, q_start, k_start = int(window), int(q_start), int(k_start)
    impl = implementation(impl, q, k, v, window, q_start, k_start)
    if impl != "triton":
        return flash_window.window_attention(q, k, v, window, impl)
    if not needs_grad(q, k, v):
        return window_forward(q, k, v, window, q_start, k_start, forward_wide_tile(q, k, v, window, q_start, k_start))[0]
    return WindowAttention.apply(q, k, v, window, q_start, k_start)
