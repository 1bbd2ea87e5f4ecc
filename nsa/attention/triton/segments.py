"""The selection inverted: for every (batch, group, block), the queries that selected it, cut into segments.

The block-centric selected-attention kernels (selected.py: the dK/dV kernel, the block-centric forward) run one
program per segment of at most `seg` queries that selected one key block. Building those lists is a sort of the
(query, slot) pairs by owner = (b*G + g) * n_blocks + block, then each owner's range in the sorted order and its
segments. In PyTorch ops that took ~45 small kernels per layer backward (sort, searchsorted, cumsum, gathers,
wheres, casts: 4,493 launches in a 4096-token M7C training step, run K); here it is three Triton launches, the
sort and a cumsum. Nothing waits for the GPU: every output has a length the host knows (the segment arrays a
static upper bound, the surplus segments empty).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa.attention.triton._common import cdiv, device_function

BLOCK = 1024  # entries, owners or segments per program


@device_function
def lower_bound(A, n, x, steps):
    """For each x: the first i in [0, n] with A[i] >= x (A ascending, n entries), in `steps` >= bit_length(n)
    halvings of [lo, hi) (a lane whose range is empty stops moving)."""
    lo = tl.zeros_like(x)
    hi = lo + n
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        below = active & (tl.load(A + mid, mask=active, other=0) < x)
        lo, hi = tl.where(below, mid + 1, lo), tl.where(active & (below == 0), mid, hi)
    return lo


@triton.jit
def _owner_keys_kernel(IDX, OWNER, total, per_bg, n_blocks, sentinel, BLOCK: tl.constexpr):
    """OWNER[i] = (b*G + g) * n_blocks + idx[i] for each (query, slot) pair i of idx [B*G, Sq*n] (per_bg = Sq*n),
    `sentinel` for an unused slot (-1), so that the sort puts those last."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = i < total
    blk = tl.load(IDX + i, mask=live, other=-1).to(tl.int32)
    owner = (i // per_bg) * n_blocks + blk
    tl.store(OWNER + i, tl.where(blk >= 0, owner, sentinel), mask=live)


@triton.jit
def _owner_ranges_kernel(SORTED, FIRST, COUNT, NSEG, total, n_owners, seg, steps, BLOCK: tl.constexpr):
    """Each owner's range [FIRST, FIRST + COUNT) in the sorted keys, and its number of segments."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = o < n_owners
    first = lower_bound(SORTED, total, o, steps)
    count = lower_bound(SORTED, total, o + 1, steps) - first
    tl.store(FIRST + o, first, mask=live)
    tl.store(COUNT + o, count, mask=live)
    tl.store(NSEG + o, (count + seg - 1) // seg, mask=live)


@triton.jit
def _segments_kernel(ORDER, QIDX, PAIR, CUM, NSEG, FIRST, COUNT, SEG_OWNER, SEG_START, SEG_END,
                     total, per_bg, n, n_owners, max_segs, seg, steps, BLOCK: tl.constexpr):
    """Entries i: the query (QIDX) and the flat (query, slot) index (PAIR) of the i-th pair in sorted order.
    Segments i: owner o holds segments [CUM[o] - NSEG[o], CUM[o]); each covers `seg` of its entries, the last
    the rest. The segments past the last owner's are empty (owner 0, start = end = 0)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = i < total
    order = tl.load(ORDER + i, mask=live, other=0)
    tl.store(QIDX + i, ((order % per_bg) // n).to(tl.int32), mask=live)
    tl.store(PAIR + i, order.to(tl.int32), mask=live)

    live = i < max_segs
    o = lower_bound(CUM, n_owners, i + 1, steps)  # the first owner whose segments end past i
    real = live & (o < n_owners)
    o = tl.minimum(o, n_owners - 1)
    n_seg = tl.load(NSEG + o, mask=real, other=0)
    within = i - (tl.load(CUM + o, mask=real, other=0) - n_seg)
    first = tl.load(FIRST + o, mask=real, other=0)
    start = first + within * seg
    end = tl.minimum(start + seg, first + tl.load(COUNT + o, mask=real, other=0))
    tl.store(SEG_OWNER + i, tl.where(real, o, 0), mask=live)
    tl.store(SEG_START + i, tl.where(real, start, 0), mask=live)
    tl.store(SEG_END + i, tl.where(real, end, 0), mask=live)


def block_segments(idx: torch.Tensor, n_blocks: int, seg: int):
    """Invert idx [B,G,Sq,n] (-1 = unused) into per-block query lists, cut into segments.

    Returns (qidx int32 [B*G*Sq*n]: query indices grouped by owner = (b*G + g)*n_blocks + block,
    ascending within an owner, the unused slots last; seg_owner, seg_start, seg_end int32
    [n_segments]: each segment's owner and its [start, end) range in qidx, at most `seg` queries;
    pair int32 [B*G*Sq*n]: for each qidx entry, its (query, slot) pair's flat index into idx,
    ((b*G + g)*Sq + t)*n + slot, where the block-centric forward writes that pair's partial result).

    n_segments = owners + B*G*Sq*n // seg, an upper bound of sum(ceil(count / seg)) over the owners (0 without
    owners); the surplus segments are empty (start == end, owner 0) and the dK/dV kernel skips them."""
    B, G, Sq, n = idx.shape
    dev = idx.device
    total, per_bg, n_owners = B * G * Sq * n, Sq * n, B * G * int(n_blocks)
    owner = torch.empty(total, dtype=torch.int32, device=dev)
    if total:
        _owner_keys_kernel[(cdiv(total, BLOCK),)](idx.contiguous(), owner, total, per_bg, int(n_blocks), n_owners,
                                                  BLOCK=BLOCK)
    # stable: the queries stay ascending within an owner (int32 keys: half the radix passes of int64)
    sorted_owner, order = torch.sort(owner, stable=True)
    first, count, n_seg = (torch.empty(n_owners, dtype=torch.int32, device=dev) for _ in range(3))
    if n_owners:
        _owner_ranges_kernel[(cdiv(n_owners, BLOCK),)](sorted_owner, first, count, n_seg, total, n_owners, int(seg),
                                                       total.bit_length(), BLOCK=BLOCK)
    cum = torch.cumsum(n_seg, 0, dtype=torch.int32)
    max_segs = n_owners + total // seg if n_owners else 0
    qidx, pair = (torch.empty(total, dtype=torch.int32, device=dev) for _ in range(2))
    seg_owner, seg_start, seg_end = (torch.empty(max_segs, dtype=torch.int32, device=dev) for _ in range(3))
    if max(total, max_segs):
        _segments_kernel[(cdiv(max(total, max_segs), BLOCK),)](
            order, qidx, pair, cum, n_seg, first, count, seg_owner, seg_start, seg_end,
            total, max(per_bg, 1), max(n, 1), n_owners, max_segs, int(seg), n_owners.bit_length(), BLOCK=BLOCK)
    return qidx, seg_owner, seg_start, seg_end, pair
