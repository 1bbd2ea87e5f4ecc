"""Attention speed and memory: NSA (ours) vs full causal SDPA (FlashAttention) vs fla-core's
`parallel_nsa`, forward and forward+backward, for two head layouts and two scopes.

    python bench/bench_attention.py                       # CPU: m7c, 1k..16k; CUDA: both layouts, 4k..64k
    python bench/bench_attention.py --seq-lens 4096,16384 --json-only
    python bench/bench_attention.py --device cuda --layout paper --scope core --impls nsa,full,fla

Layouts (--layout m7c|paper|both; default m7c on CPU, both on CUDA):
  m7c    12 query heads, 2 KV heads, head dim 64 (dim 768), M7C's attention layer
  paper  64 query heads, 4 KV heads (16 per group), head dim 128 (dim 8192 for --scope layer),
         the layout of the NSA paper's kernel benchmark
Both use NSA l=32, d=16, l'=64, n=16, w=512.

Scopes (--scope layer|core|both; default: layer for m7c, core for paper):
  layer  the whole attention module, projections included: x [B,S,dim] -> [B,S,dim]
  core   attention only, from already-projected (random) q, k, v:
           nsa   the layer's `compress` (the learnable phi MLP, l=32 stride 16) + `branches`
                 (compressed, selection, selected, window) + the layer's gated sum (`mix`: on CUDA
                 one fused Triton kernel each way, as in the layer); no wq/wkv/wo/gate MLP.
                 NSA has separate keys/values per branch, so it gets 3 k/v pairs.
           full  F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
           fla   fla.ops.nsa.parallel_nsa(q, k, v, g_cmp, g_slc, g_swa, block_counts=n,
                 block_size=l', window_size=w) with one k/v shared by all branches
         Gates (nsa and fla): sigmoid of fixed random logits.

Impls (--impls; default nsa,full, plus fla when the `fla` package is importable, and on CPU only
under TRITON_INTERPRET=1). fla rows are "skipped" (with the reason) where fla cannot run: fla-core
not installed, --scope layer, or a layout whose query heads per KV head is not a power of two >= 16
(m7c has 6). fla's compression is mean pooling over non-overlapping blocks of l' tokens (ours: the
phi MLP over l=32 tokens at stride 16, overlap-mapped to l'=64 selection blocks); its window branch
needs flash_attn: without it fla runs with window_size=0 (row: "fla_window": false), so it does
less work than NSA. Each fla row carries these differences in "notes".

On CUDA the full baseline runs under sdpa_kernel(FLASH_ATTENTION) (row field "sdpa"); if flash
refuses enable_gqa the k/v heads are repeated instead (core) or the backend is left to PyTorch
(layer), and the row says so. NSA rows say which path ran ("nsa_path": triton | torch).

One JSON line per measurement: impl, layout, scope, seq_len, pass (fwd|fwd_bwd), ms (median),
peak_mem_mb (memory the pass needs above its inputs and weights, MiB), device, dtype, batch, dim,
n_heads, n_kv_heads, head_dim, nsa (block sizes), torch; "skipped": reason or "error": message
(CUDA out of memory is an error row, not a crash). Then, unless --json-only, one table per
(layout, scope) with speedups (other_ms / nsa_ms: > 1 means NSA is faster) and the checks of the
issue "GPU speed" (fwd+bwd at 64k >= 6x vs full, break-even <= 8k, no slower than fla).
--cuda-graph (CUDA) adds "graph_ms": the same pass captured as one CUDA graph and replayed, i.e. the
GPU's time without Python launching each kernel. Eager "ms" is what a training step pays; at short
sequences and batch 1 it is mostly launch cost (NSA launches several times more kernels than flash
attention), which "graph_ms" separates from the kernels' own speed. Both get a table and the checks.
Exit status 1 if any measurement failed with an error other than out-of-memory.

Peak memory: on CUDA from torch.cuda.max_memory_allocated; on CPU each measurement runs in a
fresh subprocess and reports the growth of the resident-set high-water mark (ru_maxrss) over
the baseline taken after setup, since PyTorch keeps no CPU allocator statistics.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings

from common import PeakMemory, device_name, nsa_env, profile_top, run_isolated, sync, tuned

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nsa.attention.layer import build_attention  # noqa: E402
from nsa.attention.rope import RotaryEmbedding  # noqa: E402
from nsa.config import ModelConfig  # noqa: E402

LAYOUTS = {
    "m7c": {"n_heads": 12, "n_kv_heads": 2, "head_dim": 64, "dim": 768},
    "paper": {"n_heads": 64, "n_kv_heads": 4, "head_dim": 128, "dim": 64 * 128},
}
DEFAULT_SCOPE = {"m7c": "layer", "paper": "core"}
IMPLS = ("nsa", "full", "fla")
TARGET_SPEEDUP_64K, TARGET_BREAK_EVEN = 6.0, 8192
FLA_NOTES = ("fla: compression = mean pooling over non-overlapping blocks of block_size (ours: phi MLP over "
             "l=32 at stride 16); one k/v shared by the compressed, selected and window branches (ours: one "
             "pair per branch); selection scores from its own compressed blocks (block_size = l')")


def model_config(attention: str, layout: str) -> ModelConfig:
    return ModelConfig.from_dict({"attention": attention, **LAYOUTS[layout]})


def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def fla_skip_reason(layout: str, scope: str) -> str | None:
    """Why fla's parallel_nsa cannot be measured here, or None."""
    if not fla_installed():
        return "fla-core is not installed (pip install fla-core; the `fla` package is not importable)"
    reasons = []
    if scope != "core":
        reasons.append("fla's parallel_nsa is measured at --scope core only (it has no projections)")
    hq, h = LAYOUTS[layout]["n_heads"], LAYOUTS[layout]["n_kv_heads"]
    g = hq // h
    if hq % h or g < 16 or g & (g - 1):
        reasons.append(f"fla's parallel_nsa needs query heads per KV head to be a power of two >= 16; "
                       f"layout {layout} has {hq}/{h} = {g}")
    return "; ".join(reasons) or None


