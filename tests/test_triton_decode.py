"""The fused decode attention kernel (nsa/attention/triton/decode.py) against the PyTorch static step
it replaces (static_decode.attend_torch), and a model decoding through it against the growing caches.

Without CUDA the kernel runs on CPU through the Triton interpreter (tests/triton_setup.py). Covered:
float32 (<= 1e-4 relative max error per branch) and bfloat16 (<= 2e-2), the selected blocks identical
(and in the same order); GQA r in {1, 2, 6, 16}; head dims 16, 24 (padded), 32, 64; several
compressed tiles (> 64 visible slots), selection blocks not a power of two per tile; positions with no
compressed block yet (t < l), inside the first selection block, on block boundaries, and the window
ring wrapped; the compressed scan in one program or split over several (partials merged); branches
switched off (ablations). Also: the write kernel (RoPE of q and two keys, every cache slot) against
the PyTorch rotation and indexed copies; the split / num_warps heuristics; NSA_DECODE and the
self-check fallback; a model decoding through both kernels against the growing caches; the step
through torch.compile (the custom op as one node) against the eager one.

Run: .venv/bin/python -m pytest tests/test_triton_decode.py -q
"""

import pytest
import torch

from tests.triton_setup import (  # noqa: F401  (first: switches the interpreter on before triton loads)
    AVAILABLE, BF16, DEVICE, F32, TOL, interpreter, needs_kernels, nsa_triton, rel_err,
)

if AVAILABLE:
    from nsa.attention.triton import decode

from nsa.attention.layer import NSAttention  # noqa: E402
from nsa.attention.rope import RotaryEmbedding  # noqa: E402
from nsa.attention.static_decode import DecodePosition, StaticNSACache, attend, attend_torch  # noqa: E402
from nsa.config import ModelConfig  # noqa: E402
from nsa.model import build_model  # noqa: E402

pytestmark = needs_kernels


def static_cache(G, r, D, l, d, lp, n, w, capacity, dtype, batch=2, branches="cmp,slc,win", impl="triton"):
    cfg = ModelConfig.from_dict({"dim": 32, "n_heads": G * r, "n_kv_heads": G, "head_dim": D, "nsa": {
        "cmp_block": l, "cmp_stride": d, "slc_block": lp, "n_selected": n, "window": w, "impl": impl,
        "branches": branches}})
    layer = NSAttention(cfg).to(device=DEVICE, dtype=dtype).eval()
    return layer, StaticNSACache(layer, batch, capacity, DecodePosition(DEVICE, capacity), DEVICE, dtype)


def fill_random(cache, t, seed):
    """Random contents in every buffer (slots past t too: the kernel must not read them) and the
    window ring holding positions (t - w, t]."""
    g = torch.Generator().manual_seed(seed)
    for buf in (cache.slc_k, cache.slc_v, cache.cmp_k, cache.cmp_v, cache.win_k, cache.win_v):
        buf.copy_(torch.randn(buf.shape, generator=g))
    w = cache.window
    cache.win_pos.fill_(-1)
    kept = torch.arange(max(0, t - w + 1), t + 1, device=DEVICE)
    cache.win_pos[kept % w] = kept


def fused(q, cache, t, n, enabled, splits):
    """The fused op with an explicit number of compressed-scan splits (`attend` lets it choose: 1 on CPU)."""
    c = cache
    return decode.static_decode(q, c.cmp_k, c.cmp_v, c.slc_k, c.slc_v, c.win_k, c.win_v, c.win_pos, t.view(1),
                                c.cmp_block, c.cmp_stride, c.slc_block, n, *enabled, splits)


