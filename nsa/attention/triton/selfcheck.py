"""A one-time parity check of the Triton kernels on the device they are about to run on.

The kernels are tested in CI through the interpreter, but a new GPU, driver or Triton build can
still miscompile. Before the first NSA forward on a device, `kernels_ok(device, dtype)` runs the
kernels (compressed, selection, selected, window, gate-and-combine) on small random inputs against
the PyTorch branches (nsa.attention.ops), forward and gradients, and remembers the verdict for the
process. The layer falls back to PyTorch (with a warning) when it fails, so `model.nsa.impl: auto`
is never silently wrong. `decode_ok` does the same for the fused static-decode kernel (against
static_decode.attend_torch) before the first static cache uses it.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

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
    with torch.no_grad():  # decode's gated sum with the gate MLP's SiLU and last Linear inside
        hidden, w2, b2 = rnd(B, S, 24), rnd(3 * G * r, 24), rnd(3 * G * r)
        m_t = tk.gate_mlp_combine(hidden, w2, b2, o_t, s_t, w_t)
        gates = torch.sigmoid(F.linear(F.silu(hidden), w2, b2).float()).view(B, S, G * r, 3).transpose(1, 2)
        m_r = sum(gates[..., i:i + 1] * o.float() for i, o in enumerate((o_t, s_t, w_t)))
        checks.append(("gate MLP and combine (decode)", m_t, m_r.transpose(1, 2).reshape(B, S, G * r * D)))
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


def _decode_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """The fused decode kernel (triton/decode.py) against the PyTorch static step on random caches, and
    the dense baseline's decode (dense_decode) against softmax over the keys 0..t."""
    from nsa.attention.layer import NSAttention
    from nsa.attention.static_decode import DecodePosition, StaticNSACache, attend_torch
    from nsa.attention.triton.decode import dense_decode, static_decode
    from nsa.config import ModelConfig

    g = torch.Generator().manual_seed(0)
    B, G, r, D, l, d, lp, n, w, capacity, t = 2, 2, 3, 64, 16, 8, 32, 4, 40, 300, 250
    cfg = ModelConfig.from_dict({"dim": 16, "n_heads": G * r, "n_kv_heads": G, "head_dim": D, "nsa": {
        "cmp_block": l, "cmp_stride": d, "slc_block": lp, "n_selected": n, "window": w, "impl": "torch"}})
    cache = StaticNSACache(NSAttention(cfg), B, capacity, DecodePosition(device, capacity), device, dtype)
    for buf in (cache.slc_k, cache.slc_v, cache.cmp_k, cache.cmp_v, cache.win_k, cache.win_v):
        buf.copy_(torch.randn(buf.shape, generator=g))
    kept = torch.arange(t - w + 1, t + 1, device=device)
    cache.win_pos[kept % w] = kept
    q = torch.randn(B, G * r, 1, D, generator=g).to(device=device, dtype=dtype)
    t_dev = torch.tensor(t, device=device)
    c = cache
    *want, want_idx = attend_torch(q, cache, t_dev, n, (True, True, True))
    for splits in (1, 3):  # the compressed scan in the one kernel, and split over programs
        *got, idx = static_decode(q, c.cmp_k, c.cmp_v, c.slc_k, c.slc_v, c.win_k, c.win_v, c.win_pos,
                                  t_dev.view(1), l, d, lp, n, True, True, True, splits)
        for name, a, b in zip(("compressed", "selected", "window"), got, want):
            if not torch.isfinite(a.float()).all() or rel_error(a, b) > TOL[dtype]:
                return (f"fused decode ({splits} split) {name} output differs from the PyTorch step "
                        f"(relative error {rel_error(a, b):.2e})")
        if dtype == torch.float32 and not torch.equal(idx.long(), want_idx):
            return f"fused decode ({splits} split) block selection differs from the PyTorch step"
        # the dense baseline's step (dense_decode: every cached token its own block) against softmax over 0..t
        dense = dense_decode(q, c.slc_k, c.slc_v, t_dev.view(1), splits)
        dense_want = _dense_reference(q, c.slc_k, c.slc_v, t)
        if not torch.isfinite(dense.float()).all() or rel_error(dense, dense_want) > TOL[dtype]:
            return (f"dense decode ({splits} split) differs from softmax over the keys 0..t "
                    f"(relative error {rel_error(dense, dense_want):.2e})")
    problem = _write_problem(cache, t, torch.Generator().manual_seed(1))
    return None if problem is None else f"the fused decode's cache write: {problem}"


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: int) -> torch.Tensor:
    """Full attention of q [B, H, 1, D] over the keys 0..t of k/v [B, G, capacity, D] (GQA), fp32."""
    r = q.shape[1] // k.shape[1]
    kt, vt = (x[:, :, : t + 1].float().repeat_interleave(r, dim=1) for x in (k, v))
    return torch.softmax(q.float() @ kt.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ vt


def _write_problem(cache, t: int, g: torch.Generator, r: int = 3) -> str | None:
    """static_write (RoPE on q's r heads per group and two keys, six buffer writes) against the PyTorch
    rotation and indexed copies; the unrotated copies must be exact."""
    from nsa.attention.rope import RotaryEmbedding

    c = cache
    B, G, _, D = c.slc_k.shape
    device, dtype = c.slc_k.device, c.slc_k.dtype
    rope = RotaryEmbedding(D).to(device)
    q = torch.randn(B, r * G, 1, D, generator=g).to(device=device, dtype=dtype)
    news = [torch.randn(B, G, 1, D, generator=g).to(device=device, dtype=dtype) for _ in range(6)]
    bufs = (c.slc_k, c.slc_v, c.win_k, c.win_v, c.raw_k, c.raw_v)
    want = [buf.clone() for buf in bufs]
    cos, sin = rope.tables(c.capacity, device, torch.float32)
    pos = torch.tensor([t], device=device)
    rotated = (0, 2)  # the selection and window keys
    for i, (old, slot, new) in enumerate(zip(want, (t, t, t % c.window, t % c.window, t % c.cmp_block,
                                                    t % c.cmp_block), news)):
        old[:, :, slot] = (rope.rotate(new, pos, cos, sin) if i in rotated else new)[:, :, 0]
    q_rot = cache.write(pos.view(()), q, news[0:2], news[2:4], news[4:6], rope)
    if rel_error(q_rot, rope.rotate(q, pos, cos, sin)) > TOL[dtype]:
        return "the rotated queries differ from the PyTorch rotation"
    for i, (buf, old) in enumerate(zip(bufs, want)):
        if not (rel_error(buf, old) <= TOL[dtype] if i in rotated else torch.equal(buf, old)):
            return "a buffer differs from an indexed copy"
    if int(c.win_pos[t % c.window]) != t:
        return "the window position was not recorded"
    return None


def _verdict(key: tuple, what: str, problem, device: torch.device, dtype: torch.dtype) -> bool:
    """Run `problem` once per key (any exception is a failure), warn on a failure, remember it."""
    if key not in _VERDICTS:
        _VERDICTS[key] = "re-entered its own self-check"  # a check that reaches itself uses PyTorch
        try:
            _VERDICTS[key] = problem(device, dtype)
        except Exception as e:  # noqa: BLE001 - any failure (compile, launch) means "don't use them"
            _VERDICTS[key] = f"{type(e).__name__}: {e}"
        if _VERDICTS[key]:
            print(f"[nsa] WARNING: {what} failed {'its' if what.endswith('kernel') else 'their'} self-check on "
                  f"{device} {dtype}: {_VERDICTS[key][:300]}. Using the PyTorch path (slower, correct).",
                  file=sys.stderr, flush=True)
    return _VERDICTS[key] is None


def kernels_ok(device: torch.device, dtype: torch.dtype) -> bool:
    def problem(device, dtype):
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            return _problem(device, dtype)

    return _verdict((device.type, device.index, dtype), "Triton NSA kernels", problem, device, dtype)


def decode_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Separate from kernels_ok: a failing decode kernel only sends static decode to PyTorch ops."""
    def problem(device, dtype):
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return _decode_problem(device, dtype)

    return _verdict(("decode", device.type, device.index, dtype), "the fused NSA decode kernel", problem,
                    device, dtype)