@functools.lru_cache(maxsize=None)
def fla_import_error() -> str | None:
    """None when fla's parallel_nsa imports, else the error (fla-core can lag torch/triton/transformers)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Flash Attention is not installed" ImportWarning
            from fla.ops.nsa import parallel_nsa  # noqa: F401
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def sdpa_setup(device: str, dtype: torch.dtype, hq: int, h: int, d: int, backend: str):
    """(context factory, enable_gqa works under it, label) for the dense baseline."""
    if device != "cuda" or backend == "auto":
        return contextlib.nullcontext, True, "auto, enable_gqa"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flash = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731
    q = torch.randn(1, hq, 128, d, device=device, dtype=dtype)
    k = torch.randn(1, h, 128, d, device=device, dtype=dtype)
    try:
        with flash():
            F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        return flash, True, "flash, enable_gqa"
    except RuntimeError:
        pass
    try:
        with flash():
            kr = k.repeat_interleave(hq // h, dim=1)
            F.scaled_dot_product_attention(q, kr, kr, is_causal=True)
        return flash, False, "flash, k/v heads repeated (flash refused enable_gqa)"
    except RuntimeError:
        return contextlib.nullcontext, True, "auto (flash backend unavailable for this dtype/device), enable_gqa"


def random_gate_logits(batch: int, seq_len: int, heads: int, device: str) -> torch.Tensor:
    """[B, S, HQ, 3] fixed random gate logits for (cmp, slc, win); the gates are their sigmoids."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, seq_len, heads, 3, generator=g).to(device)


