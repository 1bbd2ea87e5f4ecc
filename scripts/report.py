#!/usr/bin/env python3
"""Run report: a one-page Markdown summary and three PNG charts for one training run.

    python scripts/report.py RUN_FOLDER_OR_OUT_DIR [--out DIR]

RUN_FOLDER is the runner's artifacts/train_runs/m7c_<stamp>/ (it holds run.info); the trainer's
out_dir is then the `out_dir:` line of run.info (relative to the repo root unless absolute; the
OUT_DIR environment variable overrides it, as in handoff.sh). Given the trainer's out_dir itself
(training.csv / metrics.json), there is no runner information (restarts, stalls, node wall time).

Writes into DIR (default: RUN_FOLDER/report, or <out_dir>/report without a run folder):
  report.md       status, config, hardware, progress, validation, throughput, time and cost, incidents
  loss.png        training loss (and validation loss) vs optimizer step
  val_loss.png    validation loss and perplexity vs step, best marked
  throughput.png  tokens/s (and MFU) vs step, skipped steps and restarts marked

Every number comes from the run's files (training.csv, val.csv, metrics.json, run.info, stalls/);
what a file does not hold is written as "n/a". Exit 0 on success; 2 with one line on stderr when
there is nothing to report (not a run folder or out_dir, training.csv missing or without rows).
Needs matplotlib (Agg backend); everything else is stdlib.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import re
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT_DIR = "artifacts/m7c_125m"  # handoff.sh's default when run.info names none
FIGSIZE, DPI = (10, 6), 100  # every PNG is 1000 x 600 pixels
PNGS = {"loss.png": "training loss and validation loss vs step",
        "val_loss.png": "validation loss and perplexity vs step, best marked",
        "throughput.png": "tokens/s and MFU vs step, skipped steps and restarts marked"}
NA = "n/a"
MAX_INCIDENT_ROWS = 20


class ReportError(Exception):
    """Nothing to report: one line for the user, exit 2."""


# ------------------------------------------------------------------------------------ reading


def _float(v) -> float | None:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    v = str(v).strip()
    if not v:
        return None
    try:
        return float(v)
    except ValueError:
        return None


def _int(v) -> int | None:
    f = _float(v)
    return int(f) if f is not None and math.isfinite(f) else None


def read_csv(path: str) -> list[dict]:
    """Rows of a CSV as dicts of floats (None for empty/unparseable cells); rows without a step are dropped."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {k: _float(v) for k, v in raw.items() if k is not None}
            if row.get("step") is None or not math.isfinite(row["step"]):
                continue
            row["step"] = int(row["step"])
            rows.append(row)
    return rows


def read_json(path: str) -> tuple[dict, str | None]:
    """(metrics dict, problem) — an unreadable file is reported, not fatal."""
    if not os.path.isfile(path):
        return {}, "not found"
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        return {}, f"unreadable ({type(e).__name__}: {e})"
    return (data, None) if isinstance(data, dict) else ({}, "not a JSON object")


def read_run_info(path: str) -> tuple[dict, list[tuple[str, str]]]:
    """run.info -> (first value per key, every (key, value) in file order). Comment lines are skipped."""
    first: dict[str, str] = {}
    lines: list[tuple[str, str]] = []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
                continue
            lines.append((key, value))
            first.setdefault(key, value)
    return first, lines


def parse_utc(s) -> _dt.datetime | None:
    if not s or not isinstance(s, str):
        return None
    s = s.strip().split()[0]
    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ"):
        try:
            return _dt.datetime.strptime(s, fmt).replace(tzinfo=_dt.timezone.utc)
        except ValueError:
            pass
    try:
        d = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return d if d.tzinfo else d.replace(tzinfo=_dt.timezone.utc)


def checkpoint_step(path) -> int | None:
    m = re.search(r"checkpoint_step(\d+)\.pt", str(path or ""))
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------- formatting


def f_loss(x) -> str:
    return NA if x is None else f"{x:.4f}"


def f_ppl(x) -> str:
    return NA if x is None else (f"{x:,.2f}" if math.isfinite(x) else "inf")


def f_int(x) -> str:
    return NA if x is None else f"{int(x):,}"


def f_rate(x) -> str:
    return NA if x is None else f"{x:,.0f}"


def f_pct(x) -> str:
    return NA if x is None else f"{x * 100:.1f}%"


def f_usd(x) -> str:
    return NA if x is None else f"${x:,.2f}"


