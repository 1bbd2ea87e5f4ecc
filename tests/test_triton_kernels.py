"""Parity of the Triton NSA kernels (nsa/attention/triton) with the PyTorch branches in
nsa.attention.ops (themselves checked against the loop reference in tests/test_nsa_attention.py).

Without CUDA the kernels run on CPU through the Triton interpreter (TRITON_INTERPRET=1, set by
tests/triton_setup.py before triton is imported); with CUDA they run on the GPU. The interpreter is slow, so shapes are
tiny: S <= 64, head dim 16 (24 once, to exercise padding), batch 1 (2 once); on CUDA, an extra
test runs the paper's geometry at S = 1000 with head dims 64 and 128. Covered: forward and
dq/dk/dv, float32 (<= 1e-4 relative max error) and bfloat16 (<= 2e-2), ragged S, decode
(q_start > 0, one query), GQA group sizes 1, 2, 6, 16, unused (-1) and empty selection slots,
selection indices identical to ops.select_blocks (NSA_SELECT=fused and topk); plus a CUDA
compile of every kernel for sm_90 (ptxas from the triton wheel, no GPU needed).

Run: .venv/bin/python -m pytest tests/test_triton_kernels.py -q   (~1.5 min on 2 shared cores)
"""

import os
import re

import pytest
import torch

from tests.triton_setup import (  # noqa: F401  (first: switches the interpreter on before triton loads)
    AVAILABLE, BF16, DEVICE, F32, TOL, check, check_grads, has_interior_and_edges, interpreter, needs_kernels,
    nsa_triton, randn, rel_err, spy_band_split,
)

if AVAILABLE:
    import triton
    import triton.language as tl

    from nsa.attention.triton import compressed, segments, select, selected
    from nsa.attention.triton.select import _merge_top, block_scores

from nsa.attention import ops  # noqa: E402
from nsa.attention.blocks import num_cmp_blocks, overlap_map, visible_cmp_count  # noqa: E402

pytestmark = needs_kernels


# ------------------------------------------------------------------------- selected attention
# (dtype, B, G, r, Sq, q_start, D, slc_block, n_selected)
SLC_CASES = [
    (F32, 1, 2, 1, 27, 0, 16, 8, 3),  # r=1, ragged S, slc_block 8 (token tile padded to 16)
    (F32, 2, 1, 2, 19, 0, 24, 16, 2),  # batch 2, head dim 24 (padded to 32)
    (F32, 1, 1, 6, 35, 0, 16, 16, 2),
    (F32, 1, 1, 16, 20, 0, 16, 16, 2),
    (BF16, 1, 1, 2, 35, 0, 16, 16, 2),
    (BF16, 1, 1, 6, 33, 0, 16, 16, 2),
    (BF16, 1, 1, 16, 18, 0, 16, 16, 2),
    (F32, 1, 2, 6, 1, 70, 16, 16, 3),  # decode: one query at position 70, keys 0..70
    (BF16, 1, 1, 16, 1, 45, 16, 16, 3),
]


@pytest.mark.parametrize("dtype,B,G,r,Sq,q_start,D,blk,n", SLC_CASES)
def test_selected_attention_parity(dtype, B, G, r, Sq, q_start, D, blk, n):
    H, N = G * r, q_start + Sq
    q = randn(B, H, Sq, D, dtype=dtype, seed=1)
    k = randn(B, G, N, D, dtype=dtype, seed=2)
    v = randn(B, G, N, D, dtype=dtype, seed=3)
    k_cmp = randn(B, G, num_cmp_blocks(N, 8, 4), D, dtype=dtype, seed=4, grad=False)
    idx = ops.select_blocks(q.detach(), k_cmp, 8, 4, blk, n, q_start)
    out = nsa_triton.selected_attention(q, k, v, idx, blk, q_start)
    ref = ops.selected_attention(q, k, v, idx, blk, q_start)
    assert out.shape == ref.shape and out.dtype == dtype
    check("out", out, ref, dtype)
    check_grads(out, ref, (q, k, v), dtype)


@pytest.mark.parametrize("dtype,B,G,r,Sq,q_start,blk,n", [
    (F32, 2, 2, 3, 40, 0, 8, 3),  # batch 2, several segments per block (SEG patched to 4)
    (F32, 1, 1, 1, 21, 0, 16, 2),  # r = 1: 64 queries per row tile
    (F32, 1, 2, 6, 9, 30, 8, 4),  # decode-like: queries at 30..38 over keys 0..38
    (BF16, 1, 1, 16, 18, 0, 8, 3),  # r = 16: 4 queries per 64-row tile
])
def test_selected_block_centric_forward(monkeypatch, dtype, B, G, r, Sq, q_start, blk, n):
    """The block-centric forward (selected.selected_forward_blocks, the "bc" tuned variant: per-block
    programs write each (query, slot)'s partial result, a second kernel merges them) gives ops'
    output and the query-centric kernel's LSE; slots -1, queries with no slot at all and blocks wholly
    after their query included; its segments serve the backward."""
    monkeypatch.setattr(selected, "SEG", 4)
    H, N = G * r, q_start + Sq
    q = randn(B, H, Sq, 16, dtype=dtype, seed=71, strided=True)
    k, v = randn(B, G, N, 16, dtype=dtype, seed=72), randn(B, G, N, 16, dtype=dtype, seed=73)
    k_cmp = randn(B, G, num_cmp_blocks(N, 8, 4), 16, dtype=dtype, seed=74, grad=False)
    idx = ops.select_blocks(q.detach(), k_cmp, 8, 4, blk, n, q_start)
    idx[0, 0, 2] = -1  # a query with no slot
    idx[0, -1, 1, -1] = -1
    if q_start == 0:
        idx[0, 0, 0, 0] = N // blk - 1 if N // blk - 1 > 0 else 0  # a block after its query: masked
    out, lse, segments = selected.selected_forward_blocks(q.detach(), k, v, idx, blk, q_start)
    ref = ops.selected_attention(q.detach(), k, v, idx, blk, q_start)
    check("out", out, ref, dtype)
    assert out[0, :r, 2].abs().max() == 0 and torch.isneginf(lse[0, :r, 2]).all()
    _, lse_q = selected.selected_forward(q.detach(), k, v, idx, blk, q_start)
    finite = torch.isfinite(lse_q)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[finite] - lse_q[finite]).abs().max() <= 1e-4
    go = randn(*ref.shape, dtype=dtype, seed=75, grad=False)
    grads = selected.selected_backward(q.detach(), k.detach(), v.detach(), idx, out, lse, go, blk, q_start,
                                       segments=segments)
    want = torch.autograd.grad(ops.selected_attention(q, k, v, idx, blk, q_start), (q, k, v), go)
    for name, a, b in zip(("dq", "dk", "dv"), grads, want):
        check(name, a, b, dtype)


@pytest.mark.parametrize("mode,qt", [("block", "1"), ("block_dq", "1"), ("block", "4"), ("block_dqsum", "1")])
def test_selected_attention_unused_and_empty_slots(monkeypatch, mode, qt):
    """-1 slots are skipped; a query whose every slot is -1 (or whose blocks lie wholly after it)
    gets zero output and zero gradient, as in ops (also with query tiles: there the tile's union
    holds blocks that such a query must still ignore)."""
    monkeypatch.setenv("NSA_SLC_DKV", mode)
    monkeypatch.setenv("NSA_SLC_QTILE", qt)
    B, G, r, S, D, blk = 1, 2, 2, 36, 16, 16
    q = randn(B, G * r, S, D, dtype=F32, seed=5, strided=True)
    k = randn(B, G, S, D, dtype=F32, seed=6, strided=True)
    v = randn(B, G, S, D, dtype=F32, seed=7, strided=True)
    g = torch.Generator().manual_seed(8)
    idx = torch.rand(B, G, S, 3, generator=g).argsort(-1).to(DEVICE)  # distinct; may include future blocks
    idx[torch.rand(idx.shape, generator=g).to(DEVICE) < 0.3] = -1
    idx[:, :, 5] = -1  # query 5: no slot at all
    idx[0, 1, 7] = torch.tensor([2, -1, 1])  # query 7 (block 0) only sees blocks after it
    out = nsa_triton.selected_attention(q, k, v, idx, blk)
    ref = ops.selected_attention(q, k, v, idx, blk)
    check("out", out, ref, F32)
    assert out[:, :, 5].abs().max() == 0 and out[0, 2:, 7].abs().max() == 0
    check_grads(out, ref, (q, k, v), F32)