def setup(impl: str, layout: str, scope: str, seq_len: int, pass_: str, device: str, dt: torch.dtype,
          batch: int, sdpa: str):
    """Inputs and weights for one measurement: (forward, SDPA context factory, parameters, inputs,
    output shape, extra row fields)."""
    cfg = model_config("full" if impl == "full" else "nsa", layout)
    n = cfg.nsa
    B, S, HQ, H, D = batch, seq_len, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    grad_on = pass_ == "fwd_bwd"
    extra: dict = {}

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dt, requires_grad=grad_on)

    if scope == "layer":
        layer = build_attention(cfg).to(device=device, dtype=dt)
        rope = RotaryEmbedding(cfg.head_dim)
        x = rnd(B, S, cfg.dim)
        ctx = contextlib.nullcontext
        if impl == "nsa":
            extra["nsa_path"] = "triton" if layer.kernels(torch.empty(0, device=device, dtype=dt)) is not None else "torch"
        else:
            ctx, gqa, label = sdpa_setup(device, dt, HQ, H, D, sdpa)
            if not gqa:  # the layer always passes enable_gqa=True: leave the backend to PyTorch
                ctx, label = contextlib.nullcontext, "auto (flash refused enable_gqa)"
            extra["sdpa"] = label
        params, inputs, out_shape = list(layer.parameters()), [x], (B, S, cfg.dim)
        forward = lambda: layer(x, rope)  # noqa: E731
    else:
        logits = random_gate_logits(B, S, HQ, device)
        if impl == "nsa":
            # only compress_k/v (phi) are used: a small dim keeps the unused wq/wkv/wo/gate MLP small
            small = ModelConfig.from_dict({"attention": "nsa", **LAYOUTS[layout], "dim": 64})
            layer = build_attention(small).to(device=device, dtype=dt)
            rope = RotaryEmbedding(cfg.head_dim)
            q = rnd(B, S, HQ, D)
            kv = [rnd(B, S, H, D) for _ in range(6)]  # raw cmp k/v, slc k/v, win k/v: [B, S, G, D]
            logits = logits.to(dt).view(B, S, 3 * HQ)  # logits[..., 3h + c], as the layer's gate MLP gives them
            extra["nsa_path"] = "triton" if layer.kernels(torch.empty(0, device=device, dtype=dt)) is not None else "torch"

            def forward():
                qt = q.transpose(1, 2)  # [B, HQ, S, D], the layer's layout
                kc, vc, ks, vs, kw, vw = (t.transpose(1, 2) for t in kv)
                cmp_kv = layer.compress(kc, vc, rope)
                outs, _ = layer.branches(qt, cmp_kv, (ks, vs), (kw, vw))
                return layer.mix(logits, outs)  # the layer's gated sum: one fused kernel each way on CUDA

            params, inputs = [p for m in (layer.compress_k, layer.compress_v) for p in m.parameters()], [q, *kv]
            ctx, out_shape = contextlib.nullcontext, (B, S, HQ * D)
        elif impl == "full":
            q, k, v = rnd(B, S, HQ, D), rnd(B, S, H, D), rnd(B, S, H, D)
            ctx, gqa, label = sdpa_setup(device, dt, HQ, H, D, sdpa)
            extra["sdpa"] = label

            def forward():
                qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                if not gqa:
                    kt, vt = kt.repeat_interleave(HQ // H, dim=1), vt.repeat_interleave(HQ // H, dim=1)
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)

            params, inputs, out_shape = [], [q, k, v], (B, HQ, S, D)
        else:  # fla
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Flash Attention is not installed" ImportWarning
                from fla.ops.nsa import parallel_nsa
            import fla

            window = n.window if flash_attn_installed() else 0
            q, k, v = rnd(B, S, HQ, D), rnd(B, S, H, D), rnd(B, S, H, D)
            g_cmp, g_slc, g_swa = (torch.sigmoid(logits[..., i]).to(dt).contiguous() for i in range(3))
            extra.update({
                "fla": getattr(fla, "__version__", "?"), "fla_window": window > 0,
                "notes": FLA_NOTES + ("" if window else "; window branch OFF: flash_attn is not installed, "
                                      "so fla ran with window_size=0 (less work than NSA)"),
            })

            def forward():
                return parallel_nsa(q, k, v, g_cmp, g_slc, g_swa, block_counts=n.n_selected,
                                    block_size=n.slc_block, window_size=window)

            params, inputs, out_shape = [], [q, k, v], (B, S, HQ, D)
            ctx = contextlib.nullcontext
    return forward, ctx, params, inputs, out_shape, extra


