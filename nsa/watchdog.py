"""Stall detection: the trainer's heartbeat, its stack dumper, and the watchdog process the runner starts.

A hung run costs money silently: a collective that never returns, a dataset stream that stops answering,
a deadlock. Three pieces, stdlib only (the watchdog must not import torch):

- `Heartbeat` (trainer, one writer per node): `<watch dir>/heartbeat.json` = {pid, rank, step, phase, time},
  rewritten atomically at most once a second and on every phase change. Phases: startup (until the
  first optimizer step completes: model build, data connection, torch.compile), train, eval, save.
- `install_stack_dumper` (trainer, every rank): `faulthandler` on SIGUSR2 writes all threads' Python
  stacks to `<watch dir>/stacks_rank{R}.txt`, and `rank{R}.pid` says whom to signal. faulthandler runs
  in the C signal handler, so it works even while the main thread is stuck inside NCCL or I/O.
- `python -m nsa.watchdog --pid PID --watch-dir DIR ...` (runner): polls the heartbeat and training.csv;
  when neither advanced for `--timeout` seconds (`--startup-timeout` before the first step), it dumps
  every rank's stacks into `--stall-dir/stall_<UTC>.txt`, writes `DIR/stalled.json` (the runner's cue to
  restart with resume), then SIGTERMs the trainer's process group and SIGKILLs it after `--grace` s.
"""

from __future__ import annotations

import argparse
import faulthandler
import glob
import json
import os
import signal
import sys
import time

HEARTBEAT = "heartbeat.json"
STALLED = "stalled.json"
STACK_SIGNAL = signal.SIGUSR2


