"""Parity of the Triton sliding-window kernels (nsa/attention/triton/window.py) with
nsa.attention.ops.window_attention: forward and dq/dk/dv under a random upstream gradient.

Without CUDA the kernels run on CPU through the Triton interpreter (TRITON_INTERPRET=1, set by
tests/triton_setup.py before triton is imported); shapes are tiny. Covered: float32
(<= 1e-4 relative max error) and bfloat16 (<= 2e-2), ragged S, GQA r in {1, 2, 6, 16}, head dims
16 and 24, window < S and >= S, a strided q, batch 2, decode over a bounded cache (q_start > 0,
k_start > 0), a query chunk with q_start > 0, queries with no key at all (zero output and grads);
three of these again with 16/32-row tiles (several tiles per head: the band bounds matter);
windows over two tiles long, whose interior tiles run unmasked (their splits recorded through the
interpreter), and the switch that masks every tile; on CUDA, realistic shapes (S = 1024 / 2048, window 512).

Run: .venv/bin/python -m pytest tests/test_triton_window.py -q
"""

import pytest
import torch

from tests.triton_setup import (  # noqa: F401  (first: switches the interpreter on before triton loads)
    AVAILABLE, BF16, DEVICE, F32, TOL, has_interior_and_edges, interpreter, needs_kernels, nsa_triton, randn, rel_err,
    spy_band_split,
)

if AVAILABLE:
    from nsa.attention.triton import window as win_mod

from nsa.attention import ops  # noqa: E402

pytestmark = needs_kernels


def run_parity(dtype, B, G, r, Sq, q_start, k_start, N, D, window, strided=False):
    q = randn(B, G * r, Sq, D, dtype=dtype, seed=1, strided=strided)
    k = randn(B, G, N, D, dtype=dtype, seed=2)
    v = randn(B, G, N, D, dtype=dtype, seed=3)
    out = nsa_triton.window_attention(q, k, v, window, q_start, k_start)
    ref = ops.window_attention(q, k, v, window, q_start, k_start)
    assert out.shape == ref.shape and out.dtype == dtype
    go = randn(*ref.shape, dtype=dtype, seed=4, grad=False)
    got = (out, *torch.autograd.grad(out, (q, k, v), go))
    want = (ref, *torch.autograd.grad(ref, (q, k, v), go))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        err = rel_err(a, b)
        assert err <= TOL[dtype], f"{name}: relative max error {err:.2e} > {TOL[dtype]:.0e}"
    return out, got[1:]


# (dtype, B, G, r, Sq, q_start, k_start, N, D, window, strided q)
CASES = [
    (F32, 1, 2, 1, 37, 0, 0, 37, 16, 8, False),  # r=1, ragged S, window < S
    (F32, 2, 1, 2, 50, 0, 0, 50, 24, 16, False),  # batch 2, head dim 24 (padded to 32)
    (F32, 1, 1, 6, 45, 0, 0, 45, 16, 64, False),  # window >= S: plain causal attention
    (F32, 1, 1, 16, 37, 0, 0, 37, 16, 16, True),  # q = [B,S,H,D].transpose(1, 2)
    (F32, 1, 1, 2, 20, 30, 22, 28, 16, 8, False),  # a query chunk at 30..49 over keys 22..49
    (BF16, 1, 2, 2, 50, 0, 0, 50, 16, 8, False),
    (BF16, 1, 1, 6, 37, 0, 0, 37, 16, 16, False),
    (BF16, 1, 1, 16, 40, 0, 0, 40, 16, 64, True),
    (F32, 1, 2, 6, 1, 70, 55, 16, 16, 16, False),  # decode: bounded cache = the last `window` keys
    (BF16, 1, 1, 16, 1, 45, 38, 8, 24, 8, False),
]


@pytest.mark.parametrize("dtype,B,G,r,Sq,q_start,k_start,N,D,window,strided", CASES)
def test_window_attention_parity(dtype, B, G, r, Sq, q_start, k_start, N, D, window, strided):
    run_parity(dtype, B, G, r, Sq, q_start, k_start, N, D, window, strided)


@pytest.mark.parametrize("bm,bn", [(16, 16), (16, 32), (32, 16)])
@pytest.mark.parametrize("dtype,B,G,r,Sq,q_start,k_start,N,D,window,strided", [CASES[0], CASES[4], CASES[5]])
def test_window_attention_small_tiles(monkeypatch, bm, bn, dtype, B, G, r, Sq, q_start, k_start, N, D, window,
                                      strided):
    """Several query and key tiles per head, so the band bounds (first/last key tile of a query
    tile, query tiles of a key tile, unaligned starts) are exercised at these small sizes."""
    monkeypatch.setattr(win_mod, "BM_MAX", bm)
    monkeypatch.setattr(win_mod, "BN_MAX", bn)
    run_parity(dtype, B, G, r, Sq, q_start, k_start, N, D, window, strided)