def graph_ms(run, repeats: int) -> float:
    """Median milliseconds per replay of `run` captured as one CUDA graph: the GPU's time for the pass
    without Python issuing its kernels (what a launch-bound short sequence would cost with CUDA graphs,
    and the kernel-only time the NSA paper compares). Warm-up (compiles, tuning) happened before."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture needs a warm-up on a side stream
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def measure(impl: str, layout: str, scope: str, seq_len: int, pass_: str, device: str, dtype: str, batch: int,
            repeats: int, sdpa: str = "flash", profile: int = 0, cuda_graph: bool = False) -> dict:
    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    forward, ctx, params, inputs, out_shape, extra = setup(impl, layout, scope, seq_len, pass_, device, dt, batch, sdpa)
    grad = torch.randn(out_shape, device=device, dtype=dt) if pass_ == "fwd_bwd" else None  # upstream gradient

    def run():
        with ctx():
            if pass_ == "fwd":
                with torch.no_grad():
                    forward()
            else:
                out = forward()
                assert out.shape == grad.shape, (out.shape, grad.shape)
                out.backward(grad)
                for t in (*inputs, *params):
                    t.grad = None

    times = []
    with PeakMemory(device) as mem:  # the warm-up counts too: on CPU, RSS after it is not a clean base
        run()  # warm-up (also builds RoPE tables and autotunes kernels)
        sync(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    if cuda_graph and device == "cuda":
        try:
            extra["graph_ms"] = round(graph_ms(run, repeats), 3)
        except Exception as e:  # noqa: BLE001 - e.g. an op that cannot be captured: a field, not a lost row
            extra["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    if profile:  # after the timed runs, so the profiler's overhead is not in "ms"
        extra["profile"] = profile_top(run, device, profile)
    return {
        "impl": impl, "layout": layout, "scope": scope, "seq_len": seq_len, "pass": pass_,
        "ms": round(statistics.median(times), 3), "peak_mem_mb": round(mem.mib, 1),
        **base_fields(layout, device, dtype, batch), "tuned": tuned(), **extra,
    }


def base_fields(layout: str, device: str, dtype: str, batch: int) -> dict:
    cfg = model_config("nsa", layout)
    return {
        "device": device_name(device), "dtype": dtype, "batch": batch,
        "dim": cfg.dim, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "nsa": {k: getattr(cfg.nsa, k) for k in ("cmp_block", "cmp_stride", "slc_block", "n_selected", "window")},
        "torch": torch.__version__, "nsa_env": nsa_env(),
    }


def no_result(impl, layout, scope, seq, pass_, device, dtype, batch, **why) -> dict:
    return {"impl": impl, "layout": layout, "scope": scope, "seq_len": seq, "pass": pass_, "ms": None,
            "peak_mem_mb": None, **why, **base_fields(layout, device, dtype, batch)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-lens", default=None, help="comma-separated, e.g. 4096,16384")
    ap.add_argument("--layout", default=None, choices=("m7c", "paper", "both"),
                    help="head layout (default: m7c on CPU, both on CUDA)")
    ap.add_argument("--scope", default="auto", choices=("auto", "layer", "core", "both"),
                    help="auto: layer for m7c, core for paper")
    ap.add_argument("--impls", default=None, help="comma list of nsa,full,fla (default: nsa,full [+fla if installed])")
    ap.add_argument("--passes", default="fwd,fwd_bwd")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--sdpa", default="flash", choices=("flash", "auto"),
                    help="CUDA backend of the full baseline (default: flash; CPU always auto)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also run each measurement once under torch.profiler and add its N most expensive "
                         "kernels (CPU: operators), launch count and busy time to the row as \"profile\"")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="CUDA: also time each pass replayed as one CUDA graph (\"graph_ms\": GPU time without "
                         "Python's launch cost)")
    ap.add_argument("--json-only", action="store_true")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)  # internal: impl:seq:pass:layout:scope
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    repeats = args.repeats or (10 if cuda else 3)
    if args._one:
        impl, seq, pass_, layout, scope = args._one.split(":")
        print(json.dumps(measure(impl, layout, scope, int(seq), pass_, args.device, dtype, args.batch, repeats,
                                 args.sdpa, args.profile)), flush=True)
        return 0

    layouts = {"both": ["m7c", "paper"], None: ["m7c", "paper"] if cuda else ["m7c"]}.get(args.layout, [args.layout])
    if args.impls:
        impls = args.impls.split(",")
        bad = [i for i in impls if i not in IMPLS]
        if bad:
            ap.error(f"unknown impl(s) {bad}; choose from {IMPLS}")
    else:
        fla_ok = fla_installed() and (cuda or os.environ.get("TRITON_INTERPRET") == "1")
        impls = ["nsa", "full"] + (["fla"] if fla_ok else [])
    default = "4096,8192,16384,32768,65536" if cuda else "1024,2048,4096,8192,16384"
    seq_lens = [int(s) for s in (args.seq_lens or default).split(",")]
    rows, failed = [], 0
    for layout in layouts:
        scopes = {"auto": [DEFAULT_SCOPE[layout]], "both": ["layer", "core"]}.get(args.scope, [args.scope])
        for scope in scopes:
            for seq in seq_lens:
                for pass_ in args.passes.split(","):
                    for impl in impls:
                        row = one_row(impl, layout, scope, seq, pass_, args, dtype, repeats)
                        failed += "error" in row and row["error"] != "out of memory"
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    if not args.json_only:
        print_table(rows)
    if failed:
        print(f"{failed} measurement(s) failed; see the rows with \"error\"", file=sys.stderr)
    return 1 if failed else 0


def one_row(impl, layout, scope, seq, pass_, args, dtype, repeats) -> dict:
    cuda = args.device == "cuda"
    common = (impl, layout, scope, seq, pass_, args.device, dtype, args.batch)
    if impl == "fla":
        reason = fla_skip_reason(layout, scope)
        if not reason and cuda and fla_import_error():
            reason = f"fla-core is installed but `from fla.ops.nsa import parallel_nsa` failed: {fla_import_error()}"[:500]
        if reason:
            return no_result(*common, skipped=reason)
    if cuda:
        try:
            return measure(impl, layout, scope, seq, pass_, args.device, dtype, args.batch, repeats, args.sdpa,
                           args.profile, args.cuda_graph)
        except torch.OutOfMemoryError:
            return no_result(*common, error="out of memory")
        except Exception as e:  # keep measuring the rest; the traceback goes to stderr
            traceback.print_exc()
            return no_result(*common, error=f"{type(e).__name__}: {e}"[:500])
        finally:
            torch.cuda.empty_cache()
    # CPU: a fresh process per measurement so ru_maxrss is this measurement's peak
    try:
        return run_isolated(__file__, ["--device", "cpu", "--dtype", dtype, "--batch", str(args.batch),
                                       "--repeats", str(repeats), "--sdpa", args.sdpa,
                                       "--profile", str(args.profile),
                                       "--_one", f"{impl}:{seq}:{pass_}:{layout}:{scope}"])
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return no_result(*common, error=str(e).strip().splitlines()[-1][:500] if str(e).strip() else "failed")


def _fmt(x, spec: str, width: int) -> str:
    return f"{'-' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec):>{width}}"


def print_table(rows: list[dict]) -> None:
    """One block per (layout, scope): times, speedups (other_ms / nsa_ms, > 1: NSA faster), MiB, checks."""
    blocks: dict = {}
    for r in rows:
        blocks.setdefault((r["layout"], r["scope"]), []).append(r)
    for (layout, scope), rs in blocks.items():
        by = {(r["impl"], r["seq_len"], r["pass"]): r for r in rs}
        keys = list(dict.fromkeys((r["seq_len"], r["pass"]) for r in rs))
        L = LAYOUTS[layout]
        r0 = rs[0]
        print(f"\n== layout {layout} ({L['n_heads']} query heads, {L['n_kv_heads']} KV heads, head dim "
              f"{L['head_dim']}), scope {scope}; {r0['device']}, {r0['dtype']}, batch {r0['batch']} ==")
        print("speedup = other_ms / nsa_ms (> 1: NSA faster); '-' = not measured (skipped, error or OOM: see JSON)")
        print(f"{'seq_len':>8} {'pass':>8} {'nsa ms':>10} {'full ms':>10} {'fla ms':>10} {'full/nsa':>9} "
              f"{'fla/nsa':>8} {'nsa MiB':>8} {'full MiB':>9} {'fla MiB':>8}")

        def ms(impl, seq, pass_):
            return by.get((impl, seq, pass_), {}).get("ms")

        def mib(impl, seq, pass_):
            return by.get((impl, seq, pass_), {}).get("peak_mem_mb")

        def ratio(a, b):
            return a / b if a and b else None

        for seq, pass_ in keys:
            n, f, a = ms("nsa", seq, pass_), ms("full", seq, pass_), ms("fla", seq, pass_)
            print(f"{seq:>8} {pass_:>8} {_fmt(n, '.2f', 10)} {_fmt(f, '.2f', 10)} {_fmt(a, '.2f', 10)} "
                  f"{_fmt(ratio(f, n), '.2f', 9)} {_fmt(ratio(a, n), '.2f', 8)} {_fmt(mib('nsa', seq, pass_), '.0f', 8)} "
                  f"{_fmt(mib('full', seq, pass_), '.0f', 9)} {_fmt(mib('fla', seq, pass_), '.0f', 8)}")
        notes = list(dict.fromkeys(f"{r['impl']}: {kind}: {r[kind]}" for r in rs for kind in ("skipped", "error")
                                   if r.get(kind)))
        if any(r["impl"] == "fla" and r.get("fla_window") is False for r in rs):
            notes.append("fla: window branch OFF (flash_attn not installed): fla ran with window_size=0, less work than NSA")
        if any(r["impl"] == "fla" and r.get("ms") for r in rs):
            notes.append(FLA_NOTES)
        for label in dict.fromkeys(r.get("sdpa") for r in rs if r.get("sdpa")):
            notes.append(f"full: SDPA {label}")
        paths = sorted({r.get("nsa_path") for r in rs if r.get("nsa_path")})
        if paths:
            on_gpu = not r0["device"].startswith("cpu")
            notes.append(f"nsa: {'+'.join(paths)} path"
                         + (" (the PyTorch path ran, NOT the Triton kernels)" if on_gpu and "torch" in paths else ""))
        for note in notes:
            print(f"  * {note}")
        print_checks(by, sorted({s for s, _ in keys}), r0["device"])
        if any(r.get("graph_ms") for r in rs):
            print("CUDA graph replay (GPU time, no launch cost), ms:")
            print(f"{'seq_len':>8} {'pass':>8} {'nsa':>10} {'full':>10} {'full/nsa':>9}")
            for seq, pass_ in keys:
                n = by.get(("nsa", seq, pass_), {}).get("graph_ms")
                f = by.get(("full", seq, pass_), {}).get("graph_ms")
                print(f"{seq:>8} {pass_:>8} {_fmt(n, '.2f', 10)} {_fmt(f, '.2f', 10)} {_fmt(ratio(f, n), '.2f', 9)}")
            print_checks(by, sorted({s for s, _ in keys}), r0["device"], "graph_ms")


def print_checks(by: dict, seq_lens: list[int], device: str, field: str = "ms") -> None:
    """The issue's targets, from the fwd+bwd rows of one block (field "graph_ms": on the CUDA-graph times)."""
    def ms(impl, seq):
        return by.get((impl, seq, "fwd_bwd"), {}).get(field)

    both = [s for s in seq_lens if ms("nsa", s) and ms("full", s)]
    lines = []
    if both:
        top = 65536 if 65536 in both else max(both)
        sp = ms("full", top) / ms("nsa", top)
        verdict = ("met" if sp >= TARGET_SPEEDUP_64K else "NOT met") if top == 65536 else "target is at 65536"
        lines.append(f"fwd+bwd @{top}: full_ms / nsa_ms = {sp:.2f}x (NSA {'faster' if sp >= 1 else 'slower'}; "
                     f"target: NSA >= {TARGET_SPEEDUP_64K:.0f}x faster @65536): {verdict}")
        even = next((s for s in both if ms("nsa", s) <= ms("full", s)), None)
        if even is None:
            lines.append(f"break-even: NSA fwd+bwd slower than full at every measured seq_len {both} "
                         f"(target <= {TARGET_BREAK_EVEN}): NOT met")
        else:
            lines.append(f"break-even: first seq_len where NSA fwd+bwd <= full: {even} (target <= {TARGET_BREAK_EVEN}): "
                         f"{'met' if even <= TARGET_BREAK_EVEN else 'NOT met'}")
    fla = [s for s in seq_lens if ms("nsa", s) and ms("fla", s)]
    if fla:
        ratios = {s: ms("fla", s) / ms("nsa", s) for s in fla}
        lines.append("NSA vs fla fwd+bwd (fla_ms / nsa_ms, target >= 1.0x i.e. no slower): "
                     + ", ".join(f"{s}: {r:.2f}x" for s, r in ratios.items())
                     + f": {'met' if all(r >= 1.0 for r in ratios.values()) else 'NOT met'}")
    if lines:
        what = " on CUDA-graph replay times" if field == "graph_ms" else ""
        print(f"checks{what} (issue 'GPU speed'; targets are for an H100, this is {device}):")
        for line in lines:
            print(f"  {line}")


if __name__ == "__main__":
    sys.exit(main())
