"""NSA branches and layer against the slow loop reference (tests/nsa_reference.py).

Tolerances: float64 <= 1e-10 relative, float32 <= 1e-5 relative (max abs error / max abs value).
Shapes are tiny and ragged (S not a multiple of any block size), batch 2, GQA groups of 1, 2 and 6
query heads, small query chunks so the chunked paths really loop.
"""

import math
import os

import pytest
import torch

from nsa.attention import ops
from nsa.attention.blocks import forced_blocks, num_cmp_blocks, overlap_map, visible_cmp_count
from nsa.attention.layer import NSAttention
from nsa.attention.rope import RotaryEmbedding
from nsa.config import ModelConfig
from tests import nsa_reference as ref

L, D_STRIDE, LP, N_SEL, W = 8, 4, 8, 3, 12
GROUPS = [(4, 4), (4, 2), (6, 1)]  # (query heads, kv heads): group sizes 1, 2, 6
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def rand_qkv(H, G, S, dtype, D=8, B=2, seed=0, n_keys=None):
    g = torch.Generator().manual_seed(seed)
    N = S if n_keys is None else n_keys
    q = torch.randn(B, H, S, D, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(B, G, N, D, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(B, G, N, D, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def grads(out, inputs, seed=1):
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, go, allow_unused=True)


def selection_tensor(sel, B, G, S, n):
    idx = torch.full((B, G, S, n), -1, dtype=torch.int64)
    for (b, g, t), blocks in sel.items():
        idx[b, g, t, : len(blocks)] = torch.tensor(blocks)
    return idx


# ---------------------------------------------------------------------------------- geometry
def test_overlap_map_paper_defaults_hand_computed():
    # l=32, d=16, l'=64: selection block 1 = tokens 64..127. Compressed block i = [16i, 16i+32).
    # Block 3 = 48..79 overlaps 16 tokens (weight 1), blocks 4,5,6 lie inside (2), block 7 =
    # 112..143 overlaps 16 (1). Blocks 2 (32..63) and 8 (128..159) do not touch it.
    index, weight = overlap_map(10, 32, 16, 64)
    to_block1 = {i: weight[i][index[i] == 1].sum().item() for i in range(10)}
    assert {i: w for i, w in to_block1.items() if w} == {3: 1.0, 4: 2.0, 5: 2.0, 6: 2.0, 7: 1.0}
    # every compressed block distributes exactly l/d = 2 units
    assert torch.allclose(weight.sum(1), torch.full((10,), 2.0, dtype=torch.float64))


def test_overlap_map_non_divisible_hand_computed():
    # l=5, d=3, l'=4: block 0 = [0,5): 4 tokens in sel 0, 1 in sel 1; block 1 = [3,8): 1 in sel 0, 4 in sel 1.
    index, weight = overlap_map(2, 5, 3, 4)
    got = [{int(j): w for j, w in zip(index[i].tolist(), weight[i].tolist()) if w} for i in range(2)]
    assert got == [{0: 4 / 3, 1: 1 / 3}, {0: 1 / 3, 1: 4 / 3}]


def test_visible_counts_and_forced_blocks():
    # l=8, d=4: block i complete at t = 4i + 7
    t = torch.arange(20)
    expect = [0] * 7 + [1] * 4 + [2] * 4 + [3] * 4 + [4]
    assert visible_cmp_count(t, 8, 4).tolist() == expect
    assert num_cmp_blocks(19, 8, 4) == 3 and num_cmp_blocks(20, 8, 4) == 4 and num_cmp_blocks(7, 8, 4) == 0
    assert forced_blocks(5, 8) == [0] and forced_blocks(9, 8) == [0, 1] and forced_blocks(30, 8) == [0, 2, 3]


# ---------------------------------------------------------------------------------- branches
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H,G", GROUPS)
def test_compressed_branch_matches_reference(H, G, dtype):
    S = 37
    q, _, _ = rand_qkv(H, G, S, dtype)
    _, kc, vc = rand_qkv(H, G, num_cmp_blocks(S, L, D_STRIDE), dtype, seed=3)
    out = ops.compressed_attention(q, kc, vc, L, D_STRIDE, chunk=5)
    want = ref.ref_compressed(q, kc, vc, L, D_STRIDE)
    assert rel_err(out, want) <= TOL[dtype]
    for a, b in zip(grads(out, (q, kc, vc)), grads(want, (q, kc, vc))):
        assert rel_err(a, b) <= TOL[dtype]
    assert out[:, :, : L - 1].abs().max() == 0  # nothing complete yet -> zero output


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H,G", GROUPS)
def test_window_branch_matches_reference(H, G, dtype):
    S = 41
    q, k, v = rand_qkv(H, G, S, dtype)
    out = ops.window_attention(q, k, v, W, chunk=6)
    want = ref.ref_window(q, k, v, W)
    assert rel_err(out, want) <= TOL[dtype]
    for a, b in zip(grads(out, (q, k, v)), grads(want, (q, k, v))):
        assert rel_err(a, b) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H,G", GROUPS)
def test_selection_matches_reference(H, G, dtype):
    S = 45
    q, _, _ = rand_qkv(H, G, S, dtype, seed=5)
    _, kc, _ = rand_qkv(H, G, num_cmp_blocks(S, L, D_STRIDE), dtype, seed=6)
    idx = ops.select_blocks(q, kc, L, D_STRIDE, LP, N_SEL, chunk=7)
    want = ref.ref_select(q.detach(), kc.detach(), L, D_STRIDE, LP, N_SEL)
    for (b, g, t), blocks in want.items():
        got = [j for j in idx[b, g, t].tolist() if j >= 0]
        assert sorted(got) == sorted(blocks), (b, g, t)
        assert set(forced_blocks(t, LP)) <= set(got)  # initial + 2 local always present
        assert max(got) <= t // LP  # never a future block


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H,G", GROUPS)
def test_selected_branch_matches_reference(H, G, dtype):
    S = 45
    q, k, v = rand_qkv(H, G, S, dtype, seed=7)
    _, kc, _ = rand_qkv(H, G, num_cmp_blocks(S, L, D_STRIDE), dtype, seed=8)
    idx = ops.select_blocks(q, kc, L, D_STRIDE, LP, N_SEL, chunk=7)
    want_sel = ref.ref_select(q.detach(), kc.detach(), L, D_STRIDE, LP, N_SEL)
    out = ops.selected_attention(q, k, v, idx, LP, chunk=5)
    want = ref.ref_selected(q, k, v, want_sel, LP)
    assert rel_err(out, want) <= TOL[dtype]
    for a, b in zip(grads(out, (q, k, v)), grads(want, (q, k, v))):
        assert rel_err(a, b) <= TOL[dtype]


def test_selection_ties_go_to_lower_index():
    # q = 0 -> every visible compressed block gets the same probability; the interior selection
    # blocks then tie exactly and the lowest-indexed ones must win, every time.
    H, G, S = 2, 1, 80
    q = torch.zeros(1, H, S, 8, dtype=torch.float64)
    kc = torch.randn(1, G, num_cmp_blocks(S, L, D_STRIDE), 8, dtype=torch.float64)
    n = 5
    idx = ops.select_blocks(q, kc, L, D_STRIDE, LP, n)
    t = S - 1  # current block 9; forced {0, 8, 9}; blocks 1..7 tie (each holds 2 units of mass)
    assert sorted(idx[0, 0, t].tolist()) == [0, 1, 2, 8, 9]
    assert torch.equal(idx, ops.select_blocks(q, kc, L, D_STRIDE, LP, n, chunk=3))
    want = ref.ref_select(q, kc, L, D_STRIDE, LP, n)
    assert sorted(want[(0, 0, t)]) == [0, 1, 2, 8, 9]


# ---------------------------------------------------------------------------------- layer
def tiny_cfg(H=4, G=2, compress="mlp", **nsa):
    base = dict(cmp_block=L, cmp_stride=D_STRIDE, slc_block=LP, n_selected=N_SEL, window=W, compress=compress)
    base.update(nsa)
    return ModelConfig.from_dict(
        dict(vocab_size=64, dim=16, n_layers=1, n_heads=H, n_kv_heads=G, head_dim=8, ffn_hidden=32, nsa=base)
    )


def make_layer(cfg, dtype, seed=0):
    torch.manual_seed(seed)
    layer = NSAttention(cfg).to(dtype)
    for p in layer.parameters():  # non-trivial values everywhere (incl. phi's position encoding)
        torch.nn.init.normal_(p, std=0.3)
    return layer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("H,G", GROUPS)
@pytest.mark.parametrize("compress", ["mlp", "mean"])
def test_layer_matches_reference(H, G, dtype, compress):
    cfg = tiny_cfg(H, G, compress, query_chunk=6)
    layer = make_layer(cfg, dtype)
    x = torch.randn(2, 39, cfg.dim, dtype=dtype, requires_grad=True)
    out = layer(x, RotaryEmbedding(cfg.head_dim))
    want = ref.ref_nsa_layer(layer, x)
    assert rel_err(out, want) <= TOL[dtype]
    params = [x] + list(layer.parameters())
    for a, b in zip(grads(out, params), grads(want, params)):
        if a is None and b is None:
            continue
        assert rel_err(a, b) <= TOL[dtype]


def test_every_parameter_gets_gradient():
    layer = make_layer(tiny_cfg(), torch.float32)
    x = torch.randn(2, 40, 16)
    layer(x, RotaryEmbedding(8)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert layer.wkv.weight.grad[: 2 * 8].abs().sum() > 0  # compression keys (first K/V rows)


# ---------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("t", [9, 23, 38])
def test_causality_layer_outputs_grads_and_selection(t):
    cfg = tiny_cfg(query_chunk=5)
    layer = make_layer(cfg, torch.float64)
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 40, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :]) * 3
    outs, idxs, gs = [], [], []
    for inp in (x, x2):
        inp = inp.clone().requires_grad_()
        out = layer(inp, rope)
        (g,) = torch.autograd.grad(out[:, : t + 1].sum(), inp)
        q, (kr, vr), _, _ = layer.project(inp, rope)
        kc, _ = layer.compress(kr, vr, rope)
        idxs.append(ops.select_blocks(q, kc, L, D_STRIDE, LP, N_SEL)[:, :, : t + 1])
        outs.append(out[:, : t + 1].detach())
        gs.append(g[:, : t + 1])
    assert torch.equal(idxs[0], idxs[1])  # selection scores see only blocks complete by t
    assert rel_err(outs[1], outs[0]) <= 1e-12
    assert rel_err(gs[1], gs[0]) <= 1e-12


@pytest.mark.parametrize("branch", ["cmp", "win", "slc"])
def test_causality_each_branch(branch):
    H, G, S, t = 4, 2, 40, 21
    q, k, v = rand_qkv(H, G, S, torch.float64, seed=11)
    kc = torch.randn(2, G, num_cmp_blocks(S, L, D_STRIDE), 8, dtype=torch.float64)
    vc = torch.randn_like(kc)

    def run(q, k, v, kc, vc):
        if branch == "cmp":
            return ops.compressed_attention(q, kc, vc, L, D_STRIDE, chunk=6)
        if branch == "win":
            return ops.window_attention(q, k, v, W, chunk=6)
        idx = ops.select_blocks(q, kc, L, D_STRIDE, LP, N_SEL, chunk=6)
        return ops.selected_attention(q, k, v, idx, LP, chunk=6)

    base = run(q, k, v, kc, vc)[:, :, : t + 1]
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :])
    kc2, vc2 = kc.clone(), vc.clone()
    first_future = (t + 1 - L) // D_STRIDE + 1  # compressed blocks that end after t
    kc2[:, :, first_future:] += 5
    vc2[:, :, first_future:] += 5
    assert rel_err(run(q2, k2, v2, kc2, vc2)[:, :, : t + 1], base.detach()) <= 1e-13


