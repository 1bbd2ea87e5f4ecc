"""Train M7C: `python -m nsa.train --config PATH [options] [section.key=value ...]`.

Options:
  --config PATH            YAML config (configs/*.yaml); every key is validated, unknown ones fail
  --resume auto|none|PATH  auto (default): newest *valid* checkpoint in train.out_dir, else start fresh;
                           none: start fresh (refuses an out_dir that already holds checkpoints);
                           PATH: that checkpoint file
  --dataset NAME           fineweb_edu | local:<path> | synthetic | embedded   (= data.dataset=NAME)
  --steps N                optimizer steps                                       (= train.steps=N)
  --out-dir DIR            output folder                                         (= train.out_dir=DIR)
  section.key=value        any config override, e.g. train.lr=3e-4 model.nsa.window=256

Launch with `python -m nsa.train ...` (one device) or `torchrun --nproc_per_node=N -m nsa.train ...`.

Exit codes:
  0    completed, or early_stopped (validation plateau)
  1    any other crash (status `failed` in metrics.json, traceback on stderr)
  2    user/config error (bad flag, key, type, value, file, incompatible checkpoint): one paragraph, no traceback
  3    diverged: `train.max_bad_steps` consecutive non-finite steps; none was applied, the last good checkpoint is intact
  143  preempted by SIGTERM/SIGINT/SIGUSR1/SIGHUP: the current step finished, a checkpoint was saved, resume
       with --resume auto

Outputs (rank 0, in train.out_dir): training.csv, val.csv, metrics.json, tb/, config.yaml (resolved),
checkpoint_step{N}.pt (last train.keep_last_k kept), best-model.safetensors/.json, final-model.safetensors/.json,
heartbeat.json (see nsa/watchdog.py; in $NSA_WATCH_DIR instead when the runner sets it), kernel_tuning.json
(on CUDA: the Triton kernel variants the first steps timed and chose, reused on resume; nsa/attention/triton/tune.py).

Time and money: metrics.json, the progress line and TensorBoard (run/*) report elapsed time (summed over
resumes), the ETA to train.steps from the measured step time (eval/checkpoint overhead included) and,
given a price (env GPU_HOURLY_USD per GPU-hour, else runtime.usd_per_gpu_hour), dollars spent and the
projected total. Stacks: SIGUSR2 dumps every thread's Python stack (to stderr, or $NSA_WATCH_DIR).

Robustness: one trainer per out_dir (flock on out_dir/.trainer.lock). CUDA OOM halves the micro-batch
(each micro-batch is split, so tokens per step and data order are unchanged), then turns on activation
checkpointing, then fails with a clear message; under DDP this assumes every rank hits the OOM together
(same shapes), which is the usual case. A stuck collective becomes an error after runtime.dist_timeout_s.

Counting: `train.steps`, `log_every`, `eval_every`, `save_every` and the LR schedule count optimizer steps.
A non-finite step is not applied to the weights but still counts (its data is consumed and the schedule
advances), so a run's length never depends on how many steps were skipped.
"""

from __future__ import annotations

import time

_PROCESS_T0 = time.time()  # before the heavy imports: the run's elapsed time (and cost) starts here

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from contextlib import nullcontext  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nsa import checkpoint as ckpt  # noqa: E402
from nsa import distributed as dist_utils  # noqa: E402
from nsa import hardware  # noqa: E402
from nsa.attention.triton import tune as kernel_tuning  # noqa: E402  (no triton import: the package is lazy)
from nsa.config import Config, load_config, parse_faults, save_config  # noqa: E402
from nsa.errors import UserError  # noqa: E402
from nsa.metrics import (TRAIN_COLUMNS, VAL_COLUMNS, CSVLog, MetricsJSON, TensorBoard, Throughput,  # noqa: E402
                         cost_fields, fmt_duration, resolve_price)
from nsa.watchdog import Heartbeat, heartbeat_path, install_stack_dumper  # noqa: E402

EXIT_OK, EXIT_CRASH, EXIT_USER, EXIT_DIVERGED, EXIT_PREEMPTED = 0, 1, 2, 3, 143
MAX_INCIDENTS = 500  # metrics.json keeps the first incident and the latest ones