def f_si(x) -> str:
    """1536 -> 1.54K, 2.6e9 -> 2.60B (for token counts and parameters)."""
    if x is None:
        return NA
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suf}"
    return f"{x:g}"


def f_dur(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return NA
    s = int(round(max(seconds, 0)))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s"


def f_size(n: int) -> str:
    return f"{n} B" if n < 1024 else (f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB")


def cell(s, limit: int = 160) -> str:
    """One Markdown table cell / inline value: single line, pipes escaped, long text shortened."""
    s = " ".join(str(s).split()).replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def val_or_na(v) -> str:
    return NA if v is None or v == "" else str(v)


# ---------------------------------------------------------------------------------- run model


class Run:
    """Everything the report needs, read once from the run folder and the trainer's out_dir."""

    def __init__(self, target: str):
        target = os.path.abspath(target)
        if not os.path.isdir(target):
            raise ReportError(f"'{target}' is not a folder. Pass a run folder (artifacts/train_runs/m7c_<stamp>, "
                              f"with run.info) or a trainer out_dir (with training.csv).")
        self.run_dir: str | None = None
        self.info: dict[str, str] = {}
        self.info_lines: list[tuple[str, str]] = []
        if os.path.isfile(os.path.join(target, "run.info")):
            self.run_dir = target
            self.info, self.info_lines = read_run_info(os.path.join(target, "run.info"))
            self.out_dir = self._resolve_out_dir(target)
        elif any(os.path.isfile(os.path.join(target, f)) for f in ("training.csv", "metrics.json")):
            self.out_dir = target
        else:
            raise ReportError(f"'{target}' is neither a run folder (no run.info) nor a trainer out_dir (no training.csv "
                              f"or metrics.json). Pass artifacts/train_runs/m7c_<stamp> or the config's train.out_dir.")
        csv_path = os.path.join(self.out_dir, "training.csv")
        self.train = read_csv(csv_path)
        if not self.train:
            why = "missing" if not os.path.isfile(csv_path) else "has no rows yet"
            raise ReportError(f"{csv_path} {why}: nothing to report. Wait for the first log row (train.log_every), "
                              f"or point at the right folder (OUT_DIR=... overrides run.info's out_dir).")
        self.val = read_csv(os.path.join(self.out_dir, "val.csv"))
        self.metrics, self.metrics_problem = read_json(os.path.join(self.out_dir, "metrics.json"))
        self.stall_files = []
        if self.run_dir and os.path.isdir(os.path.join(self.run_dir, "stalls")):
            d = os.path.join(self.run_dir, "stalls")
            self.stall_files = sorted(os.path.join(d, f) for f in os.listdir(d)
                                      if f.startswith("stall_") and os.path.isfile(os.path.join(d, f)))
        self.run_id = (self.info.get("run_id") or os.path.basename(self.run_dir or self.out_dir))

    def _resolve_out_dir(self, run_dir: str) -> str:
        env = os.environ.get("OUT_DIR")
        named = env or self.info.get("out_dir") or DEFAULT_OUT_DIR
        resolved = named if os.path.isabs(named) else os.path.join(REPO, named)
        if env or os.path.isfile(os.path.join(resolved, "training.csv")):
            return resolved
        # an unpacked handoff bundle: run.info and the trainer files side by side, out_dir from another machine
        if os.path.isfile(os.path.join(run_dir, "training.csv")):
            return run_dir
        return resolved

    # ---- derived values --------------------------------------------------------------------------
    def m(self, *keys, default=None):
        """Nested metrics.json lookup: m("best_val", "loss")."""
        cur = self.metrics
        for k in keys:
            if not isinstance(cur, dict) or k not in cur:
                return default
            cur = cur[k]
        return default if cur is None else cur

    def col(self, rows: list[dict], name: str, finite: bool = True) -> list[tuple[int, float]]:
        return [(r["step"], r[name]) for r in rows
                if r.get(name) is not None and (not finite or math.isfinite(r[name]))]

    def incidents(self) -> list[dict]:
        inc = self.m("incidents", default=[])
        return [i for i in inc if isinstance(i, dict)] if isinstance(inc, list) else []

    def attempts(self) -> list[dict]:
        """Runner attempts from run.info: number, started, resume_from, exit, restart line."""
        out: dict[int, dict] = {}
        for key, value in self.info_lines:
            m = re.fullmatch(r"attempt_(\d+)_(started_utc|exit|resume_from)", key)
            if m:
                out.setdefault(int(m.group(1)), {})[m.group(2)] = value
            m = re.fullmatch(r"restart_(\d+)", key)
            if m:
                out.setdefault(int(m.group(1)), {})["restart"] = value
        return [dict(n=n, **out[n]) for n in sorted(out)]

    def restarts(self) -> list[tuple[int, str]]:
        return [(int(k.split("_")[1]), v) for k, v in self.info_lines if re.fullmatch(r"restart_\d+", k)]

    def stall_lines(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.info_lines if re.fullmatch(r"stall_\d+", k)]

    def skipped_from_csv(self) -> tuple[int | None, list[int]]:
        """(final skipped_steps counter, steps of the rows where the counter went up)."""
        vals = self.col(self.train, "skipped_steps")
        if not vals:
            return None, []
        marks, prev = [], 0.0
        for step, v in vals:
            if v > prev:
                marks.append(step)
            prev = v
        return int(vals[-1][1]), marks

    def events(self) -> list[tuple[int, str]]:
        """(step, kind) markers for the charts: skipped steps, resumes/restarts, preemptions, OOM fallbacks, stalls."""
        ev = set()
        incidents = self.incidents()
        if not any(i.get("kind") == "skipped_step" for i in incidents):
            # only without the incident log: the CSV shows a skip at the log row after it, not at its step
            for step in self.skipped_from_csv()[1]:
                ev.add((step, "skipped step"))
        for i in incidents:
            step, kind = _int(i.get("step")), str(i.get("kind", ""))
            if step is None:
                continue
            label = {"skipped_step": "skipped step", "resumed": "resume", "preempted": "preempted",
                     "oom_fallback": "OOM fallback", "compile_fallback": "compile fallback", "diverged": "diverged",
                     "crashed": "crashed"}.get(kind)
            if label:
                ev.add((step, label))
        for a in self.attempts():
            step = checkpoint_step(a.get("resume_from"))
            if step:
                ev.add((step, "resume"))
        for _, v in self.stall_lines():
            m = re.search(r"\bstep[ =:_]*(\d+)", v)
            if m:
                ev.add((int(m.group(1)), "stall"))
        return sorted(ev)


# ------------------------------------------------------------------------------------- charts


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ReportError("matplotlib is not installed in this Python. Fix: bash scripts/prime_bootstrap.sh "
                          "(or pip install matplotlib), then re-run.")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"axes.titlesize": 11, "axes.labelsize": 10})
    return plt