# ---------------------------------------------------------------------------------- single query / ragged
def test_single_query_attends_to_all_keys():
    """Decode shape: one query at the last position against N keys must equal explicit dense
    softmax over all keys (not just the first one)."""
    H, G, N, D = 6, 2, 29, 8
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, H, 1, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, G, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, G, N, D, generator=g, dtype=torch.float64)
    dense = ref.dense_causal(q, k, v)
    win = ops.window_attention(q, k, v, window=N, q_start=N - 1)
    idx = torch.arange(math.ceil(N / LP)).view(1, 1, 1, -1).expand(1, G, 1, -1).contiguous()
    slc = ops.selected_attention(q, k, v, idx, LP, q_start=N - 1)
    # compressed with l = d = 1 is plain attention over every (compressed) token
    cmp = ops.compressed_attention(q, k, v, 1, 1, q_start=N - 1)
    for out in (win, slc, cmp):
        assert rel_err(out, dense) <= 1e-12
    assert rel_err(win, v[:, :, :1].repeat_interleave(3, 1)) > 1e-3  # not the first value


def test_coverage_equivalence_with_full_attention():
    """n * l' >= S: selection covers everything -> full causal attention; w >= S: same for window."""
    H, G, S = 6, 2, 33
    q, k, v = rand_qkv(H, G, S, torch.float64, seed=21)
    dense = ref.dense_causal(q, k, v)
    n_all = math.ceil(S / LP)
    kc = torch.randn(2, G, num_cmp_blocks(S, L, D_STRIDE), 8, dtype=torch.float64)
    idx = ops.select_blocks(q, kc, L, D_STRIDE, LP, n_all)
    assert rel_err(ops.selected_attention(q, k, v, idx, LP, chunk=4), dense) <= 1e-12
    assert rel_err(ops.window_attention(q, k, v, S, chunk=4), dense) <= 1e-12


