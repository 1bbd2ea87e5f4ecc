"""Top-n block selection (NSA Eqs. 8-10) with a Triton scoring kernel that also picks the top n.

Same result as nsa.attention.ops.select_blocks: p_cmp = softmax over the visible compressed
blocks (per head, computed as exp(s - LSE)), overlap-mapped to selection blocks with the Eq. 9
weights |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d (the geometry of nsa/attention/blocks.py), summed
over the heads of the GQA group (Eq. 10), then the initial block and the 2 local blocks forced
(+inf), blocks after the query's own block excluded (-inf), top-n with ties to the lower index,
-1 for unused slots.

Scoring. The kernel never writes the per-head [Sq x n_cmp] scores to HBM. One program per (tile
of BM queries, batch x KV group) walks the selection blocks in tiles of NJ (up to the tile's last
query's own block): for every tile of BN compressed blocks overlapping them it computes, head by
head, p = exp(q K^T * scale - LSE) for the BM queries (a tensor-core dot, each compressed key tile
loaded once for BM queries and r heads), sums p over the group's heads (Eq. 10), and maps the sum
onto the NJ selection blocks with a second dot against the [BN, NJ] overlap-weight matrix (Eq. 9,
computed in registers from the geometry).

Aligned tiles (default where the geometry allows: d divides l', l - d <= l', and the NJ * l'/d
keys of a tile are at most ALIGNED_MAX_KEYS; select.aligned_keys_per_block). The tiles of BN keys
above cover each NJ-tile's overlapping range [i_lo, i_hi), which at the paper geometry (l=32, d=16,
l'=64, NJ=16) is 65 keys: three tiles of 32, 68% used, and every head's q reloaded per key tile.
Instead, the keys that *start* in selection blocks [j0, j0 + NJ) (exactly NJ * l'/d = 64 of them)
are scored as one tile, each key once; the share of the tile's last keys that falls into the next
tile's first block (a block of l tokens starting d before a tile boundary reaches l - d tokens into
the next block) is summed into a [BM] carry and added to that block when the next tile is mapped.
The scores are the same sums in another order (the fp32 rounding differs, not the blocks chosen
on exact inputs: the tests compare both schemes with ops). Fewer dot columns (64 instead of 96), one
q load per head per tile instead of three.

Keys. Each block's score becomes a unique int64 key: the order-preserving int32 image of the fp32
score in the high half, NS - 1 - j in the low half (NS = the launch's number of selection
blocks). Larger key = better block, equal scores -> the lower j first, so the keys' descending
order is exactly ops.select_blocks' stable descending sort. A -inf score (a future block) gives a
key below VALID_KEY_MIN, decoded as -1.

Top-n, chosen by NSA_SELECT (read at each call; a bad value raises ValueError):
* "fused" (default): one launch, no score buffer. Each program keeps a running top list `top`
  [BM, NP] of keys in registers, sorted descending, with NP = NJ = max(16, next_pow2(n)) (NJ is
  a tl.dot dimension, hence >= 16), initialised below every real key. Each tile of NJ keys is
  merged with the bitonic top-k step (Shanbhag et al., SIGMOD 2018; what tl.topk does): sort the
  tile ascending, take the elementwise max with `top` (descending), which holds the NP largest
  keys of both as a bitonic sequence, and bitonic-merge that back to descending (log2 NP passes).
  The network is written here with min/max reductions rather than tl.sort (see _bitonic_pass).
  At the end the first n keys are decoded (j = NS - 1 - low half, -1 below VALID_KEY_MIN) and
  stored straight into the int64 [B, G, Sq, n] result. For n > MAX_FUSED_N the register list
  would spill, and "topk" is used instead. `chunk` only splits the queries over several launches.
  The tile is tuned per shape (select_tile, 2-byte inputs): NJ = 16 blocks on BM queries (the default),
  NJ_WIDE = 32 above head dim 64 (aligned tiles of up to 128 keys: each head's q tile is loaded half as
  often), 128 queries per program at 8 warps (each key tile serves twice the queries, the dots are twice
  as tall), or the default at the other num_warps (TILE_SHAPES). Their blocks may differ on near-ties
  (sums in another order, and the Eq. 9 map dot rounds p to tf32 for 2-byte inputs), so tuning accepts a
  variant when its blocks are a top-n of the reference scores up to that rounding (selection_differs).
* "topk": the kernel writes the keys of a chunk of C queries into an int64 [B, G, C, n_slc]
  buffer and torch.topk picks the n largest (the previous implementation; kept for comparison
  and as the reference). On an H100 (M7C layout, 64k tokens) the topk and the buffer fills cost
  as much as the scoring itself.

An earlier version ran one program per query (the r heads as a 16-row tile): on an H100 it
reloaded every compressed key for every query and took 37 ms (M7C layout) / 213 ms (paper layout)
at 64k, more than the rest of the NSA forward together (BENCHMARKS.md).

BN (compressed blocks per inner tile) is read from this module at each launch, so a benchmark can
set `select.BN = 16`: at the paper geometry a tile of 16 selection blocks overlaps 65 compressed
blocks, 3 tiles of 32 (68% used) or 5 of 16 (81% used, but more q reloads and narrower dots).

The LSE comes from compressed_attention (`lse=`); without it, select_blocks runs the compressed
forward once to get it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nsa.attention.blocks import num_slc_blocks
from nsa.attention.triton import tune
from nsa.attention.triton._common import (
    LOG2E, cdiv, check_inputs, device_function, dot_config, env_choice, launch_warps, pad_pow2,
)

SELECT_MODES = ("fused", "topk")
BM = 64  # queries per program
BN = 32  # compressed blocks per tile (read at launch: benchmarks may set 16)
NJ = 16  # selection blocks per tile without the fused top-n (a tl.dot dimension: >= 16)
MAX_FUSED_N = 32  # above, the [BM, NP] register top list spills (NP = 64): "topk" is used
ALIGNED_TILES = True  # aligned key tiles with a carry where the geometry allows (read at launch)
ALIGNED_MAX_KEYS = 64  # keys per aligned tile, at most (a [BM, keys] fp32 score tile per head)
# fewest selection blocks per tile with the fused top-n (read at launch). Each tile reloads the group's r
# query tiles once: at the paper geometry 16 blocks are 64 keys per q load (~64 flops per byte of q, which
# bounds the kernel by L2 traffic); bench_kernels times 32 blocks (128 keys, ALIGNED_MAX_KEYS raised) beside it
NJ_MIN = 16
# the wide tile tuning offers beside it (select_tile "nj32"): NJ_WIDE blocks, aligned tiles of up to WIDE_MAX_KEYS keys
# (half the q reloads). For 2-byte inputs above head dim 64 only: at 64 it spills registers for sm_90 (`aot_check
# --ptxas-info --only _select`); its picks may differ from the default's on near-ties (fp32 sums in another order)
NJ_WIDE = 32
WIDE_MAX_KEYS = 128
# how far (a share of the row's largest finite score) a tile variant's weakest pick may fall below the default's on
# the reference scores, for 2-byte inputs: the Eq. 9 map dot rounds p to tf32 (10 mantissa bits, truncated at
# worst), so each variant's scores may be off by 2^-10 of themselves and two variants may swap blocks whose exact
# scores differ by twice that. A 1e-4 bound dropped nj32 in run K over 0.003% of rows; a wrong block is off by far
# more
TF32_SWAP_TOL = 2 * 2.0 ** -10
# select_tile variants of the default NJ_MIN tile: (queries per program, num_warps). The selection kernel's warps
# were never swept on a GPU; none of these spills registers for sm_90 at head dims 64 and 128 (ptxas -v, bf16; at
# 128 queries and NJ_WIDE blocks it spills 130-280 bytes, not offered)
TILE_SHAPES = {"bm128": (128, 8), "w4": (BM, 4), "w8": (BM, 8)}
MAX_CHUNK_ELEMS = 1 << 24  # bound on the [B, G, C, n_slc] score buffer per chunk ("topk")

# key of a -inf score (with j part 0) and the smallest key of a finite or +inf score
_NEG_INF_KEY32 = (0xFF800000 ^ 0x7FFFFFFF) - (1 << 32)  # int32 bits of -inf are negative: flipped
NEG_INF_KEY = _NEG_INF_KEY32 << 32
VALID_KEY_MIN = (_NEG_INF_KEY32 + 1) << 32
# the same bounds in the kernel: a key is a real block iff key >> 32 >= _VALID_KEY32; the top list
# starts at int64 min, below every key (a padding block j >= NS has the key of -inf plus a negative
# low half NS - 1 - j: below NEG_INF_KEY, invalid too)
_VALID_KEY32: tl.constexpr = tl.constexpr(_NEG_INF_KEY32 + 1)
KEY_FLOOR: tl.constexpr = tl.constexpr(-(1 << 63))


def select_mode() -> str:
    return env_choice("NSA_SELECT", SELECT_MODES)


@device_function
def block_keys(score, j, NS):
    """The unique int64 key of selection block j's fp32 score (see Keys in the module docstring)."""
    bits = score.to(tl.int32, bitcast=True)
    key32 = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # float order as signed ints
    return (key32 << 32) + (NS - 1 - j)


