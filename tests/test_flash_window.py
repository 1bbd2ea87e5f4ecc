"""The window branch through flash-attn (nsa/attention/flash_window.py) and how it is chosen
(nsa/attention/triton/window.py `implementation`, NSA_WINDOW in the layer).

flash-attn cannot be installed without CUDA, so these tests put a stand-in package on sys.path: a
`flash_attn_func` written from flash-attn's documented semantics (q/k/v [B, S, heads, D], fewer K/V
heads for GQA, causal alignment of the last query with the last key, query i seeing keys
[i + N - Sq - left, i + N - Sq + right], softmax_scale), in fp32 with plain torch ops so autograd
gives its backward. Checked against it: our layout conversions and window/offset arithmetic give
ops.window_attention's result and gradients (bf16, <= 2e-2 relative); calls flash-attn cannot compute
stay on the Triton kernel; a missing or broken package is a clear error when forced and the Triton
kernel otherwise; NSA_WINDOW=auto times flash-attn against the Triton kernel and drops a package whose
results differ; a whole NSA layer with NSA_WINDOW=flash equals the layer on the Triton kernel.
"""

import importlib
import sys

import pytest
import torch

from tests.triton_setup import (  # noqa: F401  (first: switches the interpreter on before triton loads)
    AVAILABLE, BF16, DEVICE, F32, TOL, interpreter, needs_kernels, nsa_triton, randn, rel_err,
)

from nsa.attention import flash_window, ops  # noqa: E402
from nsa.attention.triton import tune  # noqa: E402
from nsa.errors import UserError  # noqa: E402

pytestmark = needs_kernels

FAKE = '''
import torch

CALLS = []


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **kwargs):
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "flash-attn: last dim not contiguous"
    assert q.dtype in (torch.float16, torch.bfloat16), "flash-attn: fp16/bf16 only"
    CALLS.append((tuple(q.shape), tuple(k.shape), causal, tuple(window_size)))
    B, Sq, H, D = q.shape
    N, Hk = k.shape[1], k.shape[2]
    kf = k.float().repeat_interleave(H // Hk, dim=2)
    vf = v.float().repeat_interleave(H // Hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q.float(), kf) * softmax_scale
    i = torch.arange(Sq, device=q.device)[:, None] + N - Sq
    j = torch.arange(N, device=q.device)[None, :]
    left, right = window_size
    left = left + OFF_BY
    if causal:
        right = 0
    ok = torch.ones(Sq, N, dtype=torch.bool, device=q.device)
    if left >= 0:
        ok = ok & (j >= i - left)
    if right >= 0:
        ok = ok & (j <= i + right)
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", p, vf).to(q.dtype)
    return RETURN
'''


FAKE_MODULES = {"flash": "nsa_fake_flash_attn", "flash3": "nsa_fake_flash_attn_interface"}


@pytest.fixture
def fake_flash(tmp_path, monkeypatch):
    """install(name="flash", off_by=0, returns="out", body=None) -> the stand-in for package `name`,
    importable for the test. The packages get names of their own, so that a real flash-attn installed
    on a GPU machine neither shadows the stand-ins nor counts as installed here."""
    monkeypatch.setattr(flash_window, "MODULES", FAKE_MODULES)
    installed = []

    def install(name="flash", off_by=0, returns="out", body=None):
        module = FAKE_MODULES[name]
        pkg = tmp_path / module
        pkg.mkdir()
        text = body if body is not None else FAKE.replace("OFF_BY", str(off_by)).replace(
            "RETURN", "out" if returns == "out" else "out, None")
        (pkg / "__init__.py").write_text(text)
        installed.append(module)
        monkeypatch.syspath_prepend(str(tmp_path))
        flash_window.load.cache_clear()
        return None if body is not None else importlib.import_module(module)

    flash_window.load.cache_clear()
    tune.reset()
    yield install
    for module in installed:
        sys.modules.pop(module, None)
    flash_window.load.cache_clear()
    tune.reset()


def _grads(out, leaves, seed=4):
    go = randn(*out.shape, dtype=out.dtype, seed=seed, grad=False)
    return (out, *torch.autograd.grad(out, leaves, go))


def _window_inputs(B, G, r, Sq, N, D, dtype=BF16, strided=False):
    q = randn(B, G * r, Sq, D, dtype=dtype, seed=1, strided=strided)
    k = randn(B, G, N, D, dtype=dtype, seed=2, strided=strided)
    v = randn(B, G, N, D, dtype=dtype, seed=3, strided=strided)
    return q, k, v


