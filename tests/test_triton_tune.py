"""Kernel variant tuning (nsa/attention/triton/tune.py): the choice logic with a fake clock, the cache
file, and selected attention tuned through the interpreter (whatever variant wins, the result is the
PyTorch path's)."""

import json

import pytest
import torch

from nsa.attention.triton import tune
from tests.triton_setup import (  # noqa: F401  (first: switches the interpreter on before triton loads)
    BF16, DEVICE, F32, check, check_grads, interpreter, needs_kernels, nsa_triton, randn,
)

from nsa.attention import ops
from nsa.attention.blocks import num_cmp_blocks  # noqa: E402
from nsa.attention.triton import compressed, selected, window  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_tuning(monkeypatch):
    tune.reset()
    monkeypatch.delenv("NSA_TUNE_CACHE", raising=False)
    yield
    tune.reset()


def fake_clock(monkeypatch, ms: dict):
    """TIMER returning fixed times; records how often each variant was timed."""
    timed = {}

    def timer(name, fn):
        timed[name] = timed.get(name, 0) + 1
        return ms[name]

    monkeypatch.setattr(tune, "TIMER", timer)
    return timed


def same_or_why(got, want):
    return None if got == want else f"{got} != {want}"


def test_pick_fastest_agreeing_variant(monkeypatch, capsys):
    timed = fake_clock(monkeypatch, {"ref": 3.0, "fast_wrong": 0.5, "fast": 1.0, "slow": 2.0, "broken": 0.1})
    calls = {}

    def variant(name, result):
        def fn():
            calls[name] = calls.get(name, 0) + 1
            if result is None:
                raise RuntimeError("out of shared memory")
            return result
        return fn

    variants = {"ref": variant("ref", 42), "fast_wrong": variant("fast_wrong", 41), "fast": variant("fast", 42),
                "slow": variant("slow", 42), "broken": variant("broken", None)}
    assert tune.pick("step|cpu|x", variants, same_or_why, CPU) == "fast"
    err = capsys.readouterr().err
    assert "fast_wrong of step dropped: 41 != 42" in err and "broken of step dropped: RuntimeError" in err
    assert "kernel tuning step|cpu|x: fast" in err
    assert set(timed) == {"ref", "fast", "slow"} and all(n == tune.REPS for n in timed.values())
    assert tune.choices() == {"step|cpu|x": "fast"}
    before = dict(calls)
    assert tune.pick("step|cpu|x", variants, same_or_why, CPU) == "fast"  # remembered: nothing runs again
    assert calls == before
    assert tune.pick("step|cpu|y", {"only": variant("only", 1)}, same_or_why, CPU) == "only"  # nothing to tune
    assert "step|cpu|y" not in tune.choices()


def test_cache_file_round_trip_and_corrupt_file(monkeypatch, tmp_path, capsys):
    path = tmp_path / "kernel_tuning.json"
    tune.use_cache_file(str(path))
    fake_clock(monkeypatch, {"a": 2.0, "b": 1.0})
    assert tune.pick("k1", {"a": lambda: 1, "b": lambda: 1}, same_or_why, CPU) == "b"
    stored = json.loads(path.read_text())["choices"]
    assert stored["k1"] == {"choice": "b", "ms": {"a": 2.0, "b": 1.0}}

    tune.reset()  # a new process (a resumed run) with the same cache: no variant may run
    monkeypatch.setenv("NSA_TUNE_CACHE", str(path))

    def must_not_run():
        raise AssertionError("re-tuned despite the cache")

    assert tune.pick("k1", {"a": must_not_run, "b": must_not_run}, same_or_why, CPU) == "b"
    # a cached name this code no longer has is tuned again
    fake_clock(monkeypatch, {"a": 2.0, "c": 1.0})
    assert tune.pick("k1", {"a": lambda: 1, "c": lambda: 1}, same_or_why, CPU) == "c"
    assert json.loads(path.read_text())["choices"]["k1"]["choice"] == "c"

    tune.reset()
    path.write_text("{not json")
    monkeypatch.setenv("NSA_TUNE_CACHE", str(path))
    assert tune.pick("k2", {"a": lambda: 1, "c": lambda: 1}, same_or_why, CPU) == "c"
    assert "ignoring kernel tuning cache" in capsys.readouterr().err
    assert json.loads(path.read_text())["choices"]["k2"]["choice"] == "c"  # rewritten whole