# ------------------------------------------------------------------------------------------ CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one clear paragraph
        raise UserError(f"{message}. Usage: python -m nsa.train --config PATH [--resume auto|none|PATH] "
                        f"[--dataset NAME] [--steps N] [--out-dir DIR] [section.key=value ...].")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = _Parser(prog="python -m nsa.train", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--config", required=False, default=None)
    p.add_argument("--resume", default="auto")
    p.add_argument("--dataset", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out-dir", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    for o in overrides:
        if o.startswith("-"):
            raise UserError(f"unknown flag {o!r}. Flags are --config, --resume, --dataset, --steps, --out-dir.")
    # explicit flags win over dotted overrides
    if args.dataset is not None:
        overrides.append(f"data.dataset={args.dataset}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.out_dir is not None:
        overrides.append(f"train.out_dir={args.out_dir}")
    if args.config is None:
        raise UserError("--config is required, e.g. --config configs/m7c_cpu.yaml (see configs/ for the tiers).")
    return args, overrides


# ------------------------------------------------------------------------------------- helpers


def rank0_print(info, msg: str) -> None:
    if info.is_main:
        print(msg, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def lr_lambda(train_cfg):
    """Linear warmup to lr, then cosine to lr * min_lr_ratio at train.steps (counted in optimizer steps)."""
    warm, total, floor = train_cfg.warmup_steps, train_cfg.steps, train_cfg.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def build_optimizer(model: torch.nn.Module, t, device: torch.device, fused: bool) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if (fused and device.type == "cuda") else {}
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, **kw)


def resolve_precision(pref: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype (None = plain fp32). Weights and optimizer state stay fp32 in every mode."""
    if pref == "auto":
        pref = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if pref == "fp32":
        return None
    if device.type != "cuda":
        raise UserError(f"runtime.precision={pref} needs a CUDA device; on CPU use runtime.precision=fp32 (or auto).")
    return torch.bfloat16 if pref == "bf16" else torch.float16


class RunState:
    """The metrics cursor: everything the loop accumulates that a resume must continue, not recompute."""

    def __init__(self):
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.bad_streak = 0
        self.interval_loss_sum = 0.0  # this rank's finite step losses since the last log row
        self.interval_steps = 0
        self.evals = 0
        self.best_val: float | None = None
        self.best_val_step: int | None = None
        self.plateau_ref: float | None = None
        self.plateau_count = 0
        self.last_val: dict | None = None
        self.elapsed_s = 0.0  # trainer wall time spent on this run up to the checkpoint, over all attempts
        self.starts = 0  # trainer launches on this run (1 = never resumed)

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


class Preemption:
    """Signal handlers only set a flag; the loop acts on it at the next step boundary (all ranks agree)."""

    # SIGHUP too: a trainer started straight from an SSH shell that drops should save, not die
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)

    def __init__(self):
        self.signum: int | None = None
        for s in self.SIGNALS:
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum


# ------------------------------------------------------------------------------------------ trainer


class Trainer:
    def __init__(self, cfg: Config, args, info, device: torch.device):
        self.cfg, self.args, self.info, self.device = cfg, args, info, device
        t, r = cfg.train, cfg.runtime
        self.out_dir = t.out_dir
        self.faults = parse_faults(t.fault_inject, info.rank)
        self.accum = cfg.resolve_accumulation(info.world_size)
        self.amp_dtype = resolve_precision(r.precision, device)
        self.tokens_per_step = t.batch_size * t.seq_len * self.accum * info.world_size
        self.split = 1  # OOM fallback: each micro-batch is split into this many chunks (same tokens)
        self.metrics: MetricsJSON | None = None
        self.state = RunState()
        self.preempt = Preemption()
        self.price = resolve_price(cfg.runtime.usd_per_gpu_hour)
        self.billed_gpus = info.world_size if device.type == "cuda" else 1  # on CPU: the one machine
        self.elapsed_base = 0.0  # elapsed_s carried over from earlier attempts (set on resume)
        self.incidents: list[dict] = []
        watch_dir = os.environ.get("NSA_WATCH_DIR") or None
        self.heartbeat = Heartbeat(heartbeat_path(watch_dir, self.out_dir, info.rank, info.local_rank), info.rank)
        self.faults_fired_path = os.path.join(self.out_dir, ".fault_inject_fired")
        self.faults_fired: set[str] = set()

    # ---- setup ----------------------------------------------------------------------------------
    def _pick_checkpoint(self) -> tuple[str | None, dict | None]:
        mode, out = self.args.resume, self.out_dir
        if mode == "none":
            existing = ckpt.list_checkpoints(out)
            if existing:
                raise UserError(
                    f"--resume none but {out} already holds {len(existing)} checkpoint(s) (newest "
                    f"{os.path.basename(existing[0][1])}); starting over there would overwrite that run's logs. "
                    f"Use --resume auto to continue it, or pick a new --out-dir."
                )
            return None, None
        if mode == "auto":
            return ckpt.find_latest_valid(out)
        if not os.path.isfile(mode):
            raise UserError(f"--resume {mode}: no such checkpoint file. Use auto, none, or an existing checkpoint_step*.pt.")
        try:
            return mode, ckpt.load_checkpoint(mode)
        except ckpt.CorruptCheckpoint as e:
            raise UserError(f"--resume {mode}: the checkpoint cannot be used ({e}). Pick an older checkpoint or --resume auto.")

    def _lock_out_dir(self) -> None:
        """One trainer per out_dir: two writers would interleave CSV rows and race on checkpoints."""
        import fcntl

        path = os.path.join(self.out_dir, ".trainer.lock")
        self._lock = open(path, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "unknown"
            raise UserError(
                f"another trainer ({holder}) is already writing to {self.out_dir}. Wait for it or stop it "
                f"(kill -TERM <pid> saves a checkpoint), or use a different --out-dir."
            )
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self._lock.flush()

    def setup(self) -> None:
        cfg, info, t = self.cfg, self.info, self.cfg.train
        if info.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            self._lock_out_dir()
            ckpt.clean_temp_files(self.out_dir)
        dist_utils.barrier()
        if info.is_main or os.path.isdir(self.out_dir):  # a resumed run reuses the kernels its first launch chose
            kernel_tuning.use_cache_file(os.path.join(self.out_dir, "kernel_tuning.json"), writable=info.is_main)
        self.heartbeat.beat("startup", 0)
        if self.faults and os.path.exists(self.faults_fired_path):
            with open(self.faults_fired_path) as f:
                self.faults_fired = set(f.read().split())
        path, loaded = self._pick_checkpoint()
        if loaded is not None:
            ckpt.check_compatible(loaded["config"], cfg.to_dict()["model"], info.world_size, loaded["world_size"])
            if loaded["config"].get("data", {}).get("dataset") != cfg.data.dataset:
                raise UserError(
                    f"checkpoint {path} was trained on dataset {loaded['config']['data']['dataset']!r} but this run "
                    f"uses {cfg.data.dataset!r}; its data position would be meaningless. Use the same --dataset, or "
                    f"a new --out-dir."
                )
        self.resume_path = path

        seed_everything(t.seed)  # identical init on every rank (DDP also broadcasts)
        from nsa.model import build_model, loss_path

        self.loss_path = loss_path(self.device)  # how M7C.loss computes the cross-entropy; announced below
        model = build_model(cfg.model).to(self.device)
        model.set_activation_checkpointing(cfg.model.activation_checkpointing)
        self.raw_model = model
        self.num_params = model.num_params()
        self.flops_per_token = model.flops_per_token(t.seq_len)
        self.optimizer = build_optimizer(model, t, self.device, cfg.runtime.fused_adamw)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        data_state = None
        if loaded is not None:
            model.load_state_dict(loaded["model"])  # strict: every tensor must match
            self.optimizer.load_state_dict(loaded["optimizer"])
            self.scheduler.load_state_dict(loaded["scheduler"])
            if loaded.get("scaler"):
                self.scaler.load_state_dict(loaded["scaler"])
            self.state.load_state_dict(loaded["run_state"])
            set_rng_state(loaded["rng"][info.rank], self.device)
            data_state = loaded["data"][info.rank]
            self.split = int(loaded.get("oom_split", 1))  # keep an OOM fallback across resumes
            if loaded.get("oom_activation_checkpointing"):
                model.set_activation_checkpointing(True)
        else:
            seed_everything(t.seed + info.rank)  # per-rank streams for anything random after init
        del loaded

        self.model = model
        self.compiled, self.compiled_steps = bool(cfg.runtime.compile), 0
        self.compile_failed_here = False  # this rank's compiled step failed during the current step
        if cfg.runtime.compile:
            from nsa.model import compile_model

            self.model = compile_model(self.model)
        self.model = self._wrap_ddp(self.model)

        from nsa.data import DataModule

        self.data = DataModule(cfg, info.rank, info.world_size)
        self.val = self.data.val_batches()
        self.train_stream = self.data.train_stream(data_state, pin_memory=self.device.type == "cuda")
        self._setup_outputs()

    def _setup_outputs(self) -> None:
        cfg, info = self.cfg, self.info
        self.peak = hardware.peak_tflops(self.device, cfg.runtime.peak_tflops)
        self.meter = Throughput(self.flops_per_token, self.peak, info.world_size)
        s = self.state
        prev = self._previous_metrics() if self.resume_path and info.is_main else {}  # rank 0 keeps the books
        # Time after the checkpoint that a killed attempt spent was still paid for: keep the larger figure.
        self.elapsed_base = max(s.elapsed_s, float(prev.get("elapsed_s") or 0.0))
        s.starts = max(s.starts, int(prev.get("attempts") or 0)) + 1
        if not info.is_main:
            return
        self.incidents = list(prev.get("incidents") or [])
        resume_step = s.step if self.resume_path else None
        save_config(cfg, os.path.join(self.out_dir, "config.yaml"))
        self.train_csv = CSVLog(os.path.join(self.out_dir, "training.csv"), TRAIN_COLUMNS, resume_step)
        self.val_csv = CSVLog(os.path.join(self.out_dir, "val.csv"), VAL_COLUMNS, resume_step)
        self.tb = TensorBoard(os.path.join(self.out_dir, "tb"), resume_step)
        t = cfg.train
        self.metrics = MetricsJSON(os.path.join(self.out_dir, "metrics.json"), {
            "status": "running", "stop_reason": None, "step": self.state.step, "total_steps": t.steps,
            "tokens_seen": self.state.tokens_seen, "tokens_per_step": self.tokens_per_step,
            "num_params": self.num_params, "flops_per_token": self.flops_per_token,
            "config_path": self.args.config, "config": cfg.to_dict(),
            "world_size": info.world_size, "accumulate_grad_batches": self.accum,
            "precision": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32",
            "loss_path": self.loss_path,
            "hardware": hardware.describe(self.device), "peak_tflops_per_device": self.peak,
            "data": self.data.describe(), "resumed_from": self.resume_path,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "last_val": self.state.last_val, "best_val": self._best_val_dict(), "skipped_steps": self.state.skipped_steps,
            "throughput": None, "attempts": s.starts, "incidents": self.incidents,
            "oom_fallback": ({"micro_batch": t.batch_size // self.split,
                              "activation_checkpointing": self.raw_model.activation_checkpointing}
                             if self.split > 1 or self.raw_model.activation_checkpointing != cfg.model.activation_checkpointing
                             else None),
            **cost_fields(self.elapsed(), None, self.price, self.billed_gpus),
        })
        if self.resume_path:
            lost = float(prev.get("elapsed_s") or 0.0) - s.elapsed_s
            self.incident("resumed", f"from {os.path.basename(self.resume_path)} at step {s.step} (launch {s.starts})"
                          + (f"; {fmt_duration(lost)} of work after that checkpoint is redone" if lost > 1 else ""))
        m, t = cfg.model, cfg.train
        print(
            f"[nsa.train] config {self.args.config} | model M7C attention={m.attention} dim={m.dim} layers={m.n_layers} "
            f"heads={m.n_heads}/{m.n_kv_heads}kv params={self.num_params / 1e6:.2f}M | seq_len={t.seq_len} "
            f"micro_batch={t.batch_size} accum={self.accum} ranks={info.world_size} tokens/step={self.tokens_per_step} "
            f"steps={t.steps} | data {self.data.describe()['dataset']} tokenizer {self.data.describe()['tokenizer']} | "
            f"device {self.device} precision {self.metrics.data['precision']} loss {self.loss_path} | out_dir {self.out_dir} | "
            + (f"resumed from {self.resume_path} at step {self.state.step}" if self.resume_path else "fresh start"),
            flush=True)

    def _previous_metrics(self) -> dict:
        """The metrics.json a previous attempt left (its elapsed time and incidents outlive the checkpoint)."""
        try:
            with open(os.path.join(self.out_dir, "metrics.json")) as f:
                d = json.load(f)
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def elapsed(self) -> float:
        return self.elapsed_base + (time.time() - _PROCESS_T0)

    def incident(self, kind: str, detail: str, step: int | None = None) -> None:
        """Something an operator should see in the run report (rank 0; kept across resumes via metrics.json).
        `step`: the step it happened at (default: the last completed step)."""
        if not self.info.is_main or self.metrics is None:
            return
        self.incidents.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "step": self.state.step if step is None else step, "kind": kind, "detail": detail})
        if len(self.incidents) > MAX_INCIDENTS:  # sporadic NaNs over a long run must not bloat metrics.json
            self.incidents = self.incidents[:1] + self.incidents[-(MAX_INCIDENTS - 1):]
        self.metrics.update(incidents=self.incidents)

    def _best_val_dict(self):
        s = self.state
        return None if s.best_val is None else {"step": s.best_val_step, "loss": s.best_val, "ppl": _ppl(s.best_val)}

    # ---- one optimizer step ----------------------------------------------------------------------
    def _forward_backward(self, micro_batches: list[torch.Tensor], inject_nan: bool) -> float:
        """Accumulate gradients over all micro-batches (each split self.split ways); return the mean loss."""
        chunks = [c for mb in micro_batches for c in mb.chunk(self.split, dim=0)]
        total = torch.zeros((), device=self.device)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        for i, chunk in enumerate(chunks):
            chunk = chunk.to(self.device, non_blocking=True)
            x, y = chunk[:, :-1], chunk[:, 1:]
            last = i == len(chunks) - 1
            # DDP: all-reduce gradients only on the step's final backward
            sync = nullcontext() if (last or not self.info.enabled) else self.model.no_sync()
            with sync:
                with autocast:
                    loss = self.model(x, y)  # the mean next-token cross-entropy (M7C.loss)
                if inject_nan and i == 0:
                    loss = loss * float("nan")
                loss = loss / len(chunks)  # mean over equally sized chunks == mean over the step's tokens
                self.scaler.scale(loss).backward()
            total += loss.detach()
        return total.item()

    def _step_with_fallbacks(self, micro_batches, inject_nan: bool, inject_oom: bool,
                                inject_compile: bool = False) -> float:
        """One step's forward/backward, retried after an OOM (smaller micro-batches, then activation
        checkpointing) or a torch.compile failure (eager from then on)."""
        t = self.cfg.train
        while True:
            try:
                if inject_oom:
                    inject_oom = False
                    raise torch.OutOfMemoryError("injected by train.fault_inject")
                if inject_compile and self.compiled:
                    inject_compile = False
                    raise torch._dynamo.exc.InternalTorchDynamoError("injected by train.fault_inject")
                loss = self._forward_backward(micro_batches, inject_nan)
                self.compiled_steps += self.compiled
                return loss
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if not self.cfg.runtime.oom_fallback:
                    raise UserError(self._oom_message("runtime.oom_fallback is off"))
                if t.batch_size % (self.split * 2) == 0:
                    self.split *= 2
                    rank0_print(self.info, f"[nsa.train] OOM at step {self.state.step + 1}: micro-batch "
                                f"{t.batch_size // (self.split // 2)} -> {t.batch_size // self.split}, "
                                f"accumulation x{self.split} (same tokens per step); retrying the step")
                elif not self.raw_model.activation_checkpointing:
                    self.raw_model.set_activation_checkpointing(True)
                    rank0_print(self.info, f"[nsa.train] OOM at micro-batch {t.batch_size // self.split}: enabling "
                                f"activation checkpointing; retrying the step")
                else:
                    raise UserError(self._oom_message("already at the smallest micro-batch with activation checkpointing"))
                self._record_oom_fallback("out of memory")
            except Exception as e:  # noqa: BLE001 - only compile failures are handled; anything else re-raises
                if not self._is_compile_failure(e):
                    raise
                self._fall_back_to_eager(e)

    def _record_oom_fallback(self, what: str) -> None:
        t = self.cfg.train
        if self.metrics:
            self.metrics.update(oom_fallback={"micro_batch": t.batch_size // self.split,
                                              "activation_checkpointing": self.raw_model.activation_checkpointing})
        self.incident("oom_fallback", f"{what} at step {self.state.step + 1}: micro-batch "
                      f"{t.batch_size // self.split}, activation checkpointing "
                      f"{'on' if self.raw_model.activation_checkpointing else 'off'}", step=self.state.step + 1)

    def _wrap_ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.info.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _is_compile_failure(self, e: Exception) -> bool:
        """A torch.compile failure: a Dynamo/Inductor error at any step, or any error on the first
        compiled step (backend failures surface as many exception types: Triton, C++ toolchain, ...)."""
        if not self.compiled or isinstance(e, UserError):
            return False
        return isinstance(e, torch._dynamo.exc.TorchDynamoException) or self.compiled_steps == 0

    def _use_eager(self) -> None:
        """Run the eager model from now on: same parameters and optimizer, only speed differs. Under DDP
        the wrapper stays and only its inner module changes (DDP(compiled) -> DDP(model), the same
        parameters): building a new DDP is a collective, which ranks whose compiled step did not fail,
        waiting in this step's gradient all-reduce, would never join."""
        self.compiled = False
        if self.info.enabled:  # wrapped in DDP (_wrap_ddp)
            self.model.module = self.raw_model
        else:
            self.model = self.raw_model

    def _fall_back_to_eager(self, e: Exception) -> None:
        """This rank's compiled step failed: retry it eagerly and say so. The other ranks follow at the
        end of the step (train_step), so that every rank runs the same code from the next step on."""
        self.optimizer.zero_grad(set_to_none=True)
        self._use_eager()
        self.compile_failed_here = True
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        where = f" on rank {self.info.rank}" if self.info.world_size > 1 else ""
        print(f"[nsa.train] WARNING: torch.compile failed{where} at step {self.state.step + 1} ({why}); "
              "continuing without it (runtime.compile=false skips compiling; same results, slower)", flush=True)
        self._record_compile_fallback(why)

    def _record_compile_fallback(self, why: str) -> None:
        if self.metrics:
            self.metrics.update(compile_fallback={"step": self.state.step + 1, "error": why})
        self.incident("compile_fallback", f"torch.compile failed at step {self.state.step + 1}, running eager: {why}",
                      step=self.state.step + 1)

    def _oom_message(self, why: str) -> str:
        t = self.cfg.train
        return (f"out of accelerator memory at seq_len {t.seq_len} ({why}). Use a smaller config tier, lower "
                f"train.seq_len or train.batch_size, or set model.activation_checkpointing=true. Checkpoints already "
                f"saved in {self.out_dir} are intact.")

    def _fire_faults(self, step: int) -> list[str]:
        """Injected faults due at `step`, each at most once per out_dir (so a restarted run gets past it)."""
        due = [k for k in self.faults.get(step, []) if f"{k}@{step}" not in self.faults_fired]
        # every rank that fires one records it (a fault may name one rank); appends of a line do not interleave
        if due and (self.info.is_main or os.path.isdir(self.out_dir)):
            with open(self.faults_fired_path, "a") as f:
                f.write("".join(f"{k}@{step}\n" for k in due))
        self.faults_fired.update(f"{k}@{step}" for k in due)
        return due

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step. Returns (loss, pre-clip grad norm, applied)."""
        t, step = self.cfg.train, self.state.step + 1
        faults = self._fire_faults(step)
        if "crash" in faults:
            raise RuntimeError(f"injected crash at step {step} (train.fault_inject)")
        if "hang" in faults:
            rank0_print(self.info, f"[nsa.train] hanging at step {step} for good (train.fault_inject)")
            while True:  # like a stuck collective: SIGTERM only sets the flag, which nothing here reads
                time.sleep(1.0)
        if "stall" in faults:
            rank0_print(self.info, f"[nsa.train] stalling at step {step} until a signal arrives (train.fault_inject)")
            # one collective per poll keeps the ranks in lockstep, so a signal to any rank releases all
            for _ in range(12_000):  # at most ~10 minutes
                time.sleep(0.05)
                if dist_utils.all_reduce_max([1.0 if self.preempt.signum is not None else 0.0], self.device)[0]:
                    break
        if step == self.cfg.runtime.retune_step and kernel_tuning.enabled(self.device):
            kernel_tuning.retune()
            rank0_print(self.info, f"[nsa.train] step {step}: timing the tuned kernel variants again (the model's "
                        "block selections are no longer random; runtime.retune_step)")
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the lr this step uses (logged with it)
        micro_batches = [self.train_stream.next() for _ in range(self.accum)]
        loss = self._step_with_fallbacks(micro_batches, "nan" in faults, "oom" in faults, "compile" in faults)
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        # total norm before clipping, measured while gradients still exist
        gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf")).item()
        # With fp16 loss scaling, inf grads at a finite loss are the scaler's business (it skips and lowers the scale).
        grads_ok = math.isfinite(gnorm) or self.scaler.is_enabled()
        bad_local = 0.0 if (math.isfinite(loss) and grads_ok) else 1.0
        stop_local = 1.0 if self.preempt.signum is not None else 0.0
        compile_failed_local, self.compile_failed_here = float(self.compile_failed_here), False
        checkpointing = self.raw_model.activation_checkpointing
        bad, stop, compile_failed, split, checkpointing_any = dist_utils.all_reduce_max(
            [bad_local, stop_local, compile_failed_local, float(self.split), float(checkpointing)], self.device)
        self.stop_requested = stop > 0
        if split > self.split or (checkpointing_any and not checkpointing):
            # another rank ran out of memory and fell back: every rank takes the same setting (what the
            # checkpoint records, so a resumed run does not run out of memory again first)
            self.split = int(split)
            if checkpointing_any and not checkpointing:
                self.raw_model.set_activation_checkpointing(True)
            rank0_print(self.info, f"[nsa.train] another rank ran out of memory at step {step}: every rank now "
                        f"uses micro-batch {t.batch_size // self.split}, activation checkpointing "
                        f"{'on' if self.raw_model.activation_checkpointing else 'off'} (same tokens per step)")
            self._record_oom_fallback("out of memory on another rank")
        if compile_failed and self.compiled:  # another rank's compiled step failed: all ranks run eager from now on
            self._use_eager()
            rank0_print(self.info, f"[nsa.train] WARNING: torch.compile failed on another rank at step {step}; "
                        "all ranks continue without it (same results, slower)")
            self._record_compile_fallback("on another rank (its log has the error)")
        if bad:
            if self.scaler.is_enabled():
                self.scaler.update()
            applied = False
        else:
            if self.scaler.is_enabled():
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            applied = True
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss, gnorm, applied

    # ---- eval / save -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        model = self.raw_model
        model.eval()
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        total, n = 0.0, 0
        for i, b in enumerate(self.val):
            if i % self.info.world_size != self.info.rank:
                continue
            self.heartbeat.beat("eval", self.state.step)
            b = b.to(self.device)
            with autocast:
                total += model(b[:, :-1], b[:, 1:], reduction="sum").item()
            n += b[:, 1:].numel()
        model.train()
        total, n = dist_utils.all_reduce_sum([total, float(n)], self.device)
        return total / n

    def build_state(self) -> dict:
        """The full checkpoint (see nsa/checkpoint.py); collective: every rank must call it."""
        self.state.elapsed_s = self.elapsed()
        rngs = dist_utils.gather_objects(rng_state(self.device), self.info)
        datas = dist_utils.gather_objects(self.train_stream.state_dict(), self.info)
        return {
            "format_version": ckpt.FORMAT_VERSION, "step": self.state.step, "tokens_seen": self.state.tokens_seen,
            "config": self.cfg.to_dict(), "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rngs, "data": datas, "run_state": self.state.state_dict(), "world_size": self.info.world_size,
            "oom_split": self.split, "oom_activation_checkpointing": bool(self.raw_model.activation_checkpointing),
        }

    def save(self) -> None:
        t0 = time.perf_counter()
        self.heartbeat.beat("save", self.state.step)
        state = self.build_state()
        if self.info.is_main:
            path = ckpt.save_checkpoint(self.out_dir, self.state.step, state, self.cfg.train.keep_last_k)
            print(f"[nsa.train] saved {path} ({os.path.getsize(path) / 2**20:.1f} MiB, "
                  f"{time.perf_counter() - t0:.1f}s)", flush=True)
            self.metrics.update(last_checkpoint=os.path.basename(path), last_checkpoint_step=self.state.step)
        del state
        dist_utils.barrier()
        self.meter.pause(time.perf_counter() - t0)
        self.last_saved_step = self.state.step

    def export(self, name: str, extra: dict) -> None:
        if self.info.is_main:
            meta = {"step": self.state.step, "tokens_seen": self.state.tokens_seen, "num_params": self.num_params,
                    "format": "M7C model weights (tied head.weight = embed.weight)", "model_config": self.cfg.to_dict()["model"]}
            meta.update(extra)
            ckpt.export_safetensors(self.raw_model, os.path.join(self.out_dir, f"{name}.safetensors"), meta)

    def run_eval(self) -> bool:
        """Validation + best snapshot + early-stopping bookkeeping. Returns True to stop early."""
        t0 = time.perf_counter()
        s, t = self.state, self.cfg.train
        loss = self.evaluate()
        s.evals += 1
        s.last_val = {"step": s.step, "loss": loss, "ppl": _ppl(loss)}
        improved = s.best_val is None or loss < s.best_val
        if improved:
            s.best_val, s.best_val_step = loss, s.step
            self.export("best-model", {"val_loss": loss, "val_ppl": _ppl(loss)})
        if s.plateau_ref is None or loss < s.plateau_ref * (1 - t.early_stop_min_delta):
            s.plateau_ref, s.plateau_count = loss, 0
        else:
            s.plateau_count += 1
        stop = (t.early_stop_patience > 0 and s.evals >= t.early_stop_min_evals
                and s.plateau_count >= t.early_stop_patience)
        if self.info.is_main:
            self.val_csv.write({"step": s.step, "loss": loss, "ppl": _ppl(loss)})
            self.tb.scalars(s.step, {"val/loss": loss, "val/ppl": _ppl(loss)})
            self.metrics.update(last_val=s.last_val, best_val=self._best_val_dict(), evals=s.evals)
            print(f"[nsa.train] eval step {s.step}: val loss {loss:.4f} ppl {_ppl(loss):.2f}"
                  + (" (best)" if improved else f" (best {s.best_val:.4f} @ {s.best_val_step})"), flush=True)
        self.meter.pause(time.perf_counter() - t0)
        self.last_eval_step = s.step
        return stop

    def log_row(self, loss_last: float, gnorm: float) -> None:
        s, t = self.state, self.cfg.train
        loss_sum, n = dist_utils.all_reduce_sum([s.interval_loss_sum, float(s.interval_steps)], self.device)
        loss = loss_sum / n if n else float("nan")
        s.interval_loss_sum, s.interval_steps = 0.0, 0
        if not self.info.is_main:
            self.meter.read(t.steps - s.step)
            return
        th = self.meter.read(t.steps - s.step)
        lr = self.step_lr
        mem = hardware.memory_stats_GiB(self.device).get("max_mem_allocated_GiB")
        row = {"step": s.step, "loss": loss, "lr": lr, "toks_per_s": th["toks_per_s"], "grad_norm": gnorm,
               "mfu": th["mfu"], "step_ms": th["step_ms"], "tokens_seen": s.tokens_seen,
               "skipped_steps": s.skipped_steps, "mem_GiB": mem}
        self.train_csv.write(row)
        tb = {"train/loss": loss, "train/lr": lr, "train/grad_norm": gnorm, "perf/toks_per_s": th["toks_per_s"],
              "perf/step_ms": th["step_ms"], "perf/mfu": th["mfu"], "train/tokens_seen": s.tokens_seen,
              "train/skipped_steps": s.skipped_steps, "mem/max_allocated_GiB": mem}
        tb.update(self.raw_model.gate_stats())
        money = cost_fields(self.elapsed(), th["eta_s"], self.price, self.billed_gpus)
        tb.update({"run/elapsed_h": money["elapsed_s"] / 3600, "run/eta_h": money["eta_s"] / 3600,
                   "run/cost_usd": money["cost_usd"], "run/projected_cost_usd": money["projected_cost_usd"]})
        self.tb.scalars(s.step, tb)
        self.metrics.update(step=s.step, tokens_seen=s.tokens_seen, skipped_steps=s.skipped_steps,
                            throughput={"toks_per_s": th["toks_per_s"], "step_ms": th["step_ms"], "mfu": th["mfu"],
                                        **hardware.memory_stats_GiB(self.device)}, **money)
        mfu = f"{th['mfu'] * 100:.1f}%" if th["mfu"] is not None else "n/a"
        cost = (f" | ${money['cost_usd']:.2f} spent, ~${money['projected_cost_usd']:.2f} total"
                if money["cost_usd"] is not None else "")
        print(f"step {s.step}/{t.steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {gnorm:.3f} | "
              f"{th['toks_per_s']:,.0f} tok/s | MFU {mfu} | {th['step_ms']:.0f} ms/step | "
              f"elapsed {fmt_duration(money['elapsed_s'])} | ETA {fmt_duration(th['eta_s'])}{cost}"
              + (f" | mem {mem:.2f} GiB" if mem is not None else ""), flush=True)

    # ---- the loop ------------------------------------------------------------------------------
    def finish(self, status: str, reason: str | None, code: int) -> int:
        self.heartbeat.beat("exiting", self.state.step)
        if status in ("preempted", "diverged", "early_stopped", "failed"):
            crashed = code == EXIT_CRASH  # mid-step: the step that raised is the one after the last completed
            self.incident("crashed" if crashed else status, reason or "",
                          step=self.state.step + 1 if crashed else None)
        if self.metrics:
            eta = 0.0 if status in ("completed", "early_stopped") else self.metrics.data.get("eta_s")
            self.metrics.update(status=status, stop_reason=reason, step=self.state.step,
                                tokens_seen=self.state.tokens_seen, skipped_steps=self.state.skipped_steps,
                                finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), exit_code=code,
                                **cost_fields(self.elapsed(), eta, self.price, self.billed_gpus))
        rank0_print(self.info, f"[nsa.train] {status}: {reason} (exit {code})")
        return code

    def run(self) -> int:
        t, s = self.cfg.train, self.state
        self.last_saved_step = s.step if self.resume_path else -1
        self.last_eval_step = s.last_val["step"] if s.last_val else -1
        self.stop_requested = False
        if s.step >= t.steps:
            rank0_print(self.info, f"[nsa.train] checkpoint is at step {s.step} >= train.steps {t.steps}; nothing to train.")
            if not os.path.exists(os.path.join(self.out_dir, "final-model.safetensors")):
                self.export("final-model", {"val_loss": (s.last_val or {}).get("loss")})
            return self.finish("completed", f"reached train.steps={t.steps}", EXIT_OK)
        self.raw_model.train()
        gnorm = float("nan")
        while s.step < t.steps:
            loss, gnorm, applied = self.train_step()
            s.step += 1
            s.tokens_seen += self.tokens_per_step
            self.meter.add(self.tokens_per_step)
            self.heartbeat.beat("train", s.step)
            if applied:
                s.bad_streak = 0
                s.interval_loss_sum += loss
                s.interval_steps += 1
            else:
                s.bad_streak += 1
                s.skipped_steps += 1
                rank0_print(self.info, f"[nsa.train] WARNING step {s.step}: non-finite loss {loss} or grad norm {gnorm}; "
                            f"update NOT applied ({s.bad_streak}/{t.max_bad_steps} in a row)")
                self.incident("skipped_step", f"non-finite loss {loss} or grad norm {gnorm}; update not applied")
                if s.bad_streak >= t.max_bad_steps:
                    return self.finish("diverged", f"{s.bad_streak} consecutive non-finite steps ending at step {s.step}; "
                                       f"no update was applied, last good checkpoint kept (lower train.lr or check data)",
                                       EXIT_DIVERGED)
            if s.step % t.log_every == 0 or s.step == t.steps:
                self.log_row(loss, gnorm)
            if t.eval_every and s.step % t.eval_every == 0 and s.step < t.steps:
                if self.run_eval():
                    return self._stop_early()
            if s.step % t.save_every == 0 and s.step < t.steps:
                self.save()
            if self.stop_requested:
                if self.last_saved_step != s.step:
                    self.save()
                name = signal.Signals(self.preempt.signum).name if self.preempt.signum else "signal on another rank"
                return self.finish("preempted", f"{name} at step {s.step}; checkpoint saved, resume with --resume auto",
                                   EXIT_PREEMPTED)
        if self.last_eval_step != s.step:
            if self.run_eval():
                return self._stop_early()
        if self.last_saved_step != s.step:
            self.save()
        self.export("final-model", {"val_loss": (s.last_val or {}).get("loss")})
        return self.finish("completed", f"reached train.steps={t.steps}", EXIT_OK)

    def _stop_early(self) -> int:
        s, t = self.state, self.cfg.train
        reason = (f"validation loss did not improve by {t.early_stop_min_delta:.2%} for {s.plateau_count} evaluations "
                  f"(best {s.best_val:.4f} at step {s.best_val_step})")
        if self.last_saved_step != s.step:
            self.save()
        self.export("final-model", {"val_loss": (s.last_val or {}).get("loss")})
        return self.finish("early_stopped", reason, EXIT_OK)

    def close(self) -> None:
        if getattr(self, "data", None) is not None:
            self.data.close()
        if self.info.is_main:
            for name in ("train_csv", "val_csv", "tb"):
                if getattr(self, name, None) is not None:
                    getattr(self, name).close()


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    # first thing: a hang anywhere later (even in process-group init) can be diagnosed with SIGUSR2
    stacks_file = install_stack_dumper(os.environ.get("NSA_WATCH_DIR") or None, int(os.environ.get("RANK", 0)))  # noqa: F841
    trainer = None
    try:
        args, overrides = parse_args(argv)
        cfg = load_config(args.config, overrides)
        info, device = dist_utils.init(cfg.runtime.device, cfg.runtime.dist_backend, cfg.runtime.dist_timeout_s)
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        if device.type == "cuda" and cfg.runtime.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        trainer = Trainer(cfg, args, info, device)
        trainer.setup()
        code = trainer.run()
    except UserError as e:
        print(f"nsa.train: error: {e}", file=sys.stderr, flush=True)
        code = EXIT_USER
        if trainer is not None:
            trainer.finish("failed", str(e), code)
    except Exception as e:
        traceback.print_exc()
        code = EXIT_CRASH
        if trainer is not None:
            trainer.finish("failed", f"{type(e).__name__}: {e}", code)
    finally:
        if trainer is not None:
            trainer.close()
    dist_utils.teardown()
    return code


if __name__ == "__main__":
    sys.exit(main())