GEOMETRIES = [  # G, r, D, l, d, lp, n, w, capacity, positions
    (2, 3, 16, 8, 4, 8, 3, 12, 70, (0, 6, 7, 8, 37, 69)),
    (1, 6, 32, 32, 16, 64, 16, 512, 300, (31, 63, 64, 200, 299)),
    (2, 16, 64, 16, 8, 32, 4, 20, 130, (5, 15, 16, 95, 129)),
    (2, 1, 24, 8, 4, 16, 5, 40, 400, (150, 277, 399)),  # > 64 visible compressed slots: several tiles
    (1, 2, 16, 12, 6, 24, 4, 30, 160, (11, 100, 159)),  # l, l' not powers of two
]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "G{}r{}D{}_l{}d{}lp{}n{}w{}_cap{}".format(*g[:9]))
def test_fused_decode_matches_torch_step(dtype, geometry):
    G, r, D, l, d, lp, n, w, capacity, positions = geometry
    _, cache = static_cache(G, r, D, l, d, lp, n, w, capacity, dtype)
    assert cache.fused is not None
    for i, t in enumerate(positions):
        fill_random(cache, t, seed=t)
        q = torch.randn(2, G * r, 1, D, generator=torch.Generator().manual_seed(100 + i)).to(DEVICE, dtype)
        t_dev = torch.tensor(t, device=DEVICE)
        *want, want_idx = attend_torch(q, cache, t_dev, n, (True, True, True))
        for splits in (1, 3):  # the compressed scan in the one kernel, or split over 3 programs and merged
            *got, idx = fused(q, cache, t_dev, n, (True, True, True), splits)
            assert idx.dtype == torch.int32 and torch.equal(idx.long(), want_idx), (t, splits)  # same order too
            for name, a, b in zip(("cmp", "slc", "win"), got, want):
                assert a.shape == b.shape == (2, G * r, 1, D) and a.dtype == dtype
                err = rel_err(a, b)
                assert err <= TOL[dtype], f"t={t} splits={splits} {name}: relative max error {err:.2e}"
            if t < l - 1:  # no compressed block complete yet: the branch is zero, as in PyTorch
                assert got[0].abs().max() == 0


def test_fused_decode_never_reads_stale_slots():
    """Slots the step must not attend (selection buffer past t, window ring slots outside (t - w, t],
    compressed slots not yet complete) holding inf: the outputs are those of the same caches with
    those slots zeroed, finite, with the compressed scan in one program and split."""
    G, r, D, l, d, lp, n, w, capacity = 2, 3, 16, 8, 4, 8, 3, 12, 70
    t = 9  # the window ring holds positions 0..9 of its 12 slots; compressed blocks 0 and 1 complete
    _, cache = static_cache(G, r, D, l, d, lp, n, w, capacity, F32)
    fill_random(cache, t, seed=3)
    q = torch.randn(2, G * r, 1, D, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    t_dev = torch.tensor(t, device=DEVICE)
    stale = [(cache.slc_k, slice(t + 1, None)), (cache.slc_v, slice(t + 1, None)), (cache.cmp_k, slice(2, None)),
             (cache.cmp_v, slice(2, None))]
    ring = (cache.win_pos < 0).nonzero().flatten()
    for buf, slots in stale:
        buf[:, :, slots] = 0.0
    cache.win_k[:, :, ring] = 0.0
    cache.win_v[:, :, ring] = 0.0
    *want, want_idx = attend_torch(q, cache, t_dev, n, (True, True, True))
    for buf, slots in stale:
        buf[:, :, slots] = float("inf")
    cache.win_k[:, :, ring] = float("inf")
    cache.win_v[:, :, ring] = float("-inf")
    for splits in (1, 2):
        *got, idx = fused(q, cache, t_dev, n, (True, True, True), splits)
        assert torch.equal(idx.long(), want_idx)
        for name, a, b in zip(("cmp", "slc", "win"), got, want):
            assert torch.isfinite(a).all() and rel_err(a, b) <= TOL[F32], (splits, name)


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[4]], ids=["lp8", "lp24"])
def test_fused_decode_small_tiles(geometry, monkeypatch):
    """Tiles smaller than a selection block and not aligned to one (16 tokens against l' = 24), and a
    probability pass of many iterations: the same outputs and blocks as the PyTorch step."""
    monkeypatch.setattr(decode, "TILE_ELEMS", 256)
    G, r, D, l, d, lp, n, w, capacity, positions = geometry
    _, cache = static_cache(G, r, D, l, d, lp, n, w, capacity, F32)
    for i, t in enumerate(positions[-2:]):
        fill_random(cache, t, seed=t)
        q = torch.randn(2, G * r, 1, D, generator=torch.Generator().manual_seed(7 + i)).to(DEVICE)
        t_dev = torch.tensor(t, device=DEVICE)
        *want, want_idx = attend_torch(q, cache, t_dev, n, (True, True, True))
        for splits in (1, 2):
            *got, idx = fused(q, cache, t_dev, n, (True, True, True), splits)
            assert torch.equal(idx.long(), want_idx), (t, splits)
            for name, a, b in zip(("cmp", "slc", "win"), got, want):
                assert rel_err(a, b) <= TOL[F32], f"t={t} splits={splits} {name}"


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("r, D, t", [(1, 16, 0), (6, 24, 37), (16, 64, 69)])
def test_static_write_rotates_and_writes(dtype, r, D, t):
    """The fused path's write kernel: q's heads and the selection and window keys rotated at t as
    RotaryEmbedding does (to the dtype's rounding), every buffer slot written as an indexed copy
    (unrotated ones exactly), the window position recorded; head dim 24: padded halves."""
    from nsa.attention.triton import selfcheck

    _, cache = static_cache(2, r, D, 8, 4, 8, 3, 12, 70, dtype)
    fill_random(cache, max(t - 1, 0), seed=t)
    assert selfcheck._write_problem(cache, t, torch.Generator().manual_seed(t), r=r) is None


