#!/usr/bin/env python3
"""Verdict of the runner's smoke gate on a smoke run's output folder (stdlib only).

    smoke_check.py OUT_DIR [--straight CSV --resumed-from N]

Checks: training.csv exists with the contract header and finite losses on strictly increasing
steps (no duplicates after the resume); metrics.json says completed/early_stopped at the last logged
step; at least one checkpoint_step{N}.pt exists; with --resumed-from, training continued past N, and
the resumed losses are compared with the uninterrupted run's (--straight, a copy of its
training.csv): a difference is reported as a warning (GPU kernels are not bit-deterministic), not a
failure. Prints one summary line; exits 1 with every problem listed otherwise.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys

CONTRACT_HEADER = ["step", "loss", "lr", "toks_per_s"]


def read_losses(path: str) -> tuple[list[str], list[tuple[int, float]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return [], []
    header, out = rows[0], []
    for r in rows[1:]:
        if not r:
            continue
        out.append((int(float(r[0])), float(r[1])))
    return header, out


def check(out_dir: str, straight: str | None, resumed_from: int | None) -> tuple[list[str], list[str], str]:
    problems: list[str] = []
    warnings: list[str] = []
    csv_path = os.path.join(out_dir, "training.csv")
    if not os.path.isfile(csv_path):
        return [f"{csv_path} was not written (the trainer logged nothing)"], warnings, ""
    try:
        header, rows = read_losses(csv_path)
    except (ValueError, IndexError) as e:
        return [f"{csv_path} is malformed: {e}"], warnings, ""
    if header[:4] != CONTRACT_HEADER:
        problems.append(f"{csv_path} header is {','.join(header[:4])!r}, expected {','.join(CONTRACT_HEADER)!r}")
    if not rows:
        problems.append(f"{csv_path} has no rows")
        return problems, warnings, ""
    bad = [s for s, loss in rows if not math.isfinite(loss)]
    if bad:
        problems.append(f"non-finite loss at step(s) {bad[:5]} in {csv_path}")
    steps = [s for s, _ in rows]
    if any(b <= a for a, b in zip(steps, steps[1:])):
        dup = sorted({s for s in steps if steps.count(s) > 1})
        problems.append(f"steps in {csv_path} are not strictly increasing (duplicated: {dup[:5]}): resume rewrote history")
    last = steps[-1]

    mpath = os.path.join(out_dir, "metrics.json")
    if not os.path.isfile(mpath):
        problems.append(f"{mpath} was not written")
    else:
        try:
            with open(mpath) as f:
                m = json.load(f)
            if m.get("status") not in ("completed", "early_stopped"):
                problems.append(f"metrics.json status is {m.get('status')!r}, expected 'completed'")
            if isinstance(m.get("step"), int) and m["step"] < last:
                problems.append(f"metrics.json step {m['step']} is behind the last logged step {last}")
        except (OSError, ValueError) as e:
            problems.append(f"{mpath} is not valid JSON: {e}")

    ckpts = glob.glob(os.path.join(out_dir, "checkpoint_step*.pt"))
    if not ckpts:
        problems.append(f"no checkpoint_step*.pt in {out_dir}")
    if not os.path.isdir(os.path.join(out_dir, "tb")):
        warnings.append(f"no TensorBoard folder {os.path.join(out_dir, 'tb')}")

    resume_note = ""
    if resumed_from is not None:
        if last <= resumed_from:
            problems.append(f"training did not continue after resuming from step {resumed_from} (last step {last})")
        if straight and os.path.isfile(straight):
            _, ref = read_losses(straight)
            ref_d = dict(ref)
            diffs = [abs(loss - ref_d[s]) for s, loss in rows if s > resumed_from and s in ref_d]
            if diffs and all(math.isfinite(d) for d in diffs):
                worst = max(diffs)
                resume_note = f", resumed losses vs uninterrupted run: max |diff| {worst:.2e}"
                if worst > 1e-3 * max(1.0, abs(rows[-1][1])):
                    warnings.append(
                        f"resumed losses differ from the uninterrupted run by up to {worst:.3g} "
                        "(expected ~0 on CPU; small differences are normal with non-deterministic GPU kernels)"
                    )
        resume_note = f", resumed from checkpoint step {resumed_from} to {last}" + resume_note
    summary = (
        f"smoke check OK: {len(rows)} logged steps up to {last}, loss {rows[0][1]:.4g} -> {rows[-1][1]:.4g} "
        f"(all finite), {len(ckpts)} checkpoint(s){resume_note}"
    )
    return problems, warnings, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--straight", help="training.csv of the uninterrupted smoke run")
    ap.add_argument("--resumed-from", type=int, help="checkpoint step the second leg resumed from")
    a = ap.parse_args(argv)
    problems, warnings, summary = check(a.out_dir, a.straight, a.resumed_from)
    for w in warnings:
        print(f"smoke check WARNING: {w}")
    if problems:
        for p in problems:
            print(f"smoke check FAILED: {p}")
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