def _utc(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------- trainer side


class Heartbeat:
    """Throttled, atomic heartbeat file. `beat()` is cheap enough to call every step and every eval batch."""

    def __init__(self, path: str | None, rank: int, min_interval_s: float = 1.0):
        self.path, self.rank, self.min_interval_s = path, rank, min_interval_s
        self.phase: str | None = None
        self.last = 0.0

    def beat(self, phase: str, step: int) -> None:
        if self.path is None:
            return
        now = time.time()
        if phase == self.phase and now - self.last < self.min_interval_s:
            return
        self.phase, self.last = phase, now
        try:
            _atomic_write(self.path, json.dumps({"pid": os.getpid(), "rank": self.rank, "step": step,
                                                 "phase": phase, "time": now, "utc": _utc(now)}) + "\n")
        except OSError:
            pass  # a full or vanished disk must not crash training; the watchdog will notice the silence


def install_stack_dumper(watch_dir: str | None, rank: int):
    """SIGUSR2 -> all threads' Python stacks: into watch_dir/stacks_rank{rank}.txt (and a pid file for the
    watchdog) when the runner gave a watch dir, else to stderr (`kill -USR2 <pid>` on a manual run).
    Returns the open file (keep a reference: faulthandler writes to its descriptor)."""
    if watch_dir is None:
        faulthandler.register(STACK_SIGNAL, all_threads=True, chain=False)
        return None
    os.makedirs(watch_dir, exist_ok=True)
    f = open(os.path.join(watch_dir, f"stacks_rank{rank}.txt"), "a")
    faulthandler.register(STACK_SIGNAL, file=f, all_threads=True, chain=False)
    _atomic_write(os.path.join(watch_dir, f"rank{rank}.pid"), f"{os.getpid()}\n")
    return f


def heartbeat_path(watch_dir: str | None, out_dir: str, rank: int, local_rank: int) -> str | None:
    """Under the runner: the node-local watch dir, written by each node's local rank 0 (every node's
    watchdog sees its own node). Standalone: out_dir/heartbeat.json, written by global rank 0."""
    if watch_dir:
        return os.path.join(watch_dir, HEARTBEAT) if local_rank == 0 else None
    return os.path.join(out_dir, HEARTBEAT) if rank == 0 else None


# -------------------------------------------------------------------------------- watchdog side


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by the runner) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Watchdog:
    def __init__(self, pid: int, watch_dir: str, timeout_s: float, startup_timeout_s: float, grace_s: float,
                 stall_dir: str, csv_path: str | None = None, poll_s: float = 2.0, log_path: str | None = None):
        self.pid, self.watch_dir, self.timeout_s, self.startup_timeout_s = pid, watch_dir, timeout_s, startup_timeout_s
        self.grace_s, self.stall_dir, self.csv_path, self.log_path = grace_s, stall_dir, csv_path, log_path
        self.poll_s = poll_s
        self.start = time.time()

    def log(self, msg: str) -> None:
        line = f"[watchdog] {msg}"
        print(line, flush=True)
        if self.log_path:
            try:
                with open(self.log_path, "a") as f:
                    f.write(f"{_utc()} {line}\n")
            except OSError:
                pass

    def progress(self) -> tuple[float, str, dict | None]:
        """(time of the last sign of progress, phase, heartbeat) counting only this attempt's files."""
        fresh = self.start - 1.0  # files older than our start belong to an earlier attempt
        hb_path = os.path.join(self.watch_dir, HEARTBEAT)
        hb_t, hb = _mtime(hb_path), None
        last, phase = self.start, "startup"
        if hb_t is not None and hb_t >= fresh:
            hb = _read_json(hb_path)
            last, phase = max(last, hb_t), (hb or {}).get("phase", "startup")
        csv_t = _mtime(self.csv_path) if self.csv_path else None
        if csv_t is not None and csv_t >= fresh and phase != "startup":
            last = max(last, csv_t)
        return last, phase, hb

    def run(self) -> int:
        self.log(f"watching pid {self.pid}: no progress for {self.timeout_s:.0f}s "
                 f"({self.startup_timeout_s:.0f}s before the first step) counts as a stall")
        while _alive(self.pid):
            last, phase, hb = self.progress()
            limit = self.startup_timeout_s if phase == "startup" else self.timeout_s
            quiet = time.time() - last
            if quiet > limit:
                self.fire(quiet, limit, phase, hb)
                return 0
            time.sleep(self.poll_s)
        return 0

    def dump_stacks(self) -> list[tuple[str, int, str]]:
        """Signal every live rank that left a pid file; return (rank, pid, the stack text it just wrote)."""
        ranks = []
        for pid_file in sorted(glob.glob(os.path.join(self.watch_dir, "rank*.pid"))):  # the runner empties the dir per launch
            rank = os.path.basename(pid_file)[len("rank"):-len(".pid")]
            try:
                pid = int(open(pid_file).read().strip())
            except (OSError, ValueError):
                continue
            if not _alive(pid):
                continue
            stack_file = os.path.join(self.watch_dir, f"stacks_rank{rank}.txt")
            offset = os.path.getsize(stack_file) if os.path.exists(stack_file) else 0
            try:
                os.kill(pid, STACK_SIGNAL)
            except OSError:
                continue
            ranks.append((rank, pid, stack_file, offset))
        deadline = time.time() + 5.0  # faulthandler writes at once; give slow disks a moment
        out = []
        for rank, pid, stack_file, offset in ranks:
            text = ""
            while time.time() < deadline:
                size = os.path.getsize(stack_file) if os.path.exists(stack_file) else 0
                if size > offset:
                    time.sleep(0.2)  # let the dump finish
                    break
                time.sleep(0.1)
            try:
                with open(stack_file) as f:
                    f.seek(offset)
                    text = f.read()
            except OSError:
                pass
            out.append((rank, pid, text))
        return out

    def fire(self, quiet: float, limit: float, phase: str, hb: dict | None) -> None:
        now = time.time()
        step = (hb or {}).get("step")
        self.log(f"STALL: no progress for {quiet:.0f}s (limit {limit:.0f}s, phase {phase}, step {step}); "
                 "dumping stacks, then stopping the trainer for a restart with resume")
        stacks = self.dump_stacks()
        os.makedirs(self.stall_dir, exist_ok=True)
        report = os.path.join(self.stall_dir, f"stall_{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}.txt")
        with open(report, "w") as f:
            f.write(f"# stall detected {_utc(now)} by nsa.watchdog\n")
            f.write(f"# no heartbeat/training.csv progress for {quiet:.0f}s (limit {limit:.0f}s), phase {phase}, "
                    f"step {step}, trainer pid {self.pid}\n")
            f.write(f"# last heartbeat: {json.dumps(hb) if hb else 'none from this attempt'}\n\n")
            if not stacks:
                f.write("(no rank registered a stack dumper yet: the trainer hung before nsa.train started up)\n")
            for rank, pid, text in stacks:
                f.write(f"===== rank {rank} (pid {pid}) =====\n{text or '(no stack written within 5 s)'}\n")
        _atomic_write(os.path.join(self.watch_dir, STALLED), json.dumps({
            "detected_at": _utc(now), "quiet_s": round(quiet, 1), "limit_s": limit, "phase": phase, "step": step,
            "ranks_dumped": len(stacks), "stack_file": report}) + "\n")
        self.log(f"stacks of {len(stacks)} rank(s) written to {report}")
        self.stop_trainer()

    def stop_trainer(self) -> None:
        """SIGTERM (a merely slow trainer saves and exits), then SIGKILL after the grace period. The runner
        starts the trainer in its own session, so its process group holds torchrun and every rank."""
        group = os.getpgid(self.pid) == self.pid if _alive(self.pid) else False

        def send(sig):
            try:
                os.killpg(self.pid, sig) if group else os.kill(self.pid, sig)
            except OSError:
                pass
        send(signal.SIGTERM)
        deadline = time.time() + self.grace_s
        while time.time() < deadline and _alive(self.pid):
            time.sleep(0.2)
        if _alive(self.pid):
            self.log(f"trainer still running {self.grace_s:.0f}s after SIGTERM: SIGKILL")
            send(signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nsa.watchdog", description="Stall watchdog for one trainer launch.")
    ap.add_argument("--pid", type=int, required=True, help="the launched trainer (python or torchrun)")
    ap.add_argument("--watch-dir", required=True, help="where the trainer writes heartbeat.json, rank*.pid, stacks")
    ap.add_argument("--stall-dir", required=True, help="where stall_<UTC>.txt stack reports go (the run folder)")
    ap.add_argument("--csv", default=None, help="training.csv, a second sign of progress")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds without progress once training runs")
    ap.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds allowed before the first step")
    ap.add_argument("--grace", type=float, default=60.0, help="seconds between SIGTERM and SIGKILL")
    ap.add_argument("--poll", type=float, default=2.0)
    ap.add_argument("--log", default=None, help="also append log lines here (the runner log)")
    a = ap.parse_args(argv)
    # Ctrl-C / a dropped SSH session is the runner's business (it stops the trainer, and with it us);
    # the runner ends us with SIGTERM once the trainer has exited.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return Watchdog(a.pid, a.watch_dir, a.timeout, a.startup_timeout, a.grace, a.stall_dir, a.csv, a.poll, a.log).run()


if __name__ == "__main__":
    sys.exit(main())