@device_function
def block_index(key, NS):
    """The block j of a key (int32), -1 for the key of a -inf score or a padding block."""
    j = NS - 1 - key.to(tl.int32)  # the key's low half (truncation keeps the low 32 bits)
    return tl.where((key >> 32) >= _VALID_KEY32, j, -1)


@device_function
def _bitonic_pass(x, ROWS: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, S: tl.constexpr, DESC: tl.constexpr):
    # One compare-and-swap pass of a bitonic network on each row of x [ROWS, NP]: entries S apart
    # are ordered, descending if DESC (else ascending) within the aligned blocks of K entries whose
    # position has bit K clear, the other way where it is set (K = NP: the whole row one way). The
    # pair's max/min come from reductions over the size-2 axis of a reshape, not from tl.sort's
    # xor-reduction: the interpreter runs that one element by element (~1 s per [64, 16] sort).
    OUTER: tl.constexpr = ROWS * NP // (2 * S)
    y = tl.reshape(x, [OUTER, 2, S])
    hi = tl.max(y, axis=1, keep_dims=True)
    lo = tl.min(y, axis=1, keep_dims=True)
    start = (tl.arange(0, OUTER) % (NP // (2 * S))) * (2 * S)  # the pair's position within its row
    if DESC:
        desc = (start & K) == 0
    else:
        desc = (start & K) != 0
    first = tl.arange(0, 2) == 0
    y = tl.where(first[None, :, None] == desc[:, None, None], hi, lo)
    return tl.reshape(y, [ROWS, NP])


@device_function
def _bitonic_sort(x, ROWS: tl.constexpr, NP: tl.constexpr, LOG_NP: tl.constexpr, DESC: tl.constexpr):
    for st in tl.static_range(1, LOG_NP + 1):
        for i in tl.static_range(st):
            x = _bitonic_pass(x, ROWS, NP, 1 << st, 1 << (st - 1 - i), DESC)
    return x


@device_function
def _bitonic_merge(x, ROWS: tl.constexpr, NP: tl.constexpr, LOG_NP: tl.constexpr, DESC: tl.constexpr):
    # sorts rows that are bitonic sequences (the last stage of _bitonic_sort)
    for i in tl.static_range(LOG_NP):
        x = _bitonic_pass(x, ROWS, NP, NP, NP >> (i + 1), DESC)
    return x


@device_function
def _merge_top(top, key, ROWS: tl.constexpr, NP: tl.constexpr, LOG_NP: tl.constexpr):
    # Bitonic top-k step: with `top` [ROWS, NP] sorted descending and the tile `key` sorted
    # ascending, their elementwise max holds the NP largest of both, as a bitonic sequence; a
    # bitonic merge sorts it again. Returns the new `top`.
    key = _bitonic_sort(key, ROWS, NP, LOG_NP, False)
    return _bitonic_merge(tl.maximum(top, key), ROWS, NP, LOG_NP, True)


@device_function
def _group_probs(Q, LSE, k, seen, b, g, tq, mmask, md_mask, offs_d, scale, s_qb, s_qh, s_qt, s_qd, s_lb, s_lh, s_lt,
                 R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr):
    # Eq. 10: p_cmp = exp(q K^T * scale - LSE) of the BK keys in k, summed over the group's R heads [BM, BK].
    # The mask `seen` (a query's visible keys) is applied once to the sum, not per head: the per-head select and
    # the mask's compares were ~a quarter of a head's instructions (SASS, sm_90). An unseen key's terms are finite
    # or +inf (never NaN: the scores are finite, the LSE finite), and the select drops them either way.
    p_grp = tl.zeros([BM, BK], tl.float32)
    for hh in range(0, R):
        h = g * R + hh
        q = tl.load(Q + b * s_qb + h * s_qh + tq[:, None] * s_qt + offs_d[None, :] * s_qd,
                    mask=md_mask, other=0.0).to(DOT_T)
        lse = tl.load(LSE + b * s_lb + h * s_lh + tq * s_lt, mask=mmask, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E  # no visible block: nothing contributes
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        p_grp += tl.math.exp2(s * (scale * LOG2E) - lse[:, None])  # log2 units, one FMA per score
    return tl.where(seen, p_grp, 0.0)


@device_function
def _overlap(cmp_start, slc_start, CB, LS):
    # tokens shared by compressed blocks [cmp_start, +CB) and selection blocks [slc_start, +LS) (broadcast)
    return tl.maximum(tl.minimum(cmp_start + CB, slc_start + LS) - tl.maximum(cmp_start, slc_start), 0).to(tl.float32)


@device_function
def _aligned_map(p_grp, offs_i, js, offs_j0, carry, j0, CB, CS, LS, NJ: tl.constexpr, PREC_W: tl.constexpr):
    # Eq. 9 on an aligned tile: the group probabilities p_grp [rows, keys] of the keys offs_i (those starting in
    # selection blocks js = [j0, j0 + NJ)) mapped onto js, plus the previous tile's carry into its first block.
    # Returns (scores [rows, NJ], the carry into the next tile's first block [rows]).
    st = offs_i * CS
    w = _overlap(st[:, None], js[None, :] * LS, CB, LS) / CS  # Eq. 9 weights within the tile [keys, NJ]
    acc = tl.dot(p_grp, w, input_precision=PREC_W)
    acc += tl.where(offs_j0 == 0, 1.0, 0.0)[None, :] * carry[:, None]
    return acc, tl.sum(p_grp * (_overlap(st, (j0 + NJ) * LS, CB, LS) / CS)[None, :], 1)


@device_function
def _forced_and_future(acc, js, cur):
    # the initial and the 2 local blocks forced (+inf), blocks after the query's own block excluded (-inf)
    forced = (js[None, :] == 0) | (js[None, :] == cur[:, None]) | (js[None, :] == cur[:, None] - 1)
    val = tl.where(forced, float("inf"), acc)
    return tl.where(js[None, :] > cur[:, None], float("-inf"), val)


@triton.jit
def _select_scores_kernel(
    Q, K, LSE, OUT,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kg, s_kn, s_kd,
    s_lb, s_lh, s_lt,
    s_ob, s_og, s_ot,
    G, NCMP, NS, NSEL, C, c0, q_start, scale, CB, CS, LS,
    R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, NJ: tl.constexpr, LOG_NJ: tl.constexpr, MODE: tl.constexpr,
    IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr, PREC_W: tl.constexpr,
    KPB: tl.constexpr = 0, BNA: tl.constexpr = 16,
):
    # MODE "scores": fp32 scores -> OUT [B, G, C, NS]; "keys": int64 keys -> OUT [B, G, C, NS];
    # "topn": the NSEL best block indices -> OUT [B, G, C, NSEL] (NJ = NP >= NSEL). OUT rows are
    # the chunk's queries (the caller offsets the pointer by c0), columns contiguous.
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = (pid_bg % G).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)  # query index within the chunk
    mmask = offs_m < C
    tq = (c0 + offs_m).to(tl.int64)
    t = q_start + tq
    vis = tl.minimum(tl.maximum(t - CB + 1 + CS, 0) // CS, NCMP)  # [BM] visible compressed blocks
    cur = t // LS  # [BM] the query's own selection block (t >= 0)
    t_last = q_start + c0 + tl.minimum(pid_m * BM + BM, C) - 1
    vis_max = tl.minimum(tl.maximum(t_last - CB + 1 + CS, 0) // CS, NCMP)
    cur_max = t_last // LS

    offs_d = tl.arange(0, D_PAD)
    offs_i0 = tl.arange(0, BN)
    offs_j0 = tl.arange(0, NJ)
    dmask = offs_d < D
    md_mask = mmask[:, None] & dmask[None, :]
    k_ptrs = K + b * s_kb + g * s_kg + offs_i0[:, None] * s_kn + offs_d[None, :] * s_kd
    out_rows = OUT + b * s_ob + g * s_og + offs_m[:, None].to(tl.int64) * s_ot
    top = tl.full([BM, NJ], KEY_FLOOR, tl.int64)  # "topn": running top list, sorted descending

    if KPB > 0:  # aligned tiles (module docstring); carry: the last keys' share of the next tile's first block
        offs_a = tl.arange(0, BNA)
        a_valid = offs_a < NJ * KPB
        ka_ptrs = K + b * s_kb + g * s_kg + offs_a[:, None] * s_kn + offs_d[None, :] * s_kd
        carry = tl.zeros([BM], tl.float32)
    for j0 in range(0, cur_max + 1, NJ):
        js = j0 + offs_j0
        if KPB > 0:
            # the keys that start in selection blocks [j0, j0 + NJ), each loaded and scored once
            offs_i = j0 * KPB + offs_a
            imask = a_valid & (offs_i < vis_max)
            k = tl.load(ka_ptrs + (j0 * KPB) * s_kn, mask=imask[:, None] & dmask[None, :], other=0.0).to(DOT_T)
            seen = mmask[:, None] & (offs_i[None, :] < vis[:, None]) & a_valid[None, :]  # [BM, BNA]
            p_grp = _group_probs(Q, LSE, k, seen, b, g, tq, mmask, md_mask, offs_d, scale,
                                 s_qb, s_qh, s_qt, s_qd, s_lb, s_lh, s_lt, R, BM, BNA, DOT_T, PREC)
            acc, carry = _aligned_map(p_grp, offs_i, js, offs_j0, carry, j0, CB, CS, LS, NJ, PREC_W)
        else:
            # compressed blocks overlapping selection blocks [j0, j0 + NJ): i*d + l > j0*l', i*d < (j0+NJ)*l'
            i_lo = tl.maximum(j0 * LS - CB + CS, 0) // CS
            i_hi = tl.minimum(vis_max, ((j0 + NJ) * LS + CS - 1) // CS)
            acc = tl.zeros([BM, NJ], tl.float32)
            for i0 in range(i_lo, i_hi, BN):
                offs_i = i0 + offs_i0
                imask = offs_i < i_hi
                k = tl.load(k_ptrs + i0 * s_kn, mask=imask[:, None] & dmask[None, :], other=0.0).to(DOT_T)
                seen = mmask[:, None] & (offs_i[None, :] < vis[:, None])  # [BM, BN]
                p_grp = _group_probs(Q, LSE, k, seen, b, g, tq, mmask, md_mask, offs_d, scale,
                                     s_qb, s_qh, s_qt, s_qd, s_lb, s_lh, s_lt, R, BM, BN, DOT_T, PREC)
                w = _overlap(offs_i[:, None] * CS, js[None, :] * LS, CB, LS) / CS  # Eq. 9 weights [BN, NJ]
                acc += tl.dot(p_grp, w, input_precision=PREC_W)
        val = _forced_and_future(acc, js, cur)
        if MODE == "scores":
            tl.store(out_rows + js[None, :], val, mask=mmask[:, None] & (js[None, :] < NS))
        else:
            key = block_keys(val, js[None, :], NS)
            if MODE == "keys":
                tl.store(out_rows + js[None, :], key, mask=mmask[:, None] & (js[None, :] < NS))
            else:
                top = _merge_top(top, key, BM, NJ, LOG_NJ)
    if MODE == "topn":
        idx = block_index(top, NS).to(tl.int64)
        tl.store(out_rows + offs_j0[None, :], idx, mask=mmask[:, None] & (offs_j0[None, :] < NSEL))


def _launch(q, k_cmp, lse, out, cmp_block, cmp_stride, slc_block, c0, c1, q_start, ns, mode, n_sel=0,
            tile: str = "nj16"):
    """Run the kernel for queries c0..c1-1 into `out` (rows = those queries, columns contiguous).
    tile (mode "topn"): "nj16" (the default), "nj32" (NJ_WIDE-block tiles) or a TILE_SHAPES name; see
    select_tile."""
    if tile not in ("nj16", "nj32", *TILE_SHAPES):
        raise ValueError(f"nsa triton select_blocks: unknown tile {tile!r}")
    B, H, Sq, D = q.shape
    G, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    C = c1 - c0
    kc = k_cmp if n_cmp > 0 else k_cmp.new_zeros(B, G, 1, D)
    if lse is None:  # only when n_cmp == 0 (callers compute it otherwise): nothing is scored, never read
        lse = torch.zeros(B, H, Sq, dtype=torch.float32, device=q.device)
    dots = dot_config(q.dtype)
    wide = tile == "nj32"
    nj = max(NJ_WIDE if wide else NJ_MIN, pad_pow2(n_sel)) if mode == "topn" else NJ
    kpb = aligned_keys_per_block(cmp_block, cmp_stride, slc_block, nj, WIDE_MAX_KEYS if wide else ALIGNED_MAX_KEYS)
    prec_w = "ieee" if dots["PREC"] == "ieee" else "tf32"
    bm, warps = TILE_SHAPES.get(tile, (BM, 0)) if mode == "topn" else (BM, 0)
    bm = min(bm, pad_pow2(C))
    _select_scores_kernel[(cdiv(C, bm), B * G)](
        q, kc, lse, out,
        *q.stride(), *kc.stride(), *lse.stride(), *out.stride()[:3],
        G, n_cmp, ns, n_sel, C, c0, int(q_start), 1.0 / math.sqrt(D),
        int(cmp_block), int(cmp_stride), int(slc_block),
        R=H // G, D=D, D_PAD=pad_pow2(D), BM=bm, BN=BN,
        NJ=nj, LOG_NJ=nj.bit_length() - 1, MODE=mode, KPB=kpb, BNA=pad_pow2(nj * kpb),
        PREC_W=prec_w, **dots, num_warps=warps or launch_warps("select", D),
    )


def aligned_keys_per_block(cmp_block: int, cmp_stride: int, slc_block: int, nj: int, max_keys: int | None = None) -> int:
    """Compressed keys starting in each selection block (l' / d) when the aligned tiles apply
    (ALIGNED_TILES, d divides l', a compressed block reaches at most one selection block past the
    one it starts in: l - d <= l', and a tile of nj blocks holds at most max_keys keys, default
    ALIGNED_MAX_KEYS), else 0: tiles of BN keys over each tile's overlapping range."""
    kpb = slc_block // cmp_stride
    if (not ALIGNED_TILES or slc_block % cmp_stride or cmp_block - cmp_stride > slc_block
            or nj * kpb > (ALIGNED_MAX_KEYS if max_keys is None else max_keys)):
        return 0
    return kpb


def _lse(q, k_cmp, cmp_block, cmp_stride, q_start, lse):
    if lse is None and k_cmp.shape[2] > 0:
        from nsa.attention.triton.compressed import compressed_forward

        _, lse = compressed_forward(q, k_cmp, k_cmp, cmp_block, cmp_stride, q_start)
    return lse


def _scores(q, k_cmp, cmp_block, cmp_stride, slc_block, c0, c1, q_start, lse, as_keys: bool):
    B, G, C = q.shape[0], k_cmp.shape[1], c1 - c0
    ns = num_slc_blocks(q_start + c1, slc_block)
    if as_keys:
        out = torch.full((B, G, C, ns), NEG_INF_KEY, dtype=torch.int64, device=q.device)
    else:
        out = torch.full((B, G, C, ns), float("-inf"), dtype=torch.float32, device=q.device)
    if C > 0:
        lse = _lse(q, k_cmp, cmp_block, cmp_stride, q_start, lse)
        _launch(q, k_cmp, lse, out, cmp_block, cmp_stride, slc_block, c0, c1, q_start, ns,
                "keys" if as_keys else "scores")
    return out


def block_scores(q, k_cmp, cmp_block, cmp_stride, slc_block, c0, c1, q_start=0, lse=None):
    """Group block scores [B, G, c1 - c0, n_slc] fp32 for queries c0..c1-1 (forced = +inf,
    future = -inf), n_slc = num_slc_blocks(q_start + c1, slc_block)."""
    return _scores(q, k_cmp, cmp_block, cmp_stride, slc_block, c0, c1, q_start, lse, as_keys=False)


@torch.no_grad()
def select_blocks(q, k_cmp, cmp_block: int, cmp_stride: int, slc_block: int, n_selected: int,
                  q_start: int = 0, chunk: int | None = None, *, lse: torch.Tensor | None = None):
    """Same contract as nsa.attention.ops.select_blocks -> int64 [B, G, Sq, n] (-1 = unused).

    Top-n per NSA_SELECT ("fused", default, or "topk"; see the module docstring). `chunk`
    (positional, as in ops) bounds the queries per launch; by default "fused" scores all queries
    in one launch (it has no buffer to bound) and "topk" picks chunks whose [B, G, chunk, n_slc]
    int64 key buffer stays under 2^24 elements. `lse` [B, H, Sq] fp32 (keyword only): the
    compressed-branch LSE from compressed_attention, saves one pass."""
    mode = select_mode()
    check_inputs("select_blocks", q, k_cmp)
    B, H, Sq, D = q.shape
    G = k_cmp.shape[1]
    if H % G:
        raise ValueError(f"nsa triton select_blocks: {H} query heads not a multiple of {G} KV groups")
    if lse is not None and (lse.shape != (B, H, Sq) or lse.dtype != torch.float32):
        raise ValueError(f"nsa triton select_blocks: lse must be float32 [B, H, Sq], got {lse.dtype} {tuple(lse.shape)}")
    ns_total = num_slc_blocks(q_start + Sq, slc_block)
    fused = mode == "fused" and n_selected <= MAX_FUSED_N
    if Sq == 0 or n_selected == 0:
        return torch.full((B, G, Sq, n_selected), -1, dtype=torch.int64, device=q.device)
    lse = _lse(q, k_cmp, cmp_block, cmp_stride, q_start, lse)
    if fused:  # every slot is written by the kernel: no fill
        tile = select_tile(q, k_cmp, lse, cmp_block, cmp_stride, slc_block, n_selected, q_start, ns_total)
        result = torch.empty((B, G, Sq, n_selected), dtype=torch.int64, device=q.device)
        chunk = chunk or Sq
        for c0 in range(0, Sq, chunk):
            c1 = min(Sq, c0 + chunk)
            # one NS for the launch, so that every query's keys decode to the same j
            _launch(q, k_cmp, lse, result[:, :, c0:], cmp_block, cmp_stride, slc_block, c0, c1, q_start,
                    ns_total, "topn", n_selected, tile)
        return result
    result = torch.full((B, G, Sq, n_selected), -1, dtype=torch.int64, device=q.device)
    if chunk is None:
        chunk = max(1, MAX_CHUNK_ELEMS // max(1, B * G * ns_total))
    for c0 in range(0, Sq, chunk):
        c1 = min(Sq, c0 + chunk)
        keys = _scores(q, k_cmp, cmp_block, cmp_stride, slc_block, c0, c1, q_start, lse, as_keys=True)
        keep = min(n_selected, keys.shape[-1])
        result[:, :, c0:c1, :keep] = top_n_keys(keys, keep)
    return result


def select_tile(q, k_cmp, lse, cmp_block: int, cmp_stride: int, slc_block: int, n_selected: int, q_start: int,
                ns: int) -> str:
    """The fused top-n's tile here, tuned per shape (`select_tile`) for 2-byte inputs (n <= NJ_MIN): "nj16" (the
    default and reference); "nj32" (NJ_WIDE-block tiles, above head dim 64, where it does not spill registers for
    sm_90); "bm128" (128 queries per program, 8 warps); the default at the other num_warps ("w4" or "w8"). Timed on
    the LAST queries of the tuning slice (they score every selection block, as most queries of a long sequence do;
    keyed by the number of blocks), accepted when its blocks are a top-n of the reference's scores up to the map
    dot's tf32 rounding (selection_differs, TF32_SWAP_TOL)."""
    if q.element_size() != 2 or pad_pow2(n_selected) > NJ_MIN or k_cmp.shape[2] == 0 or not tune.wanted(q):
        return "nj16"
    D = q.shape[-1]
    options = ["nj16", *(["nj32"] if D > 64 else []), "bm128", "w4" if launch_warps("select", D) == 8 else "w8"]
    b, s = tune.slice_batch(q), tune.slice_len(q)
    off = q.shape[2] - s
    qs, ks, ls, t0 = q[:b, :, off:], k_cmp[:b], lse[:b, :, off:], q_start + off

    def run(tile):
        out = torch.empty((b, k_cmp.shape[1], s, n_selected), dtype=torch.int64, device=q.device)
        _launch(qs, ks, ls, out, cmp_block, cmp_stride, slc_block, 0, s, t0, ns, "topn", n_selected, tile)
        return out

    def differs(got, want):
        return selection_differs(got, want, lambda: block_scores(qs, ks, cmp_block, cmp_stride, slc_block, 0, s,
                                                                 t0, lse=ls), rel_tol=TF32_SWAP_TOL)

    key = tune.shape_key("select_tile", q, k_cmp, f"l{cmp_block}", f"d{cmp_stride}", f"lp{slc_block}",
                         f"n{n_selected}", f"NS{pad_pow2(ns, 1)}")
    return tune.pick(key, {name: (lambda name=name: run(name)) for name in options}, differs, q.device)


def selection_differs(got: torch.Tensor, want: torch.Tensor, scores, rel_tol: float = 1e-4) -> str | None:
    """None when the blocks `got` [..., n] are a top-n of the reference's scores (`scores()` -> [..., n_slc]
    fp32, computed only if got != want) as good as `want`'s: the same number of blocks per row, none
    scored below the reference's weakest pick by more than rel_tol of the row's largest finite score.
    Scores summed in another order may swap blocks on near-ties; a wrong block fails."""
    if torch.equal(got, want):
        return None
    if not torch.equal((got >= 0).sum(-1), (want >= 0).sum(-1)):
        return "another number of selected blocks in some rows"
    s = scores()
    inf = torch.tensor(float("inf"), device=s.device)
    weakest = [torch.where(x >= 0, s.gather(-1, x.clamp_min(0)), inf).amin(-1) for x in (got, want)]
    scale = torch.where(torch.isfinite(s), s.abs(), torch.zeros_like(s)).amax(-1).clamp_min(1e-30)
    bad = weakest[0] < weakest[1] - rel_tol * scale
    if bad.any():
        return f"{bad.float().mean().item():.3%} of rows pick a block scored below the reference's n-th"
    return None


def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """The kernel's int64 keys for fp32 scores [..., n_slc]: (order-preserving int32 image of the
    score) * 2^32 + (n_slc - 1 - j). Keys are distinct, larger score first and, for equal scores,
    the lower index j first. (-0.0 would sort below +0.0; scores are sums of non-negative terms, so
    it does not occur. No NaN expected.)"""
    ns = scores.shape[-1]
    bits = scores.contiguous().view(torch.int32)
    key32 = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    j = torch.arange(ns, device=scores.device, dtype=torch.int64)
    return key32 * (1 << 32) + (ns - 1 - j)


def top_n_keys(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Block indices of the n largest keys, in descending order; -1 where the score was -inf."""
    top, order = torch.topk(keys, n, dim=-1, largest=True, sorted=True)
    return torch.where(top >= VALID_KEY_MIN, order, torch.full_like(order, -1))


def top_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest fp32 scores along the last dim, in descending order, ties to the
    lower index, -1 where the score is -inf: exactly the first n of a stable descending sort (what
    ops.select_blocks does), via torch.topk on unique int64 keys instead of a full sort."""
    return top_n_keys(score_keys(scores), n)
