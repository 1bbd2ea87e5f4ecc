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
   blocks, future blocks excluded; top-n by repeated argmax, ties to the lower block index (what
   the PyTorch step's stable sort gives), -1 past the valid blocks;
3. selected: the n blocks straight from the raw-token buffer (no gathered copy), clipped at t;
4. window: the ring buffer's slots holding positions in (t - w, t].
The scratch stores and loads are separated by CTA barriers (written and read by the same program).
With few programs (batch 1 has only G) the compressed scan, the longest part at 64k (4096 slots
against 16 blocks and the window), is split flash-decoding style: `_decode_split_kernel` runs
`scan_splits` programs per (sequence, group), each over an equal share of the visible slots' tiles,
and leaves softmax partials that _decode_kernel merges before the rest; one more program per
(sequence, group) does the window branch meanwhile, so what stays serial is the selection and its blocks.

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

BC = 64  # compressed slots per tile
BP = 256  # compressed slots per tile of the probability pass (fp32 scores from L2, no dot)
BW = 64  # window ring slots per tile
MIN_SPLIT_TILES = 4  # a split of the compressed scan takes at least this many tiles
MAX_SPLITS = 32


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


@device_function
def _scores(q, k, valid, qk_scale, PREC: tl.constexpr):
    """Scores of the query rows against a key tile, in log2 units, -inf where not valid."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    return tl.where(valid[None, :], s, float("-inf"))


@device_function
def _attend_rows(q, K, V, row_off, ok, offs_d, dmask, m_i, l_i, acc, qk_scale, IN_T: tl.constexpr,
                 DOT_T: tl.constexpr, PREC: tl.constexpr):
    """The key/value rows starting at element offsets row_off (those with ok) into the online softmax."""
    off = row_off[:, None] + offs_d[None, :]
    mask = ok[:, None] & dmask[None, :]
    k = tl.load(K + off, mask=mask, other=0.0).to(DOT_T)
    v = tl.load(V + off, mask=mask, other=0.0).to(DOT_T)
    return online_softmax(_scores(q, k, ok, qk_scale, PREC), v, m_i, l_i, acc, IN_T, DOT_T, PREC)


@device_function
def _store_rows(O, base, acc, l_i, rows, offs_d, rmask, dmask, D: tl.constexpr):
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no key: zeros, as the PyTorch step
    tl.store(O + base + rows[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


@device_function
def _cmp_scan(q, CK, CV, SCR, pid, c_lo, c_hi, NC, qk_scale, rows, rmask, offs_d, dmask,
              R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BC: tl.constexpr,
              USE_SLC: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    """Online softmax of the query rows over compressed slots [c_lo, c_hi); with selection the scores
    (log2 units) also go to SCR [B*G, R, NC]. Returns (m, l, acc)."""
    offs_c = tl.arange(0, BC)
    c_base = pid * NC * D
    m_i = tl.full([RP], float("-inf"), tl.float32)
    l_i = tl.zeros([RP], tl.float32)
    acc = tl.zeros([RP, D_PAD], tl.float32)
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
        m_i, l_i, acc = online_softmax(s, vc, m_i, l_i, acc, IN_T, DOT_T, PREC)
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
def _window(q, WK, WV, WPOS, OW, pid, t, WIN, qk_scale, rows, rmask, offs_d, dmask, R: tl.constexpr,
            RP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BW: tl.constexpr, IN_T: tl.constexpr,
            DOT_T: tl.constexpr, PREC: tl.constexpr):
    """The window branch: the ring's slots holding positions in (t - WIN, t], into OW."""
    offs_w = tl.arange(0, BW)
    w_base = pid * WIN * D
    m_i = tl.full([RP], float("-inf"), tl.float32)
    l_i = tl.zeros([RP], tl.float32)
    acc = tl.zeros([RP, D_PAD], tl.float32)
    for w0 in range(0, WIN, BW):
        slot = w0 + offs_w
        pos = tl.load(WPOS + slot, mask=slot < WIN, other=-1)
        w_ok = (slot < WIN) & (pos >= 0) & (pos > t - WIN) & (pos <= t)
        m_i, l_i, acc = _attend_rows(q, WK, WV, w_base + slot * D, w_ok, offs_d, dmask, m_i, l_i, acc,
                                     qk_scale, IN_T, DOT_T, PREC)
    _store_rows(OW, pid * R * D, acc, l_i, rows, offs_d, rmask, dmask, D)  # [B, H, 1, D]: heads g*R.. of b


@triton.jit
def _decode_split_kernel(
    Q, CK, CV, T, SCR, PM, PL, PACC, WK, WV, WPOS, OW,
    s_qb, s_qh, s_qd, G, NC, WIN, scale,
    R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    L: tl.constexpr, DS: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr, NSPLIT: tl.constexpr,
    USE_SLC: tl.constexpr, USE_WIN: tl.constexpr, IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
):
    """Split compressed scan (flash-decoding): program (b * G + g, split) takes an equal share of the
    visible slots' tiles and leaves its softmax partials (m, l, acc) for _decode_kernel to merge.
    With the window branch on, one more program per (b, g), split == NSPLIT, does the window (it
    needs no selection), so _decode_kernel's serial part after the merge is selection alone."""
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    rows = tl.arange(0, RP)
    rmask = rows < R
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    q = _load_q(Q, pid // G, pid % G, s_qb, s_qh, s_qd, rows, rmask, offs_d, dmask, R, DOT_T)
    t, n_vis = _visible(T, L, DS, NC)
    if USE_WIN and sp == NSPLIT:
        _window(q, WK, WV, WPOS, OW, pid, t, WIN, scale * LOG2E, rows, rmask, offs_d, dmask, R, RP, D, D_PAD, BW,
                IN_T, DOT_T, PREC)
    else:
        per = ((n_vis + BC - 1) // BC + NSPLIT - 1) // NSPLIT * BC  # slots per split, whole tiles
        c_lo = sp * per
        c_hi = tl.minimum(c_lo + per, n_vis)
        m_i, l_i, acc = _cmp_scan(q, CK, CV, SCR, pid, c_lo, c_hi, NC, scale * LOG2E, rows, rmask, offs_d, dmask,
                                  R, RP, D, D_PAD, BC, USE_SLC, IN_T, DOT_T, PREC)
        part = (pid * NSPLIT + sp) * RP + rows
        tl.store(PM + part, m_i)
        tl.store(PL + part, l_i)
        tl.store(PACC + part[:, None] * D_PAD + offs_d[None, :], acc)


@triton.jit
def _decode_kernel(
    Q, CK, CV, SK, SV, WK, WV, WPOS, T, SCR, PGRP, IDX, OC, OS, OW, PM, PL, PACC,
    s_qb, s_qh, s_qd,
    G, NC, NS, CAP, WIN, scale,
    R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    L: tl.constexpr, DS: tl.constexpr, LP: tl.constexpr, LP_PAD: tl.constexpr,
    NSEL: tl.constexpr, NS_PAD: tl.constexpr, NI: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr,
    BW: tl.constexpr, NSPLIT: tl.constexpr, USE_CMP: tl.constexpr, USE_SLC: tl.constexpr, USE_WIN: tl.constexpr,
    IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
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

    if USE_CMP or USE_SLC:
        if NSPLIT == 1:
            m_i, l_i, acc = _cmp_scan(q, CK, CV, SCR, pid, 0, n_vis, NC, qk_scale, rows, rmask, offs_d, dmask,
                                      R, RP, D, D_PAD, BC, USE_SLC, IN_T, DOT_T, PREC)
        else:  # merge the split scan's partials (_decode_split_kernel)
            m_i = tl.full([RP], float("-inf"), tl.float32)
            l_i = tl.zeros([RP], tl.float32)
            acc = tl.zeros([RP, D_PAD], tl.float32)
            for sp in range(NSPLIT):
                part = (pid * NSPLIT + sp) * RP + rows
                m_s = tl.load(PM + part)
                m_new = tl.maximum(m_i, m_s)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_safe)
                beta = tl.math.exp2(m_s - m_safe)
                l_i = l_i * alpha + tl.load(PL + part) * beta
                acc = acc * alpha[:, None] + tl.load(PACC + part[:, None] * D_PAD + offs_d[None, :]) * beta[:, None]
                m_i = m_new
        if USE_CMP:
            _store_rows(OC, out_base, acc, l_i, rows, offs_d, rmask, dmask, D)

    if USE_SLC:
        lse2 = m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))
        tl.debug_barrier()
        offs_p = tl.arange(0, BP)
        for c0 in range(0, n_vis, BP):  # Eq. 10: probabilities summed over the group's heads
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
        for n in range(NSEL):  # top-n, ties to the lower index; -1 once only -inf is left
            best = tl.max(score, 0)
            pick = tl.min(tl.where(score == best, j, NS_PAD), 0)
            tl.store(IDX + pid * NSEL + n, tl.where(best > float("-inf"), pick, -1).to(tl.int32))
            score = tl.where(j == pick, float("-inf"), score)
        tl.debug_barrier()
        offs_t = tl.arange(0, LP_PAD)
        s_base = pid * CAP * D
        m_i = tl.full([RP], float("-inf"), tl.float32)
        l_i = tl.zeros([RP], tl.float32)
        acc = tl.zeros([RP, D_PAD], tl.float32)
        for n in range(NSEL):
            blk = tl.load(IDX + pid * NSEL + n).to(tl.int64)
            tok = blk * LP + offs_t
            tok_ok = (blk >= 0) & (offs_t < LP) & (tok <= t)
            m_i, l_i, acc = _attend_rows(q, SK, SV, s_base + tok * D, tok_ok, offs_d, dmask, m_i, l_i, acc,
                                         qk_scale, IN_T, DOT_T, PREC)
        _store_rows(OS, out_base, acc, l_i, rows, offs_d, rmask, dmask, D)

    if USE_WIN and NSPLIT == 1:  # split: the split kernel's extra program did it
        _window(q, WK, WV, WPOS, OW, pid, t, WIN, qk_scale, rows, rmask, offs_d, dmask, R, RP, D, D_PAD, BW,
                IN_T, DOT_T, PREC)


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
    T, Q, QO, COS, SIN, SK, SV, WK, WV, WPOS, RK, RV, NKS, NVS, NKW, NVW, NKR, NVR,
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


def static_write(t: torch.Tensor, cache, q: torch.Tensor, slc_kv, win_kv, raw_kv, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor:
    """A decode token into a StaticNSACache at the device position t, in one launch: RoPE at t (fp32
    tables cos/sin [>= capacity, D], as RotaryEmbedding.tables) on the unrotated queries q [B, H, 1, D]
    and the selection and window keys; those keys and values to selection slot t and window ring slot
    t % w (and its position), the raw compression keys/values to ring slot t % l (all [B, G, 1, D],
    any strides). Returns the rotated queries [B, H, 1, D]. Replaces three RoPE kernels, seven
    index_copy_ and two remainders; not for torch.compile (Inductor fuses the PyTorch version)."""
    B, H, _, D = q.shape
    G = cache.slc_k.shape[1]
    news = (*slc_kv, *win_kv, *raw_kv)
    check_inputs("static_write", q, cache.slc_k, *news)
    q_rot = torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype)
    strides = [s for x in (q, *news) for s in (x.stride(0), x.stride(1), x.stride(3))]
    _write_kernel[(B * G,)](
        t, q, q_rot, cos, sin, cache.slc_k, cache.slc_v, cache.win_k, cache.win_v, cache.win_pos, cache.raw_k,
        cache.raw_v, *news, *strides, G, cache.slc_k.shape[2], cache.win_k.shape[2], cache.raw_k.shape[2],
        cos.stride(0), R=H // G, RP=pad_pow2(H // G, 1), D=D, D_PAD=pad_pow2(D, 1), HALF=D // 2,
        HALF_PAD=pad_pow2(D // 2, 1), num_warps=1)
    return q_rot


def overlap_terms(cmp_block: int, cmp_stride: int, slc_block: int) -> int:
    """Most compressed blocks one selection block overlaps (the kernel's unrolled Eq. 9 terms)."""
    return (slc_block + cmp_block - 2) // cmp_stride + 2


@torch.library.custom_op("nsa::static_decode", mutates_args=())
def static_decode(q: torch.Tensor, cmp_k: torch.Tensor, cmp_v: torch.Tensor, slc_k: torch.Tensor,
                  slc_v: torch.Tensor, win_k: torch.Tensor, win_v: torch.Tensor, win_pos: torch.Tensor,
                  t: torch.Tensor, cmp_block: int, cmp_stride: int, slc_block: int, n_selected: int,
                  use_cmp: bool, use_slc: bool, use_win: bool, splits: int,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode query per head, q [B, H, 1, D] at position t (a 1-element int64 device tensor),
    over static caches [B, G, *, D] (contiguous) -> (o_cmp, o_slc, o_win) [B, H, 1, D] (a branch
    switched off: an empty tensor) and the selected blocks int32 [B, G, n] (-1 = none).
    splits: programs per (sequence, group) for the compressed scan (0: `scan_splits` decides)."""
    check_inputs("static_decode", q, cmp_k, cmp_v, slc_k, slc_v, win_k, win_v)
    B, H, _, D = q.shape
    G = cmp_k.shape[1]
    nsel = min(n_selected, -(-slc_k.shape[2] // slc_block))

    def out(on):
        return torch.empty(B, H, 1, D, device=q.device, dtype=q.dtype) if on else q.new_empty(0)

    outs = out(use_cmp), out(use_slc), out(use_win)
    idx = torch.empty(B, G, nsel, device=q.device, dtype=torch.int32)  # the kernel writes every slot
    _launch(q, cmp_k, cmp_v, (slc_k, slc_v, win_k, win_v, win_pos), t, outs, idx, cmp_block, cmp_stride, slc_block,
            use_cmp, use_slc, use_win, splits)
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
    RP, D_PAD = pad_pow2(R), pad_pow2(D)
    n_part = B * G * nsplit * RP if nsplit > 1 else 0  # the split scan's (m, l, acc) per row
    partials = tuple(torch.empty(n, device=dev, dtype=torch.float32) for n in (n_part, n_part, n_part * D_PAD))
    shape = dict(R=R, RP=RP, D=D, D_PAD=D_PAD, L=cmp_block, DS=cmp_stride, BC=BC, **dot_config(q.dtype))
    if nsplit > 1:  # plus one program per (sequence, group) for the window
        _decode_split_kernel[(B * G, nsplit + int(use_win))](
            q, cmp_k, cmp_v, t, scores, *partials, win_k, win_v, win_pos, outs[2], q.stride(0), q.stride(1),
            q.stride(3), G, NC, WIN, 1.0 / math.sqrt(D),
            BW=BW, NSPLIT=nsplit, USE_SLC=use_slc, USE_WIN=use_win, **shape, num_warps=num_warps(D))
    _decode_kernel[(B * G,)](
        q, cmp_k, cmp_v, slc_k, slc_v, win_k, win_v, win_pos, t, scores, p_grp, idx, *outs, *partials,
        q.stride(0), q.stride(1), q.stride(3),
        G, NC, NS, CAP, WIN, 1.0 / math.sqrt(D),
        LP=slc_block if use_slc else 1, LP_PAD=pad_pow2(slc_block) if use_slc else 16, NSEL=idx.shape[-1],
        NS_PAD=NS_PAD, NI=overlap_terms(cmp_block, cmp_stride, slc_block) if use_slc else 1, BP=BP, BW=BW,
        NSPLIT=nsplit, USE_CMP=use_cmp, USE_SLC=use_slc, USE_WIN=use_win, **shape,
        num_warps=decode_warps(NS_PAD, D),
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


@static_decode.register_fake
def _(q, cmp_k, cmp_v, slc_k, slc_v, win_k, win_v, win_pos, t, cmp_block, cmp_stride, slc_block, n_selected,
      use_cmp, use_slc, use_win, splits):
    B, H, _, D = q.shape
    G = cmp_k.shape[1]
    nsel = min(n_selected, -(-slc_k.shape[2] // slc_block))

    def out(on):
        return q.new_empty(B, H, 1, D) if on else q.new_empty(0)

    return out(use_cmp), out(use_slc), out(use_win), q.new_empty(B, G, nsel, dtype=torch.int32)
