"""Run outputs that survive resume: CSV logs, metrics.json, TensorBoard, and throughput/MFU/ETA.

Only rank 0 constructs these. CSV rows are flushed as written so `tail -f` works. On resume a CSV keeps
its rows up to the resumed step and drops the rest (written after the checkpoint by a run that was then
killed), so the file continues without duplicated or missing steps.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time

from nsa.checkpoint import atomic_write_text

TRAIN_COLUMNS = ["step", "loss", "lr", "toks_per_s", "grad_norm", "mfu", "step_ms", "tokens_seen", "skipped_steps",
                 "mem_GiB"]
VAL_COLUMNS = ["step", "loss", "ppl"]
# whole name parts only: HF_TOKEN, wandb_api_key, webhook_url match; tokenizer, tokens_seen do not
_SECRET_KEY = re.compile(r"(^|[_-])(token|secret|password|passwd|api[_-]?key|webhook)([_-]|$)", re.I)


def redact(obj):
    """Drop values under secret-looking keys (HF_TOKEN, webhook URLs, ...) before anything is written."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if isinstance(k, str) and _SECRET_KEY.search(k) and isinstance(v, str) and v else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


class CSVLog:
    """Append-only CSV with a fixed header; `resume_step` trims rows past the checkpoint."""

    def __init__(self, path: str, columns: list[str], resume_step: int | None):
        self.path, self.columns = path, columns
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            keep = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            w.writerows(keep)
            atomic_write_text(path, buf.getvalue())
        else:
            atomic_write_text(path, ",".join(columns) + "\n")
        self._f = open(path, "a", newline="", buffering=1)
        self._w = csv.DictWriter(self._f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")

    def write(self, row: dict) -> None:
        self._w.writerow({k: _fmt(v) for k, v in row.items()})
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.8g}"
    return "" if v is None else v


class MetricsJSON:
    """metrics.json, rewritten atomically on every update (a reader never sees half a file)."""

    def __init__(self, path: str, initial: dict):
        self.path = path
        self.data = dict(initial)
        self.write()

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.write()

    def write(self) -> None:
        self.data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        atomic_write_text(self.path, json.dumps(redact(self.data), indent=2, default=str) + "\n")


class TensorBoard:
    def __init__(self, log_dir: str, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events past the checkpoint left by a killed run, mirroring the CSV trim
        self.w = SummaryWriter(log_dir, purge_step=(resume_step + 1) if resume_step is not None else None)

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
                self.w.add_scalar(k, v, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class Throughput:
    """Tokens/s over the last log interval (global tokens), MFU against the devices' bf16 peak, ETA.

    Throughput excludes eval/checkpoint pauses; the ETA adds them back, amortised per step over this launch,
    so it predicts wall time to the last step rather than pure compute time."""

    def __init__(self, flops_per_token: float, peak_tflops: float | None, n_devices: int):
        self.flops_per_token = flops_per_token
        self.peak = peak_tflops * 1e12 * n_devices if peak_tflops else None
        self.t0 = time.perf_counter()
        self.paused = 0.0
        self.tokens = 0
        self.steps = 0
        self.total_paused = 0.0  # over this launch, for the ETA's overhead per step
        self.total_steps = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1
        self.total_steps += 1

    def pause(self, seconds: float) -> None:
        """Exclude eval/checkpoint time from training throughput."""
        self.paused += seconds
        self.total_paused += seconds

    def read(self, steps_left: int) -> dict:
        dt = max(time.perf_counter() - self.t0 - self.paused, 1e-9)
        tps = self.tokens / dt
        step_s = dt / max(self.steps, 1)
        overhead_s = self.total_paused / max(self.total_steps, 1)
        out = {"toks_per_s": tps, "step_ms": step_s * 1e3, "eta_s": steps_left * (step_s + overhead_s),
               "mfu": (self.flops_per_token * tps / self.peak) if self.peak else None}
        self.t0, self.paused, self.tokens, self.steps = time.perf_counter(), 0.0, 0, 0
        return out


def resolve_price(config_usd_per_gpu_hour: float) -> float | None:
    """USD per GPU-hour: env GPU_HOURLY_USD wins over runtime.usd_per_gpu_hour; None when neither is set."""
    from nsa.errors import UserError

    raw = os.environ.get("GPU_HOURLY_USD", "").strip()
    if raw:
        try:
            price = float(raw)
        except ValueError:
            price = -1.0
        if not math.isfinite(price) or price < 0:
            raise UserError(f"GPU_HOURLY_USD={raw!r} is not a price. Set it to your USD per GPU-hour, e.g. "
                            f"GPU_HOURLY_USD=2.49, or unset it.")
        return price or None
    return config_usd_per_gpu_hour or None


def cost_fields(elapsed_s: float, eta_s: float | None, usd_per_gpu_hour: float | None, billed_gpus: int) -> dict:
    """The time-and-money block of metrics.json: cost = elapsed hours x GPUs x price; projected adds the ETA."""
    rate = usd_per_gpu_hour * billed_gpus / 3600 if usd_per_gpu_hour else None  # USD per second
    eta_utc = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + eta_s))
               if eta_s is not None else None)
    return {"elapsed_s": round(elapsed_s, 1), "eta_s": None if eta_s is None else round(eta_s, 1), "eta_utc": eta_utc,
            "usd_per_gpu_hour": usd_per_gpu_hour, "billed_gpus": billed_gpus,
            "cost_usd": round(elapsed_s * rate, 4) if rate else None,
            "projected_cost_usd": round((elapsed_s + eta_s) * rate, 4) if rate and eta_s is not None else None}


def fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
