"""Compressed-branch attention (NSA) in Triton, forward and backward, returning the LSE.

Query t (absolute position) attends to the compressed tokens i < visible(t), where
visible(t) = min(n_cmp, max(0, (t - l + 1) // d + 1)) (block i = tokens [i*d, i*d + l) is complete
by t). Queries with no visible block get a zero output, LSE = -inf and zero gradients.

Kernels (flash-attention style, fp32 softmax statistics):
* forward: one program per (query tile of BM queries, batch x query head); loops over compressed
  key tiles of BN up to the tile's last visible block; writes O and LSE [B,H,Sq] fp32 (natural log
  of the scaled scores, what selection needs for p_cmp = exp(s - LSE));
* backward dQ: same grid, recomputes p from LSE; delta = rowsum(dO * O);
* backward dK/dV: one program per (tile of BN_DKV compressed keys, batch x KV group, segment of
  queries), holding the tile's dK/dV in registers while it streams the segment's query tiles of
  BM_DKV (for each of the r query heads of the group) that can see the key tile. A wide key tile
  and a narrow query tile (as in Triton's flash-attention backward) because q and dO are the
  big operands: every key tile re-reads them, so the q/dO traffic is (NCMP / BN_DKV) x |q, dO|.
  The number of segments is chosen per launch: enough programs to fill the GPU (short sequences
  had 16 programs for M7C at 4k), and no segment longer than QSEG queries (long sequences: one
  program per key tile walked up to 6 x 1024 query tiles at 64k). With one segment dK/dV are
  stored once (deterministic); with several, the segments add fp32 partial sums with atomics.
  Every kernel walks its tiles in two loops (_common.band_split): without a mask where every query of
  the step sees every key of it (all but the last key tiles of a forward / dQ program, all but the
  first query tiles of a dK/dV program, and its last one where Sq is ragged), then the rest with the
  mask. Unmasked, a step skips the visibility (an integer division by d per query row) and the select:
  on sm_90 at head dim 128 a forward step is 359 SASS instructions instead of 466, a dQ step 296
  instead of 404, a dK/dV step (key rows, 4 warps) 327 instead of 526.
  Tuned forms (DKV_TILES): "key rows" computes the scores transposed, s^T = k q^T [BN, BM], so that
  all four dots have the keys as their M dimension (a Hopper wgmma's M is 64 per warp group) and p, dS
  feed the dV, dK dots without a transpose; "split" runs the kernel twice, dV then dK, each holding one
  [BN, D] accumulator, which is what lets 128 keys fit in registers at head dim 128.

Tiles (reference, used without tuning and for fp32): forward and dQ BM=64 queries x BN=32
compressed keys; fp32 inputs with head dim > 64 use BM=32 so the kernels fit an A100's 163 KB of
shared memory. dK/dV: BM_DKV=32 queries x BN_DKV=64 keys (measured: on an H100, bf16, 64k tokens,
64 keys beat 32 and 128 at head dim 64; at head dim 128 the 128-key tile was faster, 64 vs 78 ms,
but Triton 3.6 miscompiles it there: dK off by 6-9% relative in the GPU tests (bf16, 2026-11-27), so
it is not offered). For 2-byte inputs each of the three kernels is tuned on the device (tune.py)
over FWD_TILES / DQ_TILES / DKV_TILES: wider flash-attention tiles (128 queries x 64 keys, 8 warps)
and 64-row dK/dV tiles (the M of one Hopper wgmma). On an H100 the compressed kernels ran at ~190
TFLOP/s (forward, paper layout, 64k) against flash attention's ~340, so the tile is worth a choice.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nsa.attention.triton import _common, tune
from nsa.attention.triton._common import (
    LOG2E, DkvTile, band_split, branch_delta, cdiv, check_inputs, device_function, dot_config, lse_delta, needs_grad,
    key_tile, num_warps, online_softmax, pad_pow2, query_rows, score_grads, softmax_output,
)

BM_MAX, BN = 64, 32
BM_DKV = 32  # dK/dV pass: queries per step
BN_DKV = 64  # dK/dV pass: compressed keys per program (see the module docstring)
QSEG = 4096  # most queries per dK/dV segment (a multiple of BM_DKV)
MIN_SEG = 512  # fewest queries per dK/dV segment when splitting to fill the GPU


@device_function
def _visible(t, CB, CS, NCMP):
    """Compressed blocks complete by absolute position t (>= 0): min(NCMP, max(0, (t - l + 1) // d + 1))."""
    return tl.minimum(tl.maximum(t - CB + 1 + CS, 0) // CS, NCMP)


@device_function
def _cmp_fwd_steps(q, k_ptrs, v_ptrs, s_kn, s_vn, m_i, l_i, acc, j_lo, j_hi, n_hi, vis, qk_scale, offs_n, dmask,
                   BN: tl.constexpr, MASKED: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr,
                   PREC: tl.constexpr):
    """The forward's key tiles j*BN for j in [j_lo, j_hi); MASKED: the tiles past the first query's visible
    blocks (each query sees its own prefix), else tiles every query of the program sees whole, no mask."""
    for j in range(j_lo, j_hi):
        n0 = j * BN
        _, k, v = key_tile(k_ptrs, v_ptrs, s_kn, s_vn, n0, offs_n, n_hi, dmask, DOT_T)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)  # log2 units times qk_scale
        if MASKED:
            s = tl.where((n0 + offs_n)[None, :] < vis[:, None], s, float("-inf"))
        m_i, l_i, acc = online_softmax(s, qk_scale, v, m_i, l_i, acc, IN_T, DOT_T, PREC)
    return m_i, l_i, acc


@triton.jit
def _cmp_fwd_kernel(
    Q, K, V, O, LSE,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kg, s_kn, s_kd,
    s_vb, s_vg, s_vn, s_vd,
    s_ob, s_oh, s_ot, s_od,
    H, Sq, NCMP, q_start, scale, CB, CS,
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
    vis = _visible(q_start + offs_m, CB, CS, NCMP)  # [BM]
    n_hi = _visible(q_start + tl.minimum((pid_m + 1) * BM, Sq) - 1, CB, CS, NCMP)
    tiles, _, j_fe = band_split(0, n_hi, 0, _visible(q_start + pid_m * BM, CB, CS, NCMP), BN, INTERIOR)

    md_mask = mmask[:, None] & dmask[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :] * s_qd,
                mask=md_mask, other=0.0).to(DOT_T)
    k_ptrs = K + b * s_kb + g * s_kg + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd
    v_ptrs = V + b * s_vb + g * s_vg + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D_PAD], tl.float32)
    qk_scale = scale * LOG2E
    m_i, l_i, acc = _cmp_fwd_steps(q, k_ptrs, v_ptrs, s_kn, s_vn, m_i, l_i, acc, 0, j_fe, n_hi, vis, qk_scale, offs_n,
                                   dmask, BN, False, IN_T, DOT_T, PREC)
    m_i, l_i, acc = _cmp_fwd_steps(q, k_ptrs, v_ptrs, s_kn, s_vn, m_i, l_i, acc, j_fe, tiles, n_hi, vis, qk_scale,
                                   offs_n, dmask, BN, True, IN_T, DOT_T, PREC)

    out, lse = softmax_output(acc, m_i, l_i)
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :] * s_od,
             out.to(O.dtype.element_ty), mask=md_mask)
    tl.store(LSE + (b * H + h) * Sq + offs_m, lse, mask=mmask)  # LSE: contiguous [B, H, Sq]


