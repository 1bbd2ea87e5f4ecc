"""The shipped trainer end to end: `python -m nsa.train` with a real config on synthetic tokens.

    python bench/bench_trainer.py --config configs/m7c_125m_80g.yaml --steps 30 --compile 0,1
    python bench/bench_trainer.py --config configs/smoke.yaml --device cpu --steps 6      # CPU check

bench_train.py times a bare loop (model, AdamW, bf16 autocast); this runs the real trainer (data
pipeline, gradient accumulation, clipping, logging, metrics) so that its tokens/s and MFU can be
compared with the bare loop, and so that `runtime.compile=true` is proven on the real code path
before the shipped configs turn it on. Each (attention, compile) pair is a fresh trainer process in
a temporary out_dir (deleted afterwards) with evaluation and checkpoints pushed past the last step.

One JSON line per run: bench="trainer", config, attention, compile, seq_len, global_batch_tokens,
steps, toks_per_s / mfu / step_ms (medians over the logged steps after the first `--skip-logs`, which
include compilation and warm-up), mem_gib (largest logged), wall_s (launch to exit: model build,
data, compile, steps), loss_first / loss_last (the first and last logged training loss: eager and
compiled runs train on the same tokens, so they should agree to bf16 noise), rc, device, and "error" (the trainer's last output lines) when it failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, device_name, nsa_env

import torch  # noqa: E402

from nsa.model import LOSS_PATHS, loss_path  # noqa: E402


def run_trainer(config: str, attention: str, compile_: bool, device: str, steps: int, batch_tokens: int | None,
                seq_len: int | None, skip_logs: int, timeout: int, loss: str | None = None) -> dict:
    out_dir = tempfile.mkdtemp(prefix="bench_trainer_")
    overrides = [f"model.attention={attention}", f"runtime.compile={'true' if compile_ else 'false'}",
                 f"runtime.device={device}", "train.log_every=1", f"train.eval_every={steps * 100}",
                 f"train.save_every={steps * 100}"]
    if batch_tokens:
        overrides.append(f"train.global_batch_tokens={batch_tokens}")
    if seq_len:
        overrides += [f"train.seq_len={seq_len}", f"model.max_seq_len={seq_len}"]
    cmd = [sys.executable, "-m", "nsa.train", "--config", config, "--dataset", "synthetic", "--steps", str(steps),
           "--out-dir", out_dir, "--resume", "none", *overrides]
    row = {"bench": "trainer", "config": os.path.relpath(config, ROOT) if os.path.isabs(config) else config,
           "attention": attention, "compile": compile_, "steps": steps, "device": device_name(device),
           "torch": torch.__version__, "nsa_env": nsa_env()}
    env = dict(os.environ)
    if loss:  # how the model computes the cross-entropy (M7C.loss); recorded as the trainer resolves it
        env["NSA_LOSS"] = loss
        row["nsa_env"]["NSA_LOSS"] = loss
    row["loss"] = loss_path(torch.device(device), env.get("NSA_LOSS"))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        row["rc"] = proc.returncode
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
    except subprocess.TimeoutExpired as e:
        row["rc"] = "timeout"
        tail = [f"timed out after {timeout}s", *((e.stderr or b"").decode(errors="replace").splitlines()[-6:])]
    row["wall_s"] = round(time.time() - t0, 1)
    try:
        with open(os.path.join(out_dir, "training.csv")) as f:
            logs = list(csv.DictReader(f))
        with open(os.path.join(out_dir, "metrics.json")) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError):
        logs, info = [], {}
    try:  # what the trainer's kernel tuning chose (nsa/attention/triton/tune.py)
        with open(os.path.join(out_dir, "kernel_tuning.json")) as f:
            row["tuned"] = {k: v["choice"] for k, v in json.load(f)["choices"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        row["tuned"] = {}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    cfg = info.get("config", {}) if isinstance(info, dict) else {}
    row["seq_len"] = cfg.get("train", {}).get("seq_len", seq_len)
    row["global_batch_tokens"] = info.get("tokens_per_step") if isinstance(info, dict) else None
    timed = logs[skip_logs:] or logs
    for col, key in (("toks_per_s", "toks_per_s"), ("mfu", "mfu"), ("step_ms", "step_ms")):
        vals = [float(r[col]) for r in timed if r.get(col) not in (None, "")]
        row[key] = round(statistics.median(vals), 4 if key == "mfu" else 1) if vals else None
    # the loss curve's ends: eager and compiled runs see the same tokens from the same seed, so these
    # should agree to bf16 noise (a check of the compiled numerics, not only of its speed)
    losses = [float(r["loss"]) for r in logs if r.get("loss") not in (None, "")]
    row["loss_first"], row["loss_last"] = (round(losses[0], 4), round(losses[-1], 4)) if losses else (None, None)
    mems = [float(r["mem_GiB"]) for r in logs if r.get("mem_GiB") not in (None, "")]
    row["mem_gib"] = max(mems) if mems else None
    row["logged_steps"] = len(logs)
    if row["rc"] != 0 or not logs:
        row["error"] = " | ".join(tail)[-600:]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/m7c_125m_80g.yaml")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attention", default="nsa,full")
    ap.add_argument("--compile", default="0,1", help="comma list of 0/1")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="train.global_batch_tokens (default: the config's; 65536 keeps GPU steps short)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--skip-logs", type=int, default=3, help="logged steps left out of the medians (warm-up)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per trainer run")
    ap.add_argument("--loss", default=None,
                    help=f"comma list of NSA_LOSS values ({', '.join(LOSS_PATHS)}; default: the environment's)")
    args = ap.parse_args()
    losses = args.loss.split(",") if args.loss else [None]
    for loss in losses:
        if loss is not None and loss not in LOSS_PATHS:
            ap.error(f"--loss {loss!r}: expected a comma list of {', '.join(LOSS_PATHS)}")
    failed = False
    for comp in args.compile.split(","):
        for loss in losses:
            for attention in args.attention.split(","):
                row = run_trainer(args.config, attention, comp == "1", args.device, args.steps, args.batch_tokens,
                                  args.seq_len, args.skip_logs, args.timeout, loss)
                failed |= "error" in row
                print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