def test_read_only_cache_file(monkeypatch, tmp_path):
    """DDP ranks other than 0 (use_cache_file(writable=False)): they take the choices stored there and
    keep their own in memory, but never write the file that rank 0 writes."""
    path = tmp_path / "kernel_tuning.json"
    tune.use_cache_file(str(path))
    fake_clock(monkeypatch, {"a": 2.0, "b": 1.0})
    assert tune.pick("k1", {"a": lambda: 1, "b": lambda: 1}, same_or_why, CPU) == "b"  # rank 0's choice
    before = path.read_text()

    tune.reset()
    tune.use_cache_file(str(path), writable=False)

    def must_not_run():
        raise AssertionError("re-tuned despite the cache")

    assert tune.pick("k1", {"a": must_not_run, "b": must_not_run}, same_or_why, CPU) == "b"
    fake_clock(monkeypatch, {"a": 1.0, "b": 2.0})
    assert tune.pick("k2", {"a": lambda: 1, "b": lambda: 1}, same_or_why, CPU) == "a"  # tuned, kept in memory
    assert tune.choices()["k2"] == "a" and path.read_text() == before


def test_retune_times_again_and_replaces_the_cached_choice(monkeypatch, tmp_path):
    """retune() (the trainer's runtime.retune_step): every step is timed again on its next call, the
    new choice replaces the old in the cache file, and a process that loads that file afterwards (a
    run resumed past the re-tuning step) uses the new choice without timing."""
    path = tmp_path / "kernel_tuning.json"
    tune.use_cache_file(str(path))
    timed = fake_clock(monkeypatch, {"a": 2.0, "b": 1.0})
    assert tune.pick("k", {"a": lambda: 1, "b": lambda: 1}, same_or_why, CPU) == "b"
    assert tune.pick("k", {"a": lambda: 1, "b": lambda: 1}, same_or_why, CPU) == "b" and timed["b"] == tune.REPS
    fake_clock(monkeypatch, {"a": 0.5, "b": 1.0})  # the trained model favours a
    tune.retune()
    assert tune.pick("k", {"a": lambda: 1, "b": lambda: 1}, same_or_why, CPU) == "a"
    assert json.loads(path.read_text())["choices"]["k"]["choice"] == "a"
    tune.reset()
    tune.use_cache_file(str(path))
    fake_clock(monkeypatch, {})  # nothing may be timed
    assert tune.pick("k", {"a": lambda: 1, "b": lambda: 1}, same_or_why, CPU) == "a"


def test_mode_and_enabled(monkeypatch):
    monkeypatch.delenv("NSA_TUNE", raising=False)
    assert not tune.enabled(CPU)  # auto: CUDA only
    monkeypatch.setenv("NSA_TUNE", "on")
    assert tune.enabled(CPU)
    monkeypatch.setenv("NSA_TUNE", "off")
    assert not tune.enabled(torch.device("cuda"))
    monkeypatch.setenv("NSA_TUNE", "fast")
    with pytest.raises(ValueError, match="NSA_TUNE='fast'"):
        tune.mode()


@needs_kernels
@pytest.mark.parametrize("dtype,pins,fastest,want", [
    (F32, {}, "qt4", {"selected_fwd": "qt4", "selected_bwd_qt4": "block_dq/rows64"}),
    (BF16, {}, "qt1s2", {"selected_fwd": "qt1s2", "selected_bwd_qt1s2": "block_dq/rows64"}),
    (F32, {}, "bc", {"selected_fwd": "bc", "selected_bwd_bc": "block_dq/rows64"}),
    (BF16, {"NSA_SLC_DKV": "block_dqsum"}, "bc", {"selected_fwd": "bc", "selected_bwd_bc": "block_dqsum/rows64"}),
    (F32, {"NSA_SLC_QTILE": "2", "NSA_SLC_DKV": "block"}, None, {"selected_bwd_qt2": "block/rows64/kr"}),
    (F32, {"NSA_SLC_DKV_ROWS": "0"}, "block/rows0/kr", {"selected_fwd": "qt4", "selected_bwd_qt4": "block/rows0/kr"}),
])
def test_selected_attention_tuned(monkeypatch, dtype, pins, fastest, want):
    """Tuning on a slice (the first 24 of 40 queries of both batch elements) picks what the fake
    clock favours (a query tile, one query per program at another pipeline depth, which the dQ
    kernel then shares, in 2-byte dtypes only, or the block-centric forward, whose segments the
    backward reuses), an explicit switch pins its dimension, and the result equals the PyTorch path's."""

    monkeypatch.setenv("NSA_TUNE", "on")
    for k_, v_ in pins.items():
        monkeypatch.setenv(k_, v_)
    monkeypatch.setattr(tune, "MIN_QUERIES", 16)
    monkeypatch.setattr(tune, "SLICE_QUERIES", 24)
    monkeypatch.setattr(tune, "REPS", 1)
    ms = {"qt1": 4.0, "qt2": 3.0, "qt4": 2.0, "qt8": 3.5, "qt1s1": 5.0, "qt1s2": 4.5, "qt1s4": 4.2, "bc": 3.8,
          "block/rows0": 4.0, "block/rows64": 3.0, "block_dq/rows0": 2.0, "block_dq/rows64": 1.0,
          "block_dqsum/rows0": 2.5, "block_dqsum/rows64": 1.5, "block/rows0/kr": 3.5, "block/rows64/kr": 2.8}
    if fastest:
        ms[fastest] = 0.5
    timed = fake_clock(monkeypatch, ms)
    B, G, r, S, D, blk, n = 2, 1, 4, 40, 16, 8, 3  # r = 4: qt 8 exceeds the fp32 row cap (16 rows)
    q = randn(B, G * r, S, D, dtype=dtype, seed=1, strided=True)
    k, v = randn(B, G, S, D, dtype=dtype, seed=2), randn(B, G, S, D, dtype=dtype, seed=3)
    k_cmp = randn(B, G, 9, D, dtype=dtype, seed=4, grad=False)
    idx = ops.select_blocks(q.detach(), k_cmp, 8, 4, blk, n)
    out = nsa_triton.selected_attention(q, k, v, idx, blk)
    ref = ops.selected_attention(q, k, v, idx, blk)
    check("out", out, ref, dtype)
    check_grads(out, ref, (q, k, v), dtype)
    got = {key.split("|")[0]: choice for key, choice in tune.choices().items()}
    assert got == want
    if dtype == F32 and not pins:
        assert {"qt1", "qt2", "qt4", "bc"} == {name for name in timed if "/" not in name}
        assert {"block_dqsum/rows0", "block_dqsum/rows64", "block/rows0/kr", "block/rows64/kr"} <= set(timed)
    if dtype == BF16:
        assert {"qt1", "qt2", "qt4", "qt8", "qt1s1", "qt1s2", "qt1s4"} <= set(timed)


