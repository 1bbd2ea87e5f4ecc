"""Shared setup of the Triton kernel tests (tests/test_triton_*.py): the interpreter switch and the
parity helpers.

The interpreter must be on when the kernels are decorated (@triton.jit reads TRITON_INTERPRET then),
i.e. before triton / the kernel modules are first imported; importing this module does that on a
machine without CUDA. It is switched off again once they are loaded, so that the rest of the pytest
session (collected in the same process) does not run with it, and switched back on around each kernel
test by the autouse `interpreter` fixture (import it into the test module).
"""

import os

import pytest
import torch

_SET_HERE = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if _SET_HERE:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton")
    from nsa.attention import triton as nsa_triton
    from nsa.attention.triton import combine, compressed, decode, rope, segments, select, selected, window  # noqa: F401  (decorate now)

    DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    AVAILABLE = nsa_triton.available()
finally:
    if _SET_HERE:
        del os.environ["TRITON_INTERPRET"]

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
F32, BF16 = torch.float32, torch.bfloat16

needs_kernels = pytest.mark.skipif(not AVAILABLE, reason="triton kernels unavailable here")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def randn(*shape, dtype, seed, grad=True, strided=False):
    """Random tensor on DEVICE; strided=True gives a [B, S, H, D].transpose(1, 2) view, the layout
    the layer's projections produce."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        B, H, S, D = shape
        x = torch.randn(B, S, H, D, generator=g).to(device=DEVICE, dtype=dtype).transpose(1, 2)
    else:
        x = torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)
    return x.requires_grad_(grad)


def check(name, got, want, dtype):
    err = rel_err(got, want)
    assert err <= TOL[dtype], f"{name}: relative max error {err:.2e} > {TOL[dtype]:.0e}"


def check_grads(out_t, out_ref, inputs, dtype, seed=123):
    go = randn(*out_ref.shape, dtype=dtype, seed=seed, grad=False)
    g_t = torch.autograd.grad(out_t, inputs, go)
    g_r = torch.autograd.grad(out_ref, inputs, go)
    for name, a, b in zip(("dq", "dk", "dv"), g_t, g_r):
        assert a.shape == b.shape and a.dtype == b.dtype
        check(name, a, b, dtype)


def spy_band_split(monkeypatch, module):
    """Record the (tiles, first interior, end of interior) splits module's kernels make (_common.band_split),
    so a test can show that both its unmasked interior tiles and its masked edge tiles ran. Interpreter only:
    on the GPU the kernels are compiled, and the record stays empty (None is returned)."""
    if DEVICE != "cpu":
        return None
    splits = []
    real = module.band_split

    def spy(*args):
        res = real(*args)
        splits.append(tuple(int(x.item() if hasattr(x, "item") else x) for x in res))
        return res

    monkeypatch.setattr(module, "band_split", spy)
    return splits


def has_interior_and_edges(splits) -> bool:
    """Some program ran interior (unmasked) tiles and masked edge tiles both."""
    return any(fe > fs and tiles > fe - fs for tiles, fs, fe in splits)