@device_function
def _cmp_dq_steps(q, do, lse, delta, dq, k_ptrs, v_ptrs, s_kn, s_vn, j_lo, j_hi, n_hi, vis, mmask, qk_scale, offs_n,
                  dmask, BN: tl.constexpr, MASKED: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr,
                  PREC: tl.constexpr):
    """The dQ kernel's key tiles, as _cmp_fwd_steps."""
    for j in range(j_lo, j_hi):
        n0 = j * BN
        _, k, v = key_tile(k_ptrs, v_ptrs, s_kn, s_vn, n0, offs_n, n_hi, dmask, DOT_T)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(((n0 + offs_n)[None, :] < vis[:, None]) & mmask[:, None], p, 0.0)
        ds = score_grads(p, do, v, delta, IN_T, DOT_T, PREC)
        dq += tl.dot(ds, k, input_precision=PREC)
    return dq


@triton.jit
def _cmp_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kg, s_kn, s_kd,
    s_vb, s_vg, s_vn, s_vd,
    s_db, s_dh, s_dt, s_dd,
    H, Sq, NCMP, q_start, scale, CB, CS,
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
    vis = _visible(q_start + offs_m, CB, CS, NCMP)
    n_hi = _visible(q_start + tl.minimum((pid_m + 1) * BM, Sq) - 1, CB, CS, NCMP)
    tiles, _, j_fe = band_split(0, n_hi, 0, _visible(q_start + pid_m * BM, CB, CS, NCMP), BN, INTERIOR)

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
    dq = _cmp_dq_steps(q, do, lse, delta, dq, k_ptrs, v_ptrs, s_kn, s_vn, 0, j_fe, n_hi, vis, mmask, qk_scale, offs_n,
                       dmask, BN, False, IN_T, DOT_T, PREC)
    dq = _cmp_dq_steps(q, do, lse, delta, dq, k_ptrs, v_ptrs, s_kn, s_vn, j_fe, tiles, n_hi, vis, mmask, qk_scale,
                       offs_n, dmask, BN, True, IN_T, DOT_T, PREC)
    tl.store(DQ + row[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=md_mask)


@device_function
def _cmp_dkdv_steps(k, v, dk, dv, q_base, do_base, s_qt, s_dt, LSE, DELTA, row0, m_lo, i_lo, i_hi, skip_at, skip, Sq,
                    q_start, CB, CS, NCMP, offs_n, offs_m0, dmask, qk_scale, BM: tl.constexpr, MASKED: tl.constexpr,
                    PARTS: tl.constexpr, KEY_ROWS: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr,
                    PREC: tl.constexpr):
    """One head's query tiles m_lo + j*BM of the dK/dV kernel, j = i (plus `skip` from i = skip_at on) for i in
    [i_lo, i_hi); MASKED: tiles with a query that does not see every key of the program's tile (the first
    ones) or past Sq (the last), else no mask."""
    for i in range(i_lo, i_hi):
        m0 = m_lo + (i + (i >= skip_at).to(tl.int32) * skip) * BM
        offs_m = m0 + offs_m0
        mmask, q, do, lse, delta = query_rows(q_base, do_base, s_qt, s_dt, LSE, DELTA, row0, offs_m, Sq, dmask, DOT_T)
        if MASKED:
            vis = _visible(q_start + offs_m, CB, CS, NCMP)
        if KEY_ROWS:  # transposed scores [BN, BM]: no transposed operand in any dot
            s_t = tl.dot(k, tl.trans(q), input_precision=PREC)
            p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])  # [BN, BM]
            if MASKED:
                p_t = tl.where((offs_n[:, None] < vis[None, :]) & mmask[None, :], p_t, 0.0)
            if PARTS != 2:
                dv += tl.dot(p_t.to(IN_T).to(DOT_T), do, input_precision=PREC)
            if PARTS != 1:
                dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
                ds_t = (p_t * (dp_t - delta[None, :])).to(IN_T).to(DOT_T)
                dk += tl.dot(ds_t, q, input_precision=PREC)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
            p = tl.math.exp2(s * qk_scale - lse[:, None])  # [BM, BN]
            if MASKED:
                p = tl.where((offs_n[None, :] < vis[:, None]) & mmask[:, None], p, 0.0)
            if PARTS != 2:
                dv += tl.dot(tl.trans(p.to(IN_T).to(DOT_T)), do, input_precision=PREC)
            if PARTS != 1:
                ds = score_grads(p, do, v, delta, IN_T, DOT_T, PREC)
                dk += tl.dot(tl.trans(ds), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _cmp_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kg, s_kn, s_kd,
    s_vb, s_vg, s_vn, s_vd,
    s_db, s_dh, s_dt, s_dd,
    G, Sq, NCMP, q_start, scale, CB, CS, QSEG,
    R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr, ATOMIC: tl.constexpr, PARTS: tl.constexpr = 0,
    KEY_ROWS: tl.constexpr = False, INTERIOR: tl.constexpr = True,
):
    # PARTS: 0 = dK and dV; 1 = dV only; 2 = dK only (the split variants: two launches, one fp32
    # accumulator each, so a program can hold twice the keys and read q/dO half as often per key).
    # KEY_ROWS: scores as k q^T (keys are the rows, as in Triton's flash-attention backward), so every
    # dot has the BN keys as its M dimension and p, ds need no transpose (a trip through shared memory).
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bg // G).to(tl.int64)
    g = (pid_bg % G).to(tl.int64)
    n0 = pid_n * BN
    offs_n = n0 + tl.arange(0, BN)
    offs_m0 = tl.arange(0, BM)
    offs_d = tl.arange(0, D_PAD)
    nmask = offs_n < NCMP
    dmask = offs_d < D
    nd_mask = nmask[:, None] & dmask[None, :]
    k = tl.load(K + b * s_kb + g * s_kg + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
                mask=nd_mask, other=0.0).to(DOT_T)
    v = tl.load(V + b * s_vb + g * s_vg + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                mask=nd_mask, other=0.0).to(DOT_T)
    # first query (index into Sq) that sees compressed block n0: t >= n0*d + l - 1; from the first that sees
    # the tile's last block on, no mask (the keys past NCMP are never stored)
    m_first = tl.maximum(n0 * CS + CB - 1 - q_start, 0)
    m_lo = tl.maximum((m_first // BM) * BM, pid_s * QSEG)  # both multiples of BM
    m_end = tl.minimum(Sq, (pid_s + 1) * QSEG)
    m_full = (tl.minimum(n0 + BN, NCMP) - 1) * CS + CB - 1 - q_start
    tiles, i_fs, i_fe = band_split(m_lo, m_end, m_full, m_end, BM, INTERIOR)

    dk = tl.zeros([BN, D_PAD], tl.float32)
    dv = tl.zeros([BN, D_PAD], tl.float32)
    H = G * R
    qk_scale = scale * LOG2E
    for hh in range(0, R):
        h = g * R + hh
        q_base = Q + b * s_qb + h * s_qh + offs_d[None, :] * s_qd
        do_base = DO + b * s_db + h * s_dh + offs_d[None, :] * s_dd
        row0 = (b * H + h) * Sq
        dk, dv = _cmp_dkdv_steps(k, v, dk, dv, q_base, do_base, s_qt, s_dt, LSE, DELTA, row0, m_lo, i_fs, i_fe, i_fe, 0,
                                 Sq, q_start, CB, CS, NCMP, offs_n, offs_m0, dmask, qk_scale, BM, False, PARTS,
                                 KEY_ROWS, IN_T, DOT_T, PREC)
        dk, dv = _cmp_dkdv_steps(k, v, dk, dv, q_base, do_base, s_qt, s_dt, LSE, DELTA, row0, m_lo, 0,
                                 tiles - (i_fe - i_fs), i_fs, i_fe - i_fs, Sq, q_start, CB, CS, NCMP, offs_n, offs_m0,
                                 dmask, qk_scale, BM, True, PARTS, KEY_ROWS, IN_T, DOT_T, PREC)
    out = ((b * G + g) * NCMP + offs_n)[:, None] * D + offs_d[None, :]  # DK/DV: contiguous [B, G, NCMP, D]
    if ATOMIC:  # several segments: fp32 partial sums
        if m_lo < m_end:
            if PARTS != 1:
                tl.atomic_add(DK + out, dk * scale, mask=nd_mask)
            if PARTS != 2:
                tl.atomic_add(DV + out, dv, mask=nd_mask)
    else:
        if PARTS != 1:
            tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=nd_mask)
        if PARTS != 2:
            tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=nd_mask)


