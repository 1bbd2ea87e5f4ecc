"""Operating a paid run with the real trainer on CPU: cost and ETA, incidents across a crash and resume,
the heartbeat and SIGUSR2 stack dumps, and the runner's watchdog catching a trainer that hangs for good
(train.fault_inject=hang@N, deaf to SIGTERM) and resuming it to the same final step.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tests.conftest import (REPO, finish, offline_env, read_csv, read_metrics, run_train, run_train_concurrently,
                            start_train, tiny_config, wait_for_output)

PRICE = 36.0  # USD per GPU-hour = 1 cent per second: big enough to see on a seconds-long run


def _tb_scalars(out: str, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, "tb"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_cost_and_eta_agree_with_elapsed_time_and_price(write_config, tmp_path):
    cfg = write_config(tiny_config(train={"steps": 12, "log_every": 2, "eval_every": 6, "save_every": 6}))
    out = str(tmp_path / "run")
    t0 = time.time()
    r = run_train(cfg, "--out-dir", out, env=offline_env(GPU_HOURLY_USD=str(PRICE)))
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    m = read_metrics(out)
    # elapsed is the trainer process's wall time (from interpreter start), so within the test's own stopwatch
    assert wall - 3.0 <= m["elapsed_s"] <= wall + 0.1, (m["elapsed_s"], wall)
    assert m["usd_per_gpu_hour"] == PRICE and m["billed_gpus"] == 1 and m["attempts"] == 1
    assert m["cost_usd"] == pytest.approx(m["elapsed_s"] / 3600 * PRICE, abs=1e-4 + 0.05 / 3600 * PRICE)
    assert m["eta_s"] == 0 and m["projected_cost_usd"] == pytest.approx(m["cost_usd"], abs=1e-4)
    # every progress line: spent + ETA x rate == projected total (to the printed cent), elapsed rising
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == 6
    seen = []
    for ln in lines:
        g = re.search(r"elapsed (\d+)m(\d+)s \| ETA (\d+)m(\d+)s \| \$(\d+\.\d\d) spent, ~\$(\d+\.\d\d) total", ln)
        assert g, ln
        el, eta = int(g[1]) * 60 + int(g[2]), int(g[3]) * 60 + int(g[4])
        spent, total = float(g[5]), float(g[6])
        assert spent == pytest.approx(el * PRICE / 3600, abs=0.015)  # printed seconds are truncated
        assert total == pytest.approx(spent + eta * PRICE / 3600, abs=0.025)
        seen.append(el)
    assert seen == sorted(seen)
    # TensorBoard has the same series
    cost = _tb_scalars(out, "run/cost_usd")
    assert len(cost) == 6 and cost == sorted(cost) and cost[-1] <= m["cost_usd"] + 1e-6
    assert len(_tb_scalars(out, "run/eta_h")) == 6


def test_no_price_means_time_only_and_a_bad_price_is_refused(write_config, tmp_path):
    cfg = write_config(tiny_config(train={"steps": 2, "eval_every": 0, "save_every": 2}))
    # three independent one-thread trainers, one per core at a time
    a, b, c = run_train_concurrently([
        ((cfg, "--out-dir", str(tmp_path / "a")), {}),
        ((cfg, "--out-dir", str(tmp_path / "b")), {"env": offline_env(GPU_HOURLY_USD="two dollars")}),
        ((cfg, "--out-dir", str(tmp_path / "c"), "runtime.usd_per_gpu_hour=7.2"), {}),
    ])
    assert a.returncode == 0, a.stderr
    m = read_metrics(str(tmp_path / "a"))
    assert m["elapsed_s"] > 0 and m["cost_usd"] is None and m["projected_cost_usd"] is None
    assert "spent" not in a.stdout and "elapsed " in a.stdout
    assert b.returncode == 2 and "Traceback" not in b.stderr
    assert "GPU_HOURLY_USD='two dollars' is not a price" in b.stderr
    # the config key works when the environment does not set one
    assert c.returncode == 0 and read_metrics(str(tmp_path / "c"))["usd_per_gpu_hour"] == 7.2


def test_elapsed_cost_and_incidents_survive_a_crash_and_resume(write_config, tmp_path):
    cfg = write_config(tiny_config(train={"steps": 8, "save_every": 4, "eval_every": 4, "log_every": 1}))
    out = str(tmp_path / "run")
    env = offline_env(GPU_HOURLY_USD=str(PRICE))
    r = run_train(cfg, "--out-dir", out, "train.fault_inject=crash@6,nan@2", env=env)
    assert r.returncode == 1
    crashed = read_metrics(out)
    assert crashed["status"] == "failed"
    t0 = time.time()
    r = run_train(cfg, "--out-dir", out, "train.fault_inject=crash@6,nan@2", env=env)  # faults fire once per out_dir
    wall2 = time.time() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    m = read_metrics(out)
    # the second launch adds its own time to everything the first one spent, including the lost steps 5-6
    assert m["elapsed_s"] >= crashed["elapsed_s"] + wall2 - 3.0
    assert m["attempts"] == 2
    assert m["cost_usd"] == pytest.approx(m["elapsed_s"] / 3600 * PRICE, abs=1e-4 + 0.05 / 3600 * PRICE)
    kinds = [(i["kind"], i["step"]) for i in m["incidents"]]
    assert kinds == [("skipped_step", 2), ("crashed", 6), ("resumed", 4)], kinds
    assert "injected crash at step 6" in m["incidents"][1]["detail"]
    assert m["incidents"][2]["detail"].startswith("from checkpoint_step4.pt at step 4 (launch 2)")
    assert [int(row["step"]) for row in read_csv(os.path.join(out, "training.csv"))] == list(range(1, 9))


def test_heartbeat_and_sigusr2_stack_dump_on_a_standalone_trainer(write_config, tmp_path):
    cfg = write_config(tiny_config(train={"steps": 6, "save_every": 3, "eval_every": 0}))
    out = str(tmp_path / "run")
    p = start_train(cfg, "--out-dir", out, "train.fault_inject=stall@3")
    wait_for_output(p, "stalling at step 3")
    hb = json.load(open(os.path.join(out, "heartbeat.json")))
    assert hb["phase"] == "train" and hb["step"] in (1, 2) and hb["pid"] == p.pid  # throttled to 1 write/s
    os.kill(p.pid, signal.SIGUSR2)  # stacks to stderr (merged into the captured output), training goes on
    text = wait_for_output(p, "in train_step")
    assert "Thread" in text and "nsa/train.py" in text
    os.kill(p.pid, signal.SIGTERM)
    code, log = finish(p)
    assert code == 143, log
    assert json.load(open(os.path.join(out, "heartbeat.json")))["phase"] == "exiting"


@pytest.mark.slow
def test_runner_watchdog_resumes_a_hung_trainer_to_the_same_final_step(write_config, tmp_path):
    """The real runner, trainer and watchdog: hang@6 blocks for good (deaf to SIGTERM) after the step-4
    checkpoint; the watchdog must see the silence within STALL_TIMEOUT_S, dump the stack into the run folder,
    kill it, and the supervisor must resume from step 4 to step 8 with the losses of an uninterrupted run."""
    cfg_d = tiny_config(train={"steps": 8, "save_every": 4, "eval_every": 4, "log_every": 1})
    cfg = write_config(cfg_d)
    ref = str(tmp_path / "ref")
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = offline_env(VENV_DIR=sys.prefix, NGPU="0", CONFIG=cfg, OUT_DIR=str(out), RUNS_ROOT=str(runs),
                      SKIP_SMOKE="1", SKIP_PREFLIGHT="1", SUPERVISE="1", RESTART_BACKOFF_S="0", STALL_TIMEOUT_S="6",
                      STALL_KILL_GRACE_S="2", STALL_POLL_S="0.5", GPU_HOURLY_USD=str(PRICE))
    for k in ("DRY_RUN", "RESUME", "STEPS", "DATASET", "NNODES", "LAUNCHER", "ALERT_WEBHOOK_URL"):
        env.pop(k, None)
    with ThreadPoolExecutor(max_workers=1) as pool:  # the uninterrupted reference meanwhile, on the other core
        ref_run = pool.submit(run_train, cfg, "--out-dir", ref)
        p = subprocess.run(["bash", "scripts/train_m7c_prime.sh", "train.fault_inject=hang@6"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)
        r = ref_run.result()
    assert r.returncode == 0, r.stdout + r.stderr
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    run_dir = next(runs.glob("m7c_*"))
    info = (run_dir / "run.info").read_text()
    # (the real pre-flight through the runner: tests/test_runner_e2e.py; here it would only add seconds)
    assert re.search(r"^preflight_result: +skipped", info, re.M), info
    assert re.search(r"^stall_1: +attempt 1: no progress for", info, re.M), info
    assert re.search(r"^attempt_2_resume_from: +.*checkpoint_step4\.pt", info, re.M), info
    # detected within the configured time: quiet for more than 6 s, and not much more
    report = next((run_dir / "stalls").glob("stall_*.txt")).read_text()
    quiet = float(re.search(r"progress for (\d+)s \(limit 6s\)", report)[1])
    assert 6 <= quiet <= 6 + 3, report[:300]
    assert "===== rank 0" in report and "in train_step" in report and "nsa/train.py" in report
    assert "SIGKILL" in (run_dir / "runner.log").read_text()  # hang@6 ignores SIGTERM
    # same final step, same numbers as the uninterrupted run
    rows, ref_rows = read_csv(out / "training.csv"), read_csv(os.path.join(ref, "training.csv"))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [float(r["loss"]) for r in rows] == pytest.approx([float(r["loss"]) for r in ref_rows], rel=1e-5)
    m = read_metrics(str(out))
    assert m["status"] == "completed" and m["step"] == 8 and m["attempts"] == 2
    assert [i["kind"] for i in m["incidents"]] == ["resumed"]
    assert m["cost_usd"] == pytest.approx(m["elapsed_s"] / 3600 * PRICE, abs=1e-3)
    assert not math.isnan(m["elapsed_s"])
    assert yaml.safe_load(open(out / "config.yaml"))["train"]["fault_inject"] == "hang@6"