EVENT_STYLE = {"skipped step": dict(color="tab:red", ls=":"), "resume": dict(color="tab:purple", ls="--"),
               "preempted": dict(color="tab:brown", ls="--"), "OOM fallback": dict(color="tab:orange", ls="-."),
               "diverged": dict(color="black", ls="-"),
               "crashed": dict(color="black", ls="--"), "stall": dict(color="tab:pink", ls="-.")}


def _mark_events(ax, events: list[tuple[int, str]], legend: bool = True) -> None:
    seen = set() if legend else set(EVENT_STYLE) | {e[1] for e in events}
    for step, kind in events[:200]:  # a run with thousands of skipped steps would paint the chart solid
        st = EVENT_STYLE.get(kind, dict(color="gray", ls=":"))
        ax.axvline(step, lw=1.0, alpha=0.7, label=None if kind in seen else kind, **st)
        seen.add(kind)


def _plain_log_ticks(ax, ratio: float) -> None:
    """Log axis labelled 3, 4, 6, 10 rather than 3×10^0 (the minor ticks too, when the range is short)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fmt = FuncFormatter(lambda y, _: f"{y:,g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt if ratio < 30 else NullFormatter())


def _thousands(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:,.0f}"))


def _rolling(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def plot_loss(run: Run, path: str, plt) -> None:
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    tr = run.col(run.train, "loss")
    va = run.col(run.val, "loss")
    if tr:
        steps, losses = [s for s, _ in tr], [l for _, l in tr]
        raw_alpha = 1.0
        if len(tr) >= 50:
            w = max(5, len(tr) // 50)
            ax.plot(steps, _rolling(losses, w), lw=1.6, color="tab:blue", label=f"train loss (mean of {w} rows)")
            raw_alpha = 0.3
        ax.plot(steps, losses, lw=1.0, color="tab:blue", alpha=raw_alpha,
                label="train loss" if raw_alpha == 1.0 else "train loss (per row)")
    if va:
        ax.plot([s for s, _ in va], [l for _, l in va], "o-", ms=4, lw=1.3, color="tab:orange", label="validation loss")
    everything = [l for _, l in tr] + [l for _, l in va]
    if everything and min(everything) > 0 and max(everything) / min(everything) >= 3:
        ax.set_yscale("log")
        _plain_log_ticks(ax, max(everything) / min(everything))
        ax.set_ylabel("loss (nats/token, log scale)")
    else:
        ax.set_ylabel("loss (nats/token)")
    _mark_events(ax, run.events())
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    lr = run.col(run.train, "lr")
    if lr:
        ax2 = ax.twinx()
        (line,) = ax2.plot([s for s, _ in lr], [v for _, v in lr], color="gray", lw=0.8, alpha=0.5)
        ax2.set_ylabel("learning rate", color="gray")
        ax2.tick_params(axis="y", colors="gray")
        handles, labels = handles + [line], labels + ["learning rate (right axis)"]
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize=9)
    last = run.train[-1]
    ax.set_title(f"{run.run_id}: training loss — step {last['step']:,}, last train loss {f_loss(last.get('loss'))}"
                 + (f", best val {f_loss(min(l for _, l in va))}" if va else ""))
    _save(fig, path)
    plt.close(fig)


def plot_val(run: Run, path: str, plt) -> None:
    va = run.col(run.val, "loss")
    if not va:
        fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
        ax.text(0.5, 0.5, "no validation rows yet (val.csv missing or empty)", ha="center", va="center", fontsize=14)
        ax.set_axis_off()
        ax.set_title(f"{run.run_id}: validation")
        _save(fig, path)
        plt.close(fig)
        return
    ppl = [(r["step"], r["ppl"] if r.get("ppl") is not None else _ppl(r["loss"]))
           for r in run.val if r.get("loss") is not None and math.isfinite(r["loss"])]
    best_step, best_loss = min(va, key=lambda x: x[1])
    best_ppl = next(p for s, p in ppl if s == best_step)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=FIGSIZE, dpi=DPI, sharex=True)
    a1.plot([s for s, _ in va], [l for _, l in va], "o-", ms=4, lw=1.3, color="tab:orange", label="validation loss")
    a1.plot([best_step], [best_loss], "*", ms=16, color="tab:green", label=f"best {best_loss:.4f} @ step {best_step:,}")
    a1.set_ylabel("val loss (nats/token)")
    a1.grid(alpha=0.3)
    a1.legend(loc="upper right", fontsize=9)
    fin = [(s, p) for s, p in ppl if p is not None and math.isfinite(p)]
    a2.plot([s for s, _ in fin], [p for _, p in fin], "o-", ms=4, lw=1.3, color="tab:red", label="validation perplexity")
    if best_ppl is not None and math.isfinite(best_ppl):
        a2.plot([best_step], [best_ppl], "*", ms=16, color="tab:green", label=f"best {best_ppl:,.2f} @ step {best_step:,}")
    if fin and min(p for _, p in fin) > 0 and max(p for _, p in fin) / min(p for _, p in fin) >= 10:
        a2.set_yscale("log")
        _plain_log_ticks(a2, max(p for _, p in fin) / min(p for _, p in fin))
        a2.set_ylabel("perplexity (log scale)")
    else:
        a2.set_ylabel("perplexity")
    a2.set_xlabel("optimizer step")
    a2.grid(alpha=0.3, which="both")
    a2.legend(loc="upper right", fontsize=9)
    last_s, last_l = va[-1]
    a1.set_title(f"{run.run_id}: validation — {len(va)} evaluations, best {best_loss:.4f} @ step {best_step:,}, "
                 f"last {last_l:.4f} @ step {last_s:,}")
    _save(fig, path)
    plt.close(fig)


def plot_throughput(run: Run, path: str, plt) -> None:
    tps = run.col(run.train, "toks_per_s")
    mfu = run.col(run.train, "mfu")
    events = run.events()
    if mfu:
        fig, (a1, a2) = plt.subplots(2, 1, figsize=FIGSIZE, dpi=DPI, sharex=True)
    else:
        fig, a1 = plt.subplots(figsize=FIGSIZE, dpi=DPI)
        a2 = None
    if tps:
        a1.plot([s for s, _ in tps], [v for _, v in tps], lw=1.2, color="tab:blue", label="tokens/s (all ranks)")
        med = statistics.median(v for _, v in tps)
        a1.axhline(med, color="tab:blue", lw=0.8, ls="--", alpha=0.6, label=f"median {med:,.0f} tokens/s")
    else:
        a1.text(0.5, 0.5, "training.csv has no toks_per_s values", ha="center", va="center", transform=a1.transAxes)
    a1.set_ylabel("tokens/s")
    a1.set_ylim(bottom=0)
    _thousands(a1)
    a1.grid(alpha=0.3)
    _mark_events(a1, events)
    a1.legend(loc="lower right", fontsize=9)
    title = f"{run.run_id}: throughput"
    if a2 is not None:
        a2.plot([s for s, _ in mfu], [v * 100 for _, v in mfu], lw=1.2, color="tab:green", label="MFU")
        a2.set_ylabel("MFU (% of bf16 peak)")
        a2.set_ylim(bottom=0)
        a2.grid(alpha=0.3)
        _mark_events(a2, events, legend=False)
        a2.set_xlabel("optimizer step")
        a2.legend(loc="lower right", fontsize=9)
    else:
        a1.set_xlabel("optimizer step")
        title += " (MFU n/a: no peak TFLOPS known, e.g. CPU)"
    a1.set_title(title)
    _save(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------- report.md


def build_markdown(run: Run) -> str:
    m, info = run.m, run.info
    L: list[str] = []
    add = L.append
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    add(f"# Run report: {run.run_id}")
    add("")
    src = f"trainer out_dir `{_rel(run.out_dir)}`"
    if run.run_dir:
        src = f"run folder `{_rel(run.run_dir)}`, " + src
    add(f"Generated {now} by `scripts/report.py` from {src}.")
    if not run.run_dir:
        add("")
        add("_runner info: not available_ (this report was made from the trainer's out_dir; pass the run folder "
            "`artifacts/train_runs/m7c_<stamp>` for the runner's exit code, restarts, stalls and node wall time).")
    if run.metrics_problem:
        add("")
        add(f"_metrics.json: {run.metrics_problem}; its fields are shown as n/a._")

    # ---- status
    add("")
    add("## Status")
    status = m("status")
    reason = m("stop_reason")
    add(f"- **Status:** {val_or_na(status)}" + (f" — {cell(reason, 300)}" if reason else ""))
    add(f"- **Runner exit code:** " + (cell(info["exit_code"]) if "exit_code" in info else
                                      ("not recorded (runner still running, or killed before it could write it)"
                                       if run.run_dir else NA)))
    add(f"- **Trainer exit code:** {val_or_na(m('exit_code'))}")
    if run.run_dir:
        for key, label in (("preflight_result", "Preflight"), ("smoke_result", "Smoke gate"), ("alerts", "Alerts")):
            if key in info:
                add(f"- **{label}:** {cell(info[key], 300)}")

    # ---- config
    cfg = m("config", default={}) or {}
    mc, tc = cfg.get("model", {}) or {}, cfg.get("train", {}) or {}
    summary = dict(kv.split("=", 1) for kv in info.get("config_summary", "").split() if "=" in kv)
    add("")
    add("## Config")
    cpath = m("config_path") or info.get("config")
    add(f"- **Config:** " + (f"`{cpath}`" if cpath else NA)
        + (f" (runner chose: {cell(info['config_choice'])})" if info.get("config_choice") else ""))
    attention = mc.get("attention") or summary.get("attention")
    nparams = _int(m("num_params"))
    add(f"- **Model:** attention {val_or_na(attention)}, params "
        + (f"{f_si(nparams)} ({nparams:,})" if nparams is not None else NA)
        + _dims(mc or summary))
    seq_len = tc.get("seq_len") or summary.get("seq_len")
    tps = _int(m("tokens_per_step"))
    total_steps = _int(m("total_steps")) or _int(tc.get("steps")) or _int(summary.get("steps"))
    add(f"- **seq_len:** {f_int(_int(seq_len))}; **tokens/step:** {f_int(tps)}"
        + (f" (micro-batch {tc['batch_size']} × accumulation {m('accumulate_grad_batches')} × {m('world_size')} rank(s))"
           if tc.get("batch_size") and m("accumulate_grad_batches") and m("world_size") else "")
        + f"; **total steps:** {f_int(total_steps)}")
    data = m("data", default={}) or {}
    add(f"- **Precision:** {val_or_na(m('precision'))}; **dataset:** "
        f"{val_or_na(data.get('dataset') or (cfg.get('data') or {}).get('dataset') or info.get('dataset'))}")

    # ---- hardware
    hw = m("hardware", default={}) or {}
    add("")
    add("## Hardware")
    if run.run_dir:
        add(f"- **Node (run.info):** {val_or_na(info.get('gpu_count'))} × {val_or_na(info.get('gpu_models'))} "
            f"(world size {val_or_na(info.get('world_size'))}, host {val_or_na(info.get('host'))}); "
            f"driver {val_or_na(info.get('driver_version'))}, torch {val_or_na(info.get('torch_version'))}"
            + (f" (CUDA {info['torch_cuda_version']})" if info.get("torch_cuda_version") else ""))
    else:
        add("- **Node (run.info):** runner info: not available")
    if hw:
        parts = [f"device {val_or_na(hw.get('device_type'))}"]
        if hw.get("gpu_name"):
            parts.append(f"{val_or_na(hw.get('gpu_count'))} × {hw['gpu_name']}"
                         + (f" ({hw['gpu_memory_GiB']} GiB)" if hw.get("gpu_memory_GiB") else "")
                         + (f", capability {hw['capability']}" if hw.get("capability") else ""))
        parts.append(f"torch {val_or_na(hw.get('torch_version'))}"
                     + (f", CUDA {hw['cuda_version']}" if hw.get("cuda_version") else ""))
        parts.append(f"host {val_or_na(hw.get('hostname'))}")
        parts.append(f"world size {val_or_na(m('world_size'))}")
        add(f"- **Trainer (metrics.json):** " + "; ".join(parts))
    else:
        add(f"- **Trainer (metrics.json):** {NA}")

    # ---- progress
    first, last = run.train[0], run.train[-1]
    step = _int(m("step"))
    csv_step = last["step"]
    final_step = step if step is not None else csv_step
    tokens = _int(m("tokens_seen"))
    csv_tokens = _int(last.get("tokens_seen"))
    tokens_final = tokens if tokens is not None else csv_tokens
    add("")
    add("## Progress")
    pct = f" ({final_step / total_steps:.1%})" if total_steps else ""
    add(f"- **Step:** {final_step:,} / {f_int(total_steps)}{pct}"
        + (f" (training.csv's last row is step {csv_step:,})" if csv_step != final_step else ""))
    add(f"- **Tokens seen:** {f_int(tokens_final)}" + (f" ({f_si(tokens_final)})" if tokens_final else "")
        + (f" (training.csv's last row says {csv_tokens:,})" if tokens is not None and csv_tokens is not None
           and csv_tokens != tokens else ""))
    add(f"- **Final training loss:** {f_loss(last.get('loss'))} at step {last['step']:,} "
        f"(first: {f_loss(first.get('loss'))} at step {first['step']:,}; {len(run.train):,} logged rows)")

    # ---- validation
    add("")
    add("## Validation")
    va = run.col(run.val, "loss")
    if va:
        best_step, best_loss = min(va, key=lambda x: x[1])
        best_row = next(r for r in run.val if r["step"] == best_step and r.get("loss") == best_loss)
        best_ppl = best_row.get("ppl") if best_row.get("ppl") is not None else _ppl(best_loss)
        add(f"- **Best validation loss:** {f_loss(best_loss)} (ppl {f_ppl(best_ppl)}) at step {best_step:,}")
        lr_ = run.val[-1]
        add(f"- **Last validation loss:** {f_loss(lr_.get('loss'))} (ppl {f_ppl(lr_.get('ppl'))}) at step "
            f"{lr_['step']:,} ({len(run.val)} evaluations)")
        mb = m("best_val", "loss")
        if mb is not None and f_loss(mb) != f_loss(best_loss):
            add(f"- Note: metrics.json best_val is {f_loss(mb)} at step {val_or_na(m('best_val', 'step'))} "
                f"(val.csv was trimmed on a resume, or the files are from different runs)")
    else:
        add(f"- **Best validation loss:** {NA} (val.csv missing or without rows)")

    # ---- throughput
    add("")
    add("## Throughput")
    tps_vals = [v for _, v in run.col(run.train, "toks_per_s")]
    mfu_vals = [v for _, v in run.col(run.train, "mfu")]
    step_ms = [v for _, v in run.col(run.train, "step_ms")]
    mem = [v for _, v in run.col(run.train, "mem_GiB")]
    add(f"- **Tokens/s:** median {f_rate(statistics.median(tps_vals) if tps_vals else None)}, last "
        f"{f_rate(tps_vals[-1] if tps_vals else None)} ({len(tps_vals):,} rows)")
    add(f"- **MFU:** median {f_pct(statistics.median(mfu_vals) if mfu_vals else None)}"
        + (f", last {f_pct(mfu_vals[-1])}" if mfu_vals else " (no peak TFLOPS known, e.g. CPU)"))
    add(f"- **Step time:** median " + (f"{statistics.median(step_ms):,.1f} ms" if step_ms else NA))
    mem_json = m("throughput", "max_mem_allocated_GiB")
    add(f"- **Peak memory:** " + (f"{max(mem):.2f} GiB allocated (max of training.csv mem_GiB)" if mem
                                  else (f"{mem_json:.2f} GiB allocated (metrics.json)" if isinstance(mem_json, (int, float))
                                        else NA)))

    # ---- time and cost
    add("")
    add("## Time and cost")
    add(f"- **Trainer wall time:** " + (f"{f_dur(_float(m('elapsed_s')))} over {val_or_na(m('attempts'))} trainer start(s)"
                                        if m("elapsed_s") is not None else NA)
        + f" (metrics.json started_at {val_or_na(m('started_at'))}, finished_at {val_or_na(m('finished_at'))})")
    if run.run_dir:
        t0, t1 = parse_utc(info.get("started_utc")), parse_utc(info.get("finished_utc"))
        if t0 and t1:
            wall = (t1 - t0).total_seconds()
            add(f"- **Node wall time:** {f_dur(wall)} (run.info started_utc {info['started_utc']} → finished_utc "
                f"{info['finished_utc']})")
        else:
            wall = None
            add(f"- **Node wall time:** {NA} (run.info started_utc {val_or_na(info.get('started_utc'))}, no finished_utc: "
                f"still running or killed)")
    else:
        wall = None
        add("- **Node wall time:** n/a (runner info: not available)")
    eta = _float(m("eta_s"))
    add(f"- **ETA:** {f_dur(eta)}" + (f" (eta_utc {m('eta_utc')})" if m("eta_utc") else ""))
    price = _float(m("usd_per_gpu_hour"))
    if price is None:
        # run.info: "2.49" or "GPU_HOURLY_USD=2.49 per GPU-hour (x 8 GPU(s) on this run)" or "not set (...)"
        num = re.search(r"(?:^|=|\$)\s*([0-9]+(?:\.[0-9]+)?)", info.get("usd_per_gpu_hour", ""))
        price = float(num.group(1)) if num else None
    gpus = _int(m("billed_gpus")) or _int(info.get("gpu_count")) or None
    add(f"- **Price:** " + (f"{f_usd(price)} per GPU-hour × {f_int(gpus)} GPU(s)" if price else f"{NA} (no price set)")
        + f"; **spent:** {f_usd(_float(m('cost_usd')))}; **projected total:** {f_usd(_float(m('projected_cost_usd')))}")
    if price and gpus and wall is not None:
        add(f"- **Node cost estimate:** {f_usd(wall / 3600 * gpus * price)} (node wall time × {gpus} GPU(s) × "
            f"{f_usd(price)}/GPU-hour, this node only)")

    # ---- incidents
    add("")
    add("## Incidents")
    incidents = run.incidents()
    by_kind: dict[str, list[dict]] = {}
    for i in incidents:
        by_kind.setdefault(str(i.get("kind", "?")), []).append(i)
    if run.run_dir:
        restarts = run.restarts()
        attempts = run.attempts()
        add(f"- **Restarts:** {len(restarts)}" + (" — " + "; ".join(_attempt_text(a) for a in attempts) if attempts else ""))
    else:
        add("- **Restarts:** n/a (runner info: not available)")
    if run.run_dir:
        stalls = run.stall_lines()
        files = [f"`{os.path.relpath(p, run.run_dir)}` ({f_size(os.path.getsize(p))})" for p in run.stall_files]
        add(f"- **Stalls:** {len(stalls)} in run.info, {len(files)} stack dump file(s)"
            + "".join(f"\n  - {k}: {cell(v)}" for k, v in stalls)
            + ("\n  - dumps: " + ", ".join(files) if files else ""))
    else:
        add("- **Stalls:** n/a (runner info: not available)")
    has_log = "incidents" in run.metrics

    def n_inc(kind: str) -> str:
        return f"{len(by_kind.get(kind, []))} incident(s)" if has_log else "incidents n/a"

    oom = m("oom_fallback")
    add(f"- **OOM fallbacks:** {n_inc('oom_fallback')}"
        + (f"; in effect (metrics.json oom_fallback): micro-batch {oom.get('micro_batch')}, activation checkpointing "
           f"{oom.get('activation_checkpointing')}" if isinstance(oom, dict) else "; metrics.json oom_fallback: none"))
    skipped_json = _int(m("skipped_steps"))
    skipped_csv, _ = run.skipped_from_csv()
    add(f"- **Skipped non-finite steps:** {f_int(skipped_json)} (metrics.json), {f_int(skipped_csv)} "
        f"(training.csv's last row), {n_inc('skipped_step')}")
    res, pre = by_kind.get("resumed", []), by_kind.get("preempted", [])
    line = (f"- **Preemptions / resumes:** {len(pre)} preempted, {len(res)} resumed" if has_log
            else f"- **Preemptions / resumes:** {NA} (no incident log)")
    if not has_log and m("resumed_from"):
        line += f" (last trainer start resumed from `{os.path.basename(str(m('resumed_from')))}`)"
    add(line)
    others = {k: v for k, v in by_kind.items() if k not in ("oom_fallback", "skipped_step", "resumed", "preempted")}
    if others:
        add("- **Other incidents:** " + ", ".join(f"{k} × {len(v)}" for k, v in sorted(others.items())))
    if incidents:
        add("")
        add(f"Incident log (metrics.json, {len(incidents)}):")
        add("")
        add("| time | step | kind | detail |")
        add("|---|---|---|---|")
        shown = incidents if len(incidents) <= MAX_INCIDENT_ROWS else (
            incidents[: MAX_INCIDENT_ROWS // 2] + [None] + incidents[-MAX_INCIDENT_ROWS // 2:])
        for i in shown:
            if i is None:
                add(f"| … | | | {len(incidents) - MAX_INCIDENT_ROWS} more |")
                continue
            add(f"| {cell(i.get('time', ''), 40)} | {val_or_na(_int(i.get('step')))} | {cell(i.get('kind', ''), 40)} "
                f"| {cell(i.get('detail', ''))} |")
    elif not has_log:
        add("- (metrics.json has no incident log: written by an older trainer)")

    # ---- files
    add("")
    add("## Files")
    for name, what in PNGS.items():
        add(f"- [{name}]({name}) — {what}")
    add("")
    return "\n".join(L)


def _dims(mc: dict) -> str:
    keys = [("dim", "dim"), ("n_layers", "layers"), ("n_heads", "heads"), ("n_kv_heads", "KV heads")]
    parts = [f"{label} {mc[k]}" for k, label in keys if mc.get(k) not in (None, "")]
    return (", " + ", ".join(parts)) if parts else ""


def _attempt_text(a: dict) -> str:
    s = f"attempt {a['n']}"
    if a.get("resume_from"):
        step = checkpoint_step(a["resume_from"])
        if step is not None:
            s += f" from step {step}"
        elif a["resume_from"].startswith("none"):
            s += " (fresh start)"
        else:
            s += f" ({cell(a['resume_from'], 60)})"
    s += f" exit {a['exit']}" if a.get("exit") else " (no exit recorded)"
    if a.get("restart"):
        s += f" → restart {a['n']} {a['restart']}"
    return s


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _rel(path: str) -> str:
    p = os.path.abspath(path)
    return os.path.relpath(p, REPO) if p.startswith(REPO + os.sep) else p


def _redact(text: str) -> str:
    """Never let a secret-looking value (a webhook in `alerts:`, a token) into the report."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import secrets_scan
    except ImportError:
        return text
    finally:
        sys.path.pop(0)
    return secrets_scan.redact(text.encode()).decode(errors="replace")


# --------------------------------------------------------------------------------------------- main


def make_report(target: str, out: str | None = None) -> str:
    """Write report.md and the PNGs; return the output folder."""
    run = Run(target)
    out = os.path.abspath(out or os.path.join(run.run_dir or run.out_dir, "report"))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create the output folder {out} ({e.strerror}). Fix: pass --out DIR somewhere writable.")
    plt = _plt()
    plot_loss(run, os.path.join(out, "loss.png"), plt)
    plot_val(run, os.path.join(out, "val_loss.png"), plt)
    plot_throughput(run, os.path.join(out, "throughput.png"), plt)
    text = _redact(build_markdown(run))
    tmp = os.path.join(out, "report.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, "report.md"))
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ReportError(f"{message}. Usage: python scripts/report.py RUN_FOLDER_OR_OUT_DIR [--out DIR]")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="scripts/report.py", description=__doc__.split("\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("folder", help="run folder (with run.info) or trainer out_dir (with training.csv)")
    p.add_argument("--out", default=None, help="output folder (default: FOLDER/report)")
    try:
        args = p.parse_args(argv)
        out = make_report(args.folder, args.out)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {_rel(os.path.join(out, 'report.md'))} (+ {', '.join(PNGS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
