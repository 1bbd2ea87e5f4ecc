"""A one-time parity check of the Triton kernels on the device they are about to run on.

The kernels are tested in CI through the interpreter, but a new GPU, driver or Triton build can
still miscompile. Before the first NSA forward on a device, `kernels_ok(device, dtype)` runs the
kernels (compressed, selection, selected, window, gate-and-combine) on small random inputs against
the PyTorch branches (nsa.attention.ops), forward and gradients, and remembers the verdict for the
process. The layer falls back to PyTorch (with a warning) when it fails, so `model.nsa.impl: auto`
is never silently wrong.
"""

from __future__ import annotations

import sys

import torch

from nsa.attention import ops

_VERDICTS: dict[tuple, str | None] = {}
TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _problem(device: torch.device, dtype: torch.dtype) -> str | None:
    from nsa.attention import triton as tk

    g = torch.Generator().manual_seed(0)
    B, G, r, S, D, l, d, lp, n = 1, 2, 3, 150, 64, 16, 8, 32, 3

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = rnd(B, G * r, S, D), rnd(B, G, S, D), rnd(B, G, S, D)
    kc, vc = rnd(B, G, (S - l) // d + 1, D), rnd(B, G, (S - l) // d + 1, D)
    o_t, lse = tk.compressed_attention(q, kc, vc, l, d)
    o_r = ops.compressed_attention(q, kc, vc, l, d)
    idx_t = tk.select_blocks(q, kc, l, d, lp, n, lse=lse)
    idx_r = ops.select_blocks(q, kc, l, d, lp, n)
    s_t = tk.selected_attention(q, k, v, idx_r, lp)
    s_r = ops.selected_attention(q, k, v, idx_r, lp)
    w_t = tk.window_attention(q, k, v, 40)
    w_r = ops.window_attention(q, k, v, 40)
    logits = rnd(B, S, 3 * G * r)
    c_t = tk.gate_combine(logits, o_t, s_t, w_t)
    gates = torch.sigmoid(logits.float()).view(B, S, G * r, 3).transpose(1, 2)
    c_r = sum(gates[..., i:i + 1] * o.float() for i, o in enumerate((o_r, s_r, w_r)))
    c_r = c_r.transpose(1, 2).reshape(B, S, G * r * D)
    go = torch.randn(o_r.shape, generator=g).to(device=device, dtype=dtype)
    checks = [("compressed forward", o_t, o_r), ("selected forward", s_t, s_r), ("window forward", w_t, w_r),
              ("gate-and-combine forward", c_t, c_r)]
    gc = torch.randn(c_r.shape, generator=g).to(device=device, dtype=dtype)
    (dl_t,), (dl_r,) = (torch.autograd.grad(c, logits, dc, retain_graph=True)
                        for c, dc in ((c_t, gc), (c_r, gc.float())))
    checks.append(("gate-and-combine logits grad", dl_t, dl_r))
    for name, out_t, out_r, inputs in (("compressed", o_t, o_r, (q, kc, vc)), ("selected", s_t, s_r, (q, k, v)),
                                       ("window", w_t, w_r, (q, k, v))):
        for i, (a, b) in enumerate(zip(torch.autograd.grad(out_t, inputs, go), torch.autograd.grad(out_r, inputs, go))):
            checks.append((f"{name} grad {i}", a, b))
    for name, a, b in checks:
        if not torch.isfinite(a.float()).all() or rel_error(a, b) > TOL[dtype]:
            return f"{name} differs from the PyTorch path (relative error {rel_error(a, b):.2e})"
    if dtype == torch.float32:  # low-precision scores may order near-ties differently
        same = (idx_t.sort(-1).values == idx_r.sort(-1).values).float().mean().item()
        if same < 1.0:
            return f"block selection differs from the PyTorch path ({1 - same:.1%} of slots)"
    return None


def kernels_ok(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, device.index, dtype)
    if key not in _VERDICTS:
        try:
            with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                _VERDICTS[key] = _problem(device, dtype)
        except Exception as e:  # noqa: BLE001 - any failure (compile, launch) means "don't use them"
            _VERDICTS[key] = f"{type(e).__name__}: {e}"
        if _VERDICTS[key]:
            print(f"[nsa] WARNING: Triton NSA kernels failed their self-check on {device} {dtype}: "
                  f"{_VERDICTS[key][:300]}. Using the PyTorch path (slower, correct).", file=sys.stderr, flush=True)
    return _VERDICTS[key] is None
