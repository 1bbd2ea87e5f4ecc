"""Slow, obviously-correct NSA reference: plain Python loops over batch, heads and queries, explicit
softmax over explicit key lists, geometry computed from token intervals. Used only by tests.

Written from the paper (arXiv 2502.11089) and the block geometry in nsa/attention/blocks.py's
docstring, not from the fast code: nothing here is vectorised over queries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def softmax_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One query [D] over explicit keys [K, D] -> [D]; zero when there is no key."""
    if keys.shape[0] == 0:
        return torch.zeros_like(q)
    scores = keys @ q / math.sqrt(q.shape[0])
    w = torch.exp(scores - scores.max())
    return (w / w.sum()) @ values


def compressed_keys_visible(t: int, n_cmp: int, l: int, d: int) -> list[int]:
    return [i for i in range(n_cmp) if i * d + l - 1 <= t]


def ref_compressed(q, kc, vc, l, d):
    B, H, S, D = q.shape
    G, n_cmp = kc.shape[1], kc.shape[2]
    out = torch.zeros_like(q)
    rows = []
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for t in range(S):
                vis = compressed_keys_visible(t, n_cmp, l, d)
                rows.append(((b, h, t), softmax_attend(q[b, h, t], kc[b, g, vis], vc[b, g, vis])))
    return _assemble(out, rows)


def ref_window(q, k, v, w):
    B, H, S, D = q.shape
    G = k.shape[1]
    rows = []
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for t in range(S):
                keys = list(range(max(0, t - w + 1), t + 1))
                rows.append(((b, h, t), softmax_attend(q[b, h, t], k[b, g, keys], v[b, g, keys])))
    return _assemble(torch.zeros_like(q), rows)


def overlap_tokens(i: int, j: int, l: int, d: int, lp: int) -> int:
    lo, hi = max(i * d, j * lp), min(i * d + l, (j + 1) * lp)
    return max(0, hi - lo)


def ref_select(q, kc, l, d, lp, n):
    """Selected block lists per (b, g, t): forced blocks first, then by descending score, ties to
    the lower index; candidates are blocks j <= t // l'."""
    B, H, S, D = q.shape
    G, n_cmp = kc.shape[1], kc.shape[2]
    r = H // G
    result = {}
    for b in range(B):
        for g in range(G):
            for t in range(S):
                vis = compressed_keys_visible(t, n_cmp, l, d)
                jt = t // lp
                score = {j: 0.0 for j in range(jt + 1)}
                for h in range(g * r, (g + 1) * r):
                    if vis:
                        s = torch.stack([q[b, h, t] @ kc[b, g, i] for i in vis]) / math.sqrt(D)
                        p = torch.softmax(s, dim=0)
                        for pi, i in zip(p.tolist(), vis):
                            for j in range(jt + 1):
                                score[j] += pi * overlap_tokens(i, j, l, d, lp) / d
                forced = {0, jt, max(jt - 1, 0)}
                ranked = sorted(score, key=lambda j: (j not in forced, -score[j], j))
                result[(b, g, t)] = ranked[:n]
    return result


def ref_selected(q, k, v, selection, lp):
    B, H, S, D = q.shape
    G, N = k.shape[1], k.shape[2]
    rows = []
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for t in range(S):
                blocks = selection[(b, g, t)]
                keys = sorted(p for j in blocks for p in range(j * lp, (j + 1) * lp) if p <= t and p < N)
                rows.append(((b, h, t), softmax_attend(q[b, h, t], k[b, g, keys], v[b, g, keys])))
    return _assemble(torch.zeros_like(q), rows)


def _assemble(out, rows):
    # build by stacking (keeps autograd simple and obviously right)
    flat = {key: val for key, val in rows}
    B, H, S, D = out.shape
    return torch.stack(
        [torch.stack([torch.stack([flat[(b, h, t)] for t in range(S)]) for h in range(H)]) for b in range(B)]
    )