@pytest.mark.parametrize("branches", ["slc,win", "cmp,win", "win", "cmp,slc"])
def test_fused_decode_ablations(branches):
    """Switched-off branches come back as None; the others (and the selection, which needs the
    compressed scores even without the compressed branch) as in PyTorch."""
    enabled = tuple(b in branches.split(",") for b in ("cmp", "slc", "win"))
    _, cache = static_cache(2, 3, 16, 8, 4, 8, 3, 12, 70, F32, branches=branches)
    fill_random(cache, 50, seed=1)
    q = torch.randn(2, 6, 1, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    t = torch.tensor(50, device=DEVICE)
    want = attend_torch(q, cache, t, 3, enabled)
    got = attend(q, cache, t, 3, enabled)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) <= TOL[F32] if a.is_floating_point() else torch.equal(a.long(), b)
    *split, idx = fused(q, cache, t, 3, enabled, 2)
    for a, b, on in zip((*split, idx), want, (*enabled, enabled[1])):
        if on:
            assert rel_err(a, b) <= TOL[F32] if a.is_floating_point() else torch.equal(a.long(), b)


def test_scan_splits_fill_the_gpu(monkeypatch):
    """Batch 1 has only G programs: the compressed scan is split so that B*G*splits covers the SMs once,
    each split keeping >= MIN_SPLIT_TILES = 4 tiles of 64 slots; a full batch is not split; off CUDA never. The window
    runs beside a split scan in as many programs as keep each to the compressed splits' tile count."""
    monkeypatch.setattr(decode, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert decode.MIN_SPLIT_TILES == 4
    assert decode.scan_splits(2, 4095, cuda) == 16  # M7C at 64k, batch 1: 64 tiles -> 16 splits of 4
    assert decode.scan_splits(2, 1000, cuda) == 4  # 16 tiles
    assert decode.scan_splits(64, 4095, cuda) == 3  # batch 32: 64 programs -> 3 per (sequence, group)
    assert decode.scan_splits(256, 4095, cuda) == 1
    assert decode.scan_splits(2, 100, cuda) == 1
    assert decode.scan_splits(2, 4095, torch.device("cpu")) == 1
    assert decode.window_splits(16, 4095, 512) == 2  # 8 ring tiles, 4 per program as the compressed splits
    assert decode.window_splits(32, 4095, 512) == 4  # 2 per program
    assert decode.window_splits(3, 4095, 512) == 1  # 22 compressed tiles per split: the ring in one program
    assert decode.window_splits(8, 1000, 4096) == 32  # 64 ring tiles, 2 per program: capped at MAX_SPLITS
    assert decode.window_splits(1, 4095, 512) == 0  # no split kernel: the main kernel scans the window


def test_serial_tiles_span_blocks():
    """The main kernel's serial loops read TILE_ELEMS elements per iteration: the probability pass
    TILE_ELEMS / rows slots, the selected branch TILE_ELEMS / head dim tokens (several blocks)."""
    assert decode.prob_tile(16, 4095) == 512 and decode.prob_tile(16, 100) == 128
    assert decode.selected_rows(16, 64, 64) == 128  # M7C: 2 selection blocks per tile, 8 tiles
    assert decode.selected_rows(16, 64, 128) == 64  # the paper's head dim: one block per tile
    assert decode.selected_rows(3, 8, 16) == 32  # every selected token in one tile


def test_decode_warps_grow_with_the_score_vector():
    assert [decode.decode_warps(n, 64) for n in (1024, 2048, 4096, 8192)] == [4, 4, 8, 16]
    assert [decode.decode_warps(n, 128) for n in (1024, 2048, 4096)] == [8, 8, 16]


def test_fused_decode_off_by_env(monkeypatch):
    monkeypatch.setenv("NSA_DECODE", "torch")
    assert static_cache(2, 3, 16, 8, 4, 8, 3, 12, 70, F32)[1].fused is None
    monkeypatch.setenv("NSA_DECODE", "fast")
    with pytest.raises(Exception, match="NSA_DECODE='fast': expected fused or torch"):
        static_cache(2, 3, 16, 8, 4, 8, 3, 12, 70, F32)
    monkeypatch.delenv("NSA_DECODE")
    assert static_cache(2, 3, 16, 8, 4, 8, 3, 12, 70, F32, impl="torch")[1].fused is None  # the layer's choice


def test_model_decodes_through_the_fused_kernel():
    """A whole model (impl=triton) decoding over static caches through the fused kernel gives the
    growing caches' logits and tokens read at every step: compressed tokens emitted during decode,
    the window ring wrapping, selection blocks filling."""
    from nsa.attention.static_decode import GraphedStep

    cfg = dict(vocab_size=100, dim=32, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16, ffn_hidden=64,
               nsa=dict(cmp_block=8, cmp_stride=4, slc_block=8, n_selected=3, window=12, impl="triton"))
    torch.manual_seed(3)
    model = build_model(cfg).to(DEVICE).eval()
    reference = build_model({**cfg, "nsa": {**cfg["nsa"], "impl": "torch"}}).to(DEVICE).eval()
    reference.load_state_dict(model.state_dict())  # the same weights on the PyTorch path (faster interpreted)
    seq = torch.randint(0, 100, (2, 30), device=DEVICE)
    _, dynamic = reference.prefill(seq[:, :10])
    caches, position = model.new_static_caches(batch=2, capacity=30)
    assert all(c.fused is not None for c in caches)
    reference.prefill(seq[:, :10], caches)
    step = GraphedStep(lambda ids: model.decode_step(ids, caches), seq[:, 10], position)
    for t in range(10, 30):
        want = reference.decode_step(seq[:, t], dynamic)
        got = step(seq[:, t])
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), t
        assert caches[1].tokens_read == dynamic[1].tokens_read, t


