"""NSA block geometry: which compressed blocks exist and are visible, and how they map to selection blocks.

Notation (paper arXiv 2502.11089): compressed blocks have length l (`cmp_block`) and stride d
(`cmp_stride`); selection blocks have length l' (`slc_block`).

* Compressed block i covers tokens [i*d, i*d + l). For a sequence of S tokens there are
  floor((S - l) / d) + 1 of them (0 when S < l). Query t may see block i only when the block is
  complete by t: i*d + l - 1 <= t.
* Selection block j covers tokens [j*l', (j+1)*l').

Eq. 9 (compressed -> selection scores). The paper writes
    p_slc[j] = sum_{m=0}^{l'/d - 1} sum_{n=0}^{l/d - 1} p_cmp[(l'/d) * j - m - n]
whose printed index runs *backwards* into the previous selection block (for l=32, d=16, l'=64 it
would give selection block 1 the compressed block covering tokens 0..31). What the double sum
expresses is overlap: a compressed block is l/d stride-sized pieces, a selection block is l'/d of
them, and each shared piece contributes once. We derive it from the geometry instead:

    p_slc[j] = sum_i p_cmp[i] * |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d

which for d | l and d | l' is exactly that double sum with index (l'/d)*j + m - n. For l=32, d=16,
l'=64 selection block j receives compressed blocks 4j-1, 4j, 4j+1, 4j+2, 4j+3 with weights
1, 2, 2, 2, 1 (pinned by tests/test_nsa_blocks.py). Each compressed block overlaps at most
ceil((l - 1) / l') + 1 selection blocks, so the map is stored sparsely as (index, weight) pairs.
"""

from __future__ import annotations

import math

import torch


def num_cmp_blocks(seq_len: int, block: int, stride: int) -> int:
    """Number of complete compressed blocks in a sequence of `seq_len` tokens."""
    return 0 if seq_len < block else (seq_len - block) // stride + 1


def num_slc_blocks(seq_len: int, block: int) -> int:
    """Number of (possibly partial) selection blocks covering `seq_len` tokens."""
    return math.ceil(seq_len / block)


def visible_cmp_count(positions: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """For each query position t, how many compressed blocks are complete by t (blocks 0..count-1).

    Block i is visible iff i*d + l - 1 <= t  <=>  i <= (t - l + 1) / d."""
    return torch.div(positions - block + 1, stride, rounding_mode="floor").add(1).clamp_min(0)


def overlap_map(n_cmp: int, cmp_block: int, cmp_stride: int, slc_block: int, device=None):
    """Sparse Eq. 9 map: for each compressed block i, the selection blocks it overlaps and weights.

    Returns (index [n_cmp, P] int64, weight [n_cmp, P] float64) with weight = overlap tokens / d;
    unused slots have weight 0 (and a valid index so gathers/scatters stay in range)."""
    n_pairs = (cmp_block - 1) // slc_block + 2
    start = torch.arange(n_cmp, dtype=torch.int64, device=device) * cmp_stride  # [n_cmp]
    end = start + cmp_block
    first = torch.div(start, slc_block, rounding_mode="floor")
    index = first[:, None] + torch.arange(n_pairs, device=device)[None, :]  # [n_cmp, P]
    lo = torch.maximum(start[:, None], index * slc_block)
    hi = torch.minimum(end[:, None], (index + 1) * slc_block)
    weight = (hi - lo).clamp_min(0).to(torch.float64) / cmp_stride
    index = torch.where(weight > 0, index, first[:, None])
    return index, weight


def forced_blocks(query_pos: int, slc_block: int) -> list[int]:
    """Blocks every query always selects: the initial block and the 2 local blocks (the block
    holding t and the one before it), deduplicated, in ascending order."""
    j = query_pos // slc_block
    return sorted({0, j, max(j - 1, 0)})