@needs_kernels
def test_dkv_variant_names_round_trip():
    for mode, rows, key_rows, warps in selected.DKV_CANDIDATES:
        name = selected.dkv_variant_name(mode, rows, key_rows, warps)
        assert selected.parse_dkv_variant(name) == (mode, rows, key_rows, warps)
    assert selected.dkv_variant_name("block", 64, False, 8) == "block/rows64/w8"
    assert selected.parse_dkv_variant("block/rows64/kr") == ("block", 64, True, 0)


@needs_kernels
@pytest.mark.parametrize("wide_above,offered", [(64, False), (8, True)])
def test_selected_dkv_warps_variant_above_head_dim(monkeypatch, wide_above, offered):
    """The dK/dV kernel at its own num_warps ("block/rows64/w8") is offered above selected.WIDE_HEAD_WARPS only
    (head dim 16 here: offered once the bound is lowered to 8); chosen, the backward runs it and equals ops'."""
    monkeypatch.setenv("NSA_TUNE", "on")
    monkeypatch.setenv("NSA_SLC_QTILE", "1")
    monkeypatch.setenv("NSA_SLC_DKV", "block")  # fewer variants to run: block_dq and block_dqsum are not in question
    monkeypatch.setattr(tune, "MIN_QUERIES", 16)
    monkeypatch.setattr(tune, "REPS", 1)
    monkeypatch.setattr(selected, "WIDE_HEAD_WARPS", wide_above)
    ms = {"qt1": 1.0, "block/rows0": 4.0, "block/rows64": 3.0, "block/rows0/kr": 3.5, "block/rows64/kr": 2.8,
          "block/rows64/w8": 0.5}
    timed = fake_clock(monkeypatch, ms)
    B, G, r, S, D, blk, n = 1, 1, 2, 24, 16, 8, 3
    q = randn(B, G * r, S, D, dtype=F32, seed=1)
    k, v = randn(B, G, S, D, dtype=F32, seed=2), randn(B, G, S, D, dtype=F32, seed=3)
    idx = ops.select_blocks(q.detach(), randn(B, G, 5, D, dtype=F32, seed=4, grad=False), 8, 4, blk, n)
    out = nsa_triton.selected_attention(q, k, v, idx, blk)
    check_grads(out, ops.selected_attention(q, k, v, idx, blk), (q, k, v), F32)
    got = {key.split("|")[0]: choice for key, choice in tune.choices().items()}
    assert ("block/rows64/w8" in timed) == offered
    assert got["selected_bwd_qt1"] == ("block/rows64/w8" if offered else "block/rows64/kr")


