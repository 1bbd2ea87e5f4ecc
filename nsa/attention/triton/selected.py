"""Selected-block attention (NSA selection branch) in Triton, forward and backward.

Group-centric, as in the paper's kernel (arXiv 2502.11089, Sec. 3.4): one program per
(query position, batch x KV group). It loads the r query heads of the group as one [R_PAD, D_PAD]
tile (R_PAD = next power of two >= max(r, 16); padding rows are masked), then walks the query's n
selected blocks idx[b, g, t, :] (-1 = unused slot). Every K/V block [l', D] is loaded once for all
r heads; tokens are causally clipped at t (tok <= t) and at the key length N.

Query tiles (qt > 1; chosen per shape on the device by tuning, below; NSA_SLC_QTILE pins it): one program
per tile of qt consecutive queries. Its rows are the qt*r (query, head) pairs (padded to a power of
two >= 16), and it walks the union of the tile's selected blocks (tile_lists: ascending, distinct,
built with two short sorts); each row masks the blocks its own query did not select (compared with
its idx row in registers), so every row's result is exactly the per-query one. Neighbouring
queries share most blocks (the forced initial and local ones always): on random inputs at 4k
tokens a tile of 4 queries walks 26 distinct blocks instead of 4 x 16, and a tile of 8 walks 31
instead of 128, so K/V loads fall 2.5-4x and the dots grow from r = 6 useful rows of 16 to 48 of
64. With r = 16 (paper layout) the gain is the shared loads only. Head tiles (tuned too, for
sequences the tuning slice holds whole): a program's rows are 64 or 128 queries of one head, as in a
flash-attention kernel, walking the union of their blocks (grid axis 2: the head within the group).
The block-centric dK/dV kernel
has the same option for its rows (tuned too; NSA_SLC_DKV_ROWS pins it, default DKV_HEAD_ROWS = 0): all r heads of a few
queries as one tile of up to 64 (query, head) rows instead of 32 queries head by head.

Tuning (tune.py, on CUDA): the first call for a shape times qt = 1/2/4/8 (and qt = 1 at K/V
pipeline depths 1/2/4 besides Triton's default 3) for the forward and the dK/dV forms (block /
block_dq / block_dqsum x head rows 0 / 64, "block" with the scores computed as k q^T, DKV_KEY_ROWS, and
"block" with 64-row tiles at 8 warps above head dim 64)
for the backward on a slice of the real inputs, drops any variant whose
result differs from the reference (qt 1, default depth, "block", rows 0: the defaults without
tuning) and keeps the fastest; NSA_TUNE=off keeps the reference.

Forward: online softmax in fp32, writes O [B,H,Sq,D] (input dtype) and LSE [B,H,Sq] (fp32,
natural log of the scaled scores, -inf for a query with no valid key -> zero output).

Backward (flash-attention style recompute): delta = rowsum(dO * O) in fp32; p = exp(s - lse),
dp = dO V^T, ds = p (dp - delta). Three ways to get the gradients, chosen by NSA_SLC_DKV (default
"block"):
* "block" (block-centric): dQ comes from the query-centric kernel (owned by its program, written
  once); dK/dV from a second kernel with one program per segment of the queries that selected a
  block. The (block -> queries) lists are the inverse of idx, built with one sort; each list is cut
  into segments of at most SEG queries so that block 0 (selected by every query) and the local
  blocks do not serialise on one program. A segment sums its queries in registers and adds the
  result to fp32 dK/dV once, so atomics touch each element ~S*n/(N/l')/SEG times instead of once
  per selecting query.
* "atomic": one kernel; every (query, slot) adds its [l', D] contribution to fp32 dK/dV with
  `tl.atomic_add`: S*n*l'*D atomics per group, contended on the forced blocks. Kept as the simple
  reference and for benchmarking.
* "block_dq" (one of the tuned variants): the block-centric kernel alone; it already
  has ds for every (query, selected block) pair, so it also adds ds K to an fp32 dQ with atomics
  (n adds per query row, from n different programs: little contention) and the dQ kernel, which
  re-gathers every query's n blocks (a third of the selected branch's training time on an H100),
  is skipped.
* "block_dqsum" (tuned too): as "block_dq", but each (query, block) dQ share is stored, without
  atomics, at its (query, slot) row of an fp32 [B*G*Sq*n, r, D] buffer, and a small kernel sums
  each query's n rows (slots -1 skipped): HBM traffic instead of the dQ kernel's gathers or atomics.
With "atomic", with "block" for blocks chosen by more than SEG queries (block 0 at least) and with
"block_dq" for dQ, the order of the fp32 additions is not fixed run to run, so the last bits vary.

Block sizes: slc_block may be any size (the token tile is padded to a power of two >= 16 and
masked); head dim any size (padded likewise); r any positive integer.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nsa.attention.triton import _common, tune
from nsa.attention.triton.segments import block_segments
from nsa.attention.triton._common import (
    LOG2E, TUNING, branch_delta, cdiv, check_inputs, device_function, dot_config, env_choice, env_int, launch_warps,
    lse_delta, needs_grad, num_warps, online_softmax, pad_pow2, score_grads, softmax_output,
)

DKV_MODES = ("block", "atomic", "block_dq", "block_dqsum")
SEG = 256  # queries per dK/dV segment (block-centric backward)
BM_DKV = 32  # query rows per dot in the block-centric dK/dV kernel
MAX_TILE_ROWS = 64  # (query, head) rows of a query tile (NSA_SLC_QTILE), bf16/fp16; 16 in fp32
HEAD_TILE_ROWS = 128  # queries of a head tile (one head per program), bf16/fp16; 32 in fp32
# the dK/dV kernel's default row tile without tuning: all r heads of a few queries as one tile of up
# to this many (query, head) rows instead of BM_DKV queries head by head; 0 = off (tuning also tries 64)
DKV_HEAD_ROWS = 0
# the dK/dV kernel's score form without tuning: False = q k^T per row tile; True = "key rows", k q^T, so
# the dK and dV dots take no transposed operand (tuning also tries it for "block", at KEY_ROWS_WARPS warps:
# no register spills for sm_90 at 8 warps, head dims 64 and 128, where the q k^T form's 4 spill 170-220 bytes
# at 128; `python -m nsa.attention.triton.aot_check --ptxas-info --group 16 --only _slc_bwd_dkdv`)
DKV_KEY_ROWS = False
KEY_ROWS_WARPS = 8


def dkv_mode() -> str:
    return env_choice("NSA_SLC_DKV", DKV_MODES)


@device_function
def _tile_rows(offs_r, t0, g, Sq, R: tl.constexpr, QT: tl.constexpr, HEAD_TILES: tl.constexpr):
    """(query, head, valid) of a query-centric program's rows: all R heads of QT queries, row =
    (query t0 + row // R, head g*R + row % R); HEAD_TILES: QT queries of the one head g*R +
    program_id(2)."""
    if HEAD_TILES:
        tq = t0 + offs_r
        heads = g * R + tl.program_id(2) + offs_r * 0
        rmask = (offs_r < QT) & (tq < Sq)
    else:
        tq = t0 + offs_r // R
        heads = g * R + offs_r % R
        rmask = (offs_r < QT * R) & (tq < Sq)
    return tq, heads, rmask


@triton.jit
def _slc_fwd_kernel(
    Q, K, V, IDX, LST, CNT, O, LSE,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kg, s_kn, s_kd,
    s_vb, s_vg, s_vn, s_vd,
    s_ib, s_ig, s_it, s_is,
    s_lb, s_lg, s_lt, s_ls,
    s_ob, s_oh, s_ot, s_od,
    G, N, Sq, NSEL, NLST, q_start, scale,
    R: tl.constexpr, QT: tl.constexpr, ROWS_PAD: tl.constexpr, NSEL_PAD: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLK: tl.constexpr, BLK_PAD: tl.constexpr,
    IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr, HEAD_TILES: tl.constexpr = False,
):
    pid_t = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = (pid_bg % G).to(tl.int64)
    t0 = pid_t.to(tl.int64) * QT

    offs_r = tl.arange(0, ROWS_PAD)  # row = (query t0 + row // R, head g*R + row % R)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLK_PAD)
    tq, heads, rmask = _tile_rows(offs_r, t0, g, Sq, R, QT, HEAD_TILES)
    dmask = offs_d < D
    nvalid = offs_n < BLK
    lim = tl.minimum(q_start + tq + 1, N)  # [ROWS_PAD] keys tok < lim: causal (tok <= t) and in range
    lim_tile = tl.max(tl.where(rmask, lim, 0), 0)  # no row of the tile sees a key at or past this

    q_ptrs = Q + b * s_qb + heads[:, None] * s_qh + tq[:, None] * s_qt + offs_d[None, :] * s_qd
    q = tl.load(q_ptrs, mask=rmask[:, None] & dmask[None, :], other=0.0).to(DOT_T)

    m_i = tl.full([ROWS_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS_PAD], tl.float32)
    acc = tl.zeros([ROWS_PAD, D_PAD], tl.float32)

    lst_row = LST + b * s_lb + g * s_lg + pid_t.to(tl.int64) * s_lt
    if QT > 1:  # walk the tile's union of blocks (CNT of them); each row keeps only its own
        offs_s = tl.arange(0, NSEL_PAD)
        own = tl.load(IDX + b * s_ib + g * s_ig + tq[:, None] * s_it + offs_s[None, :] * s_is,
                      mask=rmask[:, None] & (offs_s < NSEL)[None, :], other=-1).to(tl.int32)  # [ROWS_PAD, NSEL_PAD]
        n_iter = tl.load(CNT + pid_bg.to(tl.int64) * tl.num_programs(0) + pid_t)
    else:  # one query: LST is IDX, its own n slots
        n_iter = NLST
    k_ptrs = K + b * s_kb + g * s_kg + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd
    v_ptrs = V + b * s_vb + g * s_vg + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd
    for slot in range(0, n_iter):
        blk = tl.load(lst_row + slot * s_ls).to(tl.int64)
        start = tl.where(blk >= 0, blk * BLK, N)  # unused slot (-1): start past the end, all masked
        tok = start + offs_n
        kmask = nvalid & (tok < lim_tile)
        kv_mask = kmask[:, None] & dmask[None, :]
        k = tl.load(k_ptrs + start * s_kn, mask=kv_mask, other=0.0).to(DOT_T)
        v = tl.load(v_ptrs + start * s_vn, mask=kv_mask, other=0.0).to(DOT_T)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)  # [ROWS_PAD, BLK_PAD] fp32; log2 units times qk_scale
        ok = kmask[None, :] & (tok[None, :] < lim[:, None])
        if QT > 1:
            ok = ok & (tl.sum((own == blk.to(tl.int32)).to(tl.int32), 1) > 0)[:, None]
        s = tl.where(ok, s, float("-inf"))
        m_i, l_i, acc = online_softmax(s, scale * LOG2E, v, m_i, l_i, acc, IN_T, DOT_T, PREC)

    out, lse = softmax_output(acc, m_i, l_i)
    o_ptrs = O + b * s_ob + heads[:, None] * s_oh + tq[:, None] * s_ot + offs_d[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    tl.store(LSE + (b * G * R + heads) * Sq + tq, lse, mask=rmask)  # LSE: contiguous [B, H, Sq]


@triton.jit
def _slc_bwd_kernel(
    Q, K, V, IDX, LST, CNT, DO, LSE, DELTA, DQ, DK, DV,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kg, s_kn, s_kd,
    s_vb, s_vg, s_vn, s_vd,
    s_ib, s_ig, s_it, s_is,
    s_lb, s_lg, s_lt, s_ls,
    s_db, s_dh, s_dt, s_dd,
    G, N, Sq, NSEL, NLST, q_start, scale,
    R: tl.constexpr, QT: tl.constexpr, ROWS_PAD: tl.constexpr, NSEL_PAD: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLK: tl.constexpr, BLK_PAD: tl.constexpr,
    IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr, DKV_ATOMIC: tl.constexpr,
    HEAD_TILES: tl.constexpr = False,
):
    """dQ of a tile of QT queries (rows as in the forward); DKV_ATOMIC: also dK/dV with atomics."""
    pid_t = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = (pid_bg % G).to(tl.int64)
    t0 = pid_t.to(tl.int64) * QT

    offs_r = tl.arange(0, ROWS_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLK_PAD)
    tq, heads, rmask = _tile_rows(offs_r, t0, g, Sq, R, QT, HEAD_TILES)
    dmask = offs_d < D
    nvalid = offs_n < BLK
    rd_mask = rmask[:, None] & dmask[None, :]
    lim = tl.minimum(q_start + tq + 1, N)
    lim_tile = tl.max(tl.where(rmask, lim, 0), 0)

    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + tq[:, None] * s_qt + offs_d[None, :] * s_qd,
                mask=rd_mask, other=0.0).to(DOT_T)
    do = tl.load(DO + b * s_db + heads[:, None] * s_dh + tq[:, None] * s_dt + offs_d[None, :] * s_dd,
                 mask=rd_mask, other=0.0).to(DOT_T)
    row = (b * G * R + heads) * Sq + tq  # rows of the contiguous LSE / DELTA [B,H,Sq] and DQ [B,H,Sq,D]
    lse, delta = lse_delta(LSE, DELTA, row, rmask)

    dq = tl.zeros([ROWS_PAD, D_PAD], tl.float32)
    lst_row = LST + b * s_lb + g * s_lg + pid_t.to(tl.int64) * s_lt
    if QT > 1:
        offs_s = tl.arange(0, NSEL_PAD)
        own = tl.load(IDX + b * s_ib + g * s_ig + tq[:, None] * s_it + offs_s[None, :] * s_is,
                      mask=rmask[:, None] & (offs_s < NSEL)[None, :], other=-1).to(tl.int32)
        n_iter = tl.load(CNT + pid_bg.to(tl.int64) * tl.num_programs(0) + pid_t)
    else:
        n_iter = NLST
    k_ptrs = K + b * s_kb + g * s_kg + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd
    v_ptrs = V + b * s_vb + g * s_vg + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd
    dkv_ptrs = (b * G + g) * N * D + offs_n[:, None] * D + offs_d[None, :]  # DK/DV: contiguous fp32 [B,G,N,D]
    for slot in range(0, n_iter):
        blk = tl.load(lst_row + slot * s_ls).to(tl.int64)
        start = tl.where(blk >= 0, blk * BLK, N)
        tok = start + offs_n
        kmask = nvalid & (tok < lim_tile)
        kv_mask = kmask[:, None] & dmask[None, :]
        k = tl.load(k_ptrs + start * s_kn, mask=kv_mask, other=0.0).to(DOT_T)
        v = tl.load(v_ptrs + start * s_vn, mask=kv_mask, other=0.0).to(DOT_T)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * (scale * LOG2E)  # log2 units
        ok = kmask[None, :] & (tok[None, :] < lim[:, None]) & rmask[:, None]
        if QT > 1:
            ok = ok & (tl.sum((own == blk.to(tl.int32)).to(tl.int32), 1) > 0)[:, None]
        p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)  # [ROWS_PAD, BLK_PAD]
        ds = score_grads(p, do, v, delta, IN_T, DOT_T, PREC)
        dq += tl.dot(ds, k, input_precision=PREC)
        if DKV_ATOMIC:
            dv_blk = tl.dot(tl.trans(p.to(IN_T).to(DOT_T)), do, input_precision=PREC)  # [BLK_PAD, D_PAD]
            dk_blk = tl.dot(tl.trans(ds), q, input_precision=PREC) * scale
            tl.atomic_add(DK + dkv_ptrs + start * D, dk_blk, mask=kv_mask)
            tl.atomic_add(DV + dkv_ptrs + start * D, dv_blk, mask=kv_mask)

    tl.store(DQ + row[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=rd_mask)


@device_function
def _dkdv_rows(Q, DO, LSE, DELTA, DQ, k, v, dk, dv, tq, h, prow, rmask, tok, nmask, offs_d, dmask, b, H, Sq, q_start,
               scale, s_qb, s_qh, s_qt, s_qd, s_db, s_dh, s_dt, s_dd,
               D: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr, DQ_MODE: tl.constexpr,
               KEY_ROWS: tl.constexpr, MASKED: tl.constexpr):
    """One step of the block-centric dK/dV: rows (query tq, head h) against this block's k, v; prow:
    the rows' (query, slot) pair rows of the partial dQ buffer (DQ_MODE 2). KEY_ROWS: the scores
    computed transposed, k q^T [BLK_PAD, rows], so the dK and dV dots need no transposed operand (as
    compressed._cmp_bwd_dkdv_kernel; the dQ share then takes one). MASKED=False (an interior step: every row's
    query sees every key of a full block) leaves out the score mask; a padding row (rmask off) loads q = dO = 0
    and LSE = delta = 0, so its p is 1 and it adds nothing to dK, dV or dQ."""
    md_mask = rmask[:, None] & dmask[None, :]
    q = tl.load(Q + b * s_qb + h[:, None] * s_qh + tq[:, None] * s_qt + offs_d[None, :] * s_qd,
                mask=md_mask, other=0.0).to(DOT_T)
    do = tl.load(DO + b * s_db + h[:, None] * s_dh + tq[:, None] * s_dt + offs_d[None, :] * s_dd,
                 mask=md_mask, other=0.0).to(DOT_T)
    row = (b * H + h) * Sq + tq
    lse, delta = lse_delta(LSE, DELTA, row, rmask)
    if KEY_ROWS:
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC)
        p_t = tl.math.exp2(s_t * (scale * LOG2E) - lse[None, :])  # [BLK_PAD, rows], log2 units
        if MASKED:
            p_t = tl.where(nmask[:, None] & rmask[None, :] & (tok[:, None] <= q_start + tq[None, :]), p_t, 0.0)
        dv += tl.dot(p_t.to(IN_T).to(DOT_T), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = (p_t * (dp_t - delta[None, :])).to(IN_T).to(DOT_T)
        dk += tl.dot(ds_t, q, input_precision=PREC)
        if DQ_MODE != 0:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PREC) * scale
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = tl.math.exp2(s * (scale * LOG2E) - lse[:, None])  # [rows, BLK_PAD], log2 units
        if MASKED:
            p = tl.where(rmask[:, None] & nmask[None, :] & (tok[None, :] <= q_start + tq[:, None]), p, 0.0)
        dv += tl.dot(tl.trans(p.to(IN_T).to(DOT_T)), do, input_precision=PREC)
        ds = score_grads(p, do, v, delta, IN_T, DOT_T, PREC)
        dk += tl.dot(tl.trans(ds), q, input_precision=PREC)
        if DQ_MODE != 0:
            dq = tl.dot(ds, k, input_precision=PREC) * scale
    if DQ_MODE == 1:  # a query selects a block once: its n blocks' programs add one share each
        tl.atomic_add(DQ + row[:, None] * D + offs_d[None, :], dq, mask=md_mask)
    if DQ_MODE == 2:  # this block's share, stored at its (query, slot) pair; _slc_merge_kernel adds them
        tl.store(DQ + prow[:, None] * D + offs_d[None, :], dq, mask=md_mask)
    return dk, dv


@device_function
def _interior_start(QIDX, q_lo, q_hi, start, N, q_start, STEP: tl.constexpr, BLK: tl.constexpr,
                    BLK_PAD: tl.constexpr, INTERIOR: tl.constexpr):
    """Where a block-centric program's interior steps begin: q_lo plus the steps (of STEP entries from q_lo) that
    hold a query before the last key of the block [start, start + BLK). The segment's entries ascend, and fewer
    than BLK of them come before that key (the block's own queries: select_blocks excludes future blocks), so
    they are counted among its first BLK_PAD; if all of those do (an idx with future blocks), all steps are
    masked. So are those of a partial or padded block (a padding key, loaded as 0, would get p = exp2(-lse)
    unmasked), and all with INTERIOR off (q_hi)."""
    if INTERIOR and BLK == BLK_PAD:
        offs = q_lo + tl.arange(0, BLK_PAD)
        early = tl.load(QIDX + offs, mask=offs < q_hi, other=0) < start + BLK - 1 - q_start
        n_edge = tl.sum((early & (offs < q_hi)).to(tl.int32), 0)
        m_int = tl.minimum(q_lo + (n_edge + STEP - 1) // STEP * STEP, q_hi)
        return tl.where((start + BLK <= N) & (n_edge < BLK_PAD), m_int, q_hi)
    else:
        return q_hi


@triton.jit
def _slc_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, QIDX, PAIR, SEG_OWNER, SEG_START, SEG_END,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kg, s_kn, s_kd,
    s_vb, s_vg, s_vn, s_vd,
    s_db, s_dh, s_dt, s_dd,
    G, N, NB, Sq, q_start, scale,
    R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLK: tl.constexpr, BLK_PAD: tl.constexpr, BM: tl.constexpr,
    IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr, DQ_MODE: tl.constexpr,
    QPR: tl.constexpr, ROWS_PAD: tl.constexpr, KEY_ROWS: tl.constexpr = False, INTERIOR: tl.constexpr = True,
):
    """One program per segment of the queries that selected one block (block-centric dK/dV).
    QIDX holds query indices (into Sq) grouped by owner = (b*G + g)*NB + block, PAIR their (query,
    slot) pairs (block_segments). Each query's dQ share from this block (ds K): DQ_MODE 0 none (the
    dQ kernel computes dQ), 1 added into fp32 DQ [B,H,Sq,D] with atomics, 2 stored into the fp32
    partial buffer DQ [pairs, R, D] at the pair's row (summed afterwards by _slc_merge_kernel, no atomics).
    QPR = 0: BM queries per step, one head at a time (R dots of BM rows each). QPR > 0: QPR queries
    per step with all R heads at once, as QPR*R (query, head) rows padded to ROWS_PAD (one dot of
    up to 64 rows: the size Hopper's wgmma needs), the candidate DKV_HEAD_ROWS.
    Interior steps (QPR > 0 and INTERIOR, see interior_dkv): a step whose first query (a segment's queries
    ascend) comes at or after the last key of a full block sees every key, and runs without the score mask,
    ~a third of a step's instructions (SASS, sm_90); its rows past the segment's end are padding rows (see
    _dkdv_rows). Only the block's own queries, the first entries of its list, take the mask."""
    pid = tl.program_id(0)
    owner = tl.load(SEG_OWNER + pid).to(tl.int64)
    q_lo = tl.load(SEG_START + pid).to(tl.int64)
    q_hi = tl.load(SEG_END + pid).to(tl.int64)
    bg = owner // NB
    blk = owner % NB
    b = bg // G
    g = bg % G
    start = blk * BLK

    offs_n = tl.arange(0, BLK_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_m = tl.arange(0, BM)
    dmask = offs_d < D
    tok = start + offs_n
    nmask = (offs_n < BLK) & (tok < N)
    kv_mask = nmask[:, None] & dmask[None, :]
    k = tl.load(K + b * s_kb + g * s_kg + tok[:, None] * s_kn + offs_d[None, :] * s_kd,
                mask=kv_mask, other=0.0).to(DOT_T)
    v = tl.load(V + b * s_vb + g * s_vg + tok[:, None] * s_vn + offs_d[None, :] * s_vd,
                mask=kv_mask, other=0.0).to(DOT_T)

    dk = tl.zeros([BLK_PAD, D_PAD], tl.float32)
    dv = tl.zeros([BLK_PAD, D_PAD], tl.float32)
    H = G * R
    if QPR > 0:
        offs_r = tl.arange(0, ROWS_PAD)
        m_int = _interior_start(QIDX, q_lo, q_hi, start, N, q_start, QPR, BLK, BLK_PAD, INTERIOR)
        for part in tl.static_range(2):  # unrolled: the masked steps, then the interior ones
            if part == 0:
                m_from, m_to = q_lo, m_int
            else:
                m_from, m_to = m_int, q_hi
            for m0 in range(m_from, m_to, QPR):
                rmask = (offs_r < QPR * R) & (m0 + offs_r // R < q_hi)
                tq = tl.load(QIDX + m0 + offs_r // R, mask=rmask, other=0).to(tl.int64)  # [ROWS_PAD]
                prow = tl.load(PAIR + m0 + offs_r // R, mask=rmask, other=0).to(tl.int64) * R + offs_r % R
                dk, dv = _dkdv_rows(Q, DO, LSE, DELTA, DQ, k, v, dk, dv, tq, g * R + offs_r % R, prow, rmask, tok,
                                    nmask, offs_d, dmask, b, H, Sq, q_start, scale, s_qb, s_qh, s_qt, s_qd, s_db, s_dh,
                                    s_dt, s_dd, D, IN_T, DOT_T, PREC, DQ_MODE, KEY_ROWS, part == 0)
    else:  # BM queries per step, head by head (always masked: two head loops doubled its shared memory)
        for m0 in range(q_lo, q_hi, BM):
            mmask = m0 + offs_m < q_hi
            tq = tl.load(QIDX + m0 + offs_m, mask=mmask, other=0).to(tl.int64)  # [BM] query indices
            pair = tl.load(PAIR + m0 + offs_m, mask=mmask, other=0).to(tl.int64) * R
            for hh in range(0, R):
                dk, dv = _dkdv_rows(Q, DO, LSE, DELTA, DQ, k, v, dk, dv, tq, g * R + hh + 0 * offs_m, pair + hh,
                                    mmask, tok, nmask, offs_d, dmask, b, H, Sq, q_start, scale, s_qb, s_qh, s_qt, s_qd,
                                    s_db, s_dh, s_dt, s_dd, D, IN_T, DOT_T, PREC, DQ_MODE, KEY_ROWS, True)
    out = bg * N * D + tok[:, None] * D + offs_d[None, :]  # DK/DV: contiguous fp32 [B,G,N,D]
    used = kv_mask & (q_lo < q_hi)  # the surplus segments of block_segments are empty
    tl.atomic_add(DK + out, dk * scale, mask=used)
    tl.atomic_add(DV + out, dv, mask=used)


@triton.jit
def _slc_fwd_block_kernel(
    Q, K, V, QIDX, PAIR, SEG_OWNER, SEG_START, SEG_END, PO, PL,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kg, s_kn, s_kd,
    s_vb, s_vg, s_vn, s_vd,
    G, N, NB, q_start, scale,
    R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLK: tl.constexpr, BLK_PAD: tl.constexpr,
    QPR: tl.constexpr, ROWS_PAD: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
):
    """Block-centric forward: one program per segment of the queries that selected one block (the
    dK/dV kernel's segments). The block's K/V are loaded once; QPR queries x R heads at a time form
    the dot's rows. For each (query, head) row it writes the attention over this block alone,
    normalised (PO [pairs, R, D], input dtype), and its base-2 LSE (PL [pairs, R] fp32, -inf when no
    key of the block is visible), at the (query, slot) pair's index; _slc_merge_kernel merges a
    query's n partials."""
    pid = tl.program_id(0)
    owner = tl.load(SEG_OWNER + pid).to(tl.int64)
    q_lo = tl.load(SEG_START + pid).to(tl.int64)
    q_hi = tl.load(SEG_END + pid).to(tl.int64)
    bg = owner // NB
    b = bg // G
    g = bg % G
    tok = (owner % NB) * BLK + tl.arange(0, BLK_PAD)
    nmask = (tl.arange(0, BLK_PAD) < BLK) & (tok < N)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    kv_mask = nmask[:, None] & dmask[None, :]
    k = tl.load(K + b * s_kb + g * s_kg + tok[:, None] * s_kn + offs_d[None, :] * s_kd,
                mask=kv_mask, other=0.0).to(DOT_T)
    v = tl.load(V + b * s_vb + g * s_vg + tok[:, None] * s_vn + offs_d[None, :] * s_vd,
                mask=kv_mask, other=0.0).to(DOT_T)
    offs_r = tl.arange(0, ROWS_PAD)
    hh = offs_r % R
    for m0 in range(q_lo, q_hi, QPR):
        ent = m0 + offs_r // R
        rmask = (offs_r < QPR * R) & (ent < q_hi)
        tq = tl.load(QIDX + ent, mask=rmask, other=0).to(tl.int64)
        row = tl.load(PAIR + ent, mask=rmask, other=0).to(tl.int64) * R + hh  # row of PO / PL
        q = tl.load(Q + b * s_qb + (g * R + hh)[:, None] * s_qh + tq[:, None] * s_qt + offs_d[None, :] * s_qd,
                    mask=rmask[:, None] & dmask[None, :], other=0.0).to(DOT_T)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * (scale * LOG2E)  # log2 units
        valid = rmask[:, None] & nmask[None, :] & (tok[None, :] <= q_start + tq[:, None])
        s = tl.where(valid, s, float("-inf"))
        m = tl.max(s, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = tl.sum(p, 1)
        empty = l_i == 0.0
        o = tl.dot(p.to(IN_T).to(DOT_T), v, input_precision=PREC) / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(PO + row[:, None] * D + offs_d[None, :], o.to(PO.dtype.element_ty),
                 mask=rmask[:, None] & dmask[None, :])
        part_lse = tl.where(empty, float("-inf"), m_safe + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(PL + row, part_lse, mask=rmask)


@triton.jit
def _slc_merge_kernel(
    PO, PL, IDX, O, LSE,
    s_ib, s_ig, s_it, s_is,
    s_ob, s_oh, s_ot, s_od,
    G, Sq, NSEL,
    R: tl.constexpr, QT: tl.constexpr, ROWS_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    SOFTMAX: tl.constexpr,
):
    """Merge each (query, head)'s n per-(query, slot) partial rows of PO [pairs, R, D] into O [B,H,Sq,D],
    slots -1 skipped. SOFTMAX: attention partials of _slc_fwd_block_kernel (normalised outputs, base-2
    LSEs in PL), weighted by their LSEs, and the natural-log LSE [B,H,Sq] out; else a plain sum (the
    dK/dV kernel's dQ shares, DQ_MODE 2; PL and LSE unused)."""
    pid_t = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = (pid_bg % G).to(tl.int64)
    offs_r = tl.arange(0, ROWS_PAD)
    offs_d = tl.arange(0, D_PAD)
    tq = pid_t.to(tl.int64) * QT + offs_r // R
    hh = offs_r % R
    rmask = (offs_r < QT * R) & (tq < Sq)
    dmask = offs_d < D
    m_i = tl.full([ROWS_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS_PAD], tl.float32)
    acc = tl.zeros([ROWS_PAD, D_PAD], tl.float32)
    for slot in range(0, NSEL):
        blk = tl.load(IDX + b * s_ib + g * s_ig + tq * s_it + slot * s_is, mask=rmask, other=-1)
        ok = rmask & (blk >= 0)
        row = ((pid_bg.to(tl.int64) * Sq + tq) * NSEL + slot) * R + hh
        part = tl.load(PO + row[:, None] * D + offs_d[None, :], mask=ok[:, None] & dmask[None, :], other=0.0)
        if SOFTMAX:
            part_lse = tl.load(PL + row, mask=ok, other=float("-inf"))
            m_new = tl.maximum(m_i, part_lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_safe)
            w = tl.math.exp2(part_lse - m_safe)
            l_i = l_i * alpha + w
            acc = acc * alpha[:, None] + part.to(tl.float32) * w[:, None]
            m_i = m_new
        else:
            acc += part.to(tl.float32)
    heads = g * R + hh
    if SOFTMAX:
        acc, lse = softmax_output(acc, m_i, l_i)
        tl.store(LSE + (b * G * R + heads) * Sq + tq, lse, mask=rmask)
    tl.store(O + b * s_ob + heads[:, None] * s_oh + tq[:, None] * s_ot + offs_d[None, :] * s_od,
             acc.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def interior_dkv(head_dim: int, warps: int) -> bool:
    """Does the dK/dV kernel's row-tile form (QPR > 0) run its interior steps unmasked (_common.INTERIOR_TILES)?
    Not above head dim 64 at fewer than 8 warps: there the second loop made ptxas spill (sm_90: 176 -> 292
    bytes; sm_80: 816 bytes -> 18 KB; `aot_check --ptxas-info --group 16 --only _slc_bwd_dkdv`), and tuning offers
    8 warps beside it (DKV_CANDIDATES)."""
    return _common.INTERIOR_TILES and (head_dim <= 64 or warps >= 8)


def row_cap(rows: int, dtype: torch.dtype) -> int:
    """(query, head) rows a tile may hold: `rows` for bf16/fp16, a quarter in fp32 (A100 shared memory)."""
    return rows // 4 if dtype == torch.float32 else rows


def dkv_rows() -> int:
    return env_int("NSA_SLC_DKV_ROWS", DKV_HEAD_ROWS, 0, 64,
                   "(query, head) rows per step of the selected dK/dV kernel; 0 = one head at a time")


def dkdv_queries_per_step(r: int, dtype: torch.dtype, rows: int | None = None) -> int:
    """Queries per step of the block-centric dK/dV kernel with all r heads as one row tile of at
    most `rows` (default NSA_SLC_DKV_ROWS, else DKV_HEAD_ROWS) rows, or 0: BM_DKV queries, one head
    at a time."""
    rows = row_cap(dkv_rows() if rows is None else rows, dtype)
    return rows // r if rows >= r else 0


def query_tile(Sq: int, r: int, dtype: torch.dtype, qt: int | None = None) -> int:
    """Queries per program of the forward and dQ kernels: `qt` (default NSA_SLC_QTILE, else 1), at
    most Sq, and at most MAX_TILE_ROWS (query, head) rows."""
    if qt is None:
        qt = env_int("NSA_SLC_QTILE", 1, 1, 64, "queries per selected-attention program; 1 = one query per program")
    return max(1, min(qt, Sq, row_cap(MAX_TILE_ROWS, dtype) // r))


def head_query_tile(Sq: int, dtype: torch.dtype, qt: int) -> int:
    """Queries per program of a head tile: qt, at most Sq and HEAD_TILE_ROWS (a quarter in fp32)."""
    return max(1, min(qt, Sq, row_cap(HEAD_TILE_ROWS, dtype)))


def tile_lists(idx: torch.Tensor, qt: int):
    """The union of the selected blocks of each tile of qt consecutive queries.

    idx [B,G,Sq,n] (-1 = unused) -> (lst int32 [B,G,T,qt*n]: each tile's distinct blocks ascending,
    then -1; cnt int32 [B,G,T]: how many), T = ceil(Sq / qt); a ragged last tile is padded with -1.
    Two sorts of qt*n-long rows, no host synchronisation."""
    B, G, Sq, n = idx.shape
    T = cdiv(Sq, qt)
    x = idx.to(torch.int32)
    if T * qt != Sq:
        x = F.pad(x, (0, 0, 0, T * qt - Sq), value=-1)
    big = torch.iinfo(torch.int32).max
    x = x.reshape(B, G, T, qt * n)
    x = torch.where(x < 0, big, x).sort(-1).values
    dup = F.pad(x[..., 1:] == x[..., :-1], (1, 0), value=False)
    x = torch.where(dup, big, x).sort(-1).values  # distinct blocks first, the rest (big) last
    cnt = (x != big).sum(-1, dtype=torch.int32)
    return torch.where(x == big, -1, x), cnt


def _meta(q, k, idx, slc_block, qt, head_tiles: bool = False):
    B, H, Sq, D = q.shape
    G, N = k.shape[1], k.shape[2]
    if H % G:
        raise ValueError(f"nsa triton selected_attention: {H} query heads not a multiple of {G} KV groups")
    r = H // G
    n = idx.shape[-1]
    return dict(B=B, H=H, Sq=Sq, D=D, G=G, N=N, r=r, n=n, D_PAD=pad_pow2(D),
                consts=dict(R=r, QT=qt, ROWS_PAD=pad_pow2(qt * (1 if head_tiles else r)), NSEL_PAD=pad_pow2(n, 1),
                            D=D, D_PAD=pad_pow2(D), BLK=int(slc_block), BLK_PAD=pad_pow2(slc_block),
                            HEAD_TILES=head_tiles, **dot_config(q.dtype)))


def _grid(n_tiles: int, m: dict) -> tuple[int, int, int]:
    """Query-centric programs: (query tiles, batch x KV group, heads per group with head tiles, else 1)."""
    return n_tiles, m["B"] * m["G"], m["r"] if m["consts"]["HEAD_TILES"] else 1


def _tile_args(idx, lists, qt):
    """Kernel arguments (IDX, LST, CNT, idx strides, list strides) and the grid's first dimension."""
    if qt == 1:  # each query walks its own slots: the "list" is idx itself
        return (idx, idx, idx, *idx.stride(), *idx.stride()), idx.shape[2], idx.shape[-1]
    lst, cnt = lists
    return (idx, lst, cnt, *idx.stride(), *lst.stride()), lst.shape[2], lst.shape[-1]


def _warps(kernel: str, m: dict) -> int:
    if m["consts"]["HEAD_TILES"]:  # as flash attention's 64- and 128-row tiles
        return 8 if m["consts"]["ROWS_PAD"] >= 128 else 4
    if m["consts"]["QT"] == 1:
        return launch_warps(kernel, m["D"])
    return TUNING.get(kernel, num_warps(m["D"]))  # query tiles: not measured yet


def _stages(stages: int | None) -> dict:
    """Launch option: the software-pipelining depth of the K/V block loads (None: Triton's default, 3
    on CUDA: two blocks in flight, 36 KB of shared memory per program at head dim 64)."""
    return {} if stages is None else {"num_stages": stages}


def selected_forward(q, k, v, idx, slc_block: int, q_start: int = 0, qt: int = 1, lists=None,
                     stages: int | None = None, head_tiles: bool = False):
    """Triton forward: (out [B,H,Sq,D] in q.dtype, lse [B,H,Sq] fp32). qt > 1: tiles of qt queries
    walk the union of their blocks, `lists` = tile_lists(idx, qt) (built here when None); stages:
    see _stages; head_tiles: a program's rows are qt queries of one head, not all heads of qt queries."""
    m = _meta(q, k, idx, slc_block, qt, head_tiles)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(m["B"], m["H"], m["Sq"], dtype=torch.float32, device=q.device)
    if m["Sq"] == 0:
        return out, lse
    if qt > 1 and lists is None:
        lists = tile_lists(idx, qt)
    tile_args, n_tiles, n_list = _tile_args(idx, lists, qt)
    _slc_fwd_kernel[_grid(n_tiles, m)](
        q, k, v, tile_args[0], tile_args[1], tile_args[2], out, lse,
        *q.stride(), *k.stride(), *v.stride(), *tile_args[3:], *out.stride(),
        m["G"], m["N"], m["Sq"], m["n"], n_list, int(q_start), 1.0 / math.sqrt(m["D"]),
        **m["consts"], num_warps=_warps("selected_fwd", m), **_stages(stages),
    )
    return out, lse


def selected_forward_blocks(q, k, v, idx, slc_block: int, q_start: int = 0, segments=None):
    """Block-centric forward ("bc", a tuned variant): (out, lse, segments). Each selected block's K/V
    are loaded once per segment of the queries that chose it (instead of once per query), all heads
    of several queries forming a dot's rows; per-(query, slot) partial results go through HBM
    ([B*G*Sq*n, r, D] in the input dtype) and a second kernel merges each query's n of them.
    `segments` (block_segments) are returned for the backward, which uses the same ones."""
    m = _meta(q, k, idx, slc_block, 1)
    B, H, Sq, D, G, N, r, n = (m[key] for key in ("B", "H", "Sq", "D", "G", "N", "r", "n"))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    n_blocks = cdiv(N, int(slc_block))
    if segments is None:
        segments = block_segments(idx, n_blocks, SEG)
    if Sq == 0:
        return out, lse, segments
    qidx, seg_owner, seg_start, seg_end, pair = segments
    part_o = torch.empty(B * G * Sq * n, r, D, dtype=q.dtype, device=q.device)  # rows never written: never read
    part_lse = torch.empty(B * G * Sq * n, r, dtype=torch.float32, device=q.device)
    c = m["consts"]
    dots = {key: c[key] for key in ("IN_T", "DOT_T", "PREC")}
    qpr = max(1, row_cap(MAX_TILE_ROWS, q.dtype) // r)
    if seg_owner.numel():
        _slc_fwd_block_kernel[(seg_owner.numel(),)](
            q, k, v, qidx, pair, seg_owner, seg_start, seg_end, part_o, part_lse,
            *q.stride(), *k.stride(), *v.stride(), G, N, n_blocks, int(q_start), 1.0 / math.sqrt(D),
            R=r, D=D, D_PAD=c["D_PAD"], BLK=c["BLK"], BLK_PAD=c["BLK_PAD"], QPR=qpr, ROWS_PAD=pad_pow2(qpr * r),
            **dots, num_warps=launch_warps("selected_bwd_dkdv", D))
    _merge(part_o, idx, out, m, part_lse, lse)
    return out, lse, segments


def _merge(parts, idx, out, m: dict, part_lse=None, lse=None) -> None:
    """_slc_merge_kernel: out [B,H,Sq,D] from the per-(query, slot) rows `parts`; softmax-weighted by
    part_lse (filling lse) when given, else summed."""
    qt = max(1, row_cap(MAX_TILE_ROWS, out.dtype) // m["r"])
    _slc_merge_kernel[(cdiv(m["Sq"], qt), m["B"] * m["G"])](
        parts, part_lse if part_lse is not None else parts, idx, out, lse if lse is not None else parts,
        *idx.stride(), *out.stride(), m["G"], m["Sq"], m["n"],
        R=m["r"], QT=qt, ROWS_PAD=pad_pow2(qt * m["r"]), D=m["D"], D_PAD=m["D_PAD"], SOFTMAX=part_lse is not None,
        num_warps=num_warps(m["D"]))


def selected_backward(q, k, v, idx, out, lse, grad_out, slc_block: int, q_start: int = 0, mode: str | None = None,
                      qt: int = 1, lists=None, rows: int | None = None, stages: int | None = None, segments=None,
                      key_rows: bool | None = None, head_tiles: bool = False, dkv_warps: int = 0):
    """(dq, dk, dv); mode "block", "atomic", "block_dq" or "block_dqsum" (default: NSA_SLC_DKV, else "block");
    qt / lists / stages / head_tiles as in selected_forward (for the dQ kernel); rows: the dK/dV kernel's
    row tile (see dkdv_queries_per_step); key_rows: its score form (default DKV_KEY_ROWS); dkv_warps: its
    num_warps (0: KEY_ROWS_WARPS for key rows, else launch_warps); segments: block_segments(idx, ...) when the
    forward built them."""
    m = _meta(q, k, idx, slc_block, qt, head_tiles)
    mode = mode or dkv_mode()
    key_rows = DKV_KEY_ROWS if key_rows is None else bool(key_rows)
    do = grad_out
    delta = branch_delta(do, out)  # [B,H,Sq] fp32, from the gated sum's backward where it left one
    lse = lse.contiguous()  # the kernels index it as [B,H,Sq]; a tuning slice of it is a strided view
    dk = torch.zeros(m["B"], m["G"], m["N"], m["D"], dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    if mode == "block_dq":  # fp32 accumulator for the dK/dV kernel's atomic dQ shares
        dq = torch.zeros(m["B"], m["H"], m["Sq"], m["D"], dtype=torch.float32, device=q.device)
    elif mode == "block_dqsum":  # the dK/dV kernel's per-(query, slot) dQ shares; unused slots never read
        dq_parts = torch.empty(m["B"] * m["G"] * m["Sq"] * m["n"], m["r"], m["D"], dtype=torch.float32,
                               device=q.device)
        dq = torch.empty(m["B"], m["H"], m["Sq"], m["D"], dtype=q.dtype, device=q.device)
    else:
        dq = torch.empty(m["B"], m["H"], m["Sq"], m["D"], dtype=q.dtype, device=q.device)
    if m["Sq"] > 0:
        strides = (*q.stride(), *k.stride(), *v.stride())
        atomic = mode == "atomic"
        if mode not in ("block_dq", "block_dqsum"):
            if qt > 1 and lists is None:
                lists = tile_lists(idx, qt)
            tile_args, n_tiles, n_list = _tile_args(idx, lists, qt)
            _slc_bwd_kernel[_grid(n_tiles, m)](
                q, k, v, tile_args[0], tile_args[1], tile_args[2], do, lse, delta, dq, dk, dv,
                *strides, *tile_args[3:], *do.stride(),
                m["G"], m["N"], m["Sq"], m["n"], n_list, int(q_start), 1.0 / math.sqrt(m["D"]),
                DKV_ATOMIC=atomic, **m["consts"],
                num_warps=_warps("selected_bwd_atomic" if atomic else "selected_bwd_dq", m), **_stages(stages),
            )
        if not atomic:
            n_blocks = cdiv(m["N"], int(slc_block))
            qidx, seg_owner, seg_start, seg_end, pair = segments or block_segments(idx, n_blocks, SEG)
            dq_mode = {"block_dq": 1, "block_dqsum": 2}.get(mode, 0)
            if seg_owner.numel():
                consts = {k_: v_ for k_, v_ in m["consts"].items()
                          if k_ not in ("QT", "ROWS_PAD", "NSEL_PAD", "HEAD_TILES")}
                qpr = dkdv_queries_per_step(m["r"], q.dtype, rows)
                warps = dkv_warps or (KEY_ROWS_WARPS if key_rows else launch_warps("selected_bwd_dkdv", m["D"]))
                _slc_bwd_dkdv_kernel[(seg_owner.numel(),)](
                    q, k, v, do, lse, delta, dk, dv, dq_parts if dq_mode == 2 else dq, qidx, pair,
                    seg_owner, seg_start, seg_end, *strides, *do.stride(),
                    m["G"], m["N"], n_blocks, m["Sq"], int(q_start), 1.0 / math.sqrt(m["D"]),
                    BM=BM_DKV, DQ_MODE=dq_mode, QPR=qpr, ROWS_PAD=pad_pow2(max(qpr, 1) * m["r"]), KEY_ROWS=key_rows,
                    INTERIOR=interior_dkv(m["D"], warps), **consts, num_warps=warps,
                )
            if dq_mode == 2:
                _merge(dq_parts, idx, dq, m)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# Tuning (tune.py): on its first call for a shape the layer times these variants on a slice of its
# real inputs and keeps the fastest that agrees with the reference (the first listed: one query per
# program at Triton's default pipelining depth; block-centric dK/dV head by head). One query per
# program is also tried at other depths of the K/V load pipeline (STAGE_CANDIDATES; the dQ kernel,
# which walks the same blocks, follows the forward's): fewer stages, less shared memory per program,
# more programs per SM to hide the gathers' latency.
QTILE_CANDIDATES = (1, 2, 4, 8)
# Head tiles ("qt64h", "qt128h"): a program's rows are 64 or 128 queries of one head, as in a flash-attention
# kernel, walking the union of their blocks. Below ~8k tokens a query's n blocks are a large share of the
# blocks it can see (M7C at 4096: 16 of ~32 on average), so the union is nearly the causal range and a
# program does ~2x the needed dot work, but on full 64/128-row tiles (group tiles: r = 6 heads of 8
# queries fill 48 of 64 rows and walk ~31 blocks for 16 needed). Offered only when the tuning slice holds
# every query of the call (Sq <= tune.SLICE_QUERIES): the union grows with the sequence, so a prefix of a
# long sequence would time them too fast. 2-byte inputs and head dims up to 128 only: in fp32 at head dim 128
# the dQ kernel's 32-row tile overflows an A100's shared memory (`aot_check --ptxas-info --only _slc_`).
HEAD_TILE_CANDIDATES = (64, 128)
HEAD_SUFFIX = "h"
BLOCK_TILE = "bc"  # the block-centric forward (selected_forward_blocks), also a forward candidate
# the block-centric forward and block_dqsum keep one row per (query, slot, head) in HBM: offered only
# while that buffer stays under this size for the whole call (M7C training, 8 x 4096 tokens: 0.8 / 1.6
# GB; the paper layout at 64k would need 17 / 34 GB)
PARTIALS_MAX_BYTES = 4 << 30


def partials_fit(q, idx, elem_bytes: int) -> bool:
    """Does a [B*G*Sq*n, r, D] buffer of elem_bytes elements stay under PARTIALS_MAX_BYTES?"""
    B, H, Sq, D = q.shape
    return B * idx.shape[1] * Sq * idx.shape[-1] * (H // idx.shape[1]) * D * elem_bytes <= PARTIALS_MAX_BYTES
STAGE_CANDIDATES = (1, 2, 4)
# (mode, rows, key rows, num_warps of the dK/dV kernel, 0: its default): the first is the reference. The 8-warp
# "block" form with 64-row tiles is offered above head dim 64 only (WIDE_HEAD_WARPS): at head dim 128 its 4-warp
# default spills 176 bytes for sm_90, 8 warps none (`aot_check --ptxas-info --group 16 --only _slc_bwd_dkdv`,
# with _common.TUNING["selected_bwd_dkdv"] = 8); at head dim 64 neither spills.
DKV_CANDIDATES = (("block", DKV_HEAD_ROWS, False, 0), ("block", 64, False, 0), ("block_dq", DKV_HEAD_ROWS, False, 0),
                  ("block_dq", 64, False, 0), ("block_dqsum", DKV_HEAD_ROWS, False, 0), ("block_dqsum", 64, False, 0),
                  ("block", DKV_HEAD_ROWS, True, 0), ("block", 64, True, 0), ("block", 64, False, 8))
WIDE_HEAD_WARPS = 64  # candidates with their own num_warps are offered above this head dim


def dkv_variant_name(mode: str, rows: int, key_rows: bool, warps: int = 0) -> str:
    """A backward variant's tuning name, e.g. "block/rows64", in the key-rows form "block/rows64/kr", at 8 warps
    "block/rows64/w8"."""
    return f"{mode}/rows{rows}" + ("/kr" if key_rows else "") + (f"/w{warps}" if warps else "")


def parse_dkv_variant(name: str) -> tuple[str, int, bool, int]:
    """(mode, rows, key_rows, warps) of a dkv_variant_name."""
    mode, rest = name.split("/rows")
    rows, *flags = rest.split("/")
    warps = [int(f[1:]) for f in flags if f.startswith("w")]
    return mode, int(rows), "kr" in flags, warps[0] if warps else 0


def _tune_inputs(k, v, q_start, *per_query):
    """The tuning slice: (its q_start, k, v, [each per-query tensor cut]): the LAST tune.slice_len queries
    of tune.slice_batch batch elements, with all their keys. They choose among as many blocks as most
    queries of a long sequence do; the first queries choose among few, so neighbouring queries share more
    blocks there, which flattered the query tiles at 16k-64k (as the compressed tiles, compressed._tail)."""
    b, s = tune.slice_batch(per_query[0]), tune.slice_len(per_query[0])
    off = per_query[0].shape[2] - s
    return q_start + off, k[:b], v[:b], [t[:b, :, off:] for t in per_query]


def _key(step: str, q, k, idx, slc_block: int) -> str:
    """Tuning key: the slice length (tune.shape_key) and the number of keys (the tail slices of 16k and 64k
    differ)."""
    return tune.shape_key(step, q, k, f"n{idx.shape[-1]}", f"blk{slc_block}", f"N{pad_pow2(k.shape[2], 1)}")


class Tile(NamedTuple):
    qt: int  # queries per program
    stages: int | None = None  # K/V pipeline depth, None: Triton's default
    head_tiles: bool = False  # rows: qt queries of one head (else all r heads of qt queries)


def parse_tile(name: str) -> Tile:
    """A forward variant's name -> its Tile, for the forward and its dQ kernel: "qt4" -> (4, None, False),
    "qt1s2" -> (1, 2, False), "qt64h" -> (64, None, True); "bc" (block-centric forward) -> (1, None, False)."""
    if name == BLOCK_TILE:
        return Tile(1)
    heads = name.endswith(HEAD_SUFFIX)
    qt, _, stages = name[2:].removesuffix(HEAD_SUFFIX).partition("s")
    return Tile(int(qt), int(stages) if stages else None, heads)


def forward_tile(q, k, v, idx, slc_block: int, q_start: int) -> str:
    """The forward's (and its dQ's) tile variant, a name parse_tile reads: NSA_SLC_QTILE's query tile
    when set, else the tuned fastest of QTILE_CANDIDATES, one query at STAGE_CANDIDATES, the head tiles
    (HEAD_TILE_CANDIDATES; short sequences) and the block-centric forward when tuning, else one query
    per program."""
    Sq, r = q.shape[2], q.shape[1] // k.shape[1]
    if "NSA_SLC_QTILE" in os.environ or not tune.wanted(q):
        return f"qt{query_tile(Sq, r, q.dtype)}"
    t0, ks, vs, (qs, ids) = _tune_inputs(k, v, q_start, q, idx)
    options = [f"qt{qt}" for qt in sorted({query_tile(qs.shape[2], r, q.dtype, qt) for qt in QTILE_CANDIDATES})]
    if q.element_size() == 2:  # fp32 K/V stages are twice as big: 4 of them overflow an A100's shared memory
        options += [f"qt1s{st}" for st in STAGE_CANDIDATES]
    if Sq <= tune.SLICE_QUERIES and q.element_size() == 2 and q.shape[-1] <= 128:  # fp32 / wider heads: smem
        options += [f"qt{qt}{HEAD_SUFFIX}" for qt in sorted({head_query_tile(Sq, q.dtype, c) for c in HEAD_TILE_CANDIDATES})]
    if partials_fit(q, idx, q.element_size()):
        options.append(BLOCK_TILE)

    def run(name):  # compared on the output (the LSE comes out of the same pass)
        if name == BLOCK_TILE:
            return selected_forward_blocks(qs, ks, vs, ids, slc_block, t0)[:1]
        return selected_forward(qs, ks, vs, ids, slc_block, t0, *_tile_opts(name))[:1]

    variants = {name: (lambda name=name: run(name)) for name in options}
    key = _key("selected_fwd", q, k, idx, slc_block)
    return tune.pick(key, variants, tune.differs, q.device)


def _tile_opts(name: str) -> tuple:
    """selected_forward's (qt, lists, stages, head_tiles) arguments for a tile variant."""
    qt, stages, heads = parse_tile(name)
    return qt, None, stages, heads


def backward_plan(q, k, v, idx, out, lse, grad_out, slc_block: int, q_start: int,
                  tile: str) -> tuple[str, int | None, bool, int]:
    """(dK/dV mode, rows, key rows, num_warps or 0) for this backward: NSA_SLC_DKV / NSA_SLC_DKV_ROWS pin
    theirs; the rest is tuned over DKV_CANDIDATES when tuning, else the defaults."""
    pinned_mode = os.environ.get("NSA_SLC_DKV") and dkv_mode()
    pinned_rows = dkv_rows() if "NSA_SLC_DKV_ROWS" in os.environ else None
    if not tune.wanted(q) or pinned_mode == "atomic":
        return pinned_mode or dkv_mode(), pinned_rows, DKV_KEY_ROWS, 0
    options = list(dict.fromkeys((m, rows, kr, w) for m, rows, kr, w in DKV_CANDIDATES
                                 if pinned_mode in (None, m) and pinned_rows in (None, rows)
                                 and (m != "block_dqsum" or pinned_mode == m or partials_fit(q, idx, 4))
                                 and (w == 0 or q.shape[-1] > WIDE_HEAD_WARPS)))
    if not options:  # both pinned, to a pair not in the list
        return pinned_mode, pinned_rows, DKV_KEY_ROWS, 0
    if len(options) == 1:
        return options[0]
    t0, ks, vs, (qs, ids, outs, lses, gos) = _tune_inputs(k, v, q_start, q, idx, out, lse, grad_out)
    qt, stages, heads = parse_tile(tile)
    lists = tile_lists(ids, qt) if qt > 1 else None
    variants = {dkv_variant_name(m, rows, kr, w): (lambda m=m, rows=rows, kr=kr, w=w: selected_backward(
        qs, ks, vs, ids, outs, lses, gos, slc_block, t0, mode=m, qt=qt, lists=lists, rows=rows, stages=stages,
        key_rows=kr, head_tiles=heads, dkv_warps=w)) for m, rows, kr, w in options}
    key = _key(f"selected_bwd_{tile}", q, k, idx, slc_block)
    return parse_dkv_variant(tune.pick(key, variants, tune.differs, q.device))


def _planned_forward(q, k, v, idx, slc_block: int, q_start: int):
    """(out, lse, tile, lists, segments): the forward with its tile variant chosen (forward_tile);
    segments: the block-centric forward's block_segments (None otherwise), which the backward reuses."""
    tile = forward_tile(q, k, v, idx, slc_block, q_start)
    qt, stages, heads = parse_tile(tile)
    lists = tile_lists(idx, qt) if qt > 1 else (idx, idx)
    if tile == BLOCK_TILE:
        out, lse, segments = selected_forward_blocks(q, k, v, idx, slc_block, q_start)
        return out, lse, tile, lists, segments
    out, lse = selected_forward(q, k, v, idx, slc_block, q_start, qt, lists, stages, heads)
    return out, lse, tile, lists, None


class SelectedAttention(torch.autograd.Function):
    """Triton selected attention; saves q, k, v, idx, out, the fp32 LSE and the query tiles'
    block lists for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, idx, slc_block: int, q_start: int):
        out, lse, tile, lists, segments = _planned_forward(q, k, v, idx, slc_block, q_start)
        ctx.save_for_backward(q, k, v, idx, out, lse, *lists)
        ctx.slc_block, ctx.q_start, ctx.tile, ctx.segments = slc_block, q_start, tile, segments
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, idx, out, lse, lst, cnt = ctx.saved_tensors
        mode, rows, key_rows, warps = backward_plan(q, k, v, idx, out, lse, grad_out, ctx.slc_block, ctx.q_start,
                                                    ctx.tile)
        qt, stages, heads = parse_tile(ctx.tile)
        dq, dk, dv = selected_backward(q, k, v, idx, out, lse, grad_out, ctx.slc_block, ctx.q_start,
                                       mode=mode, qt=qt, lists=(lst, cnt), rows=rows, stages=stages,
                                       segments=ctx.segments, key_rows=key_rows, head_tiles=heads, dkv_warps=warps)
        return dq, dk, dv, None, None, None


def selected_attention(q, k, v, idx, slc_block: int, q_start: int = 0, chunk: int | None = None):
    """Same contract as nsa.attention.ops.selected_attention (`chunk` is accepted and ignored).

    q [B,H,Sq,D], k/v [B,G,N,D] (positions 0..N-1), idx [B,G,Sq,n] int (-1 = unused slot; the
    blocks of one query distinct, as select_blocks gives them)."""
    check_inputs("selected_attention", q, k, v)
    if idx.shape[:3] != (q.shape[0], k.shape[1], q.shape[2]):
        raise ValueError(f"nsa triton selected_attention: idx shape {tuple(idx.shape)} does not match "
                         f"[B, G, Sq, n] = {(q.shape[0], k.shape[1], q.shape[2])}")
    if idx.device != q.device or idx.dtype not in (torch.int64, torch.int32):
        raise TypeError("nsa triton selected_attention: idx must be int64/int32 on the same device as q")
    if slc_block < 1:
        raise ValueError(f"nsa triton selected_attention: slc_block must be >= 1, got {slc_block}")
    if not needs_grad(q, k, v):
        return _planned_forward(q, k, v, idx, int(slc_block), int(q_start))[0]
    return SelectedAttention.apply(q, k, v, idx, int(slc_block), int(q_start))
