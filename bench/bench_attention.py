"""One attention layer at M7C dims: NSA (ours) vs full causal SDPA, forward and forward+backward.

    python bench/bench_attention.py                       # CPU: 1k..16k; CUDA: 4k..64k
    python bench/bench_attention.py --seq-lens 4096,16384 --json-only

One JSON line per measurement: impl (nsa|full), seq_len, pass (fwd|fwd_bwd), ms (median),
peak_mem_mb (memory the pass needs above its inputs and weights, MiB), device, plus shapes.
Then a table with NSA/full ratios (unless --json-only).

Peak memory: on CUDA from torch.cuda.max_memory_allocated; on CPU each measurement runs in a
fresh subprocess and reports the growth of the resident-set high-water mark (ru_maxrss) over
the baseline taken after setup, since PyTorch keeps no CPU allocator statistics.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import PeakMemory, device_name, run_isolated, sync

import torch  # noqa: E402

from nsa.attention.layer import build_attention  # noqa: E402
from nsa.attention.rope import RotaryEmbedding  # noqa: E402
from nsa.config import ModelConfig  # noqa: E402


def measure(impl: str, seq_len: int, pass_: str, device: str, dtype: str, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"attention": impl})
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    layer = build_attention(cfg).to(device=device, dtype=dt)
    rope = RotaryEmbedding(cfg.head_dim)
    x = torch.randn(batch, seq_len, cfg.dim, device=device, dtype=dt, requires_grad=pass_ == "fwd_bwd")
    grad = torch.randn_like(x)

    def run():
        if pass_ == "fwd":
            with torch.no_grad():
                layer(x, rope)
        else:
            layer(x, rope).backward(grad)
            x.grad = None
            layer.zero_grad(set_to_none=True)

    times = []
    with PeakMemory(device) as mem:  # the warm-up counts too: on CPU, RSS after it is not a clean base
        run()  # warm-up (also builds RoPE tables and autotunes kernels)
        sync(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return {
        "impl": impl, "seq_len": seq_len, "pass": pass_, "ms": round(statistics.median(times), 3),
        "peak_mem_mb": round(mem.mib, 1), "device": device_name(device), "dtype": dtype, "batch": batch,
        "dim": cfg.dim, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "nsa": {k: getattr(cfg.nsa, k) for k in ("cmp_block", "cmp_stride", "slc_block", "n_selected", "window")},
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-lens", default=None, help="comma-separated, e.g. 4096,16384")
    ap.add_argument("--impls", default="nsa,full")
    ap.add_argument("--passes", default="fwd,fwd_bwd")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json-only", action="store_true")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    args = ap.parse_args()
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    repeats = args.repeats or (10 if args.device == "cuda" else 3)
    if args._one:
        impl, seq, pass_ = args._one.split(":")
        print(json.dumps(measure(impl, int(seq), pass_, args.device, dtype, args.batch, repeats)), flush=True)
        return
    default = "4096,8192,16384,32768,65536" if args.device == "cuda" else "1024,2048,4096,8192,16384"
    seq_lens = [int(s) for s in (args.seq_lens or default).split(",")]
    rows = []
    for seq in seq_lens:
        for pass_ in args.passes.split(","):
            for impl in args.impls.split(","):
                if args.device == "cuda":
                    try:
                        row = measure(impl, seq, pass_, args.device, dtype, args.batch, repeats)
                    except torch.OutOfMemoryError:
                        row = {"impl": impl, "seq_len": seq, "pass": pass_, "ms": None, "peak_mem_mb": None,
                               "device": device_name("cuda"), "error": "out of memory"}
                    torch.cuda.empty_cache()
                else:  # fresh process per measurement so ru_maxrss is this measurement's peak
                    row = run_isolated(__file__, ["--device", "cpu", "--dtype", dtype, "--batch", str(args.batch),
                                                  "--repeats", str(repeats), "--_one", f"{impl}:{seq}:{pass_}"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    if not args.json_only:
        print_table(rows)


def print_table(rows: list[dict]) -> None:
    by = {(r["impl"], r["seq_len"], r["pass"]): r for r in rows}
    print(f"\n{'seq_len':>8} {'pass':>8} {'nsa ms':>10} {'full ms':>10} {'nsa/full':>9} {'nsa MiB':>9} {'full MiB':>9}")
    for (impl, seq, pass_), r in by.items():
        if impl != "nsa":
            continue
        f = by.get(("full", seq, pass_), {})
        ratio = r["ms"] / f["ms"] if r.get("ms") and f.get("ms") else float("nan")
        print(f"{seq:>8} {pass_:>8} {r.get('ms') or float('nan'):>10.1f} {f.get('ms') or float('nan'):>10.1f} "
              f"{ratio:>9.2f} {r.get('peak_mem_mb') or float('nan'):>9.0f} {f.get('peak_mem_mb') or float('nan'):>9.0f}")


if __name__ == "__main__":
    main()
