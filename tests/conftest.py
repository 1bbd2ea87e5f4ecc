"""Shared fixtures: offline environment, tiny configs, and a helper that runs the trainer CLI."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model that is fast on 2 CPU cores. Full attention where a test only needs "a model".
TINY_MODEL = {"vocab_size": 512, "dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16,
              "ffn_hidden": 64, "attention": "full", "max_seq_len": 64}
TINY_NSA = {"cmp_block": 8, "cmp_stride": 4, "slc_block": 8, "n_selected": 4, "window": 16}


# scripts/test.sh runs the suite in two phases: first everything else spread over the cores (pytest-xdist,
# one test file per worker at a time: --dist loadfile, so a module-scoped fixture runs once), then these
# files one test at a time. They train with several threads, start several processes per test, or check
# wall-clock times, so beside another worker on a 2-core machine they would run 2-5x slower or fail.
SERIAL_FILES = {
    "test_nsa_learning.py", "test_train_cpu_default.py", "test_runner_e2e.py", "test_train.py",
    "test_train_ddp.py", "test_operations.py", "test_watchdog_alerts.py",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds or more (still part of the default run)")
    config.addinivalue_line("markers", "serial: runs in scripts/test.sh's one-at-a-time phase (SERIAL_FILES)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SERIAL_FILES:
            item.add_marker(pytest.mark.serial)


def offline_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    env.update(extra)
    return env


def tiny_config(**sections) -> dict:
    """A tiny synthetic-data config; `sections` deep-merge over it (e.g. train={"steps": 8})."""
    cfg = {
        "model": dict(TINY_MODEL, nsa=dict(TINY_NSA)),
        "data": {"dataset": "synthetic", "synthetic_vocab": 512, "prefetch_batches": 2},
        "train": {"steps": 8, "seq_len": 32, "batch_size": 2, "accumulate_grad_batches": 2, "lr": 3e-3,
                  "warmup_steps": 2, "log_every": 1, "eval_every": 4, "eval_batches": 2, "save_every": 4,
                  "keep_last_k": 5, "seed": 7},
        "runtime": {"device": "cpu", "threads": 1},
    }
    for name, values in sections.items():
        for k, v in values.items():
            if isinstance(v, dict) and isinstance(cfg[name].get(k), dict):
                cfg[name][k].update(v)
            else:
                cfg[name][k] = v
    return cfg


@pytest.fixture
def write_config(tmp_path):
    def write(cfg: dict, name: str = "cfg.yaml") -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return str(path)
    return write


def train_cmd(config: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "nsa.train", "--config", config, *args]


def run_train(config: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(config, *args), cwd=REPO, env=env or offline_env(), capture_output=True,
                          text=True, timeout=timeout)


def run_train_concurrently(jobs: list[tuple], max_workers: int | None = None) -> list[subprocess.CompletedProcess]:
    """run_train(*args, **kwargs) for each (args, kwargs) job, as many at a time as there are cores (default),
    results in job order. Most trainer runs here are one thread (tiny_config: runtime.threads=1, OMP_NUM_THREADS=1)
    and the CLI cases mostly torch's single-threaded import, so run one after another they leave cores idle; no
    more than one per core, so that each still runs (and times itself) as if alone."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max_workers or os.cpu_count() or 2) as pool:
        futures = [pool.submit(run_train, *args, **kwargs) for args, kwargs in jobs]
        return [f.result() for f in futures]


def start_train(config: str, *args: str, env: dict | None = None, launcher: list[str] | None = None) -> subprocess.Popen:
    """Start the trainer in its own process group; a thread collects its output into proc.lines."""
    cmd = (launcher + ["-m", "nsa.train", "--config", config, *args]) if launcher else train_cmd(config, *args)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or offline_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.lines = []
    proc.reader = threading.Thread(target=lambda: proc.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    proc.reader.start()
    return proc


def wait_for_output(proc: subprocess.Popen, needle: str, timeout: float = 240) -> str:
    """Wait until `needle` appears in the child's output; return the output so far."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = "".join(proc.lines)
        if needle in text:
            return text
        if proc.poll() is not None:
            proc.reader.join(timeout=5)
            if needle in "".join(proc.lines):
                return "".join(proc.lines)
            break
        time.sleep(0.05)
    kill_group(proc)
    raise AssertionError(f"{needle!r} never appeared; output:\n{''.join(proc.lines)}")


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)  # never leave a stuck trainer behind
        raise
    proc.reader.join(timeout=10)
    return code, "".join(proc.lines)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_metrics(out_dir) -> dict:
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return json.load(f)


def load_weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)