# (B, G, r, Sq, q_start, k_start, N, D, window, strided)
FLASH_CASES = [
    (2, 2, 3, 37, 0, 0, 37, 16, 8, False),  # training: batch 2, GQA 3, ragged S, window < S
    (1, 1, 6, 50, 0, 0, 50, 24, 64, True),  # window >= S; the layer's [B,S,H,D].transpose(1, 2) views
    (1, 2, 1, 20, 30, 22, 28, 16, 8, False),  # a query chunk at 30..49 over keys 22..49 (aligned ends)
    (1, 2, 6, 1, 45, 38, 8, 16, 8, False),  # decode over the window cache (the last 8 keys)
]


@pytest.mark.parametrize("name,returns", [("flash", "out"), ("flash3", "tuple")])
@pytest.mark.parametrize("B,G,r,Sq,q_start,k_start,N,D,window,strided", FLASH_CASES)
def test_flash_window_matches_the_reference(fake_flash, name, returns, B, G, r, Sq, q_start, k_start, N, D,
                                            window, strided):
    fake = fake_flash(name, returns=returns)
    q, k, v = _window_inputs(B, G, r, Sq, N, D, strided=strided)
    out = nsa_triton.window_attention(q, k, v, window, q_start, k_start, impl=name)
    assert fake.CALLS == [((B, Sq, G * r, D), (B, N, G, D), True, (window - 1, 0))]
    assert out.is_contiguous() and out.shape == q.shape and out.dtype == BF16
    got = _grads(out, (q, k, v))
    want = _grads(ops.window_attention(q, k, v, window, q_start, k_start), (q, k, v))
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) <= TOL[BF16], f"{what}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("dtype,q_start,k_start,N,D", [
    (F32, 0, 0, 20, 16),  # fp32: flash-attn takes fp16/bf16 only
    (BF16, 0, 0, 24, 16),  # keys past the last query (not flash-attn's alignment)
    (BF16, 0, 0, 20, 12),  # head dim not a multiple of 8
])
def test_forced_flash_leaves_calls_it_cannot_compute_to_triton(fake_flash, dtype, q_start, k_start, N, D):
    fake = fake_flash("flash")
    q, k, v = _window_inputs(1, 1, 2, 20, N, D, dtype=dtype)
    assert flash_window.unusable(q, k, q_start, k_start)
    out = nsa_triton.window_attention(q, k, v, 8, q_start, k_start, impl="flash")
    assert fake.CALLS == []
    ref = ops.window_attention(q, k, v, 8, q_start, k_start)
    assert rel_err(out, ref) <= TOL[dtype]


def test_forced_flash_without_the_package_is_a_clear_error(fake_flash):
    q, k, v = _window_inputs(1, 1, 2, 20, 20, 16)
    assert "flash" not in flash_window.installed()
    with pytest.raises(UserError, match="NSA_WINDOW=flash: the nsa_fake_flash_attn package is not installed.*NSA_WINDOW=auto"):
        nsa_triton.window_attention(q, k, v, 8, impl="flash")
    with pytest.raises(ValueError, match="impl='flashy'"):
        nsa_triton.window_attention(q, k, v, 8, impl="flashy")


def test_a_broken_install_warns_and_auto_uses_triton(fake_flash, monkeypatch, capsys):
    fake_flash("flash", body="raise ImportError('undefined symbol: _ZN3c10 (built for another torch)')\n")
    monkeypatch.setenv("NSA_TUNE", "on")
    monkeypatch.setattr(tune, "MIN_QUERIES", 16)
    q, k, v = _window_inputs(1, 1, 2, 20, 20, 16)
    assert flash_window.installed() == []
    assert "nsa_fake_flash_attn is installed but does not import (ImportError: undefined symbol" in capsys.readouterr().err
    out = nsa_triton.window_attention(q, k, v, 8, impl="auto")
    assert rel_err(out, ops.window_attention(q, k, v, 8)) <= TOL[BF16]
    assert not any(key.startswith("window_impl") for key in tune.choices())  # nothing to choose from
    with pytest.raises(UserError, match="nsa_fake_flash_attn package is not installed here \\(or does not import\\)"):
        nsa_triton.window_attention(q, k, v, 8, impl="flash")


