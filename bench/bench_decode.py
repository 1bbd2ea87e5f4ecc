"""Per-step decode latency and tokens read: one attention layer at M7C dims, NSA vs full attention
with a KV cache, at several context lengths.

    python bench/bench_decode.py                          # CPU: 8k,16k,32k,64k, batch 1
    python bench/bench_decode.py --contexts 65536 --batches 1,32 --json-only

The caches are filled with random keys/values of the right shapes (decode cost depends only on
cache sizes, so no 64k prefill is needed). One JSON line per measurement: impl, context, batch,
ms_per_step (median), tokens_read (per sequence; NSA: compressed + selected blocks * l' + window;
full: all), paper_tokens (floor((S - l)/d) + n*l' + w), device. Then a table with ratios.
ms_mean beside the median: in NSA's static step 1 token in d also compresses a block. The table's
"best full/nsa" compares each NSA row with full attention's fastest step at that context and batch in
any mode run (e.g. the growing cache's unmasked SDPA against the static cache's masked one).

Batch matters for what the latency shows. At batch 1 one layer's step reads little (full attention
at 64k: 33 MB of bf16 K/V in M7C's layout, ~11 us of HBM time on an H100), so both are bound by
issuing their kernels and NSA, with more of them, cannot win on latency; reading 11x fewer tokens
pays off once the reads dominate, i.e. with many sequences decoding together (--batches 1,32).

Modes (--modes): "eager" uses the growing caches (nsa/attention/cache.py), one launch per kernel;
"graph" uses the static caches (nsa/attention/static_decode.py: buffers of context + steps tokens,
the position a device tensor) and replays the step as a CUDA graph (on CPU: the static step, eager),
so what remains is the GPU time of the kernels; on CUDA NSA's attention there is the fused decode
kernel (triton/decode.py) and full attention's its dense scan (dense_decode: keys 0..t, split over
programs); "graph_torch" is "graph" with PyTorch ops instead (NSA_DECODE=torch: NSA's attend_torch,
and for full attention SDPA over the whole buffer with a mask); "compiled" is "graph" with the step
through torch.compile first (Inductor fuses the remaining small kernels; a compile per shape, tens of
seconds on a GPU). Rows carry "mode". On CUDA each "compiled" measurement runs in a fresh process: a
failed graph capture leaves the process's CUDA RNG state unusable ("Offset increment outside graph
capture"), which would fail every later row too. A failed row's traceback goes to stderr.

Reads: a step reads every visible compressed block, i.e. blocks 0..floor((S - l)/d), one more than the
paper's floor((S - l)/d) (its Eq. 7 numbers the blocks from 1), so "nsa reads" = "paper" + 1 is
the formula; the table's last line checks that for every row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

from common import device_name, profile_top, run_isolated, sync

import torch  # noqa: E402

from nsa.attention.blocks import num_cmp_blocks  # noqa: E402
from nsa.attention.cache import KVCache, NSACache  # noqa: E402
from nsa.attention.static_decode import DecodePosition, GraphedStep, StaticKVCache, StaticNSACache  # noqa: E402
from nsa.attention.layer import build_attention  # noqa: E402
from nsa.attention.rope import RotaryEmbedding  # noqa: E402
from nsa.config import ModelConfig  # noqa: E402


def filled_cache(impl: str, cfg: ModelConfig, context: int, device, dtype, batch: int = 1, static=None):
    """A cache holding `context` tokens of random keys/values for `batch` sequences; static =
    (layer, capacity): the fixed-size cache of static_decode.py instead."""
    G, D, n = cfg.n_kv_heads, cfg.head_dim, cfg.nsa

    def rnd(length):
        return torch.randn(batch, G, length, D, device=device, dtype=dtype)

    if static is not None:
        layer, capacity = static
        kind = StaticKVCache if impl == "full" else StaticNSACache
        cache = kind(layer, batch, capacity, DecodePosition(device, capacity), device, dtype)
    elif impl == "full":
        cache = KVCache()
    else:
        cache = NSACache(n.window, n.cmp_block, n.cmp_stride, n.slc_block)
    if impl == "full":
        cache.fill(rnd(context), rnd(context))
        return cache
    n_cmp = num_cmp_blocks(context, n.cmp_block, n.cmp_stride)
    raw = rnd(context)
    cache.fill(raw, raw, (rnd(n_cmp), rnd(n_cmp)), (rnd(context), rnd(context)), (rnd(context), rnd(context)))
    return cache


PROFILE_STEPS = 10  # steps run under the profiler (--profile), after the timed ones


def measure(impl: str, context: int, device: str, dtype, steps: int, batch: int = 1, mode: str = "eager",
            profile: int = 0) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"attention": impl})
    layer = build_attention(cfg).to(device=device, dtype=dtype).eval()
    rope = RotaryEmbedding(cfg.head_dim)
    x = torch.randn(batch, 1, cfg.dim, device=device, dtype=dtype)
    # static caches: d + 1 warm-up steps, so that both step graphs (with and without a compressed
    # token to compute, static_decode.GraphedStep) are captured (and compiled) before the timing
    warm = 1 if mode == "eager" else cfg.nsa.cmp_stride + 1
    if mode in ("graph", "graph_torch", "compiled"):
        if mode == "graph_torch":
            os.environ["NSA_DECODE"] = "torch"  # read when the static cache is made
        try:
            extra = PROFILE_STEPS if profile else 0
            cache = filled_cache(impl, cfg, context, device, dtype, batch,
                                 static=(layer, context + warm + steps + extra))
        finally:
            os.environ.pop("NSA_DECODE", None)
        rope.reserve(cache.capacity, device, dtype)  # as model.new_static_caches does
        step = GraphedStep(lambda x_: layer.decode_step(x_, rope, cache), x, cache.position,
                           compile=mode == "compiled")
    else:
        cache = filled_cache(impl, cfg, context, device, dtype, batch)

        def step(x_):
            return layer.decode_step(x_, rope, cache)
    times = []
    for i in range(warm + steps):
        sync(device)
        t0 = time.perf_counter()
        step(x)
        sync(device)
        if i >= warm:
            times.append((time.perf_counter() - t0) * 1e3)
    n = cfg.nsa
    S = cache.length
    reads = cache.tokens_read["total"] if impl == "nsa" else cache.tokens_read
    # where a step's time goes: the kernels of PROFILE_STEPS more steps (graph replays included), per step
    prof = {}
    if profile:
        top = profile_top(lambda: [step(x) for _ in range(PROFILE_STEPS)], device, profile)
        prof = {"profile": {"busy_ms_per_step": round(top["busy_ms"] / PROFILE_STEPS, 4),
                            "launches_per_step": top["launches"] / PROFILE_STEPS,
                            "top": [{**t, "us_per_step": round(t["ms"] * 1e3 / PROFILE_STEPS, 2)}
                                    for t in top["top"]]}}
    return {
        "impl": impl, "mode": mode, "context": context, "batch": batch,
        "ms_per_step": round(statistics.median(times), 3),
        "ms_mean": round(statistics.mean(times), 3),  # 1 step in d also computes a compressed token
        "fused": getattr(cache, "fused", None) is not None,
        "tokens_read": reads,
        "paper_tokens": (S - n.cmp_block) // n.cmp_stride + n.n_selected * n.slc_block + n.window,
        "device": device_name(device),
        "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, **prof,
    }


def one_row(impl: str, context: int, batch: int, mode: str, args, dtype) -> dict:
    """One measurement as a row; a failure (out of memory at a big batch x context, a failed graph
    capture) is a row with "error", not a crash. "compiled" on CUDA runs in a fresh process (see above)."""
    failed = {"impl": impl, "mode": mode, "context": context, "batch": batch, "ms_per_step": None,
              "device": device_name(args.device)}
    if mode == "compiled" and args.device == "cuda":
        try:
            return run_isolated(__file__, ["--device", args.device, "--steps", str(args.steps),
                                           "--profile", str(args.profile), "--_one", f"{impl}:{context}:{batch}:{mode}"])
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return {**failed, "error": str(e).strip().splitlines()[-1][:300]}
    try:
        return measure(impl, context, args.device, dtype, args.steps, batch, mode, args.profile)
    except Exception as e:  # noqa: BLE001 - see the docstring
        traceback.print_exc()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        return {**failed, "error": f"{type(e).__name__}: {str(e)[:300]}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--contexts", default="8192,16384,32768,65536")
    ap.add_argument("--batches", default="1", help="comma-separated sequences decoding together, e.g. 1,32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", default="eager,graph", help="comma-separated: eager (growing caches), graph "
                    "(static caches, the step replayed as a CUDA graph), graph_torch (graph with NSA's attention "
                    "in PyTorch ops, not the fused kernel), compiled (graph after torch.compile)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="add each row's N costliest kernels per step (torch.profiler over 10 more steps)")
    ap.add_argument("--json-only", action="store_true")
    ap.add_argument("--_one", help=argparse.SUPPRESS)  # impl:context:batch:mode, one row (a fresh process)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args._one:
        impl, context, batch, mode = args._one.split(":")
        # uncaught: a failure exits non-zero with its traceback, which the parent shows
        print(json.dumps(measure(impl, int(context), args.device, dtype, args.steps, int(batch), mode, args.profile)))
        return
    rows = []
    for mode in args.modes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for context in (int(c) for c in args.contexts.split(",")):
                for impl in ("nsa", "full"):
                    row = one_row(impl, context, batch, mode, args, dtype)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if not args.json_only:
        by = {(r["impl"], r["mode"], r["context"], r["batch"]): r for r in rows}
        # full attention's fastest step at (context, batch) over every mode run: NSA against the best dense
        best_full = {}
        for r in rows:
            if r["impl"] == "full" and r["ms_per_step"] is not None:
                key = (r["context"], r["batch"])
                best_full[key] = min(best_full.get(key, float("inf")), r["ms_per_step"])
        print(f"\n{'mode':>11} {'batch':>5} {'context':>8} {'nsa ms':>8} {'full ms':>8} {'full/nsa':>9} "
              f"{'best full/nsa':>14} {'nsa reads':>10} {'paper':>8} {'full reads':>11} {'read ratio':>11}")
        for (impl, mode, ctx, batch), r in by.items():
            f = by.get(("full", mode, ctx, batch))
            if impl != "nsa" or f is None or r["ms_per_step"] is None or f["ms_per_step"] is None:
                continue
            print(f"{mode:>11} {batch:>5} {ctx:>8} {r['ms_per_step']:>8.2f} {f['ms_per_step']:>8.2f} "
                  f"{f['ms_per_step'] / r['ms_per_step']:>9.2f} {best_full[(ctx, batch)] / r['ms_per_step']:>14.2f} "
                  f"{r['tokens_read']:>10} {r['paper_tokens']:>8} "
                  f"{f['tokens_read']:>11} {f['tokens_read'] / r['tokens_read']:>11.1f}")
        nsa = [r for r in rows if r["impl"] == "nsa" and r.get("tokens_read") is not None]
        off = [r for r in nsa if r["tokens_read"] != r["paper_tokens"] + 1]
        print("check: NSA reads = floor((S - l)/d) + 1 + n*l' + w (\"paper\" + 1, blocks numbered from 0): "
              + (f"met in all {len(nsa)} rows" if not off else
                 "NOT met in " + ", ".join(f"{r['mode']} b{r['batch']} {r['context']}" for r in off)))


if __name__ == "__main__":
    main()