@needs_kernels
def test_partial_buffers_bound_the_block_centric_variants(monkeypatch):
    """The block-centric forward and block_dqsum keep a row per (query, slot, head) in HBM; above
    selected.PARTIALS_MAX_BYTES for the call they are not offered (the paper layout at 64k would need
    17 / 34 GB), unless NSA_SLC_DKV pins block_dqsum."""
    monkeypatch.setenv("NSA_TUNE", "on")
    monkeypatch.setattr(tune, "MIN_QUERIES", 16)
    monkeypatch.setattr(tune, "REPS", 1)
    B, G, r, S, D, blk, n = 1, 1, 2, 24, 16, 8, 3
    q = randn(B, G * r, S, D, dtype=F32, seed=1)
    idx = ops.select_blocks(q.detach(), randn(B, G, 5, D, dtype=F32, seed=4, grad=False), 8, 4, blk, n)
    assert selected.partials_fit(q, idx, 4) and not selected.partials_fit(q, idx, 4 * (1 << 30))
    monkeypatch.setattr(selected, "PARTIALS_MAX_BYTES", 1000)  # the buffer: 24 * 3 * 2 * 16 * 4 bytes
    timed = fake_clock(monkeypatch, {"qt1": 1.0, "qt2": 2.0, "qt4": 3.0, "block/rows0": 1.0, "block/rows64": 2.0,
                                     "block_dq/rows0": 3.0, "block_dq/rows64": 4.0, "block/rows0/kr": 1.5,
                                     "block/rows64/kr": 2.5})
    k, v = randn(B, G, S, D, dtype=F32, seed=2), randn(B, G, S, D, dtype=F32, seed=3)
    out = nsa_triton.selected_attention(q, k, v, idx, blk)
    check_grads(out, ops.selected_attention(q, k, v, idx, blk), (q, k, v), F32)
    assert not any(name == "bc" or name.startswith("block_dqsum") for name in timed) and "qt2" in timed


@needs_kernels
@pytest.mark.parametrize("slice_queries,dtype,offered", [(8192, BF16, True), (24, BF16, False), (8192, F32, False)])
def test_head_tiles_tuned_for_sequences_the_slice_holds(monkeypatch, slice_queries, dtype, offered):
    """Head tiles are offered when the tuning slice holds every query (their union of blocks grows with
    the sequence, so a prefix would time them too fast), for 2-byte inputs; chosen, the dQ kernel
    follows them and the branch equals the PyTorch path's."""
    monkeypatch.setenv("NSA_TUNE", "on")
    monkeypatch.setenv("NSA_SLC_DKV", "block")  # fewer backward variants to time: the dK/dV form is not tested here
    monkeypatch.setenv("NSA_SLC_DKV_ROWS", "0")
    monkeypatch.setattr(tune, "MIN_QUERIES", 16)
    monkeypatch.setattr(tune, "SLICE_QUERIES", slice_queries)
    monkeypatch.setattr(tune, "REPS", 1)
    B, G, r, S, D, blk, n = 1, 2, 3, 40, 16, 8, 3  # head tiles of 64 and 128 queries: both 40 here
    ms = dict.fromkeys(("qt1", "qt2", "qt4", "qt5", "qt8", "qt1s1", "qt1s2", "qt1s4", "bc"), 2.0)
    ms.update({"qt40h": 1.0, "block/rows0": 1.0, "block/rows0/kr": 1.5})
    timed = fake_clock(monkeypatch, ms)
    q = randn(B, G * r, S, D, dtype=dtype, seed=11, strided=True)
    k, v = randn(B, G, S, D, dtype=dtype, seed=12), randn(B, G, S, D, dtype=dtype, seed=13)
    idx = ops.select_blocks(q.detach(), randn(B, G, 9, D, dtype=dtype, seed=14, grad=False), 8, 4, blk, n)
    if not offered:  # the forward's tuning alone
        with torch.no_grad():
            nsa_triton.selected_attention(q, k, v, idx, blk)
        assert "qt40h" not in timed and "qt1" in timed
        return
    out = nsa_triton.selected_attention(q, k, v, idx, blk)
    ref = ops.selected_attention(q, k, v, idx, blk)
    check("out", out, ref, dtype)
    check_grads(out, ref, (q, k, v), dtype)
    got = {key.split("|")[0]: choice for key, choice in tune.choices().items()}
    assert "qt40h" in timed and got["selected_fwd"] == "qt40h" and "selected_bwd_qt40h" in got


def test_parse_tile():
    assert [selected.parse_tile(n) for n in ("qt1", "qt8", "qt1s2", "qt1s4", "bc", "qt64h", "qt128h")] == [
        (1, None, False), (8, None, False), (1, 2, False), (1, 4, False), (1, None, False), (64, None, True),
        (128, None, True)]
    assert selected.parse_tile("qt64h").head_tiles and selected.parse_tile("qt2").qt == 2


def test_tuning_slice_covers_a_training_batch(monkeypatch):
    """The slice is ~SLICE_TOKENS query tokens: a whole batch of 8 x 4096 (so GPU time, not one
    sequence's host cost, decides), the first SLICE_QUERIES positions of long sequences, one batch
    element at least."""
    monkeypatch.setattr(tune, "SLICE_QUERIES", 8192)
    monkeypatch.setattr(tune, "SLICE_TOKENS", 32768)
    for (B, S), (b, s) in {(8, 4096): (8, 4096), (2, 16384): (2, 8192), (1, 65536): (1, 8192),
                           (64, 1024): (32, 1024), (3, 600): (3, 600)}.items():
        q = torch.empty(B, 2, S, 1)
        assert (tune.slice_batch(q), tune.slice_len(q)) == (b, s)
        qs, lse = tune.prefix(q, torch.empty(B, 2, S))
        assert qs.shape == (b, 2, s, 1) and lse.shape == (b, 2, s)