def ref_rope(x, positions, theta):
    """Rotate pairs (i, i + D/2) by angle pos * theta^(-2i/D), one position at a time."""
    D = x.shape[-1]
    half = D // 2
    inv = [theta ** (-2 * i / D) for i in range(half)]
    out = []
    for idx, pos in enumerate(positions):
        xs = x[..., idx, :]
        ang = torch.tensor([pos * f for f in inv], dtype=torch.float64).to(x.dtype)
        c, s = torch.cos(ang), torch.sin(ang)
        x1, x2 = xs[..., :half], xs[..., half:]
        out.append(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))
    return torch.stack(out, dim=-2)


def ref_phi(compressor, block):
    """phi on one block [l, D] using the module's parameters explicitly."""
    if compressor.kind == "mean":
        return block.mean(0)
    h = (block + compressor.pos).reshape(-1)
    h = F.gelu(F.linear(h, compressor.fc1.weight, compressor.fc1.bias))
    return F.linear(h, compressor.fc2.weight, compressor.fc2.bias)


def ref_nsa_layer(layer, x, theta=10000.0, return_parts=False):
    """The whole NSA layer from its weights: projections, RoPE, phi per block, selection, the
    three branches, gates, output projection."""
    cfg, nsa = layer.cfg, layer.nsa
    B, S, _ = x.shape
    H, G, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    l, d, lp = nsa.cmp_block, nsa.cmp_stride, nsa.slc_block
    q = F.linear(x, layer.wq.weight).view(B, S, H, D).transpose(1, 2)
    kv = F.linear(x, layer.wkv.weight).view(B, S, 6, G, D).permute(2, 0, 3, 1, 4)
    k_cr, v_cr, k_s, v_s, k_w, v_w = kv.unbind(0)
    pos = list(range(S))
    q, k_s, k_w = ref_rope(q, pos, theta), ref_rope(k_s, pos, theta), ref_rope(k_w, pos, theta)
    n_cmp = 0 if S < l else (S - l) // d + 1
    if n_cmp:
        kc = torch.stack([torch.stack([torch.stack([ref_phi(layer.compress_k, k_cr[b, g, i * d : i * d + l])
                                                    for i in range(n_cmp)]) for g in range(G)]) for b in range(B)])
        vc = torch.stack([torch.stack([torch.stack([ref_phi(layer.compress_v, v_cr[b, g, i * d : i * d + l])
                                                    for i in range(n_cmp)]) for g in range(G)]) for b in range(B)])
        kc = ref_rope(kc, [i * d + l - 1 for i in range(n_cmp)], theta)
    else:
        kc = vc = x.new_zeros(B, G, 0, D)
    o_cmp = ref_compressed(q, kc, vc, l, d)
    sel = ref_select(q.detach(), kc.detach(), l, d, lp, nsa.n_selected)
    o_slc = ref_selected(q, k_s, v_s, sel, lp)
    o_win = ref_window(q, k_w, v_w, nsa.window)
    h = F.linear(x, layer.gate[0].weight, layer.gate[0].bias)
    gates = torch.sigmoid(F.linear(F.silu(h), layer.gate[2].weight, layer.gate[2].bias))
    gates = gates.view(B, S, H, 3).transpose(1, 2)
    o = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win
    y = F.linear(o.transpose(1, 2).reshape(B, S, H * D), layer.wo.weight)
    if return_parts:
        return y, dict(q=q, kc=kc, vc=vc, sel=sel)
    return y


def dense_causal(q, k, v):
    """Explicit dense causal softmax attention (materialises S x S; tests only)."""
    B, H, S, D = q.shape
    G = k.shape[1]
    k = k.repeat_interleave(H // G, dim=1)
    v = v.repeat_interleave(H // G, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    Sk = k.shape[2]
    t = torch.arange(S)[:, None] + (Sk - S)
    s = s.masked_fill(torch.arange(Sk)[None, :] > t, float("-inf"))
    return torch.softmax(s, dim=-1) @ v