@pytest.mark.parametrize("mode,seg,dtype,rows,key_rows", [
    ("atomic", None, F32, 0, False), ("block", 3, F32, 0, False), ("block", 5, BF16, 0, False),
    ("block_dq", 3, F32, 0, False), ("block_dq", None, BF16, 0, False),
    ("block", 5, F32, 16, False), ("block_dq", None, BF16, 64, False),
    ("block_dqsum", 3, F32, 0, False), ("block_dqsum", None, BF16, 64, False),
    ("block", 5, BF16, 64, True), ("block_dq", 3, F32, 16, True), ("block_dqsum", None, BF16, 0, True)])
def test_selected_attention_dkv_modes(monkeypatch, mode, seg, dtype, rows, key_rows):
    """All backward strategies match ops: the atomic one, the block-centric one with segments so
    short that every block's query list is split across several programs, and the block-centric
    ones that also give dQ (no dQ kernel): with atomics, or per-(query, slot) shares summed after;
    rows > 0: the dK/dV kernel's (query, head) row tiles (selected.DKV_HEAD_ROWS); key_rows: its
    scores computed as k q^T (selected.DKV_KEY_ROWS)."""
    monkeypatch.setattr(selected, "DKV_HEAD_ROWS", rows)
    monkeypatch.setattr(selected, "DKV_KEY_ROWS", key_rows)
    if seg:
        monkeypatch.setattr(selected, "SEG", seg)
    monkeypatch.setenv("NSA_SLC_DKV", mode)
    B, G, r, S, D, blk, n = 1, 2, 3, 26, 16, 8, 3
    q = randn(B, G * r, S, D, dtype=dtype, seed=31, strided=True)
    k = randn(B, G, S, D, dtype=dtype, seed=32)
    v = randn(B, G, S, D, dtype=dtype, seed=33)
    k_cmp = randn(B, G, num_cmp_blocks(S, 8, 4), D, dtype=dtype, seed=34, grad=False)
    idx = ops.select_blocks(q.detach(), k_cmp, 8, 4, blk, n)
    out = nsa_triton.selected_attention(q, k, v, idx, blk)
    check_grads(out, ops.selected_attention(q, k, v, idx, blk), (q, k, v), dtype)


@pytest.mark.parametrize("rows,key_rows,dtype,Sq,q_start,interior,future", [
    (16, False, F32, 45, 0, True, False), (21, False, BF16, 45, 0, True, False), (16, True, F32, 30, 19, True, False),
    (16, True, BF16, 45, 0, False, False), (16, False, F32, 64, 0, True, True)])
def test_selected_dkv_interior_steps(monkeypatch, rows, key_rows, dtype, Sq, q_start, interior, future):
    """The block-centric dK/dV kernel's row tiles leave out the score mask on interior steps (every query at or
    after the last key of a full block; ragged last steps too, their missing rows padding): dq/dk/dv as ops with
    both kinds of step run (a ragged last block at 45 tokens, whose steps are all masked; 7-query steps, one of
    which starts at block 1's last-but-one query; queries after a prefix, q_start > 0; an idx where every query
    also picks the last block, future to most of them, so its list starts with more than a tile of masked
    entries), and every step masked with _common.INTERIOR_TILES off. Not above head dim 64 at 4 warps (it
    spilled). Interpreter only (the steps are recorded there)."""
    from nsa.attention.triton import _common

    assert selected.interior_dkv(64, 4) and selected.interior_dkv(128, 8) and not selected.interior_dkv(128, 4)
    if DEVICE != "cpu":
        pytest.skip("records the kernel's steps through the interpreter")
    monkeypatch.setattr(selected, "DKV_HEAD_ROWS", rows)
    monkeypatch.setattr(selected, "DKV_KEY_ROWS", key_rows)
    monkeypatch.setattr(_common, "INTERIOR_TILES", interior)
    assert selected.interior_dkv(16, 4) == interior
    monkeypatch.setenv("NSA_SLC_DKV", "block")
    steps, real = [], selected._dkdv_rows

    def spy(*args):
        steps.append(bool(args[-1]))  # MASKED
        return real(*args)

    monkeypatch.setattr(selected, "_dkdv_rows", spy)
    B, G, r, D, blk, n = 1, 1, 3, 16, 16, 3  # blk = its padded tile (16): only then are steps interior
    N = q_start + Sq
    q = randn(B, G * r, Sq, D, dtype=dtype, seed=41, strided=True)
    k, v = randn(B, G, N, D, dtype=dtype, seed=42), randn(B, G, N, D, dtype=dtype, seed=43)
    k_cmp = randn(B, G, num_cmp_blocks(N, 8, 4), D, dtype=dtype, seed=44, grad=False)
    idx = ops.select_blocks(q.detach(), k_cmp, 8, 4, blk, n, q_start)
    if future:  # the last block in every query's last slot (if not chosen already)
        last = (N - 1) // blk
        idx[..., -1] = torch.where((idx[..., :-1] == last).any(-1), idx[..., -1], last)
    out = nsa_triton.selected_attention(q, k, v, idx, blk, q_start)
    check_grads(out, ops.selected_attention(q, k, v, idx, blk, q_start), (q, k, v), dtype)
    assert True in steps and (False in steps) == interior, steps


@pytest.mark.parametrize("qt,mode,dtype,r,Sq,q_start", [(2, "block", F32, 3, 26, 0), (4, "block", BF16, 3, 26, 0),
                                                        (3, "atomic", F32, 3, 26, 0), (8, "block", F32, 1, 21, 0),
                                                        (4, "block", BF16, 6, 5, 40)])
def test_selected_attention_query_tiles(monkeypatch, qt, mode, dtype, r, Sq, q_start):
    """NSA_SLC_QTILE > 1: a program takes qt queries and walks the union of their blocks, each row
    keeping only its own query's blocks; same result as ops (ragged last tile, decode, r = 1)."""
    monkeypatch.setenv("NSA_SLC_QTILE", str(qt))
    monkeypatch.setenv("NSA_SLC_DKV", mode)
    B, G, D, blk, n = 1, 2, 16, 8, 3
    N = q_start + Sq
    q = randn(B, G * r, Sq, D, dtype=dtype, seed=35, strided=True)
    k = randn(B, G, N, D, dtype=dtype, seed=36)
    v = randn(B, G, N, D, dtype=dtype, seed=37)
    k_cmp = randn(B, G, num_cmp_blocks(N, 8, 4), D, dtype=dtype, seed=38, grad=False)
    idx = ops.select_blocks(q.detach(), k_cmp, 8, 4, blk, n, q_start)
    out = nsa_triton.selected_attention(q, k, v, idx, blk, q_start)
    ref = ops.selected_attention(q, k, v, idx, blk, q_start)
    check("out", out, ref, dtype)
    check_grads(out, ref, (q, k, v), dtype)


@pytest.mark.parametrize("qt,mode,dtype,r,Sq,q_start", [(16, "block", F32, 3, 26, 0), (32, "block", BF16, 6, 40, 0),
                                                        (8, "atomic", F32, 2, 21, 0), (16, "block", F32, 1, 19, 0),
                                                        (16, "block", BF16, 16, 5, 40)])
def test_selected_attention_head_tiles(qt, mode, dtype, r, Sq, q_start):
    """Head tiles (tuned variants "qt64h"/"qt128h"): a program's rows are qt queries of one head (grid
    axis 2), walking the union of their blocks; forward, LSE and dq/dk/dv as ops and as the group
    tiles (ragged last tile, r = 1 and 16, decode-like q_start, the atomic dK/dV)."""
    B, G, D, blk, n = 2, 2, 16, 8, 3
    N = q_start + Sq
    q = randn(B, G * r, Sq, D, dtype=dtype, seed=81, strided=True)
    k, v = randn(B, G, N, D, dtype=dtype, seed=82), randn(B, G, N, D, dtype=dtype, seed=83)
    k_cmp = randn(B, G, num_cmp_blocks(N, 8, 4), D, dtype=dtype, seed=84, grad=False)
    idx = ops.select_blocks(q.detach(), k_cmp, 8, 4, blk, n, q_start)
    idx[0, 1, Sq // 2] = -1  # a query with no slot: zero output, -inf LSE
    qt = selected.head_query_tile(Sq, dtype, qt)
    lists = selected.tile_lists(idx, qt)
    out, lse = selected.selected_forward(q.detach(), k, v, idx, blk, q_start, qt, lists, head_tiles=True)
    ref = ops.selected_attention(q.detach(), k, v, idx, blk, q_start)
    check("out", out, ref, dtype)
    _, lse_ref = selected.selected_forward(q.detach(), k, v, idx, blk, q_start)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[finite] - lse_ref[finite]).abs().max() <= 1e-3
    go = randn(*ref.shape, dtype=dtype, seed=85, grad=False)
    grads = selected.selected_backward(q.detach(), k.detach(), v.detach(), idx, out, lse, go, blk, q_start,
                                       mode=mode, qt=qt, lists=lists, head_tiles=True)
    want = torch.autograd.grad(ops.selected_attention(q, k, v, idx, blk, q_start), (q, k, v), go)
    for name, a, b in zip(("dq", "dk", "dv"), grads, want):
        check(name, a, b, dtype)