def test_variants_must_agree_to_rounding():
    """A variant is kept only when it matches the reference to a few units in the last place of the
    output dtype: a 3% error (what a miscompiled kernel gave on an H100) is dropped although the
    device self-check's looser bound against the PyTorch path (5e-2 in bf16) would pass it."""
    want = torch.linspace(-4, 4, 1000, dtype=torch.bfloat16)
    one_ulp = (want.float() * (1 + 2 ** -8)).to(torch.bfloat16)
    assert tune.differs([one_ulp], [want]) is None
    off = want.clone()
    off[500] += 0.12  # 3% of the largest magnitude
    assert "differs from the reference variant's by 3" in tune.differs([off], [want])
    assert tune.differs([want.float() + 1e-5], [want.float()]) is None
    assert tune.differs([want.float() + 1e-3], [want.float()]) is not None
    assert tune.differs([torch.full((3,), float("nan"))], [torch.ones(3)]) is not None


def test_timing_failure_falls_back_to_the_reference(monkeypatch, tmp_path, capsys):
    """A failure while timing or while running the reference (e.g. out of memory) never stops the
    run: the reference variant is used for the rest of the process and nothing is written to the cache."""
    tune.use_cache_file(str(tmp_path / "kernel_tuning.json"))

    def timer(name, fn):
        if name == "b":
            raise RuntimeError("CUDA out of memory")
        return 1.0

    monkeypatch.setattr(tune, "TIMER", timer)
    assert tune.pick("k", {"a": lambda: 1, "b": lambda: 1}, same_or_why, CPU) == "a"
    assert "kernel tuning of k failed (RuntimeError: CUDA out of memory); using a" in capsys.readouterr().err
    assert tune.choices() == {"k": "a"} and not (tmp_path / "kernel_tuning.json").exists()

    def oom():
        raise RuntimeError("CUDA out of memory")

    assert tune.pick("k2", {"a": oom, "b": lambda: 1}, same_or_why, CPU) == "a"  # even the reference failed
    assert "kernel tuning of k2 skipped (RuntimeError: CUDA out of memory); using a" in capsys.readouterr().err