def _tuned_choice(q, k, v, window, grad):
    leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    with torch.set_grad_enabled(grad):
        out = nsa_triton.window_attention(*leaves, window, impl="auto")
    [(key, choice)] = [(key, c) for key, c in tune.choices().items() if key.startswith("window_impl")]
    return out, key, choice


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("fastest", ["flash", "triton"])
def test_auto_times_flash_against_triton(fake_flash, monkeypatch, grad, fastest):
    fake = fake_flash("flash")
    monkeypatch.setenv("NSA_TUNE", "on")
    monkeypatch.setattr(tune, "MIN_QUERIES", 16)
    monkeypatch.setattr(tune, "REPS", 2)
    timed = []
    monkeypatch.setattr(tune, "TIMER", lambda name, fn: (timed.append(name), fn(), 1.0 if name == fastest else 2.0)[2])
    q, k, v = _window_inputs(1, 2, 3, 40, 40, 16)
    out, key, choice = _tuned_choice(q, k, v, 8, grad)
    assert choice == fastest and key.endswith(f"|w8|grad{int(grad)}|S64") and key.startswith("window_impl|")
    from nsa.attention.triton.window import DKV_TILES

    # with gradients the Triton variant's first backward also tunes its dK/dV tile (window.DKV_TILES)
    assert sorted(set(timed) - set(DKV_TILES)) == ["flash", "triton"] and (grad or set(timed) <= {"flash", "triton"})
    assert rel_err(out, ops.window_attention(q, k, v, 8)) <= TOL[BF16]
    # the chosen implementation computes the real call (after tuning: one more flash call or none)
    calls = len(fake.CALLS)
    _tuned_choice(q, k, v, 8, grad)
    assert len(fake.CALLS) == calls + (fastest == "flash")


def test_auto_drops_a_flash_attn_that_disagrees(fake_flash, monkeypatch, capsys):
    """A package whose window is one key wider than asked (or any other disagreement with the Triton
    reference beyond rounding) is never chosen, however fast it times."""
    fake_flash("flash", off_by=1)
    monkeypatch.setenv("NSA_TUNE", "on")
    monkeypatch.setattr(tune, "MIN_QUERIES", 16)
    monkeypatch.setattr(tune, "TIMER", lambda name, fn: 1.0 if name == "flash" else 2.0)
    q, k, v = _window_inputs(1, 1, 2, 40, 40, 16)
    out, _, choice = _tuned_choice(q, k, v, 8, grad=True)
    assert choice == "triton"
    assert "kernel variant flash of window_impl dropped: output 0 differs" in capsys.readouterr().err
    assert rel_err(out, ops.window_attention(q, k, v, 8)) <= TOL[BF16]


def test_layer_window_switch(fake_flash, monkeypatch):
    """NSA_WINDOW reaches the window branch: a whole NSA layer (the Triton kernels, bf16) computes the
    same output and gradients with NSA_WINDOW=flash as with NSA_WINDOW=triton; a bad value is named."""
    from nsa.attention.layer import NSAttention
    from nsa.attention.rope import RotaryEmbedding
    from nsa.config import ModelConfig

    fake = fake_flash("flash")
    cfg = ModelConfig.from_dict(dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=64,
                                     vocab_size=64, max_seq_len=128,
                                     nsa=dict(cmp_block=8, cmp_stride=4, slc_block=8, n_selected=3, window=16,
                                              impl="triton")))
    torch.manual_seed(0)
    layer = NSAttention(cfg).to(device=DEVICE, dtype=BF16)
    rope = RotaryEmbedding(16, max_seq_len=128).to(DEVICE)
    x = randn(1, 33, 64, dtype=BF16, seed=5)

    def run(impl):
        monkeypatch.setenv("NSA_WINDOW", impl)
        layer.zero_grad()
        out = layer(x, rope)
        return _grads(out, (x, *layer.parameters()))

    want = run("triton")
    assert fake.CALLS == []
    got = run("flash")
    assert [c[-1] for c in fake.CALLS] == [(15, 0)]
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) <= TOL[BF16], f"tensor {i}: {rel_err(a, b):.2e}"
    monkeypatch.setenv("NSA_WINDOW", "fa2")
    with pytest.raises(UserError, match="NSA_WINDOW='fa2': expected one of auto, triton, flash, flash3, sdpa"):
        layer(x, rope)


def test_auto_tunes_inside_activation_checkpointing(fake_flash, monkeypatch):
    """The first call times forward + backward of each candidate inside the model's forward; under
    non-reentrant activation checkpointing that inner backward must neither unpack the checkpoint's
    saved tensors nor change how many tensors the forward saves (the recomputation must match)."""
    from torch.utils.checkpoint import checkpoint

    fake_flash("flash")
    monkeypatch.setenv("NSA_TUNE", "on")
    monkeypatch.setattr(tune, "MIN_QUERIES", 16)
    monkeypatch.setattr(tune, "REPS", 1)
    monkeypatch.setattr(tune, "TIMER", lambda name, fn: (fn(), 1.0 if name == "flash" else 2.0)[1])
    q, k, v = _window_inputs(1, 1, 2, 40, 40, 16)

    def window(q, k, v):
        return nsa_triton.window_attention(q * 1.0, k, v, 8, impl="auto") * 2.0

    got = _grads(checkpoint(window, q, k, v, use_reentrant=False), (q, k, v))
    assert [c for key, c in tune.choices().items() if key.startswith("window_impl")] == ["flash"]
    want = _grads(ops.window_attention(q, k, v, 8) * 2.0, (q, k, v))
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) <= TOL[BF16], f"{what}: {rel_err(a, b):.2e}"