def test_head_query_tile_caps():
    assert selected.head_query_tile(4096, BF16, 128) == 128 and selected.head_query_tile(4096, F32, 128) == 32
    assert selected.head_query_tile(50, BF16, 64) == 50 and selected.head_query_tile(4096, BF16, 256) == 128


def test_tile_lists_union_per_tile():
    """tile_lists: each tile's distinct blocks ascending, then -1, and their count."""
    g = torch.Generator().manual_seed(9)
    idx = torch.randint(-1, 6, (2, 3, 11, 4), generator=g)
    for qt in (1, 3, 4):
        lst, cnt = selected.tile_lists(idx, qt)
        assert lst.shape == (2, 3, -(-11 // qt), qt * 4) and lst.dtype == cnt.dtype == torch.int32
        for b in range(2):
            for gi in range(3):
                for t in range(lst.shape[2]):
                    want = sorted({int(j) for j in idx[b, gi, t * qt:(t + 1) * qt].flatten() if j >= 0})
                    c = int(cnt[b, gi, t])
                    assert c == len(want) and lst[b, gi, t, :c].tolist() == want
                    assert (lst[b, gi, t, c:] == -1).all()


@pytest.mark.parametrize("value", ["0", "two", "-1", "65"])
def test_query_tile_validated(monkeypatch, value):
    monkeypatch.setenv("NSA_SLC_QTILE", value)
    with pytest.raises(ValueError, match="NSA_SLC_QTILE"):
        selected.query_tile(100, 6, BF16)
    if value != "0":  # 0 is valid there: head by head
        monkeypatch.setenv("NSA_SLC_DKV_ROWS", value)
        with pytest.raises(ValueError, match="NSA_SLC_DKV_ROWS"):
            selected.dkdv_queries_per_step(6, BF16)


def test_query_tile_caps(monkeypatch):
    monkeypatch.setenv("NSA_SLC_QTILE", "8")
    assert selected.query_tile(100, 6, BF16) == 8  # 48 rows
    assert selected.query_tile(100, 16, BF16) == 4 and selected.query_tile(100, 16, F32) == 1
    assert selected.query_tile(3, 1, BF16) == 3 and selected.query_tile(100, 64, BF16) == 1
    monkeypatch.setenv("NSA_SLC_DKV_ROWS", "64")
    assert selected.dkdv_queries_per_step(6, BF16) == 10 and selected.dkdv_queries_per_step(6, F32) == 2
    assert selected.dkdv_queries_per_step(32, F32) == 0  # 16 fp32 rows cannot hold one query's 32 heads


@pytest.mark.parametrize("B,G,Sq,n,NB,seg,unused", [
    (2, 2, 23, 3, 5, 4, -1),  # several segments per block, unused slots
    (1, 1, 40, 2, 3, 1, 0),  # one query per segment, every slot used
    (1, 3, 17, 4, 9, 64, -1),  # every list in one segment
    (1, 1, 6, 2, 4, 4, -2),  # no slot used
    (1, 2, 0, 3, 4, 4, -1),  # no query
    (2, 1, 9, 2, 0, 4, -1),  # no key block (the slots all -1)
])
def test_block_segments_invert_idx(B, G, Sq, n, NB, seg, unused):
    """block_segments (segments.py) lists, for every (batch, group, block), exactly the queries that selected it,
    ascending, in ceil(count / seg) consecutive segments of at most `seg` (the last the rest), each entry with its
    (query, slot) pair index; unused (-1) slots go last, the segment arrays have their static length and the
    surplus segments are empty, owner 0."""
    g = torch.Generator().manual_seed(9 + Sq)
    idx = torch.randint(unused, NB, (B, G, Sq, n), generator=g).clamp_min(-1) if NB else torch.full((B, G, Sq, n), -1)
    qidx, owner, start, end, pair = segments.block_segments(idx.to(DEVICE), NB, seg)
    total, n_owners = idx.numel(), B * G * NB
    assert all(x.dtype == torch.int32 for x in (qidx, owner, start, end, pair))
    assert qidx.shape == pair.shape == (total,)
    assert owner.shape == start.shape == end.shape == ((n_owners + total // seg,) if n_owners else (0,))
    flat = idx.reshape(-1)
    assert sorted(pair.tolist()) == list(range(total))  # every (query, slot) pair once
    want, got, next_start = {}, {}, {}
    for p_ in range(total):
        if flat[p_] >= 0:
            want.setdefault((p_ // (Sq * n)) * NB + flat[p_].item(), []).append(p_ // n % Sq)
    n_used = sum(len(v) for v in want.values())
    assert (flat[pair[n_used:].long()] < 0).all()  # the unused slots last
    for i, (o, a, e) in enumerate(zip(owner.tolist(), start.tolist(), end.tolist())):
        if i >= sum(-(-len(v) // seg) for v in want.values()):
            assert (o, a, e) == (0, 0, 0), f"surplus segment {i}"
            continue
        assert 0 < e - a <= seg and a == next_start.get(o, a)  # an owner's segments are consecutive
        assert e - a == seg or e == a + len(want[o]) - len(got.get(o, [])), "only an owner's last segment is short"
        next_start[o] = e
        for p_, t in zip(pair[a:e].tolist(), qidx[a:e].tolist()):  # each entry's pair holds this block and query
            assert (p_ // (Sq * n)) * NB + flat[p_].item() == o and p_ // n % Sq == t
        got.setdefault(o, []).extend(qidx[a:e].tolist())
    assert got == want  # the queries of each block, ascending (stable), none missing


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rowsum_do_o_matches_torch(dtype):
    """The backward's delta = rowsum(dO * O) kernel, on the layer's strided layout and on an
    expanded (stride-0) upstream gradient, against the fp32 torch expression."""
    from nsa.attention.triton._common import rowsum_do_o

    o = randn(2, 3, 37, 24, dtype=dtype, seed=61, grad=False, strided=True)
    for do in (randn(2, 3, 37, 24, dtype=dtype, seed=62, grad=False), torch.ones(1, device=DEVICE, dtype=dtype).expand(o.shape)):
        got = rowsum_do_o(do, o)
        want = (do.float() * o.float()).sum(-1)
        assert got.dtype == torch.float32 and got.shape == (2, 3, 37) and got.is_contiguous()
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


# ------------------------------------------------------------------------ compressed attention
# (dtype, B, G, r, Sq, q_start, D, l, d)
CMP_CASES = [
    (F32, 1, 2, 1, 45, 0, 16, 8, 4),
    (F32, 2, 1, 2, 50, 0, 24, 16, 8),
    (F32, 1, 1, 6, 61, 0, 16, 8, 4),
    (F32, 1, 1, 16, 37, 0, 16, 8, 4),
    (BF16, 1, 2, 2, 45, 0, 16, 8, 4),
    (BF16, 1, 1, 6, 40, 0, 16, 16, 8),
    (BF16, 1, 1, 16, 37, 0, 16, 8, 4),
    (F32, 1, 2, 6, 1, 77, 16, 8, 4),  # decode
    (BF16, 1, 1, 16, 1, 63, 16, 16, 8),
    (F32, 1, 1, 2, 5, 0, 16, 8, 4),  # S < l: no compressed block at all
]


@pytest.mark.parametrize("dtype,B,G,r,Sq,q_start,D,l,d", CMP_CASES)
def test_compressed_attention_parity(dtype, B, G, r, Sq, q_start, D, l, d):
    H, n_cmp = G * r, num_cmp_blocks(q_start + Sq, l, d)
    q = randn(B, H, Sq, D, dtype=dtype, seed=11, strided=r == 16)
    kc = randn(B, G, n_cmp, D, dtype=dtype, seed=12)
    vc = randn(B, G, n_cmp, D, dtype=dtype, seed=13)
    out, lse = nsa_triton.compressed_attention(q, kc, vc, l, d, q_start)
    ref = ops.compressed_attention(q, kc, vc, l, d, q_start)
    assert out.shape == ref.shape and out.dtype == dtype and lse.dtype == torch.float32
    check("out", out, ref, dtype)
    # LSE against an explicit masked logsumexp (fp32 scores)
    pos = torch.arange(q_start, q_start + Sq, device=DEVICE)
    count = visible_cmp_count(pos, l, d).clamp_max(n_cmp)
    s = torch.einsum("bgrtd,bgkd->bgrtk", q.detach().float().view(B, G, r, Sq, D), kc.detach().float()) / D**0.5
    s = s.masked_fill(torch.arange(n_cmp, device=DEVICE)[None, :] >= count[:, None], float("-inf"))
    lse_ref = torch.logsumexp(s, dim=-1).view(B, H, Sq) if n_cmp else torch.full_like(lse, float("-inf"))
    empty = (count == 0).expand(B, H, Sq)
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    if (~empty).any():
        assert (lse[~empty] - lse_ref[~empty]).abs().max() <= (1e-4 if dtype == F32 else 2e-2)
    if n_cmp == 0:
        assert out.abs().max() == 0
        go = torch.randn_like(out)
        dq = torch.autograd.grad(out, q, go)[0]
        assert dq.abs().max() == 0
        return
    check_grads(out, ref, (q, kc, vc), dtype)


@pytest.mark.parametrize("dtype,bn", [(F32, 64), (BF16, 16)])
def test_compressed_attention_dkdv_segments(monkeypatch, dtype, bn):
    """Long sequences split the compressed dK/dV pass into query segments whose partial sums are
    added atomically: same gradients as ops (here 2 segments of 64 queries; with bn=16, two key
    tiles per program grid row)."""
    monkeypatch.setattr(compressed, "QSEG", 64)
    monkeypatch.setattr(compressed, "DKV_TILES", {f"bm32_bn{bn}": compressed.DkvTile(32, bn, 0)})  # the reference
    B, G, r, S, D, l, d = 1, 1, 2, 100, 16, 8, 4
    q = randn(B, G * r, S, D, dtype=dtype, seed=51)
    kc = randn(B, G, num_cmp_blocks(S, l, d), D, dtype=dtype, seed=52)
    vc = randn(B, G, num_cmp_blocks(S, l, d), D, dtype=dtype, seed=53)
    out, _ = nsa_triton.compressed_attention(q, kc, vc, l, d)
    check_grads(out, ops.compressed_attention(q, kc, vc, l, d), (q, kc, vc), dtype)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_compressed_tile_variants(dtype):
    """Every tile variant tuning may pick (compressed.FWD_TILES, DQ_TILES: 128-query and 64-key tiles;
    DKV_TILES: 64-row, 32- to 128-key tiles, the key-rows form, one launch or split into dV then dK) gives
    the PyTorch path's output, LSE and gradients; S = 200: ragged 128-query tiles, several key tiles per
    query tile. On CUDA the paper layout (16 heads per group, head dim 128, l=32, d=16, S = 2000: 124
    compressed keys, so 64-key tiles have interior steps too), where Triton once miscompiled a 128-key dK/dV
    tile (BENCHMARKS.md, run E); head dim 64 in fp32, which tuning never runs with other tiles (aot_check
    compiles only the reference for it)."""
    B, G, r, S, D, l, d = (1, 1, 16, 2000, 128 if dtype == BF16 else 64, 32, 16) if DEVICE == "cuda" else \
        (1, 1, 2, 200, 16, 8, 4)
    n_cmp = num_cmp_blocks(S, l, d)
    q = randn(B, G * r, S, D, dtype=dtype, seed=61, strided=True)
    kc, vc = randn(B, G, n_cmp, D, dtype=dtype, seed=62), randn(B, G, n_cmp, D, dtype=dtype, seed=63)
    ref = ops.compressed_attention(q, kc, vc, l, d)
    go = randn(*ref.shape, dtype=dtype, seed=64, grad=False)
    want = torch.autograd.grad(ref, (q, kc, vc), go)
    out0, lse0 = compressed.compressed_forward(q, kc, vc, l, d)
    finite = torch.isfinite(lse0)
    assert finite.any() and not finite.all()  # the first queries see no block
    for fwd, dq_tile in zip(compressed.FWD_TILES, compressed.DQ_TILES):
        out, lse = compressed.compressed_forward(q, kc, vc, l, d, tile=fwd)
        check(f"out {fwd}", out, ref, dtype)
        assert torch.equal(torch.isfinite(lse), finite) and (lse[finite] - lse0[finite]).abs().max() <= 1e-3
        dq, _, _ = compressed.compressed_backward(q, kc, vc, out, lse, go, l, d, dq_tile=dq_tile, parts="dq")
        check(f"dq {dq_tile}", dq, want[0], dtype)
    assert len(compressed.DKV_TILES) >= 7
    for dkv_tile in compressed.DKV_TILES:
        _, dk, dv = compressed.compressed_backward(q, kc, vc, out0, lse0, go, l, d, dkv_tile=dkv_tile, parts="dkv")
        check(f"dk {dkv_tile}", dk, want[1], dtype)
        check(f"dv {dkv_tile}", dv, want[2], dtype)


@pytest.mark.parametrize("dtype,qseg,q_start", [(F32, 4096, 0), (BF16, 64, 0), (F32, 64, 37)])
def test_compressed_interior_tiles_unmasked(monkeypatch, dtype, qseg, q_start):
    """Key tiles every query of a program sees whole (forward, dQ) and query tiles that see every key of the
    program's tile (dK/dV) run without a mask (band_split): with 16-row tiles at S = 200 every kernel has such
    interior tiles and masked edge tiles (recorded through the interpreter), and gives ops' results in both dK/dV
    score forms (the reference; key rows, split into dV then dK), in one query segment or in segments of 64
    (atomic sums), also for the last S - q_start queries alone (a tuning slice, a chunk)."""
    monkeypatch.setattr(compressed, "QSEG", qseg)
    monkeypatch.setattr(compressed, "FWD_TILES", {"bm16_bn16": (16, 16, 4), "bm32_bn16": (32, 16, 4)})
    monkeypatch.setattr(compressed, "DQ_TILES", {"bm16_bn16": (16, 16, 4), "bm32_bn16": (32, 16, 4)})
    monkeypatch.setattr(compressed, "DKV_TILES", {  # the split runs both parts: dV, then dK, in the key-rows form
        "bm16_bn16": compressed.DkvTile(16, 16, 4),
        "kr_split_bm16_bn16": compressed.DkvTile(16, 16, 4, split=True, key_rows=True)})
    splits = spy_band_split(monkeypatch, compressed)

    def check_split_since(n, what):  # the kernel launched since the record held n splits had both kinds of tile
        assert splits is None or has_interior_and_edges(splits[n:]), f"{what}: {splits[n:]}"
        return 0 if splits is None else len(splits)

    B, G, r, S, D, l, d = 1, 1, 2, 200, 16, 8, 4
    n_cmp = num_cmp_blocks(S, l, d)
    q = randn(B, G * r, S - q_start, D, dtype=dtype, seed=71, strided=True)
    kc, vc = randn(B, G, n_cmp, D, dtype=dtype, seed=72), randn(B, G, n_cmp, D, dtype=dtype, seed=73)
    ref = ops.compressed_attention(q, kc, vc, l, d, q_start)
    go = randn(*ref.shape, dtype=dtype, seed=74, grad=False)
    want = dict(zip(("dq", "dk", "dv"), torch.autograd.grad(ref, (q, kc, vc), go)))
    n = 0
    for name in compressed.FWD_TILES:
        out, lse = compressed.compressed_forward(q, kc, vc, l, d, q_start, tile=name)
        n = check_split_since(n, f"forward {name}")
        check(f"out {name}", out, ref, dtype)
        dq = compressed.compressed_backward(q, kc, vc, out, lse, go, l, d, q_start, dq_tile=name, parts="dq")[0]
        n = check_split_since(n, f"dq {name}")
        check(f"dq {name}", dq, want["dq"], dtype)
    for name in compressed.DKV_TILES:
        _, dk, dv = compressed.compressed_backward(q, kc, vc, out, lse, go, l, d, q_start, dkv_tile=name,
                                                   parts="dkv")
        n = check_split_since(n, f"dkv {name}")
        check(f"dk {name}", dk, want["dk"], dtype)
        check(f"dv {name}", dv, want["dv"], dtype)


def test_compressed_dkdv_segments_fill_the_gpu():
    """Segment count: one segment when the key tiles already fill the GPU, more (>= MIN_SEG queries
    each) for short sequences with few key tiles, and never a segment longer than QSEG."""
    from nsa.attention.triton.compressed import MIN_SEG, QSEG, dkdv_segments

    assert dkdv_segments(4096, 32, key_tiles=1024, sms=132) == (4096, 1)
    qseg, n = dkdv_segments(4096, 32, key_tiles=8, sms=132)  # M7C at 4k, batch 1: 4 x 2 tiles
    assert n == 4096 // MIN_SEG and qseg == MIN_SEG
    qseg, n = dkdv_segments(65536, 32, key_tiles=128, sms=132)
    assert n == 65536 // QSEG and qseg == QSEG
    for sq in (1, 33, 1000, 5000, 70001):
        qseg, n = dkdv_segments(sq, 32, key_tiles=3, sms=132)
        assert qseg % 32 == 0 and qseg <= QSEG and (n - 1) * qseg < sq <= n * qseg


# --------------------------------------------------------------------------------- selection
# (B, G, r, Sq, q_start, l, d, l', n)
SEL_CASES = [
    (1, 2, 1, 41, 0, 8, 4, 8, 4),
    (2, 1, 2, 37, 0, 16, 8, 8, 4),  # l > l': a compressed block overlaps up to 3 selection blocks
    (1, 1, 6, 40, 0, 8, 4, 8, 5),
    (1, 1, 16, 33, 0, 8, 4, 8, 4),
    (1, 2, 3, 1, 90, 8, 4, 8, 4),  # decode
    (1, 1, 2, 64, 0, 8, 4, 16, 3),  # l' = 2 l: Eq. 9 over 5 compressed blocks per selection block
    (1, 1, 2, 24, 200, 8, 4, 8, 5),  # 28 blocks: the fused top list merges 2 tiles of 16
    (1, 2, 2, 20, 300, 8, 4, 8, 20),  # n > 16: NP = 32, 40 blocks in 2 tiles of 32
    (1, 1, 3, 12, 5, 8, 4, 8, 6),  # n > the 3 blocks that exist: -1 slots for every query
    (1, 1, 2, 8, 300, 8, 4, 8, 40),  # n > MAX_FUSED_N: "fused" falls back to "topk"
    (1, 1, 2, 40, 0, 32, 4, 8, 4),  # l - d > l': no aligned tiles (select.aligned_keys_per_block)
    (1, 2, 3, 45, 0, 8, 4, 6, 4),  # d does not divide l': no aligned tiles
]


@pytest.fixture(params=["fused", "topk"])
def select_mode(request, monkeypatch):
    """Runs a selection test with the fused top-n and with the score buffer + torch.topk."""
    monkeypatch.setenv("NSA_SELECT", request.param)
    return request.param


def ref_block_scores(q, kc, l, d, lp, q_start=0):
    """Group block scores as ops.select_blocks computes them (before forcing), fp32, in torch."""
    B, H, Sq, D = q.shape
    G, n_cmp = kc.shape[1], kc.shape[2]
    pos = torch.arange(q_start, q_start + Sq, device=q.device)
    ns = -(-(q_start + Sq) // lp)
    out = torch.zeros(B, G, Sq, ns, device=q.device)
    if n_cmp == 0:
        return out
    s = torch.einsum("bgrtd,bgkd->bgrtk", q.float().view(B, G, H // G, Sq, D), kc.float()) / D**0.5
    valid = torch.arange(n_cmp, device=q.device)[None, :] < visible_cmp_count(pos, l, d)[:, None]
    p = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0).sum(2)  # [B,G,Sq,n_cmp]
    idx, w = overlap_map(n_cmp, l, d, lp, device=q.device)
    for slot in range(idx.shape[1]):
        out.scatter_add_(-1, idx[:, slot].clamp_max(ns - 1).expand(B, G, Sq, n_cmp), p * w[:, slot].float())
    return out


@pytest.mark.parametrize("B,G,r,Sq,q_start,l,d,lp,n", SEL_CASES)
def test_select_blocks_identical(select_mode, B, G, r, Sq, q_start, l, d, lp, n):
    q = randn(B, G * r, Sq, 16, dtype=F32, seed=21, grad=False)
    kc = randn(B, G, num_cmp_blocks(q_start + Sq, l, d), 16, dtype=F32, seed=22, grad=False)
    want = ops.select_blocks(q, kc, l, d, lp, n, q_start)
    got = nsa_triton.select_blocks(q, kc, l, d, lp, n, q_start)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)  # same sets per query
    assert torch.equal(got, want)  # and the same order (stable sort, ties to the lower index)


@pytest.mark.parametrize("r,lp,S", [(6, 8, 45), (2, 16, 64)])
def test_select_blocks_scores_lse_and_chunks(select_mode, r, lp, S):
    """The kernel's group block scores (Eq. 9 weights from the geometry, Eq. 10 group sum) against
    torch; selection with the LSE handed over from compressed_attention, in several query chunks."""
    B, G, l, d, n = 1, 1, 8, 4, 3
    q = randn(B, G * r, S, 16, dtype=F32, seed=23, grad=False)
    kc = randn(B, G, num_cmp_blocks(S, l, d), 16, dtype=F32, seed=24, grad=False)
    sc = block_scores(q, kc, l, d, lp, 0, S)
    ref = ref_block_scores(q, kc, l, d, lp)
    finite = torch.isfinite(sc)
    cur = (torch.arange(S, device=DEVICE) // lp)[:, None]
    j = torch.arange(sc.shape[-1], device=DEVICE)[None, :]
    free = (j <= cur) & (j != 0) & (j != cur) & (j != cur - 1)
    assert torch.equal(finite, free.expand_as(finite)) and finite.any()
    assert torch.isposinf(sc[(~free & (j <= cur)).expand_as(sc)]).all()  # forced blocks
    assert (sc[finite] - ref[finite]).abs().max() <= 1e-5 * r
    _, lse = nsa_triton.compressed_attention(q, kc, kc, l, d)
    got = nsa_triton.select_blocks(q, kc, l, d, lp, n, 0, 16, lse=lse)
    assert torch.equal(got, ops.select_blocks(q, kc, l, d, lp, n))


@pytest.mark.parametrize("l,d,lp,Sq,q_start,nj", [(8, 4, 8, 24, 200, 16), (16, 8, 8, 20, 150, 16),
                                                  (8, 4, 16, 30, 290, 16), (32, 16, 64, 9, 2100, 16),
                                                  (8, 4, 8, 20, 300, 32)])
def test_select_aligned_tiles(monkeypatch, l, d, lp, Sq, q_start, nj):
    """Aligned key tiles (each compressed key scored once; the share of a key that runs into the
    next tile's first block carried over) give the torch group block scores and the same blocks as
    the per-tile overlapping ranges (ALIGNED_TILES off) and as ops, across several tiles."""
    assert select.aligned_keys_per_block(l, d, lp, nj) > 0
    B, G, r = 1, 1, 3
    q = randn(B, G * r, Sq, 16, dtype=F32, seed=27, grad=False)
    kc = randn(B, G, num_cmp_blocks(q_start + Sq, l, d), 16, dtype=F32, seed=28, grad=False)
    assert -(-(q_start + Sq) // lp) > nj  # more than one tile of selection blocks: the carry is used
    ref = ref_block_scores(q, kc, l, d, lp, q_start)
    aligned = block_scores(q, kc, l, d, lp, 0, Sq, q_start)
    finite = torch.isfinite(aligned)
    assert finite.any() and (aligned[finite] - ref[finite]).abs().max() <= 1e-5 * r
    n = nj // 2 + 1 if nj > 16 else 5  # NJ = next power of two >= n
    want = ops.select_blocks(q, kc, l, d, lp, n, q_start)
    assert torch.equal(nsa_triton.select_blocks(q, kc, l, d, lp, n, q_start), want)
    monkeypatch.setattr(select, "ALIGNED_TILES", False)
    assert select.aligned_keys_per_block(l, d, lp, nj) == 0
    plain = block_scores(q, kc, l, d, lp, 0, Sq, q_start)
    assert torch.equal(torch.isfinite(plain), finite) and (plain[finite] - aligned[finite]).abs().max() <= 1e-5 * r
    assert torch.equal(nsa_triton.select_blocks(q, kc, l, d, lp, n, q_start), want)


@pytest.mark.parametrize("l,d,lp,Sq,q_start", [(32, 16, 64, 9, 2100), (8, 4, 8, 20, 300)])
def test_select_wider_tiles_than_n(monkeypatch, l, d, lp, Sq, q_start):
    """select.NJ_MIN = 32 (bench_kernels' "fused_nj32": 32 selection blocks per tile, a top list of 32
    of which the first n are kept) chooses ops' blocks, aligned tiles of 128 keys and a carry included."""
    monkeypatch.setattr(select, "NJ_MIN", 32)
    monkeypatch.setattr(select, "ALIGNED_MAX_KEYS", 128)
    assert select.aligned_keys_per_block(l, d, lp, 32) > 0
    B, G, r, n = 1, 1, 3, 5
    q = randn(B, G * r, Sq, 16, dtype=F32, seed=29, grad=False)
    kc = randn(B, G, num_cmp_blocks(q_start + Sq, l, d), 16, dtype=F32, seed=30, grad=False)
    assert -(-(q_start + Sq) // lp) > 32  # more than one tile of selection blocks
    assert torch.equal(nsa_triton.select_blocks(q, kc, l, d, lp, n, q_start),
                       ops.select_blocks(q, kc, l, d, lp, n, q_start))


def test_top_n_matches_stable_sort():
    """top_n (topk on unique int64 keys) == the first n of a stable descending sort, -1 for -inf,
    on scores full of ties, +-inf and tiny values."""
    from nsa.attention.triton.select import top_n

    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        ns = int(torch.randint(1, 40, (1,), generator=g))
        x = torch.randint(0, 5, (3, 4, ns), generator=g).float() * 0.5  # many exact ties
        x[torch.rand(x.shape, generator=g) < 0.2] = float("inf")
        x[torch.rand(x.shape, generator=g) < 0.2] = float("-inf")
        x[..., 0] = torch.rand(3, 4, generator=g) * 1e-40  # denormals
        n = int(torch.randint(1, ns + 1, (1,), generator=g))
        vals, order = torch.sort(x, dim=-1, descending=True, stable=True)
        want = torch.where(vals[..., :n] > float("-inf"), order[..., :n], -1)
        assert torch.equal(top_n(x.to(DEVICE), n).cpu(), want)


def test_select_mode_validated(monkeypatch):
    monkeypatch.setenv("NSA_SELECT", "sort")
    q = randn(1, 2, 8, 16, dtype=F32, seed=25, grad=False)
    kc = randn(1, 1, num_cmp_blocks(8, 8, 4), 16, dtype=F32, seed=26, grad=False)
    with pytest.raises(ValueError, match="NSA_SELECT.*fused, topk"):
        nsa_triton.select_blocks(q, kc, 8, 4, 8, 2)


if AVAILABLE:  # jit-decorated inside the test, once the interpreter is on
    def _merge_top_kernel(X, TOP, T: tl.constexpr, ROWS: tl.constexpr, NP: tl.constexpr, LOG_NP: tl.constexpr):
        r = tl.arange(0, ROWS)[:, None]
        c = tl.arange(0, NP)[None, :]
        top = tl.load(TOP + r * NP + c)
        for t in range(T):
            top = _merge_top(top, tl.load(X + (r * T + t) * NP + c), ROWS, NP, LOG_NP)
        tl.store(TOP + r * NP + c, top)


@pytest.mark.parametrize("np_", [16, 32])
def test_merge_top_keeps_the_largest(np_):
    """The fused selection's running top list (bitonic sort + max + merge per tile): after T tiles
    of keys it holds the NP largest, sorted descending, duplicates and int64 extremes included."""
    rows, T = 16, 3
    g = torch.Generator().manual_seed(np_)
    x = torch.randint(-6, 6, (rows, T * np_), generator=g) * (1 << 60)  # many ties
    x[:, ::5] = torch.randint(-(1 << 62), 1 << 62, x[:, ::5].shape, generator=g)
    x[0, :3] = torch.iinfo(torch.int64).min
    x[1, :3] = torch.iinfo(torch.int64).max
    top = torch.full((rows, np_), torch.iinfo(torch.int64).min, dtype=torch.int64)
    x, top = x.to(DEVICE), top.to(DEVICE)
    triton.jit(_merge_top_kernel)[(1,)](x, top, T=T, ROWS=rows, NP=np_, LOG_NP=np_.bit_length() - 1)
    assert torch.equal(top, x.sort(-1, descending=True).values[:, :np_])


def test_select_blocks_bf16_near_identical(select_mode):
    """bf16: ops scores come from a bf16 matmul, the kernel's from an fp32-accumulated one, so
    near-ties may order differently; every block chosen by the kernel and not by ops must score
    (in the fp32 reference) within 2e-2 (relative to the group's head count) of ops' weakest choice."""
    B, G, r, S, l, d, lp, n, D = 1, 2, 2, 48, 8, 4, 8, 3, 16
    q = randn(B, G * r, S, D, dtype=BF16, seed=31, grad=False)
    kc = randn(B, G, num_cmp_blocks(S, l, d), D, dtype=BF16, seed=32, grad=False)
    want = ops.select_blocks(q, kc, l, d, lp, n)
    got = nsa_triton.select_blocks(q, kc, l, d, lp, n)
    ref = ref_block_scores(q, kc, l, d, lp)
    cur = torch.arange(S, device=DEVICE) // lp
    for b in range(B):
        for g in range(G):
            for t in range(S):
                a = set(got[b, g, t].tolist()) - {-1}
                w = set(want[b, g, t].tolist()) - {-1}
                assert len(a) == len(w)
                forced = {0, int(cur[t]), max(int(cur[t]) - 1, 0)}
                assert forced <= a
                if a != w:
                    weakest = min(ref[b, g, t, j].item() for j in w - forced)
                    for j in a - w:
                        assert ref[b, g, t, j].item() >= weakest - 2e-2 * r


# ----------------------------------------------------------------------------- gate-and-combine
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_gate_combine_matches_torch(dtype):
    """The fused gate-and-combine kernel equals sigmoid-gated sum + transpose, forward and the
    gradients of the logits and of all three branch outputs (strided outputs, ragged token tile,
    head dim 24 padded to 32)."""
    from nsa.attention.triton.combine import gate_combine

    B, H, S, D = 2, 3, 70, 24
    logits = randn(B, S, 3 * H, dtype=dtype, seed=51)
    outs = [randn(B, H, S, D, dtype=dtype, seed=52 + i, strided=i == 1) for i in range(3)]
    y = gate_combine(logits, *outs)
    g = torch.sigmoid(logits.float()).view(B, S, H, 3).transpose(1, 2)
    ref = sum(g[..., i:i + 1] * outs[i].float() for i in range(3)).transpose(1, 2).reshape(B, S, H * D)
    assert y.shape == (B, S, H * D) and y.dtype == dtype
    check("y", y, ref, dtype)
    dy = randn(B, S, H * D, dtype=dtype, seed=60, grad=False)
    got = torch.autograd.grad(y, [logits, *outs], dy)
    want = torch.autograd.grad(ref, [logits, *outs], dy.float())
    for name, a, b in zip(("d logits", "d o_cmp", "d o_slc", "d o_win"), got, want):
        assert a.dtype == dtype
        check(name, a, b, dtype)
    # each d o_c carries the branch backward's delta rowsum(d o_c * o_c) (fp32 [B, H, S]), from the rounded d o_c
    from nsa.attention.triton._common import branch_delta, rowsum_do_o
    for grad, o in zip(got[1:], outs):
        delta, src = grad.nsa_delta
        assert delta.dtype == torch.float32 and delta.shape == (B, H, S) and torch.equal(src, o.detach())
        torch.testing.assert_close(delta, rowsum_do_o(grad, src), rtol=1e-5, atol=1e-5)
    assert branch_delta(got[1], outs[0].detach().contiguous()) is got[1].nsa_delta[0]  # the output it came from
    assert branch_delta(got[1], outs[2].detach()) is not got[1].nsa_delta[0]  # another output: computed
    with pytest.raises(ValueError, match="logits must be"):
        gate_combine(logits[:, :, :3], *outs)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("bias", [True, False])
def test_gate_mlp_combine_matches_torch(dtype, bias):
    """The inference kernel with the gate MLP's SiLU and last Linear inside equals nn.SiLU, nn.Linear
    (rounded to the dtype, as they are) and the gated sum: a decode step (S = 1) and a ragged S = 3,
    strided branch outputs, hidden 24 padded to 32, head dim 24 padded. With gradients: ValueError."""
    import torch.nn.functional as F

    from nsa.attention.triton.combine import gate_mlp_combine

    B, H, D, N = 2, 3, 24, 24
    w2 = randn(3 * H, N, dtype=dtype, seed=81, grad=False) * 0.3
    b2 = randn(3 * H, dtype=dtype, seed=82, grad=False) if bias else None
    for S in (1, 3):
        hidden = randn(B, S, N, dtype=dtype, seed=83 + S, grad=False)
        outs = [randn(B, H, S, D, dtype=dtype, seed=90 + i, grad=False, strided=i == 1) for i in range(3)]
        with torch.no_grad():
            y = gate_mlp_combine(hidden, w2, b2, *outs)
            logits = F.linear(F.silu(hidden), w2, b2)  # [B, S, 3H] in dtype
        g = torch.sigmoid(logits.float()).view(B, S, H, 3).transpose(1, 2)
        ref = sum(g[..., i:i + 1] * outs[i].float() for i in range(3)).transpose(1, 2).reshape(B, S, H * D)
        assert y.shape == (B, S, H * D) and y.dtype == dtype
        check(f"y S={S}", y, ref, dtype)
    with pytest.raises(ValueError, match="expected hidden"):
        gate_mlp_combine(hidden[..., :5], w2, b2, *outs)
    with pytest.raises(ValueError, match="inference only"):
        gate_mlp_combine(hidden.clone().requires_grad_(), w2, b2, *outs)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rope_matches_torch(dtype):
    """The Triton RoPE kernel equals RotaryEmbedding's PyTorch rotation, forward and gradient, on a
    strided [B, S, H, D].transpose(1, 2) input at scattered positions (compressed keys' block ends)."""
    from nsa.attention.rope import RotaryEmbedding
    from nsa.attention.triton.rope import apply_rope

    B, H, P, D = 2, 3, 70, 24
    x = randn(B, H, P, D, dtype=dtype, seed=71, strided=True)
    pos = torch.arange(P, device=DEVICE) * 4 + 7
    rope = RotaryEmbedding(D).to(DEVICE)
    cos, sin = rope.tables(int(pos[-1]) + 1, torch.device(DEVICE), torch.float32)
    y, ref = apply_rope(x, pos, cos, sin), rope.rotate(x, pos, cos, sin)
    assert y.shape == ref.shape and y.dtype == dtype
    check("y", y, ref, dtype)
    dy = randn(B, H, P, D, dtype=dtype, seed=72, grad=False)
    check("dx", torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(ref, x, dy)[0], dtype)
    with pytest.raises(ValueError, match="D even"):
        apply_rope(x[..., :5], pos, cos, sin)


def test_rope_device_check(monkeypatch, capsys):
    """The one-time RoPE check passes with the real kernel and fails, with a warning, with a broken one."""
    from nsa.attention import rope as rope_mod
    from nsa.attention.triton import rope as triton_rope

    monkeypatch.setattr(rope_mod, "_TRITON_OK", {})
    assert rope_mod._triton_rope_ok(torch.device(DEVICE), F32)
    monkeypatch.setattr(rope_mod, "_TRITON_OK", {})
    monkeypatch.setattr(triton_rope, "apply_rope", lambda x, *a: x)  # no rotation at all
    assert not rope_mod._triton_rope_ok(torch.device(DEVICE), F32)
    assert "Triton RoPE kernel failed its self-check" in capsys.readouterr().err


# ------------------------------------------------------------------ larger shapes, GPU only
@pytest.mark.skipif(DEVICE != "cuda", reason="too slow for the interpreter")
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("G,r,D,qt", [(2, 6, 64, "1"), (1, 16, 128, "1"), (4, 1, 64, "1"), (2, 6, 64, "8"),
                                     (1, 16, 128, "4")])
def test_paper_geometry_cuda(monkeypatch, dtype, G, r, D, qt):
    """Paper block sizes (l=32, d=16, l'=64, n=16) at S = 1000: all three kernels against ops
    (qt: queries per selected-attention program, NSA_SLC_QTILE, with the dK/dV kernel's 64-row (query, head)
    tiles, selected.DKV_HEAD_ROWS, on those cases). Tuning off: these settings, not the tuned ones
    (tests/test_triton_tune.py tests tuning on the GPU)."""
    monkeypatch.setenv("NSA_TUNE", "off")
    monkeypatch.setenv("NSA_SLC_QTILE", qt)
    monkeypatch.setattr(selected, "DKV_HEAD_ROWS", 64 if qt != "1" else 0)
    B, S, l, d, lp, n = 2, 1000, 32, 16, 64, 16
    q = randn(B, G * r, S, D, dtype=dtype, seed=41, strided=True)
    k = randn(B, G, S, D, dtype=dtype, seed=42)
    v = randn(B, G, S, D, dtype=dtype, seed=43)
    kc = randn(B, G, num_cmp_blocks(S, l, d), D, dtype=dtype, seed=44)
    vc = randn(B, G, num_cmp_blocks(S, l, d), D, dtype=dtype, seed=45)
    out, lse = nsa_triton.compressed_attention(q, kc, vc, l, d)
    ref = ops.compressed_attention(q, kc, vc, l, d)
    check("cmp out", out, ref, dtype)
    check_grads(out, ref, (q, kc, vc), dtype)
    idx = nsa_triton.select_blocks(q.detach(), kc.detach(), l, d, lp, n, lse=lse)
    if dtype == F32:
        assert torch.equal(idx, ops.select_blocks(q.detach(), kc.detach(), l, d, lp, n))
    out = nsa_triton.selected_attention(q, k, v, idx, lp)
    ref = ops.selected_attention(q, k, v, idx, lp)
    check("slc out", out, ref, dtype)
    check_grads(out, ref, (q, k, v), dtype)


def paper_blocks_case(B, G, r, D, seed):
    """bf16 q, k, v (S = 1000) with paper block sizes (l=32, d=16, l'=64, n=16): (q, k, v, idx, ops' output,
    an upstream gradient, ops' dq/dk/dv for it)."""
    S, lp, n = 1000, 64, 16
    q = randn(B, G * r, S, D, dtype=BF16, seed=seed, strided=True)
    k, v = randn(B, G, S, D, dtype=BF16, seed=seed + 1), randn(B, G, S, D, dtype=BF16, seed=seed + 2)
    kc = randn(B, G, num_cmp_blocks(S, 32, 16), D, dtype=BF16, seed=seed + 3, grad=False)
    idx = ops.select_blocks(q.detach(), kc, 32, 16, lp, n)
    ref = ops.selected_attention(q, k, v, idx, lp)
    go = randn(*ref.shape, dtype=BF16, seed=seed + 4, grad=False)
    return q, k, v, idx, ref, go, torch.autograd.grad(ref, (q, k, v), go)


@pytest.mark.skipif(DEVICE != "cuda", reason="too slow for the interpreter")
@pytest.mark.parametrize("G,r,D", [(1, 16, 128), (2, 6, 64)])
@pytest.mark.parametrize("rows", [0, 64])
def test_selected_key_rows_variants_cuda(G, r, D, rows):
    """The selected dK/dV kernel's key-rows form (tuned for "block", at selected.KEY_ROWS_WARPS warps) and its
    default form at 8 warps (tuned above head dim 64) at the paper and M7C head layouts, bf16, paper block sizes:
    the gradients of the default form and of ops."""
    lp = 64
    q, k, v, idx, ref, go, want = paper_blocks_case(1, G, r, D, seed=71)
    out, lse = selected.selected_forward(q.detach(), k.detach(), v.detach(), idx, lp)
    for key_rows, warps in ((False, 0), (True, 0), (False, 8)):
        got = selected.selected_backward(q.detach(), k.detach(), v.detach(), idx, out, lse, go, lp, mode="block",
                                         rows=rows, key_rows=key_rows, dkv_warps=warps)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            check(f"{name} key_rows={key_rows} warps={warps}", a, b, BF16)


@pytest.mark.skipif(DEVICE != "cuda", reason="too slow for the interpreter")
@pytest.mark.parametrize("G,r,D", [(1, 16, 128), (2, 6, 64)])
@pytest.mark.parametrize("qt", selected.HEAD_TILE_CANDIDATES if AVAILABLE else [])
def test_selected_head_tile_variants_cuda(G, r, D, qt):
    """Head tiles (tuned "qt64h"/"qt128h": qt queries of one head per program, 4 or 8 warps) at the paper
    and M7C head layouts, bf16, paper block sizes, S = 1000: output, LSE and gradients against ops."""
    lp = 64
    q, k, v, idx, ref, go, want = paper_blocks_case(2, G, r, D, seed=91)
    lists = selected.tile_lists(idx, qt)
    out, lse = selected.selected_forward(q.detach(), k.detach(), v.detach(), idx, lp, qt=qt, lists=lists,
                                         head_tiles=True)
    check("out", out, ref, BF16)
    _, lse_ref = selected.selected_forward(q.detach(), k.detach(), v.detach(), idx, lp)
    assert (lse - lse_ref).abs().max() <= 1e-2
    got = selected.selected_backward(q.detach(), k.detach(), v.detach(), idx, out, lse, go, lp, mode="block",
                                     qt=qt, lists=lists, head_tiles=True)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        check(name, a, b, BF16)


@pytest.mark.skipif(DEVICE != "cuda", reason="too slow for the interpreter")
@pytest.mark.parametrize("G,r,D", [(4, 16, 128), (2, 6, 64)])
def test_select_tile_variants_cuda(G, r, D):
    """Every selection tile tuning may pick (select_tile: nj16, nj32 above head dim 64, bm128, the other num_warps)
    at the paper and M7C head layouts, bf16, paper block sizes, 8k tokens (eight tiles of 16 selection blocks):
    a top-n of the reference scores within the tf32 rounding tuning accepts (select.TF32_SWAP_TOL), as the
    default tile's is (run K's H200 dropped nj32 at the old 1e-4 bound)."""
    B, S, l, d, lp, n = 1, 8192, 32, 16, 64, 16
    q = randn(B, G * r, S, D, dtype=BF16, seed=96, grad=False)
    kc = randn(B, G, num_cmp_blocks(S, l, d), D, dtype=BF16, seed=97, grad=False)
    _, lse = nsa_triton.compressed_attention(q, kc, kc, l, d)
    ns = -(-S // lp)
    scores = block_scores(q, kc, l, d, lp, 0, S, lse=lse)
    exact = select.top_n(scores, n)
    for tile in ("nj16", *(["nj32"] if D > 64 else []), *select.TILE_SHAPES):
        out = torch.empty(B, G, S, n, dtype=torch.int64, device=DEVICE)
        select._launch(q, kc, lse, out, l, d, lp, 0, S, 0, ns, "topn", n, tile)
        assert select.selection_differs(out, exact, lambda: scores, rel_tol=select.TF32_SWAP_TOL) is None, tile


@pytest.mark.parametrize("tile", sorted(select.TILE_SHAPES))
def test_select_tile_shapes(monkeypatch, tile):
    """The selection tiles of other shapes (select.TILE_SHAPES: 128 queries per program, other num_warps) choose
    ops' blocks in fp32: aligned tiles with the carry, ragged query tiles, two launches (chunk); each launch's
    grid has one program per tile of the queries (not per default tile: surplus programs score for nothing)."""
    B, G, r, Sq, q_start, l, d, lp, n = 1, 2, 3, 150, 300, 8, 4, 8, 5
    q = randn(B, G * r, Sq, 16, dtype=F32, seed=65, grad=False)
    kc = randn(B, G, num_cmp_blocks(q_start + Sq, l, d), 16, dtype=F32, seed=66, grad=False)
    _, lse = nsa_triton.compressed_attention(q, kc, kc, l, d, q_start)
    ns = -(-(q_start + Sq) // lp)
    want = ops.select_blocks(q, kc, l, d, lp, n, q_start)
    out = torch.empty(B, G, Sq, n, dtype=torch.int64, device=DEVICE)
    grids, kernel = [], select._select_scores_kernel

    class GridSpy:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return kernel[grid]

    monkeypatch.setattr(select, "_select_scores_kernel", GridSpy())
    for c0, c1 in ((0, 40), (40, Sq)):
        select._launch(q, kc, lse, out[:, :, c0:], l, d, lp, c0, c1, q_start, ns, "topn", n, tile)
    assert torch.equal(out, want)
    bm = select.TILE_SHAPES[tile][0]
    assert grids == [(1, B * G), (-(-110 // min(bm, 128)), B * G)]  # 40 queries: one tile of 64; 110: of bm
    with pytest.raises(ValueError, match="unknown tile"):
        select._launch(q, kc, lse, out, l, d, lp, 0, Sq, q_start, ns, "topn", n, "rows")


@pytest.mark.skipif(DEVICE != "cuda", reason="the Triton RoPE dispatch is CUDA-only")
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rope_dispatch_cuda(monkeypatch, dtype):
    """RotaryEmbedding on CUDA takes the kernel (NSA_ROPE=triton, default) and equals NSA_ROPE=torch."""
    from nsa.attention.rope import RotaryEmbedding

    rope = RotaryEmbedding(64).to(DEVICE)
    x = randn(4, 12, 3000, 64, dtype=dtype, seed=81, strided=True)
    pos = torch.arange(100, 3100, device=DEVICE)
    y = rope(x, pos, 3100)
    assert y.grad_fn is not None and "Rope" in type(y.grad_fn).__name__
    monkeypatch.setenv("NSA_ROPE", "torch")
    ref = rope(x, pos, 3100)
    check("rope", y, ref, dtype)
    dy = randn(*y.shape, dtype=dtype, seed=82, grad=False)
    check("rope grad", torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(ref, x, dy)[0], dtype)


# ------------------------------------------------- CUDA compilation, no GPU needed (ptxas only)
@pytest.mark.slow
def test_kernels_compile_for_sm90_bf16(tmp_path):
    """Every kernel compiles to a cubin for sm_90 with bf16 inputs through triton's own compiler
    and the ptxas in the triton wheel: catches code the interpreter accepts but the GPU backend
    rejects. Runs in a subprocess without TRITON_INTERPRET (triton's standard library is set up
    differently once imported under the interpreter). All archs/dtypes:
    `python -m nsa.attention.triton.aot_check`. The PTX dump (--ptx-dir, for diffing refactors)
    has one file per variant, with code and without source locations. Two compiling processes."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "nsa.attention.triton.aot_check", "--arch", "90", "--dtype", "bf16", "--head-dim", "64",
         "--ptx-dir", str(tmp_path), "--jobs", "2"],  # the suite runs tests one at a time: the second core is free
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    dumps = sorted(tmp_path.iterdir())
    assert len(dumps) == proc.stdout.count("OK   sm90"), [d.name for d in dumps]
    for name in ("_cmp_fwd_kernel", "_slc_bwd_kernel", "_select_scores_kernel", "_decode_kernel"):
        assert any(name in d.name for d in dumps), name
    ptx = dumps[0].read_text()
    assert ".entry" in ptx and "ret;" in ptx
    assert not any(line.lstrip().startswith((".loc", ".file")) for line in ptx.splitlines())


def test_aot_check_reports_registers_and_spills():
    """aot_check --ptxas-info --only: the named kernels alone, specialised as a launch on contiguous tensors
    would be, each with ptxas -v's registers and spill bytes (how tile variants are chosen without a GPU)."""
    import subprocess
    import sys

    from nsa.attention.triton import window
    from nsa.attention.triton.aot_check import parse_ptxas

    report = ("ptxas info    : Function properties for k\n    16 bytes stack frame, 12 bytes spill stores, "
              "20 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers")
    assert parse_ptxas(report) == "regs=255 spill=12/20"
    assert parse_ptxas("nothing") == "ptxas: no register report"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "nsa.attention.triton.aot_check", "--arch", "90", "--dtype", "bf16", "--head-dim", "64",
         "--group", "16", "--only", "_win_bwd_dkdv", "--ptxas-info"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("OK ")]
    assert len(lines) == len(window.DKV_TILES)  # one per tile variant, the reference included
    assert all("_win_bwd_dkdv_kernel" in line and re.search(r"regs=\d+ spill=\d+/\d+", line) for line in lines)
    assert any("KEY_ROWS" in line for line in lines)


# ---------------------------------------------------------------------------------- layer dispatch
LAYER_CASES = [(1, 45, 16, 3)]  # (B, S, slc_block, n_selected)
if DEVICE == "cuda":  # scripts/demo_64k.py's geometry at its GPU training length (2 query chunks in selection)
    LAYER_CASES.append((32, 2048, 8, 4))


@pytest.mark.parametrize("B,S,lp,n", LAYER_CASES)
def test_layer_triton_path_matches_torch_path(monkeypatch, B, S, lp, n):
    """The whole NSA layer with model.nsa.impl=triton equals impl=torch: forward and every gradient. The
    branches' backwards take their delta from the fused gated sum's backward (none computes its own)."""
    from nsa.attention.triton import _common
    from nsa.attention.layer import NSAttention
    from nsa.attention.rope import RotaryEmbedding
    from nsa.config import ModelConfig

    def layer_for(impl):
        cfg = ModelConfig.from_dict(dict(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16,
                                         ffn_hidden=32, nsa=dict(cmp_block=8, cmp_stride=4, slc_block=lp,
                                                                 n_selected=n, window=16, impl=impl)))
        torch.manual_seed(0)
        return NSAttention(cfg).to(DEVICE)

    tri, ref = layer_for("triton"), layer_for("torch")
    assert tri.kernels(torch.zeros(1, device=DEVICE)) is not None and ref.kernels(torch.zeros(1)) is None
    rope = RotaryEmbedding(16)
    x = randn(B, S, 32, dtype=F32, seed=5)
    out_t, out_r = tri(x, rope), ref(x, rope)
    check("layer out", out_t, out_r, F32)
    go = randn(*out_r.shape, dtype=F32, seed=6, grad=False)
    params_t, params_r = [x, *tri.parameters()], [x, *ref.parameters()]
    computed = []
    real = _common.rowsum_do_o
    monkeypatch.setattr(_common, "rowsum_do_o", lambda *a: computed.append(a) or real(*a))
    grads_t = torch.autograd.grad(out_t, params_t, go)
    assert not computed
    for (name, _), a, b in zip([("x", x), *tri.named_parameters()], grads_t, torch.autograd.grad(out_r, params_r, go)):
        check(f"grad {name}", a, b, F32)
