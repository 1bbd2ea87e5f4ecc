"""Top-n block selection (NSA Eqs. 8-10) with a Triton scoring kernel.

Same result as nsa.attention.ops.select_blocks: p_cmp = softmax over the visible compressed
blocks (per head, computed as exp(s - LSE)), overlap-mapped to selection blocks with the Eq. 9
weights |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d (the geometry of nsa/attention/blocks.py), summed
over the heads of the GQA group (Eq. 10), then the initial block and the 2 local blocks forced
(+inf), blocks after the query's own block excluded (-inf), top-n with ties to the lower index,
-1 for unused slots.

The kernel never writes the per-head [Sq x n_cmp] scores to HBM. One program per (query,
batch x KV group): the r heads of the group form one [R_PAD, D] query tile; for each tile of NJ
selection blocks (up to the query's own block) it recomputes the scores of the compressed blocks
overlapping that tile, p = exp(s - lse), sums over heads, applies the overlap weights (computed
in registers from the geometry) and writes the NJ group scores. Only the [B, G, C, n_slc] fp32
group block scores of a chunk of C queries reach HBM (r * l'/d times smaller than the per-head
score tensor), and the chunk is bounded.

Top-n (first version, outside the kernel): torch.topk on unique int64 keys built from the block
scores and the block index (see top_n), which reproduces ops.select_blocks' stable descending sort
exactly (ties to the lower index) without sorting all n_slc blocks. A fused in-kernel top-n is
future work.

The LSE may be passed in (from compressed_attention, `lse=`); otherwise the kernel computes it in
a first pass over the visible compressed blocks (online max / sum, COMPUTE_LSE).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nsa.attention.blocks import num_slc_blocks
from nsa.attention.triton._common import check_inputs, dot_config, num_warps, pad_pow2

BN = 32  # compressed blocks per tile
MAX_CHUNK_ELEMS = 1 << 24  # bound on the [B, G, C, n_slc] fp32 score buffer per chunk


@triton.jit
def _select_scores_kernel(
    Q, K, LSE, OUT,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kg, s_kn, s_kd,
    s_lb, s_lh, s_lt,
    G, NCMP, NS, C, c0, q_start, scale, CB, CS, LS,
    R: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BN: tl.constexpr, NJ: tl.constexpr, COMPUTE_LSE: tl.constexpr,
    IN_T: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // G).to(tl.int64)
    g = (pid_bg % G).to(tl.int64)
    tq = (c0 + pid_c).to(tl.int64)
    t = q_start + tq
    vis = tl.minimum(tl.maximum(t - CB + 1 + CS, 0) // CS, NCMP)
    cur = t // LS  # t >= 0

    offs_r = tl.arange(0, R_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_i0 = tl.arange(0, BN)
    offs_j0 = tl.arange(0, NJ)
    rmask = offs_r < R
    dmask = offs_d < D
    heads = g * R + offs_r
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + tq * s_qt + offs_d[None, :] * s_qd,
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(DOT_T)
    k_ptrs = K + b * s_kb + g * s_kg + offs_i0[:, None] * s_kn + offs_d[None, :] * s_kd

    if COMPUTE_LSE:
        m_i = tl.full([R_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([R_PAD], tl.float32)
        for i0 in range(0, vis, BN):
            imask = (i0 + offs_i0) < vis
            k = tl.load(k_ptrs + i0 * s_kn, mask=imask[:, None] & dmask[None, :], other=0.0).to(DOT_T)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            s = tl.where(imask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
        lse = tl.where(l_i == 0.0, 0.0, m_i + tl.log(tl.where(l_i == 0.0, 1.0, l_i)))
    else:
        lse = tl.load(LSE + b * s_lb + heads * s_lh + tq * s_lt, mask=rmask, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)  # no visible block: nothing contributes

    out_row = OUT + ((b * G + g) * C + pid_c) * NS  # OUT: contiguous [B, G, C, NS], prefilled -inf
    for j0 in range(0, cur + 1, NJ):
        js = j0 + offs_j0
        # compressed blocks overlapping selection blocks [j0, j0 + NJ): i*d + l > j0*l', i*d < (j0+NJ)*l'
        i_lo = tl.maximum(j0 * LS - CB + CS, 0) // CS
        i_hi = tl.minimum(vis, ((j0 + NJ) * LS + CS - 1) // CS)
        acc = tl.zeros([NJ], tl.float32)
        for i0 in range(i_lo, i_hi, BN):
            offs_i = i0 + offs_i0
            imask = offs_i < i_hi
            k = tl.load(k_ptrs + i0 * s_kn, mask=imask[:, None] & dmask[None, :], other=0.0).to(DOT_T)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            p = tl.where(imask[None, :] & rmask[:, None], tl.exp(s - lse[:, None]), 0.0)
            pg = tl.sum(p, 0)  # Eq. 10: sum over the group's heads  [BN]
            st = offs_i * CS
            lo = tl.maximum(st[:, None], js[None, :] * LS)
            hi = tl.minimum(st[:, None] + CB, js[None, :] * LS + LS)
            w = tl.maximum(hi - lo, 0).to(tl.float32) / CS  # Eq. 9 overlap weight [BN, NJ]
            acc += tl.sum(pg[:, None] * w, 0)
        forced = (js == 0) | (js == cur) | (js == cur - 1)
        val = tl.where(forced, float("inf"), acc)
        val = tl.where(js > cur, float("-inf"), val)
        tl.store(out_row + js, val, mask=js < NS)


def block_scores(q, k_cmp, cmp_block, cmp_stride, slc_block, c0, c1, q_start=0, lse=None):
    """Group block scores [B, G, c1 - c0, n_slc] fp32 for queries c0..c1-1 (forced = +inf,
    future = -inf), n_slc = num_slc_blocks(q_start + c1, slc_block)."""
    B, H, Sq, D = q.shape
    G, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    r = H // G
    C = c1 - c0
    ns = num_slc_blocks(q_start + c1, slc_block)
    out = torch.full((B, G, C, ns), float("-inf"), dtype=torch.float32, device=q.device)
    if C == 0:
        return out
    kc = k_cmp if n_cmp > 0 else k_cmp.new_zeros(B, G, 1, D)
    # NJ selection blocks per tile: the compressed blocks overlapping a tile fit one BN tile when possible
    nj = max(1, (BN - -(-cmp_block // cmp_stride)) * cmp_stride // slc_block)
    NJ = max(2, min(64, 1 << (nj.bit_length() - 1)))  # a power of two <= nj (>= 2: no size-1 tiles)
    if lse is None:
        lse_t, lse_strides, compute = q, (0, 0, 0), True
    else:
        lse_t, lse_strides, compute = lse, lse.stride(), False
    _select_scores_kernel[(C, B * G)](
        q, kc, lse_t, out,
        *q.stride(), *kc.stride(), *lse_strides,
        G, n_cmp, ns, C, c0, int(q_start), 1.0 / math.sqrt(D), int(cmp_block), int(cmp_stride), int(slc_block),
        R=r, R_PAD=pad_pow2(r), D=D, D_PAD=pad_pow2(D), BN=BN, NJ=NJ, COMPUTE_LSE=compute,
        **dot_config(q.dtype), num_warps=num_warps(D),
    )
    return out


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
    for c0 in range(0, Sq, chunk):
        c1 = min(Sq, c0 + chunk)
        scores = block_scores(q, k_cmp, cmp_block, cmp_stride, slc_block, c0, c1, q_start, lse)
        keep = min(n_selected, scores.shape[-1])
        result[:, :, c0:c1, :keep] = top_n(scores, keep)
    return result


def top_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest scores along the last dim, in descending order, ties to the lower
    index, -1 where the score is -inf: exactly the first n of a stable descending sort (what
    ops.select_blocks does), but with torch.topk on unique int64 keys instead of a full sort.

    key = (order-preserving int32 image of the fp32 score) * 2^32 + (n_slc - 1 - j): keys are
    distinct, larger score first and, for equal scores, the lower index j first. (-0.0 would sort
    below +0.0; scores are sums of non-negative terms, so it does not occur. No NaN expected.)"""
    ns = scores.shape[-1]
    bits = scores.contiguous().view(torch.int32)
    key32 = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # float order as signed ints
    j = torch.arange(ns, device=scores.device, dtype=torch.int64)
    keys = key32 * (1 << 32) + (ns - 1 - j)
    _, order = torch.topk(keys, n, dim=-1, largest=True, sorted=True)
    vals = torch.gather(scores, -1, order)
    return torch.where(vals > float("-inf"), order, torch.full_like(order, -1))
