"""NSA's decode attention over the static caches (static_decode.py) as one Triton kernel.

Replayed as a CUDA graph, a decode step costs the GPU time of its kernels, and at a few microseconds
each the PyTorch static step's ~80 attention ops per layer (masked softmaxes, the overlap-map scatter,
a sort, gathers of the selected blocks) cost more than full attention reads at 64k (BENCHMARKS.md).
Here one program per (sequence, KV group) does all three branches for the group's r query heads,
which share every K/V load (the paper's group-centric layout), reading each cached token once:

1. compressed: the compressed slots complete by t (only those: the loop stops at the visible count),
   online softmax; the scores (log2 units) go to a small fp32 scratch [B*G, r, n_cmp];
2. selection (Eqs. 8-10): the probabilities exp2(s - lse) summed over the group's heads, per
   compressed slot (a second scratch), then per selection block through the overlap map computed
   from the geometry (weight = overlap tokens / d, as blocks.overlap_map); forced initial and local
   blocks, future blocks excluded; top-n by n max-reductions of unique int64 keys (select.block_keys:
   ties to the lower block index, what the PyTorch step's stable sort gives), -1 past the valid blocks;
3. selected: the n blocks straight from the raw-token buffer (no gathered copy), clipped at t, as
   one flat list of n * l' tokens read TILE_ELEMS / D per tile (several blocks per tile);
4. window: the ring buffer's slots holding positions in (t - w, t].
The scratch stores and loads are separated by CTA barriers (written and read by the same program).

Batch 1 has only G programs, and each loop iteration of a program waits for a memory round trip, so
the step is latency-bound. Hence: with few programs the compressed scan (the longest part at 64k:
4096 slots against 16 blocks and the window) is split flash-decoding style over `scan_splits`
programs per (sequence, group) in `_decode_split_kernel`, at least MIN_SPLIT_TILES tiles each, and
the window beside it over `window_splits` programs (no more tiles each than a compressed split);
they leave softmax partials that _decode_kernel merges a chunk of splits per load. What stays serial
is the selection and its blocks, in few large tiles, the loops without a dot pipelined (tl.range).
Before it, `static_write` (one program per sequence and group) rotates the query heads and the
selection and window keys at t and writes every cache slot of the new token: the step's RoPE and
writes, eleven PyTorch/Triton kernels otherwise, in one launch.

The position t is a device tensor, so the launch is the same at every step (graph-capturable), and
the call is a torch custom op (`nsa::static_decode`), so a step through torch.compile keeps it as
one opaque node in its single graph. Reference and CPU fallback: static_decode.attend_torch.

The dense baseline's static step uses the same kernels (`nsa::dense_decode`): the compressed scan
with l = d = 1 is full attention over the tokens 0..t, split over programs like the NSA scan, and
selection and window are compiled out.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from nsa.attention.triton._common import (
    LOG2E, check_inputs, device_function, dot_config, num_warps, online_softmax, pad_pow2,
)
from nsa.attention.triton.select import KEY_FLOOR, block_index, block_keys

BC = 64  # compressed slots per tile
BW = 64  # window ring slots per tile
# a split of the compressed scan takes at least this many tiles. Run K (H200, bench_kernels): half the splits of
# 2-tile ones was faster at batch 1, M7C 64k 46 against 51 us, 16k 28.5 against 30 (paper 16k 51 against 55)
MIN_SPLIT_TILES = 4
MAX_SPLITS = 32
# Elements per tile of the main kernel's serial loops (64 fp32 registers per thread at 4 warps). At batch 1
# each loop iteration waits on a memory round trip, so fewer, larger tiles: the probability pass reads
# TILE_ELEMS // rows compressed slots' scores per iteration, the selected branch TILE_ELEMS // head dim
# tokens (several selection blocks) per tile.
TILE_ELEMS = 8192


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_warps(ns_pad: int, head_dim: int) -> int:
    """The main kernel keeps all selection-block scores in registers. ptxas -v (sm90, bf16, r <= 16)
    reports no spills at head dim 64 with 4 warps up to 2048 blocks (128k tokens at l' = 64) and with
    8 up to 4096; at head dim 128 with 8 warps up to 2048 (4 warps spill at 1024). Beyond: 16 warps."""
    if head_dim <= 64 and ns_pad <= 2048:
        return 4
    return 8 if ns_pad * max(1, head_dim // 64) <= 4096 else 16


def scan_splits(programs: int, n_cmp: int, device: torch.device) -> int:
    """How many programs share each (sequence, group)'s compressed scan: enough to cover the GPU's
    SMs once (batch 1 has only G programs otherwise), at least MIN_SPLIT_TILES tiles each; 1 off CUDA."""
    if device.type != "cuda":
        return 1
    want = -(-_sm_count(device.index if device.index is not None else torch.cuda.current_device()) // programs)
    return max(1, min(want, -(-n_cmp // BC) // MIN_SPLIT_TILES, MAX_SPLITS))


def window_splits(nsplit: int, n_cmp: int, window: int) -> int:
    """Programs per (sequence, group) for the window branch beside a split compressed scan: as many as
    keep each one to the compressed splits' tiles per program (the step waits for the longest program)."""
    if nsplit <= 1:
        return 0
    per = max(1, -(-(-(-n_cmp // BC)) // nsplit))  # compressed tiles per split
    return max(1, min(-(-(-(-window // BW)) // per), MAX_SPLITS))


def prob_tile(rows: int, n_cmp: int) -> int:
    """Compressed slots per iteration of the probability pass (`rows` score rows each, padded)."""
    return max(16, min(TILE_ELEMS // rows, pad_pow2(n_cmp)))


def selected_rows(n_sel: int, slc_block: int, head_dim: int) -> int:
    """Selected tokens per tile of the selected branch (the n blocks' l' tokens, flattened)."""
    return max(16, min(pad_pow2(n_sel * slc_block), TILE_ELEMS // pad_pow2(head_dim)))


def merge_chunk(splits: int, rows: int, d_pad: int) -> int:
    """Split programs whose accumulators the merge loads at once (rows x d_pad fp32 each)."""
    return max(1, min(pad_pow2(splits, 1), TILE_ELEMS // (rows * d_pad)))


@device_function
def _scores(q, k, valid, qk_scale, PREC: tl.constexpr):
    """Scores of the query rows against a key tile, in log2 units, -inf where not valid."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    return tl.where(valid[None, :], s, float("-inf"))


@device_function
def _attend_rows(q, K, V, row_off, ok, offs_d, dmask, m_i, l_i, acc, qk_scale, IN_T: tl.constexpr,
                 DOT_T: tl.constexpr, PREC: tl.constexpr):
    """The key/value rows starting at element offsets row_off (those with ok) into the online softmax.
    The others are not read: a stale slot's values must not reach the sum, not even as 0 * inf."""
    off = row_off[:, None] + offs_d[None, :]
    mask = ok[:, None] & dmask[None, :]
    k = tl.load(K + off, mask=mask, other=0.0).to(DOT_T)
    v = tl.load(V + off, mask=mask, other=0.0).to(DOT_T)
    return online_softmax(_scores(q, k, ok, qk_scale, PREC), 1.0, v, m_i, l_i, acc, IN_T, DOT_T, PREC)


@device_function
def _store_rows(O, base, acc, l_i, rows, offs_d, rmask, dmask, D: tl.constexpr):
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no key: zeros, as the PyTorch step
    tl.store(O + base + rows[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


@device_function
def _softmax_init(RP: tl.constexpr, D_PAD: tl.constexpr):
    return tl.full([RP], float("-inf"), tl.float32), tl.zeros([RP], tl.float32), tl.zeros([RP, D_PAD], tl.float32)


@device_function
def _cmp_scan(q, CK, CV, SCR, pid, c_lo, c_hi, NC, qk_scale, rows, rmask, offs_d, dmask,
              R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BC: tl.constexpr,
              USE_SLC: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """Online softmax of the query rows over compressed slots [c_lo, c_hi); with selection the scores
    (log2 units) also go to SCR [B*G, R, NC]. Returns (m, l, acc)."""
    offs_c = tl.arange(0, BC)
    c_base = pid * NC * D
    m_i, l_i, acc = _softmax_init(RP, D_PAD)
    for c0 in range(c_lo, c_hi, BC):
        cin = (c0 + offs_c) < c_hi
        c_off = c_base + (c0 + offs_c)[:, None] * D + offs_d[None, :]
        c_mask = cin[:, None] & dmask[None, :]
        kc = tl.load(CK + c_off, mask=c_mask, other=0.0).to(DOT_T)
        vc = tl.load(CV + c_off, mask=c_mask, other=0.0).to(DOT_T)
        s = _scores(q, kc, cin, qk_scale, PREC)
        if USE_SLC:  # kept for the probabilities once the LSE is known
            tl.store(SCR + (pid * R + rows[:, None]) * NC + c0 + offs_c[None, :], s,
                     mask=rmask[:, None] & cin[None, :])
        m_i, l_i, acc = online_softmax(s, 1.0, vc, m_i, l_i, acc, IN_T, DOT_T, PREC)
    return m_i, l_i, acc


@device_function
def _visible(T, L: tl.constexpr, DS: tl.constexpr, NC):
    """(t, compressed blocks complete by t)."""
    t = tl.load(T).to(tl.int64)
    tt = t + 1 - L
    return t, tl.minimum(tl.where(tt >= 0, tl.maximum(tt, 0) // DS + 1, 0), NC)


@device_function
def _load_q(Q, b, g, s_qb, s_qh, s_qd, rows, rmask, offs_d, dmask, R: tl.constexpr, DOT_T: tl.constexpr):
    return tl.load(Q + b * s_qb + (g * R + rows)[:, None] * s_qh + offs_d[None, :] * s_qd,
                   mask=rmask[:, None] & dmask[None, :], other=0.0).to(DOT_T)


@device_function
def _win_scan(q, WK, WV, WPOS, pid, t, WIN, w_lo, w_hi, qk_scale, offs_d, dmask, RP: tl.constexpr,
              D: tl.constexpr, D_PAD: tl.constexpr, BW: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr,
              PREC: tl.constexpr):
    """The window branch over ring slots [w_lo, w_hi): those holding positions in (t - WIN, t]."""
    offs_w = tl.arange(0, BW)
    w_base = pid * WIN * D
    m_i, l_i, acc = _softmax_init(RP, D_PAD)
    for w0 in range(w_lo, w_hi, BW):
        slot = w0 + offs_w
        in_range = slot < w_hi
        pos = tl.load(WPOS + slot, mask=in_range, other=-1)
        w_ok = in_range & (pos >= 0) & (pos > t - WIN) & (pos <= t)
        m_i, l_i, acc = _attend_rows(q, WK, WV, w_base + slot * D, w_ok, offs_d, dmask, m_i, l_i, acc, qk_scale,
                                     IN_T, DOT_T, PREC)
    return m_i, l_i, acc


@device_function
def _merge_partials(PM, PL, PACC, first, count, rows, offs_d, RP: tl.constexpr, D_PAD: tl.constexpr,
                    MPAD: tl.constexpr, MCH: tl.constexpr):
    """Flash-decoding merge of the softmax partials (m, l, acc) of splits first .. first + count - 1
    (their rows at (split * RP + row) in PM, PL and PACC's [.., D_PAD] rows), count <= MPAD. Every
    split's (m, l) in one load, the accumulators MCH splits per load: a few round trips, not one per split."""
    sp = tl.arange(0, MPAD)
    m_s = tl.load(PM + (first + sp)[:, None] * RP + rows[None, :], mask=(sp < count)[:, None], other=float("-inf"))
    l_s = tl.load(PL + (first + sp)[:, None] * RP + rows[None, :], mask=(sp < count)[:, None], other=0.0)
    m_i = tl.max(m_s, 0)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_i = tl.sum(l_s * tl.math.exp2(m_s - m_safe[None, :]), 0)
    acc = tl.zeros([RP, D_PAD], tl.float32)
    ch = tl.arange(0, MCH)
    for c0 in tl.range(0, count, MCH, num_stages=2):
        ok = (c0 + ch) < count
        part = (first + c0 + ch)[:, None] * RP + rows[None, :]  # [MCH, RP]
        w = tl.math.exp2(tl.load(PM + part, mask=ok[:, None], other=float("-inf")) - m_safe[None, :])
        a = tl.load(PACC + part[:, :, None] * D_PAD + offs_d[None, None, :], mask=ok[:, None, None], other=0.0)
        acc += tl.sum(a * w[:, :, None], 0)
    return m_i, l_i, acc


@triton.jit
def _decode_split_kernel(
    Q, CK, CV, T, SCR, PM, PL, PACC, WK, WV, WPOS,
    s_qb, s_qh, s_qd, G, NC, WIN, scale,
    R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    L: tl.constexpr, DS: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr, NSPLIT: tl.constexpr,
    WSPLIT: tl.constexpr, USE_SLC: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
):
    """Split scans (flash-decoding): program (b * G + g, split) takes an equal share of the visible
    compressed slots' tiles (split < NSPLIT) or of the window ring's (the WSPLIT programs after them:
    the window needs no selection, so it runs here, beside the compressed scan) and leaves its softmax
    partials (m, l, acc) for _decode_kernel to merge. What stays serial there is the selection."""
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    rows = tl.arange(0, RP)
    rmask = rows < R
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    q = _load_q(Q, pid // G, pid % G, s_qb, s_qh, s_qd, rows, rmask, offs_d, dmask, R, DOT_T)
    t, n_vis = _visible(T, L, DS, NC)
    qk_scale = scale * LOG2E
    if sp >= NSPLIT:  # (only with WSPLIT > 0)
        ws: tl.constexpr = WSPLIT if WSPLIT > 0 else 1
        w_per = ((WIN + BW - 1) // BW + ws - 1) // ws * BW  # ring slots per program, whole tiles
        w_lo = (sp - NSPLIT) * w_per
        m_i, l_i, acc = _win_scan(q, WK, WV, WPOS, pid, t, WIN, w_lo, tl.minimum(w_lo + w_per, WIN), qk_scale,
                                  offs_d, dmask, RP, D, D_PAD, BW, IN_T, DOT_T, PREC)
    else:
        per = ((n_vis + BC - 1) // BC + NSPLIT - 1) // NSPLIT * BC  # slots per split, whole tiles
        c_lo = sp * per
        c_hi = tl.minimum(c_lo + per, n_vis)
        m_i, l_i, acc = _cmp_scan(q, CK, CV, SCR, pid, c_lo, c_hi, NC, qk_scale, rows, rmask, offs_d, dmask,
                                  R, RP, D, D_PAD, BC, USE_SLC, IN_T, DOT_T, PREC)
    part = (pid * (NSPLIT + WSPLIT) + sp) * RP + rows
    tl.store(PM + part, m_i)
    tl.store(PL + part, l_i)
    tl.store(PACC + part[:, None] * D_PAD + offs_d[None, :], acc)


@device_function
def _select_blocks(SCR, PGRP, IDX, pid, t, n_vis, lse2, NC, NS, rows, rmask, R: tl.constexpr, L: tl.constexpr,
                   DS: tl.constexpr, LP: tl.constexpr, NSEL: tl.constexpr, NS_PAD: tl.constexpr, NI: tl.constexpr,
                   BP: tl.constexpr):
    """Eqs. 8-10 from the scores in SCR and the rows' LSE (log2 units): the top NSEL selection blocks
    into IDX[pid] (-1 past the valid ones), in the order of the PyTorch step's stable sort."""
    offs_p = tl.arange(0, BP)
    for c0 in tl.range(0, n_vis, BP, num_stages=2):  # Eq. 10: probabilities summed over the group's heads
        pin = (c0 + offs_p) < n_vis
        s2 = tl.load(SCR + (pid * R + rows[:, None]) * NC + c0 + offs_p[None, :],
                     mask=rmask[:, None] & pin[None, :], other=float("-inf"))
        tl.store(PGRP + pid * NC + c0 + offs_p, tl.sum(tl.math.exp2(s2 - lse2[:, None]), 0), mask=pin)
    tl.debug_barrier()
    # Eq. 9: selection block j gets compressed blocks i = i_lo(j) .. with weight overlap / d
    j = tl.arange(0, NS_PAD)
    first_tok = j * LP - L + 1  # block i overlaps j iff i*d + l - 1 >= j*l'
    i_lo = tl.where(first_tok > 0, (tl.maximum(first_tok, 0) + DS - 1) // DS, 0)
    score = tl.zeros([NS_PAD], tl.float32)
    for term in tl.static_range(NI):
        i = i_lo + term
        lo = tl.maximum(i * DS, j * LP)
        hi = tl.minimum(i * DS + L, (j + 1) * LP)
        hit = (hi > lo) & (i < n_vis) & (j < NS)
        p_i = tl.load(PGRP + pid * NC + i, mask=hit, other=0.0)
        score += tl.where(hit, p_i * ((hi - lo).to(tl.float32) / DS), 0.0)
    cur = t // LP
    score = tl.where((j == 0) | (j == cur) | (j == cur - 1), float("inf"), score)
    score = tl.where((j > cur) | (j >= NS), float("-inf"), score)
    # top-n by NSEL max-reductions of unique int64 keys (select.block_keys: the score's order, ties to
    # the lower block), one reduction per pick; -1 once only -inf (future or padding blocks) is left
    key = block_keys(score, j, NS)
    for n in range(NSEL):
        best = tl.max(key, 0)
        tl.store(IDX + pid * NSEL + n, block_index(best, NS))
        key = tl.where(key == best, KEY_FLOOR, key)


@triton.jit
def _decode_kernel(
    Q, CK, CV, SK, SV, WK, WV, WPOS, T, SCR, PGRP, IDX, OC, OS, OW, PM, PL, PACC,
    s_qb, s_qh, s_qd,
    G, NC, NS, CAP, WIN, scale,
    R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    L: tl.constexpr, DS: tl.constexpr, LP: tl.constexpr, NSEL: tl.constexpr, NS_PAD: tl.constexpr,
    NI: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr, BW: tl.constexpr, SR: tl.constexpr,
    NSPLIT: tl.constexpr, WSPLIT: tl.constexpr, MPAD: tl.constexpr, MCH: tl.constexpr, USE_CMP: tl.constexpr,
    USE_SLC: tl.constexpr, USE_WIN: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * G + g
    rows = tl.arange(0, RP)
    rmask = rows < R
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    q = _load_q(Q, pid // G, pid % G, s_qb, s_qh, s_qd, rows, rmask, offs_d, dmask, R, DOT_T)
    qk_scale = scale * LOG2E
    out_base = pid * R * D  # outputs [B, H, 1, D] contiguous: head g * R + row of sequence b
    t, n_vis = _visible(T, L, DS, NC)

    if USE_WIN:  # the window: merged from the split kernel's programs, or scanned here
        if NSPLIT == 1:
            m_w, l_w, acc_w = _win_scan(q, WK, WV, WPOS, pid, t, WIN, 0, WIN, qk_scale, offs_d, dmask, RP, D, D_PAD,
                                        BW, IN_T, DOT_T, PREC)
        else:
            m_w, l_w, acc_w = _merge_partials(PM, PL, PACC, pid * (NSPLIT + WSPLIT) + NSPLIT, WSPLIT, rows, offs_d,
                                              RP, D_PAD, MPAD, MCH)
        _store_rows(OW, out_base, acc_w, l_w, rows, offs_d, rmask, dmask, D)

    if USE_CMP or USE_SLC:
        if NSPLIT == 1:
            m_i, l_i, acc = _cmp_scan(q, CK, CV, SCR, pid, 0, n_vis, NC, qk_scale, rows, rmask, offs_d, dmask,
                                      R, RP, D, D_PAD, BC, USE_SLC, IN_T, DOT_T, PREC)
        else:  # merge the split scan's partials (_decode_split_kernel)
            m_i, l_i, acc = _merge_partials(PM, PL, PACC, pid * (NSPLIT + WSPLIT), NSPLIT, rows, offs_d, RP, D_PAD,
                                            MPAD, MCH)
        if USE_CMP:
            _store_rows(OC, out_base, acc, l_i, rows, offs_d, rmask, dmask, D)

    if USE_SLC:
        tl.debug_barrier()  # the scores in SCR (this program's scan) complete
        _select_blocks(SCR, PGRP, IDX, pid, t, n_vis, m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)), NC, NS,
                       rows, rmask, R, L, DS, LP, NSEL, NS_PAD, NI, BP)
        tl.debug_barrier()
        # the n blocks' tokens as one flat list, SR per tile (several blocks: fewer serial round trips)
        offs_f = tl.arange(0, SR)
        s_base = pid * CAP * D
        m_i, l_i, acc = _softmax_init(RP, D_PAD)
        for f0 in range(0, NSEL * LP, SR):
            f = f0 + offs_f
            in_list = f < NSEL * LP
            blk = tl.load(IDX + pid * NSEL + f // LP, mask=in_list, other=-1).to(tl.int64)
            tok = blk * LP + f % LP
            tok_ok = in_list & (blk >= 0) & (tok <= t)
            m_i, l_i, acc = _attend_rows(q, SK, SV, s_base + tok * D, tok_ok, offs_d, dmask, m_i, l_i, acc,
                                         qk_scale, IN_T, DOT_T, PREC)
        _store_rows(OS, out_base, acc, l_i, rows, offs_d, rmask, dmask, D)


@device_function
def _copy_row(DST, dst_off, SRC, src_off, s_d, offs_d, dmask):
    tl.store(DST + dst_off + offs_d, tl.load(SRC + src_off + offs_d * s_d, mask=dmask).to(DST.dtype.element_ty),
             mask=dmask)


@device_function
def _rotate_row(DST, dst_off, SRC, src_off, s_d, c, s, offs_h, hmask, HALF: tl.constexpr):
    """RoPE (rotate-half, fp32, as nsa.attention.rope) of a row, or of rows when the offsets are
    [rows, 1]: y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin."""
    x1 = tl.load(SRC + src_off + offs_h * s_d, mask=hmask, other=0.0).to(tl.float32)
    x2 = tl.load(SRC + src_off + (offs_h + HALF) * s_d, mask=hmask, other=0.0).to(tl.float32)
    tl.store(DST + dst_off + offs_h, (x1 * c - x2 * s).to(DST.dtype.element_ty), mask=hmask)
    tl.store(DST + dst_off + HALF + offs_h, (x2 * c + x1 * s).to(DST.dtype.element_ty), mask=hmask)


@triton.jit
def _write_kernel(
    T, LAST_T, Q, QO, COS, SIN, SK, SV, WK, WV, WPOS, RK, RV, NKS, NVS, NKW, NVW, NKR, NVR,
    s_qb, s_qh, s_qd, s_ksb, s_ksg, s_ksd, s_vsb, s_vsg, s_vsd, s_kwb, s_kwg, s_kwd, s_vwb, s_vwg, s_vwd,
    s_krb, s_krg, s_krd, s_vrb, s_vrg, s_vrd,
    G, CAP, WIN, L, s_tab, R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * G + g
    b = pid // G
    g = pid % G
    t = tl.load(T).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    offs_h = tl.arange(0, HALF_PAD)
    hmask = offs_h < HALF
    c = tl.load(COS + t * s_tab + offs_h, mask=hmask, other=0.0)  # the tables' fp32 row at t
    s = tl.load(SIN + t * s_tab + offs_h, mask=hmask, other=0.0)
    rows = tl.arange(0, RP)  # the group's query heads, rotated into QO [B, H, 1, D] (contiguous)
    _rotate_row(QO, (pid * R + rows)[:, None] * D, Q, b * s_qb + (g * R + rows)[:, None] * s_qh, s_qd,
                c[None, :], s[None, :], offs_h[None, :], (rows < R)[:, None] & hmask[None, :], HALF)
    row = (pid * CAP + t) * D  # selection buffer: position t at slot t
    _rotate_row(SK, row, NKS, b * s_ksb + g * s_ksg, s_ksd, c, s, offs_h, hmask, HALF)
    _copy_row(SV, row, NVS, b * s_vsb + g * s_vsg, s_vsd, offs_d, dmask)
    row = (pid * WIN + t % WIN) * D  # window ring: slot t % w
    _rotate_row(WK, row, NKW, b * s_kwb + g * s_kwg, s_kwd, c, s, offs_h, hmask, HALF)
    _copy_row(WV, row, NVW, b * s_vwb + g * s_vwg, s_vwd, offs_d, dmask)
    row = (pid * L + t % L) * D  # raw-token ring for the compression (unrotated): slot t % l
    _copy_row(RK, row, NKR, b * s_krb + g * s_krg, s_krd, offs_d, dmask)
    _copy_row(RV, row, NVR, b * s_vrb + g * s_vrg, s_vrd, offs_d, dmask)
    if pid == 0:
        tl.store(WPOS + t % WIN, t)
        tl.store(LAST_T, t)  # the step's position, for the cache's read count


def static_write(t: torch.Tensor, cache, q: torch.Tensor, slc_kv, win_kv, raw_kv, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    """A decode token into a StaticNSACache at the device position t, in one launch: RoPE at t (fp32
    tables cos/sin [>= capacity, D], as RotaryEmbedding.tables) on the unrotated queries q [B, H, 1, D]
    and the selection and window keys; those keys and values to selection slot t and window ring slot
    t % w (and its position), the raw compression keys/values to ring slot t % l (all [B, G, 1, D],
    any strides), and t to cache.last_t. Returns the rotated queries [B, H, 1, D]. Replaces three RoPE
    kernels, seven index_copy_, two remainders and a copy; not for torch.compile (Inductor fuses the
    PyTorch version)."""
    B, H, _, D = q.shape
    G = cache.slc_k.shape[1]
    news = (*slc_kv, *win_kv, *raw_kv)
    check_inputs("static_write", q, cache.slc_k, *news)
    q_rot = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    strides = [s for x in (q, *news) for s in (x.stride(0), x.stride(1), x.stride(3))]
    _write_kernel[(B * G,)](
        t, cache.last_t, q, q_rot, cos, sin, cache.slc_k, cache.slc_v, cache.win_k, cache.win_v, cache.win_pos, cache.raw_k,
        cache.raw_v, *news, *strides, G, cache.slc_k.shape[2], cache.win_k.shape[2], cache.raw_k.shape[2],
        cos.stride(0), R=H // G, RP=pad_pow2(H // G, 1), D=D, D_PAD=pad_pow2(D, 1), HALF=D // 2,
        HALF_PAD=pad_pow2(D // 2, 1), num_warps=1)
    return q_rot


def overlap_terms(cmp_block: int, cmp_stride: int, slc_block: int) -> int:
    """Most compressed blocks one selection block overlaps (the kernel's unrolled Eq. 9 terms)."""
    return (slc_block + cmp_block - 2) // cmp_stride + 2


def selected_shape(q: torch.Tensor, cmp_k: torch.Tensor, slc_k: torch.Tensor, slc_block: int,
                   n_selected: int) -> tuple[int, int, int]:
    """Shape of the selected-blocks buffer of static_decode_into: [B, G, min(n, selection blocks)]."""
    return q.shape[0], cmp_k.shape[1], min(n_selected, -(-slc_k.shape[2] // slc_block))


@torch.library.custom_op("nsa::static_decode", mutates_args=("idx",))
def static_decode_into(q: torch.Tensor, cmp_k: torch.Tensor, cmp_v: torch.Tensor, slc_k: torch.Tensor,
                       slc_v: torch.Tensor, win_k: torch.Tensor, win_v: torch.Tensor, win_pos: torch.Tensor,
                       t: torch.Tensor, idx: torch.Tensor, cmp_block: int, cmp_stride: int, slc_block: int,
                       n_selected: int, use_cmp: bool, use_slc: bool, use_win: bool, splits: int,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode query per head, q [B, H, 1, D] at position t (a 1-element int64 device tensor),
    over static caches [B, G, *, D] (contiguous) -> (o_cmp, o_slc, o_win) [B, H, 1, D] (a branch
    switched off: an empty tensor). With selection, the selected blocks go into idx, int32
    [B, G, min(n, selection blocks)] (-1 = none): a buffer the caller keeps (StaticNSACache.last_sel),
    so a replayed CUDA graph leaves them there without a copy kernel.
    splits: programs per (sequence, group) for the compressed scan (0: `scan_splits` decides)."""
    check_inputs("static_decode", q, cmp_k, cmp_v, slc_k, slc_v, win_k, win_v)
    want = selected_shape(q, cmp_k, slc_k, slc_block, n_selected)
    if use_slc and (tuple(idx.shape) != want or idx.dtype != torch.int32 or not idx.is_contiguous()):
        raise ValueError(f"nsa triton decode: idx must be a contiguous int32 tensor of shape {list(want)}, "
                         f"got {idx.dtype} {list(idx.shape)}")
    B, H, _, D = q.shape

    def out(on):
        return torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype) if on else q.new_empty(0)

    outs = out(use_cmp), out(use_slc), out(use_win)
    _launch(q, cmp_k, cmp_v, (slc_k, slc_v, win_k, win_v, win_pos), t, outs, idx, cmp_block, cmp_stride, slc_block,
            use_cmp, use_slc, use_win, splits)
    return outs


def static_decode(q, cmp_k, cmp_v, slc_k, slc_v, win_k, win_v, win_pos, t, cmp_block: int, cmp_stride: int,
                  slc_block: int, n_selected: int, use_cmp: bool, use_slc: bool, use_win: bool, splits: int):
    """static_decode_into with a new selected-blocks tensor, returned last: (o_cmp, o_slc, o_win, idx)."""
    idx = torch.empty(selected_shape(q, cmp_k, slc_k, slc_block, n_selected), device=q.device, dtype=torch.int32)
    outs = static_decode_into(q, cmp_k, cmp_v, slc_k, slc_v, win_k, win_v, win_pos, t, idx, cmp_block, cmp_stride,
                              slc_block, n_selected, use_cmp, use_slc, use_win, splits)
    return (*outs, idx)


def _launch(q, cmp_k, cmp_v, others, t, outs, idx, cmp_block, cmp_stride, slc_block, use_cmp, use_slc, use_win,
            splits) -> None:
    """The decode kernels (the split compressed scan first when it pays) into outs = (o_cmp, o_slc, o_win)."""
    slc_k, slc_v, win_k, win_v, win_pos = others
    B, H, _, D = q.shape
    G, NC, CAP, WIN = cmp_k.shape[1], cmp_k.shape[2], slc_k.shape[2], win_k.shape[2]
    R = H // G
    for buf in (cmp_k, cmp_v, slc_k, slc_v, win_k, win_v):
        if not buf.is_contiguous():
            raise ValueError("nsa triton decode: the cache buffers must be contiguous")
    dev = q.device
    NS = -(-CAP // slc_block)
    NS_PAD = pad_pow2(NS) if use_slc else 16  # selection off: its constants only size code that is not compiled
    scores = torch.empty(B * G, R, NC if use_slc else 0, device=dev, dtype=torch.float32)
    p_grp = torch.empty(B * G, NC if use_slc else 0, device=dev, dtype=torch.float32)
    nsplit = (splits or scan_splits(B * G, NC, dev)) if (use_cmp or use_slc) else 1
    wsplit = window_splits(nsplit, NC, WIN) if use_win else 0
    RP, D_PAD = pad_pow2(R), pad_pow2(D)
    n_part = B * G * (nsplit + wsplit) * RP if nsplit > 1 else 0  # the split programs' (m, l, acc) per row
    partials = tuple(torch.empty(n, device=dev, dtype=torch.float32) for n in (n_part, n_part, n_part * D_PAD))
    shape = dict(R=R, RP=RP, D=D, D_PAD=D_PAD, L=cmp_block, DS=cmp_stride, BC=BC, BW=BW, NSPLIT=nsplit,
                 WSPLIT=wsplit, USE_SLC=use_slc, **dot_config(q.dtype))
    scale = 1.0 / math.sqrt(D)
    if nsplit > 1:
        _decode_split_kernel[(B * G, nsplit + wsplit)](
            q, cmp_k, cmp_v, t, scores, *partials, win_k, win_v, win_pos, q.stride(0), q.stride(1), q.stride(3),
            G, NC, WIN, scale, **shape, num_warps=num_warps(D))
    nsel = idx.shape[-1]
    _decode_kernel[(B * G,)](
        q, cmp_k, cmp_v, slc_k, slc_v, win_k, win_v, win_pos, t, scores, p_grp, idx, *outs, *partials,
        q.stride(0), q.stride(1), q.stride(3), G, NC, NS, CAP, WIN, scale,
        LP=slc_block if use_slc else 1, NSEL=nsel, NS_PAD=NS_PAD,
        NI=overlap_terms(cmp_block, cmp_stride, slc_block) if use_slc else 1,
        BP=prob_tile(RP, NC), SR=selected_rows(nsel, slc_block, D) if use_slc else 16,
        MPAD=pad_pow2(max(nsplit, wsplit), 1), MCH=merge_chunk(max(nsplit, wsplit), RP, D_PAD),
        USE_CMP=use_cmp, USE_WIN=use_win, **shape, num_warps=decode_warps(NS_PAD, D),
    )


@torch.library.custom_op("nsa::dense_decode", mutates_args=())
def dense_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: torch.Tensor, splits: int) -> torch.Tensor:
    """Full attention's decode step over a static KV cache: q [B, H, 1, D] at position t (a 1-element
    int64 device tensor) over k/v [B, G, capacity, D] (contiguous, rotated keys), keys 0..t ->
    [B, H, 1, D]. It is the kernels' compressed scan with l = d = 1: every cached token its own block,
    t + 1 of them visible, split over programs flash-decoding style (splits: as in static_decode), so
    it reads only the tokens up to t. The dense baseline's graphed step, against a masked SDPA over
    the whole buffer (BENCHMARKS.md: 1.95 ms at 64k on an H100, not flash)."""
    check_inputs("dense_decode", q, k, v)
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    idx = torch.empty(0, device=q.device, dtype=torch.int32)
    none = q.new_empty(0)
    # the selection / window buffers are never read with those branches compiled out: k, v and t stand in
    _launch(q, k, v, (k, v, k, v, t), t, (o, none, none), idx, 1, 1, 1, True, False, False, splits)
    return o


@dense_decode.register_fake
def _(q, k, v, t, splits):
    return torch.empty_like(q)


@static_decode_into.register_fake
def _(q, cmp_k, cmp_v, slc_k, slc_v, win_k, win_v, win_pos, t, idx, cmp_block, cmp_stride, slc_block, n_selected,
      use_cmp, use_slc, use_win, splits):
    B, H, _, D = q.shape

    def out(on):
        return q.new_empty(B, H, 1, D) if on else q.new_empty(0)

    return out(use_cmp), out(use_slc), out(use_win)