@pytest.mark.slow
def test_fused_decode_step_compiles_as_one_graph():
    """Through torch.compile (fullgraph: the op `nsa::static_decode` is one opaque node with a fake
    implementation for tracing) the fused step gives the eager one's outputs and reads (~25 s on CPU)."""
    from nsa.attention.static_decode import GraphedStep

    layer, first = static_cache(2, 3, 16, 8, 4, 8, 3, 12, 40, F32)
    second = StaticNSACache(layer, 2, 40, DecodePosition(DEVICE, 40), DEVICE, F32)
    rope = RotaryEmbedding(16)
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    for cache in (first, second):
        layer(x[:, :11], rope, cache)
    eager = GraphedStep(lambda x_: layer.decode_step(x_, rope, first), x[:, 11:12], first.position)
    compiled = GraphedStep(lambda x_: layer.decode_step(x_, rope, second), x[:, 11:12], second.position,
                           compile=True)
    for t in range(11, 20):
        want = eager(x[:, t:t + 1])
        assert (compiled(x[:, t:t + 1]) - want).abs().max() <= 1e-5, t
        assert second.tokens_read == first.tokens_read, t


def test_failed_decode_self_check_means_pytorch_step(monkeypatch, capsys):
    """A fused decode kernel that fails its one-time check on a device is not used (the other
    kernels still are), with a warning naming it."""
    from nsa.attention.triton import selfcheck

    # impl=auto on a device where the layer runs the kernels (on CPU it never would)
    monkeypatch.setattr(NSAttention, "kernels", lambda self, q: nsa_triton)
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    assert static_cache(2, 3, 16, 8, 4, 8, 3, 12, 70, F32, impl="auto")[1].fused is not None  # the check passes
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    monkeypatch.setattr(selfcheck, "_decode_problem", lambda device, dtype: "simulated miscompile")
    assert static_cache(2, 3, 16, 8, 4, 8, 3, 12, 70, F32, impl="auto")[1].fused is None
    assert "the fused NSA decode kernel failed its self-check" in capsys.readouterr().err
    assert static_cache(2, 3, 16, 8, 4, 8, 3, 12, 70, F32)[1].fused is not None  # impl=triton: no check


