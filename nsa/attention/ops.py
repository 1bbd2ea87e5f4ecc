"""Functional NSA branches in PyTorch: compressed attention, block selection, selected attention,
sliding window. Batched tensor ops, chunked over queries so memory is linear in sequence length.

Layouts: queries q [B, H, Sq, Dh]; keys/values [B, G, N, Dh] with H = G * r (query head h belongs to
KV group h // r). Queries sit at absolute positions q_start .. q_start + Sq - 1 (q_start > 0 is
decode); raw keys start at position 0 unless stated. All functions work for Sq = 1.

No tensor of size Sq x N per head is ever built: each chunk of `chunk` queries sees only the keys
it may attend to (a window slice, the visible compressed blocks, or its n gathered blocks).
The compressed and window branches run through SDPA (flash / memory-efficient kernels on CUDA,
the flash kernel on CPU); the selected branch gathers blocks per query and has its own
recompute-in-backward autograd function, so only its inputs are kept for the backward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nsa.attention.blocks import num_slc_blocks, overlap_map, visible_cmp_count


def _visible(t: int, block: int, stride: int) -> int:
    """Python-int version of visible_cmp_count (no device sync)."""
    return max(0, (t - block + 1) // stride + 1)


def _sdpa_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """SDPA for a GQA group without repeating K/V: the r query heads of a group become extra query
    rows. q [B,G,r,C,D], k/v [B,G,K,D], mask [C,K] (True = attend) -> [B,G,r,C,D]."""
    B, G, r, C, D = q.shape
    out = F.scaled_dot_product_attention(
        q.reshape(B, G, r * C, D), k, v, attn_mask=mask.repeat(r, 1), scale=scale
    )
    return out.view(B, G, r, C, D)


def compressed_attention(q, k_cmp, v_cmp, block: int, stride: int, q_start: int = 0, chunk: int = 512):
    """Attend each query t to the compressed tokens of blocks complete by t (i*d + l - 1 <= t).

    Queries with no complete block yet (t < l - 1) get a zero output (and no gradient)."""
    B, H, Sq, D = q.shape
    G, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    qg = q.view(B, G, H // G, Sq, D)
    scale = 1.0 / math.sqrt(D)
    outs = []
    for c0 in range(0, Sq, chunk):
        c1 = min(Sq, c0 + chunk)
        n_keys = min(n_cmp, _visible(q_start + c1 - 1, block, stride))
        if n_keys == 0:
            outs.append(q.new_zeros(B, G, H // G, c1 - c0, D))
            continue
        pos = torch.arange(q_start + c0, q_start + c1, device=q.device)
        count = visible_cmp_count(pos, block, stride).clamp_max(n_cmp)
        # SDPA returns NaN for a row with no key: let empty rows see block 0, then zero them.
        mask = torch.arange(n_keys, device=q.device)[None, :] < count.clamp_min(1)[:, None]
        out = _sdpa_grouped(qg[:, :, :, c0:c1], k_cmp[:, :, :n_keys], v_cmp[:, :, :n_keys], mask, scale)
        outs.append(out * (count > 0).to(out.dtype)[:, None])
    return torch.cat(outs, dim=3).view(B, H, Sq, D)


def window_attention(q, k, v, window: int, q_start: int = 0, k_start: int = 0, chunk: int = 512):
    """Sliding window: query t attends to keys at positions (t - window, t]. Keys k/v [B,G,N,D] hold
    positions k_start .. k_start + N - 1 (k_start > 0 for a bounded decode cache)."""
    B, H, Sq, D = q.shape
    G = k.shape[1]
    qg = q.view(B, G, H // G, Sq, D)
    scale = 1.0 / math.sqrt(D)
    outs = []
    for c0 in range(0, Sq, chunk):
        c1 = min(Sq, c0 + chunk)
        t0, t1 = q_start + c0, q_start + c1 - 1
        lo, hi = max(k_start, t0 - window + 1), t1 + 1
        t = torch.arange(t0, t1 + 1, device=q.device)[:, None]
        kp = torch.arange(lo, hi, device=q.device)[None, :]
        mask = (kp <= t) & (kp > t - window)
        ks, vs = k[:, :, lo - k_start : hi - k_start], v[:, :, lo - k_start : hi - k_start]
        outs.append(_sdpa_grouped(qg[:, :, :, c0:c1], ks, vs, mask, scale))
    return torch.cat(outs, dim=3).view(B, H, Sq, D)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Softmax statistics in at least float32 (bf16/fp16 scores are upcast; fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to `valid`; rows with no valid entry give all zeros."""
    scores = scores.masked_fill(~valid, float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
    p = torch.exp(scores - peak)
    # a non-empty row sums to >= 1 (its max contributes exp(0)), an empty one to 0
    return p / p.sum(dim=-1, keepdim=True).clamp_min(1.0)


@torch.no_grad()
def select_blocks(
    q, k_cmp, cmp_block: int, cmp_stride: int, slc_block: int, n_selected: int,
    q_start: int = 0, chunk: int = 512,
):
    """Top-n selection blocks per query and KV group (paper Eqs. 8-10).

    p_cmp = softmax over the visible compressed blocks (per head) -> overlap-mapped to selection
    blocks (Eq. 9, see blocks.py) -> summed over the heads of the GQA group (Eq. 10) -> top-n among
    blocks j <= t // l', with the initial block and the 2 local blocks always included and ties
    broken toward the lower index. Returns int64 [B, G, Sq, n]; slots beyond the number of
    available blocks are -1. No gradient flows through selection (it is a discrete choice).
    """
    B, H, Sq, D = q.shape
    G, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    r = H // G
    qg = q.view(B, G, r, Sq, D)
    scale = 1.0 / math.sqrt(D)
    score_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    map_idx, map_w = overlap_map(n_cmp, cmp_block, cmp_stride, slc_block, device=q.device)
    map_w = map_w.to(score_dtype)
    result = torch.full((B, G, Sq, n_selected), -1, dtype=torch.int64, device=q.device)
    for c0 in range(0, Sq, chunk):
        c1 = min(Sq, c0 + chunk)
        C = c1 - c0
        t = torch.arange(q_start + c0, q_start + c1, device=q.device)
        n_slc = num_slc_blocks(q_start + c1, slc_block)  # blocks that can hold a token <= t
        slc_scores = torch.zeros(B, G, C, n_slc, dtype=score_dtype, device=q.device)
        n_keys = min(n_cmp, _visible(q_start + c1 - 1, cmp_block, cmp_stride))
        if n_keys > 0:
            s = torch.einsum("bgrcd,bgkd->bgrck", qg[:, :, :, c0:c1], k_cmp[:, :, :n_keys])
            count = visible_cmp_count(t, cmp_block, cmp_stride)
            valid = torch.arange(n_keys, device=q.device)[None, :] < count[:, None]
            p_cmp = _masked_softmax(s.to(score_dtype) * scale, valid)  # [B,G,r,C,n_keys]
            p_grp = p_cmp.sum(dim=2)  # Eq. 10: the group shares one choice  [B,G,C,n_keys]
            for slot in range(map_idx.shape[1]):  # Eq. 9, scattered along the sparse overlap map
                dest = map_idx[:n_keys, slot].clamp_max(n_slc - 1).expand(B, G, C, n_keys)
                slc_scores.scatter_add_(-1, dest, p_grp * map_w[:n_keys, slot])
        j = torch.arange(n_slc, device=q.device)[None, :]
        cur = torch.div(t, slc_block, rounding_mode="floor")[:, None]
        forced = (j == 0) | (j == cur) | (j == cur - 1)
        slc_scores = slc_scores.masked_fill(forced, float("inf")).masked_fill(j > cur, float("-inf"))
        # stable descending sort = ties to the lower block index
        vals, order = torch.sort(slc_scores, dim=-1, descending=True, stable=True)
        keep = min(n_selected, n_slc)
        chosen = torch.where(vals[..., :keep] > float("-inf"), order[..., :keep], -1)
        result[:, :, c0:c1, :keep] = chosen
    return result


class _SelectedAttention(torch.autograd.Function):
    """Attention of each query over the raw tokens of its selected blocks, causally clipped at t.

    Forward and backward both loop over query chunks; backward recomputes the probabilities, so
    the only saved tensors are q, k, v and the block indices (memory linear in S). Keys are
    gathered per token with advanced indexing, which reads k/v in place whatever their strides
    (a decode cache is a slice of a larger buffer: no O(N) copy per step)."""

    @staticmethod
    def _chunk_setup(idx_c, c0, c1, q_start, block, n_keys):
        """Token indices [B,G,C,n*l'] (clamped in range) and validity [B,G,1,C,n*l'] of a chunk.
        Slots beyond the number of blocks that exist by the chunk's last query are always empty
        (select_blocks fills slots in order), so they are dropped before gathering."""
        idx_c = idx_c[..., : min(idx_c.shape[-1], num_slc_blocks(q_start + c1, block))]
        B, G, C, n = idx_c.shape
        tok = idx_c[..., None] * block + torch.arange(block, device=idx_c.device)  # [B,G,C,n,l']
        t = torch.arange(q_start + c0, q_start + c1, device=idx_c.device).view(1, 1, -1, 1, 1)
        valid = (idx_c[..., None] >= 0) & (tok <= t) & (tok < n_keys)
        tok = tok.clamp(0, n_keys - 1).view(B, G, C, n * block)
        return tok, valid.view(B, G, 1, C, n * block)

    @staticmethod
    def forward(ctx, q, k, v, idx, block: int, q_start: int, chunk: int):
        B, H, Sq, D = q.shape
        G, N = k.shape[1], k.shape[2]
        qg = q.view(B, G, H // G, Sq, D)
        bi = torch.arange(B, device=q.device).view(B, 1, 1, 1)
        gi = torch.arange(G, device=q.device).view(1, G, 1, 1)
        scale = 1.0 / math.sqrt(D)
        out = torch.empty_like(qg)
        for c0 in range(0, Sq, chunk):
            c1 = min(Sq, c0 + chunk)
            tok, valid = _SelectedAttention._chunk_setup(idx[:, :, c0:c1], c0, c1, q_start, block, N)
            kg, vg = k[bi, gi, tok], v[bi, gi, tok]  # [B,G,C,n*l',D]
            s = _upcast(torch.einsum("bgrcd,bgckd->bgrck", qg[:, :, :, c0:c1], kg)) * scale
            p = _masked_softmax(s, valid)
            out[:, :, :, c0:c1] = torch.einsum("bgrck,bgckd->bgrcd", p.to(v.dtype), vg)
        ctx.save_for_backward(q, k, v, idx)
        ctx.block, ctx.q_start, ctx.chunk = block, q_start, chunk
        return out.view(B, H, Sq, D)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, idx = ctx.saved_tensors
        block, q_start, chunk = ctx.block, ctx.q_start, ctx.chunk
        B, H, Sq, D = q.shape
        G, N = k.shape[1], k.shape[2]
        qg = q.view(B, G, H // G, Sq, D)
        dog = grad_out.reshape(B, G, H // G, Sq, D)
        bi = torch.arange(B, device=q.device).view(B, 1, 1, 1)
        gi = torch.arange(G, device=q.device).view(1, G, 1, 1)
        row0 = (torch.arange(B * G, device=q.device) * N).view(B, G, 1, 1)  # first row of (b, g)
        acc = torch.float32 if k.dtype in (torch.float16, torch.bfloat16) else k.dtype
        dk = torch.zeros(B * G * N, D, dtype=acc, device=k.device)
        dv = torch.zeros_like(dk)
        dq = torch.empty_like(qg)
        scale = 1.0 / math.sqrt(D)
        for c0 in range(0, Sq, chunk):
            c1 = min(Sq, c0 + chunk)
            tok, valid = _SelectedAttention._chunk_setup(idx[:, :, c0:c1], c0, c1, q_start, block, N)
            kg, vg = k[bi, gi, tok], v[bi, gi, tok]
            qc, doc = qg[:, :, :, c0:c1], dog[:, :, :, c0:c1]
            s = _upcast(torch.einsum("bgrcd,bgckd->bgrck", qc, kg)) * scale
            p = _masked_softmax(s, valid)
            dvg = torch.einsum("bgrck,bgrcd->bgckd", p.to(doc.dtype), doc)
            dp = _upcast(torch.einsum("bgrcd,bgckd->bgrck", doc, vg))
            ds = (p * (dp - (p * dp).sum(dim=-1, keepdim=True)) * scale).to(q.dtype)
            dq[:, :, :, c0:c1] = torch.einsum("bgrck,bgckd->bgrcd", ds, kg)
            dkg = torch.einsum("bgrck,bgrcd->bgckd", ds, qc)
            rows = (row0 + tok).reshape(-1)  # masked slots carry zero gradient
            dk.index_add_(0, rows, dkg.reshape(-1, D).to(acc))
            dv.index_add_(0, rows, dvg.reshape(-1, D).to(acc))
        dk = dk.view(B, G, N, D).to(k.dtype)
        dv = dv.view(B, G, N, D).to(v.dtype)
        return dq.view(B, H, Sq, D), dk, dv, None, None, None, None


def selected_attention(q, k, v, idx, slc_block: int, q_start: int = 0, chunk: int = 256):
    """Each query attends over the raw tokens of its selected blocks `idx` [B,G,Sq,n] (-1 = none),
    clipped causally at t. k/v [B,G,N,D] hold positions 0..N-1."""
    return _SelectedAttention.apply(q, k, v, idx, slc_block, q_start, chunk)
