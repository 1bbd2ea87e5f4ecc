"""Where NSA's attention time goes on a GPU: each Triton kernel timed alone, with its variants.

    python bench/bench_kernels.py --device cuda                          # m7c and paper, 16k and 64k
    python bench/bench_kernels.py --layout paper --seq-lens 65536 --json-only

Per (layout, seq_len), bf16, batch 1, random inputs (selection from random q and compressed keys,
so blocks are spread as at initialisation), timed with triton.testing.do_bench (median, CUDA events):
  cmp_fwd / cmp_dq /    compressed attention (forward returns the LSE) / its dQ kernel / its dK/dV
  cmp_dkv               kernel, one row per tile variant the layer tunes over (compressed.FWD_TILES,
                        DQ_TILES, DKV_TILES, e.g. "bm128_bn64": 128 queries x 64 keys; reference first;
                        "kr_": scores computed as k q^T, "split": dV then dK in two launches);
                        "..._masked": that tile with every step masked (_common.INTERIOR_TILES off, as
                        before the interior steps ran unmasked), for bm128_bn64 / bm128_bn64 / kr_bm32_bn64
  select                block scoring + top-n from that LSE: "fused" (NSA_SELECT=fused, the default:
                        top-n inside the scoring kernel, on aligned key tiles where the geometry
                        allows; first checked bit-identical to "topk"), "topk" (int64 score-key buffer
                        + torch.topk), "fused_unaligned" (select.ALIGNED_TILES off: tiles of BN=32
                        compressed blocks over each tile's overlapping range, the previous scheme) and
                        "fused_unaligned_bn16" (the same with BN=16), "fused_nj32_same{share}" (32 selection
                        blocks per tile, select.NJ_MIN: half the query reloads; share = rows choosing the
                        same blocks as "fused"), "fused_bm128_same{share}" / "fused_w4_…" / "fused_w8_…"
                        (select.TILE_SHAPES: 128 queries per program at 8 warps, 64 at 4 or 8 warps)
  slc_fwd               selected attention forward, num_warps swept (variant "w2", "w4", "w8"), the
                        K/V pipeline depth ("s1", "s2", "s4"; Triton's default is 3), and
                        query tiles "qt2", "qt4", "qt8" (NSA_SLC_QTILE: qt queries per program walk
                        the union of their blocks; the union's construction included), head tiles
                        "qt64h", "qt128h" (qt queries of one head per program; S <= 16384, 2-byte;
                        the union given, as from tuning)
                        and "bc" (the block-centric forward: per selected block, the queries that
                        chose it as dot rows, partial results merged by a second kernel; with its
                        index, and "bc_index_given" without, as the training backward reuses it)
  slc_lists             that union alone (selected.tile_lists); the variant names the mean number
                        of distinct blocks per tile, e.g. "qt4_union26.1of64"
  slc_bwd               selected attention backward: "atomic" (one kernel, fp32 atomics per query and
                        slot) vs "block" (dQ kernel + block-centric dK/dV kernel over the inverted
                        index, its sort included), with num_warps variants for the block kernels
                        ("block_dkdv_w8", "block_dq_w4", "block_dq_w8"; "block" is the defaults), vs
                        "block_dq" (the block-centric kernel alone, adding dQ with atomics), vs
                        "block_dqsum" (the same storing per-(query, slot) dQ shares, summed after), and
                        "block_qt{qt}" / "block_qt{qt}h" (the dQ kernel on query / head tiles, lists
                        from the forward), and
                        "block_rows64" / "block_dq_rows64" / "block_dqsum_rows64" (the dK/dV kernel on
                        64-row (query, head) tiles, rows=64), "block_rows64_w8" (that at 8 warps), "block_kr" /
                        "block_rows64_kr" (its key-rows form: scores computed as k q^T, no transposed dot operand
                        for dK and dV), "block_rows64_masked" / "block_rows64_w8_masked" (every step masked,
                        _common.INTERIOR_TILES off)
  win_fwd / win_bwd     sliding window (w=512): "sdpa" (ops.window_attention, chunked SDPA) vs
                        "triton" (nsa.attention.triton.window_attention) when that kernel exists, and
                        "triton_bm{BM}_bn{BN}": the Triton kernels with other tile caps (see window.py);
                        "flash" / "flash3": flash-attn 2 / 3's sliding window, where installed
  win_dq                the window dQ kernel alone, per tile variant (window.DQ_TILES; the first is the
                        reference; tuned above head dim 64)
  win_dkv               the window dK/dV kernel alone, per tile variant (window.DKV_TILES; the first is
                        the reference, "kr_": scores computed as k q^T); for both, and for win_fwd /
                        win_bwd "triton", "..._masked": every step masked (as for cmp_*)
  combine_fwd / _bwd    gate-and-combine of three branch outputs: "triton" (the fused kernel,
                        triton/combine.py) vs "torch" (the gated sum and transpose, NSA_COMBINE=torch)
  rope_fwd / rope_bwd    RoPE of the queries: "triton" (triton/rope.py) vs "torch" (NSA_ROPE=torch)
  decode                the fused static-decode kernel (triton/decode.py), one query per head at
                        position S - 1, replayed from a CUDA graph: "b{batch}_split{n}": batch 1 (and
                        32 for m7c), the compressed scan in one program per (sequence, group)
                        ("split1") or split over n programs (what decode.scan_splits picks for this
                        GPU, and half that); "..._cmp", "..._cmp_slc", "..._win": only those
                        branches (selection needs the compressed scan), so the differences say what
                        each part costs;
                        "..._tiles2048": the main kernel's serial loops on tiles of 2048 elements
                        (decode.TILE_ELEMS, default 8192: 4x the round trips); "..._w8": the main
                        kernel at 8 warps (decode.decode_warps: 4 at head dim 64);
                        "dense_b{batch}_split{n}": full attention's decode kernel over the S tokens
  full_fwd / full_bwd   causal SDPA (flash) on the same q/k/v, for scale
"bwd" rows time the backward alone (the forward ran before, outside the timed region).

One JSON line per measurement: kernel, variant, layout, seq_len, ms, device, dtype, plus "error" when
it failed (an out-of-memory or compile failure is a row, not a crash). Then a table: one line per
kernel, the fastest variant first. Which variant is fastest feeds the defaults in
nsa/attention/triton (num_warps, tile sizes) and BENCHMARKS.md; the selected-attention query tiles and
dK/dV forms are also chosen by the layer itself at run time (triton/tune.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

from common import device_name

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nsa.attention import ops  # noqa: E402
from nsa.attention.blocks import num_cmp_blocks  # noqa: E402

LAYOUTS = {"m7c": (12, 2, 64), "paper": (64, 4, 128)}  # (query heads, KV heads, head dim)
L, D_STRIDE, LP, N_SEL, WINDOW = 32, 16, 64, 16, 512


def bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def graph_time(fn, reps: int = 20) -> float:
    """ms per call of fn, replayed `reps` times from one CUDA graph (no launch cost in the time)."""
    fn()  # compile
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return bench(graph.replay) / reps


def rows_for(layout: str, S: int, device: str):
    """Yield one dict per (kernel, variant) measurement."""
    from nsa.attention import triton as tk
    from nsa.attention.triton import _common, compressed, select, selected

    HQ, G, D = LAYOUTS[layout]
    dt = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dt)

    q = rnd(1, S, HQ, D).transpose(1, 2)  # the layer's layout: a view of [B, S, H, D]
    k, v = rnd(1, G, S, D), rnd(1, G, S, D)
    n_cmp = num_cmp_blocks(S, L, D_STRIDE)
    kc, vc = rnd(1, G, n_cmp, D), rnd(1, G, n_cmp, D)
    go = rnd(1, HQ, S, D)

    def tuned(kernel: str, warps: int | None, fn):
        _common.TUNING.clear()
        if warps:
            _common.TUNING[kernel] = warps
        try:
            return bench(fn)
        finally:
            _common.TUNING.clear()

    def patched(module, name: str, value, fn):
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            return fn()
        finally:
            setattr(module, name, saved)

    o_cmp, lse = compressed.compressed_forward(q, kc, vc, L, D_STRIDE)
    for name in compressed.FWD_TILES:  # the reference first
        yield "cmp_fwd", name, lambda name=name: bench(
            lambda: compressed.compressed_forward(q, kc, vc, L, D_STRIDE, tile=name))
    for kernel, tiles in (("dq", compressed.DQ_TILES), ("dkv", compressed.DKV_TILES)):
        for name in tiles:
            yield f"cmp_{kernel}", name, lambda kernel=kernel, name=name: bench(
                lambda: compressed.compressed_backward(q, kc, vc, o_cmp, lse, go, L, D_STRIDE, parts=kernel,
                                                       **{f"{kernel}_tile": name}))

    def masked(run):  # every tile takes the mask (_common.INTERIOR_TILES off): the interior tiles' gain
        return patched(_common, "INTERIOR_TILES", False, run)

    # the tiles run K's 64k tuning picked (dK/dV) or that were fastest in bench_kernels (forward, dQ), every tile masked
    yield "cmp_fwd", "bm128_bn64_masked", lambda: masked(lambda: bench(
        lambda: compressed.compressed_forward(q, kc, vc, L, D_STRIDE, tile="bm128_bn64")))
    for kernel, name in (("dq", "bm128_bn64"), ("dkv", "kr_bm32_bn64")):
        yield f"cmp_{kernel}", f"{name}_masked", lambda kernel=kernel, name=name: masked(lambda: bench(
            lambda: compressed.compressed_backward(q, kc, vc, o_cmp, lse, go, L, D_STRIDE, parts=kernel,
                                                   **{f"{kernel}_tile": name})))
    def with_env(name: str, value: str, fn):
        saved = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if saved is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved

    def sel():  # untuned: the rows below choose the variant (tuning would pick the tile itself, select.select_tile)
        return with_env("NSA_TUNE", "off", lambda: tk.select_blocks(q, kc, L, D_STRIDE, LP, N_SEL, lse=lse))

    def sel_fused():  # same scoring code and tiles as "topk": the indices must be bit-identical
        if not torch.equal(with_env("NSA_SELECT", "fused", sel), with_env("NSA_SELECT", "topk", sel)):
            raise AssertionError("select: NSA_SELECT=fused and topk chose different blocks")
        return with_env("NSA_SELECT", "fused", lambda: bench(sel))

    yield "select", "fused", sel_fused
    yield "select", "topk", lambda: with_env("NSA_SELECT", "topk", lambda: bench(sel))
    def unaligned(bn: int):
        return lambda: with_env("NSA_SELECT", "fused", lambda: patched(
            select, "ALIGNED_TILES", False, lambda: patched(select, "BN", bn, lambda: bench(sel))))

    yield "select", "fused_unaligned", unaligned(select.BN)
    yield "select", "fused_unaligned_bn16", unaligned(16)

    def nj32(run):  # the wide tile tuning may pick (select.select_tile): 32 selection blocks, 128 keys per tile
        return with_env("NSA_SELECT", "fused", lambda: patched(
            select, "NJ_MIN", select.NJ_WIDE, lambda: patched(select, "ALIGNED_MAX_KEYS", select.WIDE_MAX_KEYS, run)))

    # its scores round differently at tile edges, so near-ties may pick other blocks: the name gives the
    # share of (query, group) rows whose blocks equal the default's
    try:
        same = (nj32(sel) == with_env("NSA_SELECT", "fused", sel)).all(-1).float().mean().item()
        name = f"fused_nj32_same{same:.4f}"
    except Exception:  # noqa: BLE001 - e.g. it does not compile here: the timed row records the error
        name = "fused_nj32"
    yield "select", name, lambda: nj32(lambda: bench(sel))

    for tile in select.TILE_SHAPES:  # the other tile shapes tuning may pick (128 queries per program, num_warps)
        def shaped(run, tile=tile):
            return with_env("NSA_SELECT", "fused", lambda: patched(select, "select_tile", lambda *a, **k: tile, run))

        try:
            same = (shaped(sel) == with_env("NSA_SELECT", "fused", sel)).all(-1).float().mean().item()
            name = f"fused_{tile}_same{same:.4f}"
        except Exception:  # noqa: BLE001 - the timed row records the error
            name = f"fused_{tile}"
        yield "select", name, lambda shaped=shaped: shaped(lambda: bench(sel))

    idx = tk.select_blocks(q, kc, L, D_STRIDE, LP, N_SEL, lse=lse)
    for w in (2, 4, 8):
        yield "slc_fwd", f"w{w}", lambda w=w: tuned("selected_fwd", w, lambda: selected.selected_forward(q, k, v, idx, LP))
    for st in selected.STAGE_CANDIDATES:
        yield "slc_fwd", f"s{st}", lambda st=st: bench(lambda: selected.selected_forward(q, k, v, idx, LP, stages=st))
    # query tiles (NSA_SLC_QTILE): qt queries per program walk the union of their blocks
    qtiles = [qt for qt in (2, 4, 8) if qt * (HQ // G) <= selected.MAX_TILE_ROWS]
    lists = {qt: selected.tile_lists(idx, qt) for qt in qtiles}
    for qt in qtiles:
        union = lists[qt][1].float().mean().item()
        yield "slc_lists", f"qt{qt}_union{union:.1f}of{qt * N_SEL}", lambda qt=qt: bench(lambda: selected.tile_lists(idx, qt))
        yield "slc_fwd", f"qt{qt}", lambda qt=qt: bench(lambda: selected.selected_forward(q, k, v, idx, LP, qt=qt))
    if qtiles:
        qt = qtiles[-1]
        yield "slc_fwd", f"qt{qt}_w8", lambda qt=qt: tuned("selected_fwd", 8, lambda: selected.selected_forward(
            q, k, v, idx, LP, qt=qt))
    # head tiles (tuned variants "qt64h", "qt128h": qt queries of one head walk the union of their blocks);
    # offered by tuning for short sequences only, where the union is nearly the causal range: at 64k it is
    # dense-attention work, so not timed there
    head_tiles = [qt for qt in selected.HEAD_TILE_CANDIDATES if S <= 16384]  # bf16 here
    lists.update({f"{qt}h": selected.tile_lists(idx, qt) for qt in head_tiles})
    for qt in head_tiles:
        union = lists[f"{qt}h"][1].float().mean().item()
        yield "slc_lists", f"qt{qt}h_union{union:.1f}of{qt * N_SEL}", lambda qt=qt: bench(lambda: selected.tile_lists(idx, qt))
        yield "slc_fwd", f"qt{qt}h", lambda qt=qt: bench(lambda: selected.selected_forward(
            q, k, v, idx, LP, qt=qt, lists=lists[f"{qt}h"], head_tiles=True))
    # the block-centric forward (tuned variant "bc"): with its index built, and given (the backward reuses it)
    segments = selected.block_segments(idx, math.ceil(S / LP), selected.SEG)
    yield "slc_fwd", "bc", lambda: bench(lambda: selected.selected_forward_blocks(q, k, v, idx, LP))
    yield "slc_fwd", "bc_index_given", lambda: bench(
        lambda: selected.selected_forward_blocks(q, k, v, idx, LP, segments=segments))
    o_slc, lse_slc = selected.selected_forward(q, k, v, idx, LP)
    yield "slc_bwd", "atomic", lambda: bench(
        lambda: selected.selected_backward(q, k, v, idx, o_slc, lse_slc, go, LP, mode="atomic"))
    # dQ at 2 warps spills registers (ptxas -v, sm_90a) yet measured fastest with triton 3.6: 4 and 8 check that
    for kernel, w in (("selected_bwd_dkdv", None), ("selected_bwd_dkdv", 8 if D <= 64 else 4),
                      ("selected_bwd_dq", 4), ("selected_bwd_dq", 8)):
        name = "block" if w is None else f"block_{kernel.rsplit('_', 1)[-1]}_w{w}"
        yield "slc_bwd", name, lambda kernel=kernel, w=w: tuned(kernel, w, lambda: selected.selected_backward(
            q, k, v, idx, o_slc, lse_slc, go, LP, mode="block"))
    yield "slc_bwd", "block_dq", lambda: bench(
        lambda: selected.selected_backward(q, k, v, idx, o_slc, lse_slc, go, LP, mode="block_dq"))
    yield "slc_bwd", "block_dqsum", lambda: bench(
        lambda: selected.selected_backward(q, k, v, idx, o_slc, lse_slc, go, LP, mode="block_dqsum"))
    for mode in ("block", "block_dq", "block_dqsum"):  # the dK/dV kernel on 64-row (query, head) tiles
        yield "slc_bwd", f"{mode}_rows64", lambda mode=mode: bench(
            lambda: selected.selected_backward(q, k, v, idx, o_slc, lse_slc, go, LP, mode=mode, rows=64))
    yield "slc_bwd", "block_rows64_w8", lambda: bench(  # tuned above head dim 64 (selected.DKV_CANDIDATES)
        lambda: selected.selected_backward(q, k, v, idx, o_slc, lse_slc, go, LP, mode="block", rows=64, dkv_warps=8))
    # the row tiles with every step masked (_common.INTERIOR_TILES off): the interior steps' gain
    for name, w in (("block_rows64", 0), ("block_rows64_w8", 8)):
        yield "slc_bwd", f"{name}_masked", lambda w=w: masked(lambda: bench(lambda: selected.selected_backward(
            q, k, v, idx, o_slc, lse_slc, go, LP, mode="block", rows=64, dkv_warps=w)))
    for rows in (0, 64):  # the dK/dV kernel's key-rows form (scores as k q^T, selected.KEY_ROWS_WARPS warps)
        yield "slc_bwd", "block_kr" if rows == 0 else "block_rows64_kr", lambda rows=rows: bench(
            lambda: selected.selected_backward(q, k, v, idx, o_slc, lse_slc, go, LP, mode="block", rows=rows,
                                               key_rows=True))
    for qt in qtiles:  # the lists come from the forward in training: not timed here
        yield "slc_bwd", f"block_qt{qt}", lambda qt=qt: bench(lambda: selected.selected_backward(
            q, k, v, idx, o_slc, lse_slc, go, LP, mode="block", qt=qt, lists=lists[qt]))
    for qt in head_tiles:
        yield "slc_bwd", f"block_qt{qt}h", lambda qt=qt: bench(lambda: selected.selected_backward(
            q, k, v, idx, o_slc, lse_slc, go, LP, mode="block", qt=qt, lists=lists[f"{qt}h"], head_tiles=True))
    yield "slc_bwd", "block_index_only", lambda: bench(
        lambda: selected.block_segments(idx, math.ceil(S / LP), selected.SEG))

    win_impls = {"sdpa": lambda *a: ops.window_attention(*a, WINDOW)}
    if hasattr(tk, "window_attention"):
        win_impls["triton"] = lambda *a: tk.window_attention(*a, WINDOW)
        from nsa.attention import flash_window

        for name in flash_window.installed():  # flash-attn 2 / 3 where installed (NSA_WINDOW=auto times them)
            win_impls[name] = lambda *a, name=name: flash_window.window_attention(*a, WINDOW, name)
    for name, fn in win_impls.items():
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        yield "win_fwd", name, lambda fn=fn: bench(lambda: fn(q, k, v))
        yield "win_bwd", name, lambda fn=fn, qg=qg, kg=kg, vg=vg: _bwd_time(fn(qg, kg, vg), (qg, kg, vg), go)
        if name == "triton":  # the same with every tile masked
            yield "win_fwd", "triton_masked", lambda fn=fn: masked(lambda: bench(lambda: fn(q, k, v)))
            yield "win_bwd", "triton_masked", lambda fn=fn, qg=qg, kg=kg, vg=vg: masked(
                lambda: _bwd_time(fn(qg, kg, vg), (qg, kg, vg), go))
    if "triton" in win_impls:  # tile caps (query BM, key BN) of all three window kernels
        from nsa.attention.triton import window

        fn = win_impls["triton"]
        # BM_MAX / BN_MAX patched; at head dim 128 a 128-query backward tile needs 262 KB of shared
        # memory, over the H100's 227 KB: not tried
        for bm, bn in ((64, 128), (128, 64)):
            def tiles(run, bm=bm, bn=bn):
                return patched(window, "BM_MAX", bm, lambda: patched(window, "BN_MAX", bn, run))

            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            yield "win_fwd", f"triton_bm{bm}_bn{bn}", lambda tiles=tiles: tiles(lambda: bench(lambda: fn(q, k, v)))
            if bm == 64 or D <= 64:
                yield "win_bwd", f"triton_bm{bm}_bn{bn}", lambda tiles=tiles, qg=qg, kg=kg, vg=vg: tiles(
                    lambda: _bwd_time(fn(qg, kg, vg), (qg, kg, vg), go))
        o_win, lse_win = window.window_forward(q, k, v, WINDOW)
        for name in window.DQ_TILES:  # the dQ kernel alone, each tile variant tuning may pick (head dim > 64)
            for suffix, run in (("", lambda f: f()), ("_masked", masked)):
                yield "win_dq", name + suffix, lambda name=name, run=run: run(lambda: bench(
                    lambda: window.window_backward(q, k, v, o_win, lse_win, go, WINDOW, dq_tile=name, parts="dq")))
        for name in window.DKV_TILES:  # the dK/dV kernel alone, each tile variant tuning may pick
            for suffix, run in (("", lambda f: f()), ("_masked", masked)):
                yield "win_dkv", name + suffix, lambda name=name, run=run: run(lambda: bench(
                    lambda: window.window_backward(q, k, v, o_win, lse_win, go, WINDOW, dkv_tile=name, parts="dkv")))

    # gate-and-combine: the fused kernel vs the PyTorch gated sum + transpose (NSA_COMBINE=torch)
    from nsa.attention.triton.combine import gate_combine

    logits = rnd(1, S, 3 * HQ).requires_grad_()
    outs = [rnd(1, HQ, S, D).requires_grad_() for _ in range(3)]

    def torch_combine(lg, *os_):
        g = torch.sigmoid(lg.float()).view(1, S, HQ, 3).transpose(1, 2).to(dt)
        return sum(g[..., i:i + 1] * o for i, o in enumerate(os_)).transpose(1, 2).reshape(1, S, HQ * D)

    for name, fn in (("triton", gate_combine), ("torch", torch_combine)):
        yield "combine_fwd", name, lambda fn=fn: bench(lambda: fn(logits, *outs))
        yield "combine_bwd", name, lambda fn=fn: _bwd_time(fn(logits, *outs), (logits, *outs), rnd(1, S, HQ * D))

    # RoPE on the queries: the Triton kernel vs the PyTorch rotation (NSA_ROPE=torch)
    from nsa.attention.rope import RotaryEmbedding
    from nsa.attention.triton.rope import apply_rope

    rope = RotaryEmbedding(D).to(device)
    pos = torch.arange(S, device=device)
    cos, sin = rope.tables(S, torch.device(device), torch.float32)
    qr = q.detach().requires_grad_()
    for name, fn in (("triton", apply_rope), ("torch", rope.rotate)):
        yield "rope_fwd", name, lambda fn=fn: bench(lambda: fn(q, pos, cos, sin))
        yield "rope_bwd", name, lambda fn=fn: _bwd_time(fn(qr, pos, cos, sin), (qr,), go)

    # the fused static decode (triton/decode.py): one query per head at position S - 1 over static caches
    # of S tokens, the compressed scan in the main kernel ("split1") or split over programs ("splitN").
    # Replayed from a CUDA graph (as the decode step runs): do_bench over a Python call would time the
    # launch, not the kernels. Branch subsets show where the step's time goes; "dense" is full
    # attention's decode kernel over the same S tokens.
    from nsa.attention.triton import decode

    def decode_timer(batch: int, splits: int, branches: tuple[bool, bool, bool] | None, tile_elems: int = 0,
                     warps: int = 0):
        def run():
            if tile_elems:  # read at launch, i.e. when graph_time captures
                return patched(decode, "TILE_ELEMS", tile_elems, decode_timer(batch, splits, branches, 0, warps))
            if warps:  # the main kernel's num_warps
                return patched(decode, "decode_warps", lambda ns_pad, d: warps, decode_timer(batch, splits, branches))
            qd = rnd(batch, HQ, 1, D)
            t = torch.tensor([S - 1], device=device)
            if branches is None:
                k_all, v_all = rnd(batch, G, S, D), rnd(batch, G, S, D)
                return graph_time(lambda: decode.dense_decode(qd, k_all, v_all, t, splits))
            bufs = [rnd(batch, G, n, D) for n in (n_cmp, n_cmp, S, S, WINDOW, WINDOW)]
            kept = torch.arange(S - WINDOW, S, device=device)
            win_pos = torch.empty(WINDOW, dtype=torch.int64, device=device)
            win_pos[kept % WINDOW] = kept
            return graph_time(lambda: decode.static_decode(qd, *bufs, win_pos, t, L, D_STRIDE, LP, N_SEL, *branches,
                                                           splits))
        return run

    subsets = {"": (True, True, True), "_cmp": (True, False, False), "_cmp_slc": (True, True, False),
               "_win": (False, False, True)}
    for batch in (1, 32) if layout == "m7c" else (1,):
        auto = decode.scan_splits(batch * G, n_cmp, torch.device(device))
        for splits in sorted({1, auto, max(1, auto // 2)}):
            yield "decode", f"b{batch}_split{splits}", decode_timer(batch, splits, subsets[""])
        yield "decode", f"b{batch}_split{auto}_tiles2048", decode_timer(batch, auto, subsets[""], 2048)
        yield "decode", f"b{batch}_split{auto}_w8", decode_timer(batch, auto, subsets[""], warps=8)
        for name, branches in subsets.items():
            if name:
                yield "decode", f"b{batch}_split{auto}{name}", decode_timer(batch, auto, branches)
        dense_auto = decode.scan_splits(batch * G, S, torch.device(device))
        yield "decode", f"dense_b{batch}_split{dense_auto}", decode_timer(batch, dense_auto, None)

    qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))

    def full(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)

    yield "full_fwd", "sdpa", lambda: bench(lambda: full(q, k, v))
    yield "full_bwd", "sdpa", lambda: _bwd_time(full(qf, kf, vf), (qf, kf, vf), go)


def _bwd_time(out: torch.Tensor, inputs, go) -> float:
    return bench(lambda: torch.autograd.grad(out, inputs, go, retain_graph=True))


def print_table(rows: list[dict]) -> None:
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["layout"], r["seq_len"], r["kernel"]), []).append(r)
    print(f"\n== NSA kernels, {rows[0]['device']}, {rows[0]['dtype']}, batch 1 (ms, median; fastest variant first) ==")
    for (layout, S, kernel), rs in by.items():
        ok = sorted((r for r in rs if r.get("ms") is not None), key=lambda r: r["ms"])
        cells = [f"{r['variant']} {r['ms']:.3f}" for r in ok] + [f"{r['variant']} ERROR" for r in rs if r.get("ms") is None]
        print(f"{layout:6} S={S:<6} {kernel:9} " + " | ".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layout", default="both", choices=["m7c", "paper", "both"])
    ap.add_argument("--seq-lens", default="16384,65536")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args()
    os.environ["NSA_TUNE"] = "off"  # each variant is timed here by name; the layer's tuning would mix them
    if args.device != "cuda" or not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (the kernels' CPU interpreter is for correctness only)", file=sys.stderr)
        return 2
    layouts = ["m7c", "paper"] if args.layout == "both" else [args.layout]
    rows, failed = [], False
    for layout in layouts:
        for S in (int(s) for s in args.seq_lens.split(",")):
            base = dict(layout=layout, seq_len=S, device=device_name("cuda"), dtype="bf16")
            try:
                for kernel, variant, timer in rows_for(layout, S, "cuda"):
                    row = dict(kernel=kernel, variant=variant, **base)
                    try:
                        row["ms"] = round(timer(), 4)
                    except Exception as e:  # noqa: BLE001 - a failed variant is a row
                        row.update(ms=None, error=f"{type(e).__name__}: {str(e)[:300]}")
                        failed |= not isinstance(e, torch.cuda.OutOfMemoryError)
                        traceback.print_exc(limit=3)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            except Exception as e:  # noqa: BLE001 - setup failed (e.g. OOM): record and go on
                row = dict(kernel="setup", variant="-", ms=None, error=f"{type(e).__name__}: {str(e)[:300]}", **base)
                failed |= not isinstance(e, torch.cuda.OutOfMemoryError)
                traceback.print_exc(limit=5)
                rows.append(row)
                print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if rows and not args.json_only:
        print_table(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
