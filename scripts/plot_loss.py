#!/usr/bin/env python3
"""Render the loss curve of a run to PNG (matplotlib, headless).

    python scripts/plot_loss.py OUT_DIR PNG_PATH

Reads OUT_DIR/training.csv (step,loss,lr,toks_per_s,...) and, when present, OUT_DIR/val.csv
(step,loss,ppl); plots training loss (and validation loss) against optimizer step, with the
learning rate on a second axis. Exits 1 with a clear line when there is nothing to plot.
"""

from __future__ import annotations

import csv
import math
import os
import sys


def _read(path: str, cols: tuple[str, ...]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {c: [] for c in cols}
    if not os.path.isfile(path):
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                vals = {c: float(row[c]) for c in cols}
            except (KeyError, TypeError, ValueError):
                continue
            for c in cols:
                out[c].append(vals[c])
    return out


def plot(out_dir: str, png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = _read(os.path.join(out_dir, "training.csv"), ("step", "loss", "lr"))
    if not tr["step"]:
        tr = _read(os.path.join(out_dir, "training.csv"), ("step", "loss"))
        tr["lr"] = []
    if not tr["step"]:
        raise SystemExit(f"plot_loss: no rows in {os.path.join(out_dir, 'training.csv')}: nothing to plot")
    va = _read(os.path.join(out_dir, "val.csv"), ("step", "loss"))
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    finite = [(s, l) for s, l in zip(tr["step"], tr["loss"]) if math.isfinite(l)]
    ax.plot([s for s, _ in finite], [l for _, l in finite], lw=1.2, label="train loss")
    if va["step"]:
        ax.plot(va["step"], va["loss"], "o-", ms=3, lw=1.2, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if tr["lr"]:
        ax2 = ax.twinx()
        (lr_line,) = ax2.plot(tr["step"], tr["lr"], color="gray", lw=0.8, alpha=0.6, label="learning rate")
        ax2.set_ylabel("learning rate")
        handles, labels = handles + [lr_line], labels + ["learning rate (right axis)"]
    ax.legend(handles, labels, loc="upper right")
    last = finite[-1] if finite else (tr["step"][-1], float("nan"))
    ax.set_title(f"{os.path.basename(os.path.abspath(out_dir))}: step {int(last[0])}, train loss {last[1]:.4f}")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    print(f"loss curve -> {plot(argv[0], argv[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