@needs_kernels
def test_compressed_and_window_tiles_tuned(monkeypatch):
    """bf16, head dim > 64: the compressed forward, dQ and dK/dV tiles (compressed.FWD_TILES, DQ_TILES,
    DKV_TILES: each kernel timed on its own; here the split key-rows dK/dV wins), the window forward query
    tile (64 / 128), the window dQ tile (window.DQ_TILES) and the window dK/dV tile (window.DKV_TILES) are
    tuned; with non-reference tiles chosen the results still equal the PyTorch path's."""
    monkeypatch.setenv("NSA_TUNE", "on")
    monkeypatch.setattr(tune, "MIN_QUERIES", 16)
    monkeypatch.setattr(tune, "REPS", 1)
    ms = {name: 2.0 for name in (*compressed.FWD_TILES, *compressed.DKV_TILES)}
    ms.update({"bm128_bn64": 0.5, "bm64_bn64": 1.0, "bm32_bn32": 0.8, "bm64": 2.0, "bm128": 1.0,
               "kr_split_bm64_bn128": 0.6, "kr_bm32_bn128": 0.7})  # compressed / window dK/dV
    timed = fake_clock(monkeypatch, ms)
    B, G, r, S, D, l, d, w = 1, 1, 2, 40, 128, 8, 4, 16
    q = randn(B, G * r, S, D, dtype=BF16, seed=1)
    k, v = randn(B, G, S, D, dtype=BF16, seed=2), randn(B, G, S, D, dtype=BF16, seed=3)
    kc, vc = randn(B, G, (S - l) // d + 1, D, dtype=BF16, seed=4), randn(B, G, (S - l) // d + 1, D, dtype=BF16, seed=5)
    out, _ = nsa_triton.compressed_attention(q, kc, vc, l, d)
    check_grads(out, ops.compressed_attention(q, kc, vc, l, d), (q, kc, vc), BF16)
    out = nsa_triton.window_attention(q, k, v, w)
    ref = ops.window_attention(q, k, v, w)
    check("win out", out, ref, BF16)
    check_grads(out, ref, (q, k, v), BF16)
    got = {key.split("|")[0]: choice for key, choice in tune.choices().items()}
    assert got == {"compressed_fwd": "bm128_bn64", "compressed_dq": "bm128_bn64",
                   "compressed_dkv": "kr_split_bm64_bn128", "window_fwd": "bm128", "window_dq": "bm128_bn64",
                   "window_dkv": "kr_bm32_bn128"}
    assert (set(compressed.FWD_TILES) | set(compressed.DKV_TILES) | set(window.DQ_TILES) | set(window.DKV_TILES)
            <= set(timed))


@pytest.mark.skipif(DEVICE != "cuda", reason="times real kernels: GPU only")
@pytest.mark.parametrize("G,r,D", [(2, 6, 64), (1, 16, 128)])
def test_tuning_on_the_gpu(monkeypatch, G, r, D):
    """Real tuning (CUDA events) at the M7C and paper head layouts: every tuned step makes a choice
    among its variants and the branches still equal the PyTorch path."""
    monkeypatch.setenv("NSA_TUNE", "auto")
    for name in ("NSA_SLC_QTILE", "NSA_SLC_DKV", "NSA_SLC_DKV_ROWS"):
        monkeypatch.delenv(name, raising=False)
    B, S, l, d, lp, n, w = 2, 2048, 32, 16, 64, 16, 512
    q = randn(B, G * r, S, D, dtype=BF16, seed=1, strided=True)
    k, v = randn(B, G, S, D, dtype=BF16, seed=2), randn(B, G, S, D, dtype=BF16, seed=3)
    kc = randn(B, G, (S - l) // d + 1, D, dtype=BF16, seed=4)
    vc = randn(B, G, (S - l) // d + 1, D, dtype=BF16, seed=5)
    out, lse = nsa_triton.compressed_attention(q, kc, vc, l, d)
    check_grads(out, ops.compressed_attention(q, kc, vc, l, d), (q, kc, vc), BF16)
    idx = nsa_triton.select_blocks(q.detach(), kc.detach(), l, d, lp, n, lse=lse)
    out = nsa_triton.selected_attention(q, k, v, idx, lp)
    ref = ops.selected_attention(q, k, v, idx, lp)
    check("slc out", out, ref, BF16)
    check_grads(out, ref, (q, k, v), BF16)
    out = nsa_triton.window_attention(q, k, v, w)
    check_grads(out, ops.window_attention(q, k, v, w), (q, k, v), BF16)
    got = {key.split("|")[0]: choice for key, choice in tune.choices().items()}
    assert got["selected_fwd"] in {"qt1", "qt2", "qt4", "qt8", "qt1s1", "qt1s2", "qt1s4", "bc", "qt64h", "qt128h"}
    assert got[f"selected_bwd_{got['selected_fwd']}"] in {
        "block/rows0", "block/rows64", "block_dq/rows0", "block_dq/rows64", "block_dqsum/rows0", "block_dqsum/rows64",
        "block/rows0/kr", "block/rows64/kr"}
    assert ("window_fwd" in got) == ("window_dq" in got) == (D > 64)
    assert got.get("window_dq", "bm64_bn64") in window.DQ_TILES
    assert got["compressed_fwd"] in compressed.FWD_TILES and got["compressed_dq"] in compressed.DQ_TILES
    assert got["compressed_dkv"] in compressed.DKV_TILES and got["window_dkv"] in window.DKV_TILES


@needs_kernels
def test_backward_kernels_read_a_sliced_lse():
    """The tuning slices (tune.prefix, the compressed kernels' tail) cut the forward's LSE [B, H, S] to a
    strided view. Every backward launcher must read it as such: the kernels index it as contiguous, and
    tuning at S > tune.SLICE_QUERIES used to time the gradients of other queries' LSEs (here: head 1 of a
    prefix reads head 0's later positions)."""
    B, G, r, S, D, l, d, w, lp, n, s = 1, 1, 2, 48, 16, 8, 4, 16, 16, 2, 32
    q = randn(B, G * r, S, D, dtype=F32, seed=1, grad=False)
    k, v = randn(B, G, S, D, dtype=F32, seed=2, grad=False), randn(B, G, S, D, dtype=F32, seed=3, grad=False)
    kc = randn(B, G, (S - l) // d + 1, D, dtype=F32, seed=4, grad=False)
    vc = randn(B, G, (S - l) // d + 1, D, dtype=F32, seed=5, grad=False)
    go = randn(B, G * r, S, D, dtype=F32, seed=6, grad=False)

    def same_as_contiguous(backward, lse, *args):
        assert not lse.is_contiguous()
        got, want = backward(lse, *args), backward(lse.contiguous(), *args)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            check(name, a, b, F32)

    out, lse = compressed.compressed_forward(q, kc, vc, l, d)
    off = S - s  # the tail, as compressed._tail cuts it
    same_as_contiguous(lambda lse_: compressed.compressed_backward(
        q[:, :, off:], kc, vc, out[:, :, off:], lse_, go[:, :, off:], l, d, off), lse[:, :, off:])
    out, lse = window.window_forward(q, k, v, w)
    same_as_contiguous(lambda lse_: window.window_backward(
        q[:, :, :s], k[:, :, :s], v[:, :, :s], out[:, :, :s], lse_, go[:, :, :s], w), lse[:, :, :s])
    idx = ops.select_blocks(q, kc, l, d, lp, n)
    out, lse = selected.selected_forward(q, k, v, idx, lp)
    same_as_contiguous(lambda lse_: selected.selected_backward(
        q[:, :, :s], k[:, :, :s], v[:, :, :s], idx[:, :, :s], out[:, :, :s], lse_, go[:, :, :s], lp), lse[:, :, :s])


@needs_kernels
def test_compressed_tiles_are_tuned_on_the_last_queries(monkeypatch):
    """The compressed kernels are timed on the last tune.slice_len queries (they see every compressed key,
    as most queries of a long sequence do; the first see few) and keyed by the number of compressed keys,
    so 16k and 64k tokens, which share the slice length, are tuned apart."""
    monkeypatch.setenv("NSA_TUNE", "on")
    monkeypatch.setattr(tune, "MIN_QUERIES", 16)
    monkeypatch.setattr(tune, "SLICE_QUERIES", 16)
    monkeypatch.setattr(tune, "REPS", 1)
    B, G, r, S, D, l, d = 1, 1, 2, 40, 16, 8, 4
    q = randn(B, G * r, S, D, dtype=BF16, seed=1, grad=False)
    t0, (qs, xs) = compressed._tail(5, q, q + 1)
    assert t0 == 5 + S - 16 and torch.equal(qs, q[:, :, S - 16:]) and torch.equal(xs, q[:, :, S - 16:] + 1)
    starts = []
    real_forward = compressed.compressed_forward

    def spy(q_, kc_, vc_, block, stride, q_start=0, tile=None):
        starts.append((q_.shape[2], q_start))
        return real_forward(q_, kc_, vc_, block, stride, q_start, tile)

    monkeypatch.setattr(compressed, "compressed_forward", spy)
    for n_tokens in (40, 72):  # 9 and 17 compressed keys: buckets N16 and N32
        kc = randn(B, G, (n_tokens - l) // d + 1, D, dtype=BF16, seed=4, grad=False)
        compressed.forward_tile(q, kc, kc, l, d, n_tokens - S)
    assert (16, S - 16) in starts and (16, 72 - 16) in starts  # timed on the tail, at its own positions
    keys = [key.split("|") for key in tune.choices()]
    assert sorted(parts[-2] for parts in keys if parts[0] == "compressed_fwd") == ["N16", "N32"]


@needs_kernels
def test_selected_variants_are_tuned_on_the_last_queries(monkeypatch):
    """The selected-attention variants are timed on the last tune.slice_len queries with all their keys
    (their union of blocks per query tile is as large as a long sequence's; the first queries choose among
    few blocks) and keyed by the number of keys, so 16k and 64k tokens are tuned apart; the backward too."""
    monkeypatch.setenv("NSA_TUNE", "on")
    monkeypatch.setattr(tune, "MIN_QUERIES", 16)
    monkeypatch.setattr(tune, "SLICE_QUERIES", 16)
    monkeypatch.setattr(tune, "REPS", 1)
    B, G, r, S, D, blk, n = 1, 1, 2, 40, 16, 8, 3
    k, v = randn(B, G, 72, D, dtype=F32, seed=2, grad=False), randn(B, G, 72, D, dtype=F32, seed=3, grad=False)
    q = randn(B, G * r, S, D, dtype=F32, seed=1, grad=False)
    t0, ks, vs, (qs, xs) = selected._tune_inputs(k, v, 5, q, q + 1)
    assert t0 == 5 + S - 16 and ks.shape == k.shape and torch.equal(qs, q[:, :, S - 16:])
    assert torch.equal(xs, q[:, :, S - 16:] + 1)
    starts = []
    real_forward, real_backward = selected.selected_forward, selected.selected_backward

    def spy_fwd(q_, k_, v_, idx_, blk_, q_start=0, *a, **kw):
        starts.append(("fwd", q_.shape[2], k_.shape[2], q_start))
        return real_forward(q_, k_, v_, idx_, blk_, q_start, *a, **kw)

    def spy_bwd(q_, k_, v_, idx_, out_, lse_, go_, blk_, q_start=0, **kw):
        starts.append(("bwd", q_.shape[2], k_.shape[2], q_start))
        return real_backward(q_, k_, v_, idx_, out_, lse_, go_, blk_, q_start, **kw)

    monkeypatch.setattr(selected, "selected_forward", spy_fwd)
    monkeypatch.setattr(selected, "selected_backward", spy_bwd)
    for n_keys in (40, 72):  # buckets N64 and N128
        kn, vn = (x[:, :, :n_keys].clone().requires_grad_() for x in (k, v))
        qn = q.clone().requires_grad_()
        kc = randn(B, G, num_cmp_blocks(n_keys, 8, 4), D, dtype=F32, seed=4, grad=False)
        idx = ops.select_blocks(qn.detach(), kc, 8, 4, blk, n, n_keys - S)
        out = nsa_triton.selected_attention(qn, kn, vn, idx, blk, n_keys - S)
        check_grads(out, ops.selected_attention(qn, kn, vn, idx, blk, n_keys - S), (qn, kn, vn), F32)
    for n_keys in (40, 72):  # timed on the tail, at its own positions, over every key
        assert ("fwd", 16, n_keys, n_keys - 16) in starts and ("bwd", 16, n_keys, n_keys - 16) in starts
    keys = [key.split("|") for key in tune.choices()]
    assert sorted(parts[-2] for parts in keys if parts[0] == "selected_fwd") == ["N128", "N64"]


def test_selection_differs_accepts_near_ties_only():
    """A variant's blocks are accepted when they are a top-n of the reference scores up to rounding: the
    same blocks, or a swap between near-tied blocks; a lower-scored block or another count is not."""
    from nsa.attention.triton.select import selection_differs

    scores = torch.tensor([[[float("inf"), 3.0, 2.0, 2.0 * (1 + 1e-7), 1.0, float("-inf")]]])
    want = torch.tensor([[[0, 1, 3]]])

    def calls():
        calls.n += 1
        return scores
    calls.n = 0
    assert selection_differs(want.clone(), want, calls) is None and calls.n == 0  # equal: no scores needed
    assert selection_differs(torch.tensor([[[0, 1, 2]]]), want, calls) is None  # near-tie swap
    assert "below the reference" in selection_differs(torch.tensor([[[0, 1, 4]]]), want, calls)
    assert "number of selected blocks" in selection_differs(torch.tensor([[[0, 1, -1]]]), want, calls)
    # a swap 1e-3 apart (of the row's largest finite score, 3): beyond fp32 rounding, within the tf32 rounding
    # of the map dot that tuning allows for 2-byte inputs (select.TF32_SWAP_TOL)
    from nsa.attention.triton.select import TF32_SWAP_TOL
    scores[..., 3] = 2.0 + 3e-3
    assert "below the reference" in selection_differs(torch.tensor([[[0, 1, 2]]]), want, calls)
    assert selection_differs(torch.tensor([[[0, 1, 2]]]), want, calls, rel_tol=TF32_SWAP_TOL) is None
    scores[..., 3] = 2.0 + 3e-2  # 1e-2 of the largest: a wrong block even so
    assert "below the reference" in selection_differs(torch.tensor([[[0, 1, 2]]]), want, calls, rel_tol=TF32_SWAP_TOL)


@needs_kernels
@pytest.mark.parametrize("fastest", ["nj16", "nj32", "bm128"])
def test_select_tiles_tuned(monkeypatch, fastest):
    """For 2-byte inputs the fused top-n's tile is tuned on the last queries (select_tile): the clock's
    favourite is kept, and the blocks are a top-n of the untuned kernel's scores. The wide tile is offered
    above head dim 64 only, the other num_warps as the default's ("w4" at 128, "w8" at 64); fp32 tunes
    nothing."""
    from nsa.attention.blocks import num_cmp_blocks
    from nsa.attention.triton import select

    monkeypatch.setenv("NSA_TUNE", "on")
    monkeypatch.setattr(tune, "MIN_QUERIES", 16)
    monkeypatch.setattr(tune, "SLICE_QUERIES", 24)
    monkeypatch.setattr(tune, "REPS", 1)
    ms = {"nj16": 2.0, "nj32": 3.0, "bm128": 3.0, "w4": 3.0, "w8": 3.0}
    ms[fastest] = 1.0
    timed = fake_clock(monkeypatch, ms)
    l, d, lp, n, Sq, q_start = 8, 4, 8, 5, 40, 300  # 43 selection blocks: two tiles of 32
    q = randn(1, 4, Sq, 128, dtype=BF16, seed=41, grad=False)
    kc = randn(1, 2, num_cmp_blocks(q_start + Sq, l, d), 128, dtype=BF16, seed=42, grad=False)
    _, lse = compressed.compressed_forward(q, kc, kc, l, d, q_start)
    got = select.select_blocks(q, kc, l, d, lp, n, q_start, lse=lse)
    [(key, choice)] = [(k, c) for k, c in tune.choices().items() if k.startswith("select_tile|")]
    assert choice == fastest and key.endswith("|S32") and "|NS64" in key and set(timed) == {"nj16", "nj32", "bm128", "w4"}
    monkeypatch.setenv("NSA_TUNE", "off")
    want = select.select_blocks(q, kc, l, d, lp, n, q_start, lse=lse)
    scores = select.block_scores(q, kc, l, d, lp, 0, Sq, q_start, lse=lse)
    assert select.selection_differs(got, want, lambda: scores) is None
    monkeypatch.setenv("NSA_TUNE", "on")
    for D, dtype, offered in ((64, BF16, {"nj16", "bm128", "w8"}), (128, F32, set())):
        tune.reset()
        timed.clear()
        q2, kc2 = q[..., :D].to(dtype).contiguous(), kc[..., :D].to(dtype).contiguous()
        select.select_blocks(q2, kc2, l, d, lp, n, q_start, lse=lse)
        assert set(timed) == offered