# (dtype, Sq, q_start, k_start, N, window): windows longer than two tiles, so that the kernels have interior tiles
INTERIOR_CASES = [(F32, 100, 0, 0, 100, 40), (BF16, 70, 30, 10, 90, 37), (F32, 90, 0, 0, 90, 200)]


@pytest.mark.parametrize("dtype,Sq,q_start,k_start,N,window", INTERIOR_CASES)
def test_window_interior_tiles_unmasked(monkeypatch, dtype, Sq, q_start, k_start, N, window):
    """Tiles inside the band run without a mask (band_split): with 16-row tiles and a window of 37-40 keys
    every kernel has interior and edge tiles (shown through the interpreter by recording the splits), and the
    results are ops' for the forward, dQ and every dK/dV form (the reference and key rows); window 200 >= S is
    plain causal attention, whose interior is everything left of the diagonal tiles."""
    monkeypatch.setattr(win_mod, "BM_MAX", 16)
    monkeypatch.setattr(win_mod, "BN_MAX", 16)
    monkeypatch.setattr(win_mod, "DQ_TILES", {"bm16_bn16": (16, 16, 4), "bm32_bn16": (32, 16, 4)})
    monkeypatch.setattr(win_mod, "DKV_TILES", {"bm16_bn16": win_mod.DkvTile(16, 16, 4),
                                               "kr_bm16_bn16": win_mod.DkvTile(16, 16, 4, key_rows=True)})
    splits = spy_band_split(monkeypatch, win_mod)

    def check_split_since(n, what):  # the kernel launched since the record held n splits had both kinds of tile
        assert splits is None or has_interior_and_edges(splits[n:]), f"{what}: {splits[n:]}"
        return 0 if splits is None else len(splits)

    q = randn(1, 2, Sq, 16, dtype=dtype, seed=21, strided=True)
    k, v = randn(1, 1, N, 16, dtype=dtype, seed=22), randn(1, 1, N, 16, dtype=dtype, seed=23)
    ref = ops.window_attention(q, k, v, window, q_start, k_start)
    go = randn(*ref.shape, dtype=dtype, seed=24, grad=False)
    want = torch.autograd.grad(ref, (q, k, v), go)
    out, lse = win_mod.window_forward(q, k, v, window, q_start, k_start)
    n = check_split_since(0, "forward")
    got = {"out": out}
    for name in win_mod.DQ_TILES:
        got[f"dq {name}"] = win_mod.window_backward(q, k, v, out, lse, go, window, q_start, k_start, dq_tile=name,
                                                    parts="dq")[0]
        n = check_split_since(n, f"dq {name}")
    for name in win_mod.DKV_TILES:
        _, got[f"dk {name}"], got[f"dv {name}"] = win_mod.window_backward(q, k, v, out, lse, go, window, q_start,
                                                                          k_start, dkv_tile=name, parts="dkv")
        n = check_split_since(n, f"dkv {name}")
    for what, value in got.items():
        exp = {"out": ref, "dq": want[0], "dk": want[1], "dv": want[2]}[what.split()[0]]
        err = rel_err(value, exp)
        assert err <= TOL[dtype], f"{what}: relative max error {err:.2e} > {TOL[dtype]:.0e}"


