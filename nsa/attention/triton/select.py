"""Top-n block selection (NSA Eqs. 8-10) with a Triton scoring kernel.

Same result as nsa.attention.ops.select_blocks: p_cmp = softmax over the visible compressed
blocks (per head, computed as exp(s - LSE)), overlap-mapped to selection blocks with the Eq. 9
weights |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d (the geometry of nsa/attention/blocks.py), summed
over the heads of the GQA group (Eq. 10), then the initial block and the 2 local blocks forced
(+inf), blocks after the query's own block excluded (-inf), top-n with ties to the lower index,
-1 for unused slots.

The kernel never writes the per-head [Sq x n_cmp] scores to HBM. One program per (tile of BM
queries, batch x KV group) walks the selection blocks in tiles of NJ: for every tile of BN
compressed blocks overlapping them it computes, head by head, p = exp(q K^T * scale - LSE) for
the BM queries (a tensor-core dot, each compressed key tile loaded once for BM queries and r
heads), sums p over the group's heads (Eq. 10), and maps the sum onto the NJ selection blocks with
a second dot against the [BN, NJ] overlap-weight matrix (Eq. 9, computed in registers from the
geometry). Only the [B, G, C, n_slc] group block scores of a chunk of C queries reach HBM (r * l'/d
times smaller than the per-head score tensor), and the chunk is bounded.

An earlier version ran one program per query (the r heads as a 16-row tile): on an H100 it
reloaded every compressed key for every query and took 37 ms (M7C layout) / 213 ms (paper layout)
at 64k, more than the rest of the NSA forward together (BENCHMARKS.md).

Top-n: the kernel writes each block's score as a unique int64 key (order-preserving int32 image of
the fp32 score in the high half, n_slc - 1 - j in the low half), so one torch.topk on the keys
reproduces ops.select_blocks' stable descending sort exactly (ties to the lower index) without
sorting all n_slc blocks and without extra passes to build keys.

The LSE comes from compressed_attention (`lse=`); without it, select_blocks runs the compressed
forward once to get it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nsa.attention.blocks import num_slc_blocks
from nsa.attention.triton._common import check_inputs, dot_config, launch_warps, pad_pow2

BM = 64  # queries per program
BN = 32  # compressed blocks per tile
NJ = 16  # selection blocks per output tile (a tl.dot dimension: >= 16)
MAX_CHUNK_ELEMS = 1 << 24  # bound on the [B, G, C, n_slc] score buffer per chunk


@triton.jit
def _select_scores_kernel(
    Q, K, LSE, OUT,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kg, s_kn, s_kd,
    s_lb, s_lh, s_lt,
    G, NCMP, NS, C, c0, q_start, scale, CB, CS, LS,
    R: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, NJ: tl.constexpr, AS_KEYS: tl.constexpr,
    IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr, PREC_W: tl.constexpr,
):
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
    out_rows = OUT + ((b * G + g) * C + offs_m)[:, None] * NS  # OUT: contiguous [B, G, C, NS], prefilled

    for j0 in range(0, cur_max + 1, NJ):
        js = j0 + offs_j0
        # compressed blocks overlapping selection blocks [j0, j0 + NJ): i*d + l > j0*l', i*d < (j0+NJ)*l'
        i_lo = tl.maximum(j0 * LS - CB + CS, 0) // CS
        i_hi = tl.minimum(vis_max, ((j0 + NJ) * LS + CS - 1) // CS)
        acc = tl.zeros([BM, NJ], tl.float32)
        for i0 in range(i_lo, i_hi, BN):
            offs_i = i0 + offs_i0
            imask = offs_i < i_hi
            k = tl.load(k_ptrs + i0 * s_kn, mask=imask[:, None] & dmask[None, :], other=0.0).to(DOT_T)
            seen = mmask[:, None] & (offs_i[None, :] < vis[:, None])  # [BM, BN]
            p_grp = tl.zeros([BM, BN], tl.float32)
            for hh in range(0, R):  # Eq. 10: sum p over the group's heads
                h = g * R + hh
                q = tl.load(Q + b * s_qb + h * s_qh + tq[:, None] * s_qt + offs_d[None, :] * s_qd,
                            mask=md_mask, other=0.0).to(DOT_T)
                lse = tl.load(LSE + b * s_lb + h * s_lh + tq * s_lt, mask=mmask, other=0.0)
                lse = tl.where(lse == float("-inf"), 0.0, lse)  # no visible block: nothing contributes
                s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
                p_grp += tl.where(seen, tl.exp(s - lse[:, None]), 0.0)
            st = offs_i * CS
            lo = tl.maximum(st[:, None], js[None, :] * LS)
            hi = tl.minimum(st[:, None] + CB, js[None, :] * LS + LS)
            w = tl.maximum(hi - lo, 0).to(tl.float32) / CS  # Eq. 9 overlap weight [BN, NJ]
            acc += tl.dot(p_grp, w, input_precision=PREC_W)
        forced = (js[None, :] == 0) | (js[None, :] == cur[:, None]) | (js[None, :] == cur[:, None] - 1)
        val = tl.where(forced, float("inf"), acc)
        val = tl.where(js[None, :] > cur[:, None], float("-inf"), val)
        smask = mmask[:, None] & (js[None, :] < NS)
        if AS_KEYS:
            bits = val.to(tl.int32, bitcast=True)
            key32 = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # float order as signed ints
            tl.store(out_rows + js[None, :], (key32 << 32) + (NS - 1 - js)[None, :], mask=smask)
        else:
            tl.store(out_rows + js[None, :], val, mask=smask)


# key of a -inf score (with j part 0) and the smallest key of a finite or +inf score
_NEG_INF_KEY32 = (0xFF800000 ^ 0x7FFFFFFF) - (1 << 32)  # int32 bits of -inf are negative: flipped
NEG_INF_KEY = _NEG_INF_KEY32 << 32
VALID_KEY_MIN = (_NEG_INF_KEY32 + 1) << 32


def _scores(q, k_cmp, cmp_block, cmp_stride, slc_block, c0, c1, q_start, lse, as_keys: bool):
    B, H, Sq, D = q.shape
    G, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    C = c1 - c0
    ns = num_slc_blocks(q_start + c1, slc_block)
    if as_keys:
        out = torch.full((B, G, C, ns), NEG_INF_KEY, dtype=torch.int64, device=q.device)
    else:
        out = torch.full((B, G, C, ns), float("-inf"), dtype=torch.float32, device=q.device)
    if C == 0:
        return out
    kc = k_cmp if n_cmp > 0 else k_cmp.new_zeros(B, G, 1, D)
    if lse is None and n_cmp > 0:
        from nsa.attention.triton.compressed import compressed_forward

        _, lse = compressed_forward(q, k_cmp, k_cmp, cmp_block, cmp_stride, q_start)
    elif lse is None:  # no compressed block yet: nothing is scored, the LSE is never read
        lse = torch.zeros(B, H, Sq, dtype=torch.float32, device=q.device)
    dots = dot_config(q.dtype)
    _select_scores_kernel[(triton.cdiv(C, BM), B * G)](
        q, kc, lse, out,
        *q.stride(), *kc.stride(), *lse.stride(),
        G, n_cmp, ns, C, c0, int(q_start), 1.0 / math.sqrt(D), int(cmp_block), int(cmp_stride), int(slc_block),
        R=H // G, D=D, D_PAD=pad_pow2(D), BM=min(BM, pad_pow2(C)), BN=BN, NJ=NJ, AS_KEYS=as_keys,
        PREC_W="ieee" if dots["PREC"] == "ieee" else "tf32", **dots,
        num_warps=launch_warps("select", D),
    )
    return out


def block_scores(q, k_cmp, cmp_block, cmp_stride, slc_block, c0, c1, q_start=0, lse=None):
    """Group block scores [B, G, c1 - c0, n_slc] fp32 for queries c0..c1-1 (forced = +inf,
    future = -inf), n_slc = num_slc_blocks(q_start + c1, slc_block)."""
    return _scores(q, k_cmp, cmp_block, cmp_stride, slc_block, c0, c1, q_start, lse, as_keys=False)


@torch.no_grad()
def select_blocks(q, k_cmp, cmp_block: int, cmp_stride: int, slc_block: int, n_selected: int,
                  q_start: int = 0, chunk: int | None = None, *, lse: torch.Tensor | None = None):
    """Same contract as nsa.attention.ops.select_blocks -> int64 [B, G, Sq, n] (-1 = unused).

    `chunk` (positional, as in ops) bounds the queries per scoring launch; by default it is chosen
    so the [B, G, chunk, n_slc] fp32 score buffer stays under 2^24 elements. `lse` [B, H, Sq] fp32
    (keyword only): the compressed-branch LSE from compressed_attention, saves one pass."""
    check_inputs("select_blocks", q, k_cmp)
    B, H, Sq, D = q.shape
    G = k_cmp.shape[1]
    if H % G:
        raise ValueError(f"nsa triton select_blocks: {H} query heads not a multiple of {G} KV groups")
    if lse is not None and (lse.shape != (B, H, Sq) or lse.dtype != torch.float32):
        raise ValueError(f"nsa triton select_blocks: lse must be float32 [B, H, Sq], got {lse.dtype} {tuple(lse.shape)}")
    result = torch.full((B, G, Sq, n_selected), -1, dtype=torch.int64, device=q.device)
    if chunk is None:
        ns_total = num_slc_blocks(q_start + Sq, slc_block)
        chunk = max(1, MAX_CHUNK_ELEMS // max(1, B * G * ns_total))
    if lse is None and k_cmp.shape[2] > 0:
        from nsa.attention.triton.compressed import compressed_forward

        _, lse = compressed_forward(q, k_cmp, k_cmp, cmp_block, cmp_stride, q_start)
    for c0 in range(0, Sq, chunk):
        c1 = min(Sq, c0 + chunk)
        keys = _scores(q, k_cmp, cmp_block, cmp_stride, slc_block, c0, c1, q_start, lse, as_keys=True)
        keep = min(n_selected, keys.shape[-1])
        result[:, :, c0:c1, :keep] = top_n_keys(keys, keep)
    return result


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
