"""M7C training throughput on one device: NSA vs the same model with `attention: full`.

    python bench/bench_train.py                              # CUDA: seq 4096,16384; compile off,on
    python bench/bench_train.py --seq-lens 512 --compile 0   # CPU smoke of the benchmark itself

Each measurement: a few warm-up optimizer steps, then timed steps of AdamW (fused on CUDA) with
bf16 autocast on CUDA (fp32 on CPU), micro-batch `--batch`. One JSON line per measurement with
attention, seq_len, compile, tokens_per_s, mfu (model FLOPs per token x tokens/s / bf16 peak;
null where the peak is unknown, e.g. CPU), peak_mem_gb, device, loss (how the cross-entropy was computed:
"chunked" or "full", see M7C.loss; `--loss chunked,full` measures both); then a table with NSA/full ratios.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
import traceback

from common import PeakMemory, device_name, nsa_env, profile_top, run_isolated, sync, tuned

import torch  # noqa: E402

from nsa.hardware import peak_tflops  # noqa: E402
from nsa.model import HAS_CHUNKED_LOSS, LOSS_PATHS, build_model, compile_model, loss_path  # noqa: E402


def measure(attention: str, seq_len: int, compile_: bool, device: str, batch: int, steps: int, warmup: int,
            profile: int = 0, loss: str | None = None) -> dict:
    if loss:  # else the environment's NSA_LOSS
        os.environ["NSA_LOSS"] = loss
    torch.manual_seed(0)
    model = build_model({"attention": attention, "max_seq_len": seq_len}).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    step_model = compile_model(model) if compile_ else model
    x = torch.randint(0, model.cfg.vocab_size, (batch, seq_len + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            step_model(inputs, targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with PeakMemory(device) as mem:
        for _ in range(warmup):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        elapsed = time.perf_counter() - t0
    tokens_per_s = batch * seq_len * steps / elapsed
    peak = peak_tflops(torch.device(device))
    mfu = model.flops_per_token(seq_len) * tokens_per_s / (peak * 1e12) if peak else None
    extra = {"profile": profile_top(step, device, profile)} if profile else {}
    return {
        "attention": attention, "seq_len": seq_len, "compile": compile_, "batch": batch,
        "loss": loss_path(torch.device(device)),
        "tokens_per_s": round(tokens_per_s, 1), "mfu": round(mfu, 4) if mfu is not None else None,
        "peak_mem_gb": round(mem.mib / 1024, 3), "step_ms": round(elapsed / steps * 1e3, 1),
        "num_params": model.num_params(), "device": device_name(device),
        "dtype": "bf16" if device == "cuda" else "fp32", "torch": torch.__version__, "nsa_env": nsa_env(), "tuned": tuned(), **extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-lens", default=None)
    ap.add_argument("--attention", default="nsa,full")
    ap.add_argument("--compile", default=None, help="comma list of 0/1 (default: 0,1 on CUDA, 0 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default: --batch-tokens / seq_len)")
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="tokens per step, e.g. 32768 = 8 x 4096 = 2 x 16384 (default: batch 1)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--loss", default=None,
                    help=f"comma list of NSA_LOSS values ({', '.join(LOSS_PATHS)}; default: the environment's)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile one step after the timed ones and add its N most expensive kernels "
                         "(CPU: operators) to the row as \"profile\"")
    ap.add_argument("--json-only", action="store_true")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    steps = args.steps or (20 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    def batch_for(seq: int) -> int:
        return args.batch or max(1, (args.batch_tokens or seq) // seq)

    losses = args.loss.split(",") if args.loss else [""]
    for loss in losses:
        if loss and loss not in LOSS_PATHS:
            ap.error(f"--loss {loss!r}: expected a comma list of {', '.join(LOSS_PATHS)}")
    if args._one:
        attention, seq, comp, loss = args._one.split(":")
        print(json.dumps(measure(attention, int(seq), comp == "1", args.device, batch_for(int(seq)), steps, warmup,
                                 args.profile, loss)))
        return

    def one_row(attention: str, seq: int, comp: str, loss: str) -> dict:
        requested = loss or os.environ.get("NSA_LOSS", LOSS_PATHS[0])
        base = {"attention": attention, "seq_len": seq, "compile": comp == "1", "batch": batch_for(seq), "loss": requested}
        if requested == "chunked" and not HAS_CHUNKED_LOSS:  # it would silently measure "full" again
            return {**base, "skipped": f"torch {torch.__version__} has no chunked F.linear_cross_entropy (2.13+)",
                    "device": device_name(args.device)}
        if not cuda:  # a fresh process per row, so that its peak memory is its own
            return run_isolated(__file__, ["--device", "cpu", "--batch", str(batch_for(seq)), "--steps", str(steps),
                                           "--warmup", str(warmup), "--profile", str(args.profile),
                                           "--_one", f"{attention}:{seq}:{comp}:{loss}"])
        try:
            return measure(attention, seq, comp == "1", "cuda", batch_for(seq), steps, warmup, args.profile, loss)
        except Exception as e:  # noqa: BLE001 - OOM or a failure of one variant is a row
            traceback.print_exc(limit=4)
            err = "out of memory" if isinstance(e, torch.OutOfMemoryError) else f"{type(e).__name__}: {e}"
            return {**base, "error": err[:300], "device": device_name("cuda")}
        finally:
            torch.cuda.empty_cache()

    rows = []
    seqs = [int(s) for s in (args.seq_lens or ("4096,16384" if cuda else "512")).split(",")]
    compiles = (args.compile or ("0,1" if cuda else "0")).split(",")
    for seq, comp, loss, attention in itertools.product(seqs, compiles, losses, args.attention.split(",")):
        rows.append(one_row(attention, seq, comp, loss))
        print(json.dumps(rows[-1]), flush=True)
    if not args.json_only:
        by = {(r["attention"], r["seq_len"], r["compile"], r["loss"]): r for r in rows}
        print(f"\n{'seq_len':>8} {'compile':>8} {'loss':>8} {'nsa tok/s':>10} {'full tok/s':>11} {'nsa/full':>9} {'nsa MFU':>8} {'full MFU':>9} {'nsa GB':>7} {'full GB':>8}")
        for (att, seq, comp, loss), r in by.items():
            f = by.get(("full", seq, comp, loss))
            if att != "nsa" or not f or {"error", "skipped"} & (set(r) | set(f)):
                continue
            fmt = lambda m: f"{m:.1%}" if m is not None else "n/a"  # noqa: E731
            print(f"{seq:>8} {str(comp):>8} {loss:>8} {r['tokens_per_s']:>10.0f} {f['tokens_per_s']:>11.0f} "
                  f"{r['tokens_per_s'] / f['tokens_per_s']:>9.2f} {fmt(r['mfu']):>8} {fmt(f['mfu']):>9} "
                  f"{r['peak_mem_gb']:>7.2f} {f['peak_mem_gb']:>8.2f}")


if __name__ == "__main__":
    main()