def test_window_every_tile_masked_switch(monkeypatch):
    """_common.INTERIOR_TILES = False (what bench_kernels times the kernels against): every tile takes the mask,
    and the results are still ops'."""
    from nsa.attention.triton import _common

    monkeypatch.setattr(_common, "INTERIOR_TILES", False)
    monkeypatch.setattr(win_mod, "BM_MAX", 16)
    monkeypatch.setattr(win_mod, "BN_MAX", 16)
    splits = spy_band_split(monkeypatch, win_mod)
    run_parity(F32, 1, 1, 2, 100, 0, 0, 100, 16, 40)
    assert splits is None or (splits and all(fs == fe for _, fs, fe in splits))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_window_dkdv_tile_variants(dtype):
    """Every dK/dV tile tuning may pick (window.DKV_TILES: 64 or 128 keys per program, the key-rows score
    form) gives ops' dK and dV: several key tiles and a band edge inside tiles (window 16 here, S = 150); on
    CUDA the paper layout at head dim 128 with the paper's window."""
    B, G, r, S, D, w = (1, 2, 16, 1024, 128, 512) if DEVICE == "cuda" else (1, 1, 2, 150, 16, 16)
    q = randn(B, G * r, S, D, dtype=dtype, seed=11, strided=True)
    k, v = randn(B, G, S, D, dtype=dtype, seed=12), randn(B, G, S, D, dtype=dtype, seed=13)
    ref = ops.window_attention(q, k, v, w)
    go = randn(*ref.shape, dtype=dtype, seed=14, grad=False)
    _, want_dk, want_dv = torch.autograd.grad(ref, (q, k, v), go)
    out, lse = win_mod.window_forward(q, k, v, w)
    assert len(win_mod.DKV_TILES) >= 3
    for name in win_mod.DKV_TILES:
        _, dk, dv = win_mod.window_backward(q, k, v, out, lse, go, w, dkv_tile=name, parts="dkv")
        for what, got, want in (("dk", dk, want_dk), ("dv", dv, want_dv)):
            err = rel_err(got, want)
            assert err <= TOL[dtype], f"{what} {name}: relative max error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_window_dq_tile_variants(dtype):
    """Every dQ tile tuning may pick (window.DQ_TILES: 64 or 128 queries per program, 64 or 32 keys per step)
    gives ops' dQ: band edges inside the tiles (window 16, S = 150, keys starting later than the queries);
    on CUDA the paper layout at head dim 128 with the paper's window."""
    B, G, r, S, D, w, k0 = (1, 2, 16, 1024, 128, 512, 0) if DEVICE == "cuda" else (1, 1, 2, 150, 16, 16, 5)
    q = randn(B, G * r, S, D, dtype=dtype, seed=15, strided=True)
    k, v = randn(B, G, S - k0, D, dtype=dtype, seed=16), randn(B, G, S - k0, D, dtype=dtype, seed=17)
    ref = ops.window_attention(q, k, v, w, 0, k0)
    go = randn(*ref.shape, dtype=dtype, seed=18, grad=False)
    (want_dq,) = torch.autograd.grad(ref, (q,), go)
    out, lse = win_mod.window_forward(q, k, v, w, 0, k0)
    assert len(win_mod.DQ_TILES) >= 3
    for name in win_mod.DQ_TILES:
        (dq,) = win_mod.window_backward(q, k, v, out, lse, go, w, 0, k0, dq_tile=name, parts="dq")[:1]
        err = rel_err(dq, want_dq)
        assert err <= TOL[dtype], f"dq {name}: relative max error {err:.2e} > {TOL[dtype]:.0e}"


def test_window_attention_query_without_keys():
    """Queries 2..4 lie before the first key (position 5): zero output and zero dq, as in ops."""
    out, (dq, _, _) = run_parity(F32, 1, 1, 2, 6, 2, 5, 10, 16, 4)
    assert out[:, :, :3].abs().max() == 0 and dq[:, :, :3].abs().max() == 0
    assert out[:, :, 3:].abs().min() > 0


def test_window_attention_rejects_bad_inputs():
    q = randn(1, 3, 8, 16, dtype=F32, seed=0, grad=False)
    k = randn(1, 2, 8, 16, dtype=F32, seed=0, grad=False)
    with pytest.raises(ValueError, match="multiple"):
        nsa_triton.window_attention(q, k, k, 4)
    with pytest.raises(ValueError, match="window"):
        nsa_triton.window_attention(q, k[:, :1], k[:, :1], 0)
    with pytest.raises(TypeError, match="dtype"):
        nsa_triton.window_attention(q.double(), k.double(), k.double(), 4)


# ------------------------------------------------------------------ larger shapes, GPU only
@pytest.mark.skipif(DEVICE != "cuda", reason="too slow for the interpreter")
@pytest.mark.parametrize("dtype,G,r,S,D,wide", [(BF16, 2, 6, 2048, 64, False), (F32, 2, 6, 2048, 64, False),
                                                (BF16, 4, 16, 1024, 128, False), (BF16, 4, 16, 1024, 128, True)])
def test_window_attention_realistic_cuda(monkeypatch, dtype, G, r, S, D, wide):
    """wide: the candidate 128-query forward tile for head dim 128 (window.WIDE_FWD_TILE; tuning off,
    so that this setting is the one tested)."""
    monkeypatch.setenv("NSA_TUNE", "off")
    monkeypatch.setattr(win_mod, "WIDE_FWD_TILE", wide)
    run_parity(dtype, 1, G, r, S, 0, 0, S, D, 512, strided=True)