# ---------------------------------------------------------------------------------- gradcheck
def test_gradcheck_selected_attention():
    q, k, v = rand_qkv(2, 1, 13, torch.float64, D=4, B=1, seed=31)
    kc = torch.randn(1, 1, num_cmp_blocks(13, 4, 2), 4, dtype=torch.float64)
    idx = ops.select_blocks(q, kc, 4, 2, 4, 3)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.selected_attention(a, b, c, idx, 4, chunk=3), (q, k, v))


def test_gradcheck_compressed_and_window():
    q, k, v = rand_qkv(2, 1, 11, torch.float64, D=4, B=1, seed=32)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.window_attention(a, b, c, 4, chunk=3), (q, k, v))
    kc, vc = (torch.randn(1, 1, num_cmp_blocks(11, 4, 2), 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.compressed_attention(a, b, c, 4, 2, chunk=3), (q, kc, vc))


def test_gradcheck_layer():
    cfg = ModelConfig.from_dict(dict(vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
                                     ffn_hidden=8, nsa=dict(cmp_block=4, cmp_stride=2, slc_block=4,
                                                            n_selected=3, window=5, compress_hidden=4, gate_hidden=4)))
    layer = make_layer(cfg, torch.float64)
    x = torch.randn(1, 14, 8, dtype=torch.float64, requires_grad=True)
    rope = RotaryEmbedding(4)
    assert torch.autograd.gradcheck(lambda x: layer(x, rope), (x,))


def test_forcing_triton_where_it_cannot_run_is_a_clear_error(monkeypatch):
    from nsa.errors import UserError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = make_layer(tiny_cfg(impl="triton"), torch.float64)  # fp64 on CPU: never Triton
    with pytest.raises(UserError, match="model.nsa.impl=auto"):
        layer(torch.randn(1, 20, 16, dtype=torch.float64), RotaryEmbedding(8))
    assert make_layer(tiny_cfg(impl="auto"), torch.float32).kernels(torch.zeros(1)) is None  # CPU -> ops


def test_triton_self_check_failure_means_pytorch_fallback(monkeypatch, capsys):
    """A kernel that fails (miscompile, launch error) on a new device must not be used by `auto`."""
    from nsa.attention import triton as tk
    from nsa.attention.triton import selfcheck

    def broken(*args, **kwargs):
        raise RuntimeError("simulated miscompile")

    monkeypatch.setattr(tk, "compressed_attention", broken, raising=False)
    monkeypatch.setattr(selfcheck, "_VERDICTS", {})
    assert selfcheck.kernels_ok(torch.device("cpu"), torch.float32) is False
    assert "simulated miscompile" in capsys.readouterr().err
    assert selfcheck.kernels_ok(torch.device("cpu"), torch.float32) is False  # remembered, not re-run


def test_imports_leave_triton_unloaded_and_compile_keeps_branches_eager():
    """Importing the model/trainer must not import triton (torch.compiler.disable would, via Dynamo):
    the kernel tests switch the Triton interpreter on before triton's first import. compile_model's
    patch makes NSAttention.branches a Dynamo graph break and leaves the layer working."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "import nsa.model, nsa.train, nsa.attention.layer as L\n"
        "assert 'triton' not in sys.modules, 'importing nsa imported triton'\n"
        "L.keep_branches_eager(); L.keep_branches_eager()\n"
        "assert L.NSAttention.branches._nsa_eager\n"
        "m = nsa.model.build_model(dict(vocab_size=32, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,"
        " ffn_hidden=32, nsa=dict(cmp_block=8, cmp_stride=4, slc_block=8, n_selected=3, window=8)))\n"
        "m(torch.randint(0, 32, (1, 40))).sum().backward()\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