# Tile variants (queries BM, compressed keys BN, num_warps; 0 = num_warps(head dim)), tuned per shape on
# the device for 2-byte inputs (tune.py); the first of each is the reference, used untuned and for fp32.
# Forward and dQ: flash-attention's wider tiles (128 queries, 64 keys, 8 warps) besides ours.
FWD_TILES = {"bm64_bn32": (BM_MAX, BN, 0), "bm128_bn64": (128, 64, 8), "bm64_bn64": (64, 64, 4),
             "bm128_bn32": (128, 32, 8)}
DQ_TILES = dict(FWD_TILES)
# dK/dV: 64 query rows (one Hopper wgmma tile) besides 32, and 32-key tiles; the key-rows form with 64 and
# 128 keys, whose dots all have the keys as M (the M of a Hopper wgmma is 64 per warp group), in one launch
# or split. The q/dO traffic per key falls as BN grows: the pass is bound by it (~64 flops per byte of q
# and dO at 32 keys, in the paper layout it ran at ~280 TFLOP/s). The one-launch form with 128 keys and
# both accumulators (the removed WIDE_DKV_TILE) was miscompiled on sm_90 at head dim 128 (BENCHMARKS.md).
# The key-rows tiles are those whose segmented (atomic) form, what long sequences run, compiles without register
# spills for sm_90 at head dims 64 and 128, except at 128 kr_bm32_bn64 (52 bytes) and kr_bm64_bn64 (4 bytes):
# `python -m nsa.attention.triton.aot_check --ptxas-info --group 16 --only _cmp_bwd_dkdv` (2026-11-27).
DKV_TILES = {"bm32_bn64": DkvTile(BM_DKV, BN_DKV, 0), "bm64_bn64": DkvTile(64, 64, 8), "bm64_bn32": DkvTile(64, 32, 4),
             "bm32_bn32": DkvTile(32, 32, 4), "kr_bm32_bn64": DkvTile(32, 64, 4, key_rows=True),
             "kr_bm64_bn64": DkvTile(64, 64, 8, key_rows=True), "kr_bm32_bn128": DkvTile(32, 128, 8, key_rows=True),
             "kr_split_bm64_bn128": DkvTile(64, 128, 8, split=True, key_rows=True)}