DENSE_CASES = [  # G, r, D, capacity, positions
    (2, 3, 16, 70, (0, 1, 37, 69)),
    (1, 6, 32, 300, (63, 64, 200, 299)),  # several 64-slot tiles
    (2, 16, 64, 130, (5, 129)),
    (2, 1, 24, 100, (99,)),  # head dim 24: padded
]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "G{}r{}D{}_cap{}".format(*c[:4]))
def test_dense_decode_matches_sdpa(dtype, case):
    """The dense baseline's decode kernel (the scan with every cached token its own block) against SDPA
    over keys 0..t, in one program and split over programs (partials merged). The slots past t hold
    NaN: a read of one would show."""
    G, r, D, capacity, positions = case
    g = torch.Generator().manual_seed(capacity)
    k, v = (torch.randn(2, G, capacity, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    q = torch.randn(2, G * r, 1, D, generator=g).to(DEVICE, dtype)
    for t in positions:
        kt, vt = k.clone(), v.clone()
        kt[:, :, t + 1:] = float("nan")
        vt[:, :, t + 1:] = float("nan")
        want = torch.nn.functional.scaled_dot_product_attention(
            q.float(), kt[:, :, : t + 1].float(), vt[:, :, : t + 1].float(), enable_gqa=True)
        for splits in (1, 3):
            got = decode.dense_decode(q, kt, vt, torch.tensor([t], device=DEVICE), splits)
            assert got.dtype == dtype and torch.isfinite(got).all(), (t, splits)
            assert rel_err(got, want) <= TOL[dtype], (t, splits)


def test_dense_static_step_through_the_kernel():
    """The dense layer's static step through the kernel equals its masked-SDPA step at every position
    as the position advances, with the same reads."""
    from nsa.attention.layer import build_attention
    from nsa.attention.static_decode import StaticKVCache

    cfg = ModelConfig.from_dict({"attention": "full", "dim": 32, "n_heads": 6, "n_kv_heads": 2, "head_dim": 16})
    torch.manual_seed(5)
    layer = build_attention(cfg).to(DEVICE).eval()
    rope = RotaryEmbedding(16)
    caches = [StaticKVCache(layer, 2, 40, DecodePosition(DEVICE, 40), DEVICE, F32, fused=f) for f in (True, False)]
    assert caches[0].fused is not None and caches[1].fused is None
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with torch.no_grad():
        for cache in caches:
            layer(x[:, :11], rope, cache)
    for t in range(11, 20):
        got, want = (layer.decode_step(x[:, t:t + 1], rope, cache) for cache in caches)
        assert rel_err(got, want) <= TOL[F32], t
        for cache in caches:
            cache.position.advance()
        assert caches[0].tokens_read == caches[1].tokens_read == t + 1


def test_dense_kernel_where_it_can_run(monkeypatch):
    """auto: CUDA only, unless NSA_DECODE=torch or the decode kernels failed their self-check; fused=True
    forces it (CPU: through the interpreter)."""
    from nsa.attention.static_decode import dense_kernel
    from nsa.attention.triton import selfcheck

    cuda = torch.device("cuda")
    assert dense_kernel("cpu", F32) is None and dense_kernel("cpu", F32, fused=True) is not None
    monkeypatch.setattr(selfcheck, "decode_ok", lambda device, dtype: False)
    assert dense_kernel(cuda, F32) is None
    monkeypatch.setattr(selfcheck, "decode_ok", lambda device, dtype: True)
    assert dense_kernel(cuda, BF16) is not None and dense_kernel(cuda, torch.float64) is None
    monkeypatch.setenv("NSA_DECODE", "torch")
    assert dense_kernel(cuda, F32) is None


@pytest.mark.slow
def test_dense_static_step_compiles_as_one_graph():
    """Through torch.compile (fullgraph: `nsa::dense_decode` is one opaque node with a fake implementation)
    the dense step through the kernel gives the eager step's outputs."""
    from nsa.attention.layer import build_attention
    from nsa.attention.static_decode import GraphedStep, StaticKVCache

    cfg = ModelConfig.from_dict({"attention": "full", "dim": 32, "n_heads": 6, "n_kv_heads": 2, "head_dim": 16})
    torch.manual_seed(7)
    layer = build_attention(cfg).to(DEVICE).eval()
    rope = RotaryEmbedding(16)
    first, second = (StaticKVCache(layer, 2, 30, DecodePosition(DEVICE, 30), DEVICE, F32, fused=True) for _ in range(2))
    x = torch.randn(2, 30, 32, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    with torch.no_grad():
        for cache in (first, second):
            layer(x[:, :9], rope, cache)
    eager = GraphedStep(lambda x_: layer.decode_step(x_, rope, first), x[:, 9:10], first.position)
    compiled = GraphedStep(lambda x_: layer.decode_step(x_, rope, second), x[:, 9:10], second.position, compile=True)
    for t in range(9, 14):
        want = eager(x[:, t:t + 1])
        assert (compiled(x[:, t:t + 1]) - want).abs().max() <= 1e-5, t
