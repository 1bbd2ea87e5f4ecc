"""Host (CPU-side) cost of one attention layer: the Python and PyTorch-dispatch time per call with
every Triton kernel launch stubbed out, and how many kernels a call launches.

    python bench/bench_host.py                 # NSA (Triton path) vs full attention, tiny shapes
    python bench/bench_host.py --json-only

Why: below ~16k tokens at batch 1, and in decode, an NSA layer on a GPU is launch-bound: the GPU
finishes its kernels faster than Python issues them (BENCHMARKS.md: 2.2 ms of GPU work in a 12 ms
forward+backward at 4k), so these microseconds, not the kernels, set the wall time. The kernels run
through the Triton interpreter with their launches replaced by no-ops (TRITON_INTERPRET=1 is set
here; no GPU needed), on tiny shapes where PyTorch's own ops cost little more than their dispatch;
what remains is our wrappers, autograd, and the launches' count. The RoPE kernel is used as on CUDA.
Per pass (fwd, fwd_bwd, decode, decode_static: the static-cache step a CUDA graph replays, whose op
count is the graph's kernel count; the common step, without a compressed token to compute: d - 1 in
d): CPU microseconds per call (the lowest of --repeats batch means), the number of PyTorch ops that
launch a kernel (views excluded) and the number of Triton launches. One JSON line each,
then a table. Run it before and after a change to the layer's host code; the numbers are CPU times
and move with the machine, so compare within one run.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (no GPU needed: the launches are stubbed)

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from common import device_name  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

VIEW_OPS = {"view", "_unsafe_view", "transpose", "permute", "unbind", "select", "slice", "expand", "as_strided", "t",
            "unsqueeze", "squeeze", "reshape", "alias", "detach", "unfold", "split", "split_with_sizes", "empty",
            "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "chunk", "flatten",
            "diagonal", "_reshape_alias", "is_same_size", "_has_compatible_shallow_copy_type"}


class LaunchCounter(TorchDispatchMode):
    """Counts the PyTorch ops that launch a kernel (views and allocations excluded)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEW_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def stub_triton_launches(counter: collections.Counter):
    """Replace every interpreted kernel launch by a no-op that counts it."""
    from triton.runtime.interpreter import InterpretedFunction

    def run(self, *args, **kwargs):
        counter[self.fn.__name__] += 1

    InterpretedFunction.run = run


def rope_as_on_cuda():
    """RotaryEmbedding takes its Triton kernel only on CUDA tensors; take it here too."""
    from nsa.attention import rope as rope_mod
    from nsa.attention.triton.rope import apply_rope

    def forward(self, x, positions, bound):
        cos, sin = self.tables(bound, x.device, torch.float32)
        return apply_rope(x, positions, cos, sin) if x.dim() == 4 else self.rotate(x, positions, cos, sin)

    rope_mod.RotaryEmbedding.forward = forward


def tiny_config(attention: str):
    from nsa.config import ModelConfig

    return ModelConfig.from_dict(dict(
        vocab_size=64, dim=96, n_layers=1, n_heads=6, n_kv_heads=1, head_dim=16, attention=attention,
        nsa=dict(cmp_block=8, cmp_stride=4, slc_block=16, n_selected=3, window=16, impl="triton")))


def passes(attention: str, seq_len: int):
    """name -> fn for one layer at tiny dims (M7C's 6 query heads per KV head)."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_decode import filled_cache
    from nsa.attention.layer import build_attention
    from nsa.attention.rope import RotaryEmbedding

    torch.manual_seed(0)
    cfg = tiny_config(attention)
    layer, rope = build_attention(cfg), RotaryEmbedding(cfg.head_dim)
    x = torch.randn(1, seq_len, cfg.dim, requires_grad=True)
    token = torch.randn(1, 1, cfg.dim)
    cache = filled_cache(attention, cfg, seq_len, "cpu", torch.float32)

    def fwd():
        with torch.no_grad():
            layer(x, rope)

    def fwd_bwd():
        layer(x, rope).sum().backward()
        for p in (x, *layer.parameters()):  # as the trainer's zero_grad(set_to_none=True)
            p.grad = None

    def decode():
        layer.decode_step(token, rope, cache)

    # the static-cache step (static_decode.py), what a CUDA graph replays: its count is the graph's kernels
    static = filled_cache(attention, cfg, seq_len, "cpu", torch.float32, static=(layer, seq_len + 1))

    def decode_static():
        layer.decode_step(token, rope, static)  # the position stays: every call writes the same slots

    return {"fwd": fwd, "fwd_bwd": fwd_bwd, "decode": decode, "decode_static": decode_static}


def measure(fn, repeats: int, inner: int) -> float:
    """Microseconds of this thread's CPU time per call, the lowest batch mean: CPU time and the
    minimum ignore the time other processes take the core away (the number is our cost, not the
    machine's load)."""
    for _ in range(5):
        fn()
    batches = []
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(inner):
            fn()
        batches.append((time.thread_time() - t0) / inner * 1e6)
    return min(batches)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=50)
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # host cost of one issuing thread
    launches: collections.Counter = collections.Counter()
    from nsa.attention import triton as tk

    if not tk.available():
        print(json.dumps({"bench": "host", "error": "triton not importable"}))
        return 1
    stub_triton_launches(launches)
    rope_as_on_cuda()
    rows = []
    for attention in ("nsa", "full"):
        for name, fn in passes(attention, args.seq_len).items():
            us = measure(fn, args.repeats, args.inner)
            launches.clear()
            with LaunchCounter() as counter:
                fn()
            rows.append({"bench": "host", "attention": attention, "pass": name, "seq_len": args.seq_len,
                         "host_us": round(us, 1), "torch_ops": sum(counter.ops.values()),
                         "triton_launches": sum(launches.values()), "device": device_name("cpu"),
                         "torch": torch.__version__})
            print(json.dumps(rows[-1]), flush=True)
    if not args.json_only:
        print(f"\n{'pass':<13} {'nsa us':>9} {'full us':>9} {'nsa/full':>9} {'nsa ops+launches':>17} {'full ops+launches':>18}")
        by = {(r["attention"], r["pass"]): r for r in rows}
        for name in ("fwd", "fwd_bwd", "decode", "decode_static"):
            n, f = by[("nsa", name)], by[("full", name)]
            print(f"{name:<13} {n['host_us']:>9.0f} {f['host_us']:>9.0f} {n['host_us'] / f['host_us']:>9.2f} "
                  f"{n['torch_ops']:>10} + {n['triton_launches']:<5} {f['torch_ops']:>11} + {f['triton_launches']:<5}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