def _meta(q, k_cmp):
    B, H, Sq, D = q.shape
    G, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    if H % G:
        raise ValueError(f"nsa triton compressed_attention: {H} query heads not a multiple of {G} KV groups")
    return dict(B=B, H=H, Sq=Sq, D=D, G=G, NCMP=n_cmp, R=H // G, D_PAD=pad_pow2(D))


def _tile(tiles: dict, name: str | None, q) -> tuple[int, int, int]:
    """(BM, BN, num_warps) of a tile variant (None: the reference); fp32 inputs with head dim > 64 keep
    the reference with BM <= 32 so the kernels fit an A100's 163 KB of shared memory."""
    bm, bn, warps = tiles[name or next(iter(tiles))][:3]
    D = q.shape[-1]
    if q.dtype == torch.float32 and D > 64:
        bm = min(bm, 32)
    return min(bm, pad_pow2(q.shape[2])), bn, warps or num_warps(D)


def compressed_forward(q, k_cmp, v_cmp, block: int, stride: int, q_start: int = 0, tile: str | None = None):
    """(out [B,H,Sq,D] q.dtype, lse [B,H,Sq] fp32); tile: a FWD_TILES name (None: the reference)."""
    m = _meta(q, k_cmp)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(m["B"], m["H"], m["Sq"], dtype=torch.float32, device=q.device)
    if m["NCMP"] == 0 or m["Sq"] == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    bm, bn, warps = _tile(FWD_TILES, tile, q)
    _cmp_fwd_kernel[(cdiv(m["Sq"], bm), m["B"] * m["H"])](
        q, k_cmp, v_cmp, out, lse,
        *q.stride(), *k_cmp.stride(), *v_cmp.stride(), *out.stride(),
        m["H"], m["Sq"], m["NCMP"], int(q_start), 1.0 / math.sqrt(m["D"]), int(block), int(stride),
        R=m["R"], D=m["D"], D_PAD=m["D_PAD"], BM=bm, BN=bn, **dot_config(q.dtype), INTERIOR=_common.INTERIOR_TILES,
        num_warps=warps,
    )
    return out, lse


def compressed_backward(q, k_cmp, v_cmp, out, lse, grad_out, block: int, stride: int, q_start: int = 0,
                        dq_tile: str | None = None, dkv_tile: str | None = None, parts: str = "dq,dkv"):
    """(dq, dk, dv); dq_tile / dkv_tile: DQ_TILES / DKV_TILES names (None: the references); parts: which
    kernels run ("dq", "dkv" or both; a gradient not computed is returned as zeros), for tuning."""
    m = _meta(q, k_cmp)
    run = parts.split(",")
    if m["NCMP"] == 0 or m["Sq"] == 0:
        return tuple(torch.zeros(t.shape, dtype=t.dtype, device=q.device) for t in (q, k_cmp, v_cmp))
    # a kernel stores every element of its gradient (no memset: 1 GB for dq at 64k in the paper layout);
    # a gradient not computed is zeros, and so are the fp32 sums the segments add to atomically
    dq = (torch.empty if "dq" in run else torch.zeros)(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k_cmp.shape, dtype=k_cmp.dtype, device=q.device) if "dkv" not in run else None
    dv = torch.zeros(v_cmp.shape, dtype=v_cmp.dtype, device=q.device) if "dkv" not in run else None
    do = grad_out
    delta = branch_delta(do, out)  # [B,H,Sq] fp32, from the gated sum's backward where it left one
    lse = lse.contiguous()  # the kernels index it as [B,H,Sq]; a tuning slice of it is a strided view
    common = (m["Sq"], m["NCMP"], int(q_start), 1.0 / math.sqrt(m["D"]), int(block), int(stride))
    consts = dict(R=m["R"], D=m["D"], D_PAD=m["D_PAD"], **dot_config(q.dtype), INTERIOR=_common.INTERIOR_TILES)
    strides = (*q.stride(), *k_cmp.stride(), *v_cmp.stride(), *do.stride())
    if "dq" in run:
        bm, bn, warps = _tile(DQ_TILES, dq_tile, q)
        _cmp_bwd_dq_kernel[(cdiv(m["Sq"], bm), m["B"] * m["H"])](
            q, k_cmp, v_cmp, do, lse, delta, dq, *strides, m["H"], *common, BM=bm, BN=bn, **consts,
            num_warps=warps)
    if "dkv" in run:
        bm, bn, warps = _tile(DKV_TILES, dkv_tile, q)
        key_tiles = cdiv(m["NCMP"], bn) * m["B"] * m["G"]
        qseg, n_seg = dkdv_segments(m["Sq"], bm, key_tiles, _sm_count(q.device))
        atomic = n_seg > 1
        new = torch.zeros if atomic else torch.empty
        dk = new(k_cmp.shape, dtype=torch.float32 if atomic else k_cmp.dtype, device=q.device)
        dv = new(v_cmp.shape, dtype=torch.float32 if atomic else v_cmp.dtype, device=q.device)
        spec = DKV_TILES[dkv_tile or next(iter(DKV_TILES))]
        for part in (1, 2) if spec.split else (0,):
            _cmp_bwd_dkdv_kernel[(cdiv(m["NCMP"], bn), m["B"] * m["G"], n_seg)](
                q, k_cmp, v_cmp, do, lse, delta, dk, dv, *strides, m["G"], *common, qseg, ATOMIC=atomic,
                PARTS=part, KEY_ROWS=spec.key_rows, BM=bm, BN=bn, **consts, num_warps=warps)
    return dq, dk.to(k_cmp.dtype), dv.to(v_cmp.dtype)


def _tunes(q) -> bool:
    """Are the tiles tuned for these queries? 2-byte inputs only, and when tune.wanted says so."""
    return q.element_size() == 2 and tune.wanted(q)


def _tuned(step: str, tiles: dict, q, k_cmp, block: int, stride: int, run) -> str:
    """The tuned tile variant of `step`: run(name) computes the step's result with that tile on the
    tuning slice (callers check _tunes first). Keyed by the number of compressed keys too (rounded up to a
    power of two): the tuning slice keeps them all (_tail), and the kernels' speed depends on it."""
    n_cmp = k_cmp.shape[2]
    key = tune.shape_key(step, q, k_cmp, f"l{block}", f"d{stride}", f"N{1 << max(n_cmp - 1, 0).bit_length()}")
    return tune.pick(key, {name: (lambda name=name: run(name)) for name in tiles}, tune.differs, q.device)


def _tail(q_start: int, q, *per_query):
    """(q_start of the slice, [q and each per-query tensor sliced]): the compressed kernels' tuning slice
    is the LAST tune.slice_len(q) queries (of tune.slice_batch(q) batch elements), which see all the
    compressed keys, as most queries of a long sequence do. The first queries (tune.prefix) see few: at
    64k in the paper layout they made the dK/dV tuning keep a 32-key tile that ran 30.4 ms against 24.6 for
    the 64-key key-rows tile (H100, BENCHMARKS.md, run J)."""
    b, s = tune.slice_batch(q), tune.slice_len(q)
    off = q.shape[2] - s
    return q_start + off, [t[:b, :, off:] for t in (q, *per_query)]


def _lse_compared(out, lse):
    """The forward's result as tune.differs compares it: -inf LSEs (queries that see no block) as 0."""
    return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def forward_tile(q, k_cmp, v_cmp, block: int, stride: int, q_start: int) -> str | None:
    """The forward's tuned tile (None: the reference, also whenever nothing is tuned: no slicing then,
    decode and short calls are host-bound)."""
    if not _tunes(q):
        return None
    b = tune.slice_batch(q)
    (t0, (qs,)), ks, vs = _tail(q_start, q), k_cmp[:b], v_cmp[:b]
    return _tuned("compressed_fwd", FWD_TILES, q, k_cmp, block, stride,
                  lambda name: _lse_compared(*compressed_forward(qs, ks, vs, block, stride, t0, name)))


def backward_tiles(q, k_cmp, v_cmp, out, lse, grad_out, block: int, stride: int, q_start: int):
    """(dq_tile, dkv_tile): each kernel tuned on its own (the other's gradient is not computed)."""
    if not _tunes(q):
        return None, None
    b = tune.slice_batch(q)
    t0, (qs, outs, lses, gos) = _tail(q_start, q, out, lse, grad_out)
    args = (qs, k_cmp[:b], v_cmp[:b], outs, lses, gos, block, stride, t0)
    dq_tile = _tuned("compressed_dq", DQ_TILES, q, k_cmp, block, stride,
                     lambda name: compressed_backward(*args, dq_tile=name, parts="dq")[:1])
    dkv_tile = _tuned("compressed_dkv", DKV_TILES, q, k_cmp, block, stride,
                      lambda name: compressed_backward(*args, dkv_tile=name, parts="dkv")[1:])
    return dq_tile, dkv_tile


def dkdv_segments(sq: int, bm: int, key_tiles: int, sms: int) -> tuple[int, int]:
    """(queries per segment, number of segments) for the dK/dV pass: at least ~4 programs per SM
    where the sequence allows (segments of >= MIN_SEG queries), segments of at most QSEG queries,
    whole query tiles of bm per segment."""
    want = cdiv(4 * sms, max(key_tiles, 1))
    n_seg = max(cdiv(sq, QSEG), min(want, cdiv(sq, MIN_SEG)), 1)
    qseg = cdiv(cdiv(sq, n_seg), bm) * bm
    return qseg, cdiv(sq, qseg)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: few programs
    return torch.cuda.get_device_properties(device).multi_processor_count


class CompressedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, block: int, stride: int, q_start: int):
        out, lse = compressed_forward(q, k_cmp, v_cmp, block, stride, q_start,
                                      forward_tile(q, k_cmp, v_cmp, block, stride, q_start))
        ctx.save_for_backward(q, k_cmp, v_cmp, out, lse)
        ctx.geom = (block, stride, q_start)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k_cmp, v_cmp, out, lse = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None, None
        dq_tile, dkv_tile = backward_tiles(q, k_cmp, v_cmp, out, lse, grad_out, *ctx.geom)
        dq, dk, dv = compressed_backward(q, k_cmp, v_cmp, out, lse, grad_out, *ctx.geom, dq_tile, dkv_tile)
        return dq, dk, dv, None, None, None


def compressed_attention(q, k_cmp, v_cmp, block: int, stride: int, q_start: int = 0, chunk: int | None = None):
    """Like nsa.attention.ops.compressed_attention (`chunk` accepted and ignored) but returns
    (out [B,H,Sq,D], lse [B,H,Sq] fp32, -inf where a query sees no compressed block).
    The LSE is not differentiable (selection uses it under no_grad)."""
    check_inputs("compressed_attention", q, k_cmp, v_cmp)
    if not needs_grad(q, k_cmp, v_cmp):
        block, stride, q_start = int(block), int(stride), int(q_start)
        return compressed_forward(q, k_cmp, v_cmp, block, stride, q_start,
                                  forward_tile(q, k_cmp, v_cmp, block, stride, q_start))
    return CompressedAttention.apply(q, k_cmp, v_cmp, int(block), int(stride), int(q_start))
