"""End to end on CPU: the real scripts/train_m7c_prime.sh and the real trainer, from a fresh copy.

The working tree's files that a commit would hold (`git ls-files --cached --others --exclude-standard`:
tracked plus untracked-but-not-ignored, so no .venv/ or artifacts/) are copied to a temporary folder
and committed there, which is what `git clone` of that state gives a new user. The runner then runs
there with no GPU (NGPU=0 -> configs/m7c_cpu.yaml, plain `python`), reusing this test's venv through
VENV_DIR instead of reinstalling. Kept short (< 3 min on 2 cores): the smoke gate runs through a
shortened copy of configs/smoke.yaml (6 steps, checkpoint at 3, resumed from it), and real training
runs STEPS=2 then, on a second invocation, resumes to STEPS=4. Then scripts/handoff.sh bundles it.

Checks every contract file: run folder (run.info fields, smoke.log, train.log), trainer outputs
(training.csv / val.csv headers, metrics.json status and step, tb/ events, checkpoint_step{N}.pt,
best/final safetensors + JSON, config.yaml), resume on the second invocation, and the bundle.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # a hard stop; the expected wall time is 1-3 minutes

pytestmark = pytest.mark.skipif(
    not (REPO / "nsa" / "train.py").is_file() or not (REPO / "configs" / "m7c_cpu.yaml").is_file(),
    reason="the trainer (nsa/train.py) or configs/m7c_cpu.yaml is not in this tree yet",
)


def _fresh_clone(dst: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if not src.is_file():  # deleted in the working tree but still tracked
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel)
    git = ["git", "-c", "user.name=e2e", "-c", "user.email=e2e@example.invalid", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q", "-b", "main"], cwd=dst, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dst, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "e2e snapshot"], cwd=dst, check=True)
    return dst


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    print(p.stdout[-6000:])
    print(p.stderr[-3000:], file=sys.stderr)
    return p


def _info(run_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (run_dir / "run.info").read_text().splitlines():
        if line.startswith("#") or ":" not in line:
            continue
        k, v = line.split(":", 1)
        out.setdefault(k.strip(), v.strip())
    return out


def test_runner_end_to_end_on_cpu_from_a_fresh_clone(tmp_path: Path) -> None:
    clone = _fresh_clone(tmp_path / "clone")
    assert not (clone / ".venv").exists() and not (clone / "artifacts" / "m7c_cpu").exists()

    smoke = yaml.safe_load((clone / "configs" / "smoke.yaml").read_text())
    smoke["train"].update(steps=6, save_every=3, eval_every=3, log_every=1, keep_last_k=2)
    smoke_cfg = tmp_path / "smoke_short.yaml"
    smoke_cfg.write_text(yaml.safe_dump(smoke))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "TORCH_NCCL_", "FAKE_"))}
    for k in ("CONFIG", "OUT_DIR", "RUNS_ROOT", "DATASET", "SKIP_SMOKE", "RESUME", "DRY_RUN", "NNODES", "LAUNCHER"):
        env.pop(k, None)
    env.update(VENV_DIR=sys.prefix, NGPU="0", STEPS="2", SMOKE_CONFIG=str(smoke_cfg), CI="true")
    overrides = ["train.log_every=1", "train.eval_every=2", "train.save_every=2", "train.eval_batches=1"]

    p = _run(["bash", "scripts/train_m7c_prime.sh", *overrides], clone, env)
    assert p.returncode == 0, f"runner failed with exit {p.returncode}"
    assert "config       : configs/m7c_cpu.yaml" in p.stdout
    assert "smoke check OK" in p.stdout

    runs = sorted((clone / "artifacts" / "train_runs").glob("m7c_*"))
    assert len(runs) == 1
    run_dir = runs[0]
    info = _info(run_dir)
    for key in ("run_id", "started_utc", "git_commit", "config", "config_sha256", "gpu_count", "gpu_models",
                "gpu_vram_gib", "driver_version", "cuda_driver_version", "torch_version", "python_version",
                "launcher", "launch_command", "resume_from", "smoke_result", "exit_code"):
        assert key in info, f"run.info lacks {key}"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    assert info["git_commit"] == head
    assert info["config"] == "configs/m7c_cpu.yaml" and info["gpu_count"] == "0" and info["device"] == "cpu"
    assert info["torch_version"].startswith("2.") and info["smoke_result"].startswith("passed")
    assert info["exit_code"].startswith("0 ")
    assert "python -m nsa.train --config configs/m7c_cpu.yaml --resume auto" in info["launch_command"]
    for f in ("smoke.log", "train.log", "runner.log"):
        assert (run_dir / f).stat().st_size > 0, f
    assert "resumed" in (run_dir / "smoke.log").read_text()

    out = clone / "artifacts" / "m7c_cpu"  # the CPU config's train.out_dir
    with open(out / "training.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["step", "loss", "lr", "toks_per_s"]
    assert [int(r[0]) for r in rows[1:]] == [1, 2]
    with open(out / "val.csv", newline="") as f:
        vrows = list(csv.reader(f))
    assert vrows[0][:3] == ["step", "loss", "ppl"] and len(vrows) >= 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "completed" and m["step"] == 2
    assert any((out / "tb").rglob("*tfevents*"))
    assert (out / "checkpoint_step2.pt").is_file()
    for stem in ("best-model", "final-model"):
        assert (out / f"{stem}.safetensors").stat().st_size > 0 and (out / f"{stem}.json").is_file()
    assert (out / "config.yaml").is_file()

    # second invocation: no smoke, longer run -> resumes from the step-2 checkpoint
    env2 = dict(env, STEPS="4", SKIP_SMOKE="1")
    p = _run(["bash", "scripts/train_m7c_prime.sh", *overrides], clone, env2)
    assert p.returncode == 0, f"resumed runner failed with exit {p.returncode}"
    assert f"resume from  : {out}/checkpoint_step2.pt" in p.stdout
    runs = sorted((clone / "artifacts" / "train_runs").glob("m7c_*"))
    assert len(runs) == 2
    assert _info(runs[-1])["resume_from"].endswith("checkpoint_step2.pt")
    with open(out / "training.csv", newline="") as f:
        steps = [int(r[0]) for r in list(csv.reader(f))[1:]]
    assert steps == [1, 2, 3, 4], steps
    assert json.loads((out / "metrics.json").read_text())["step"] == 4

    # handoff of the latest run
    bundle = tmp_path / "handoff.tar.gz"
    p = _run(["bash", "scripts/handoff.sh", "--out", str(bundle)], clone, env2)
    assert p.returncode == 0
    with tarfile.open(bundle) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for f in ("run.info", "preflight.log", "train.log", "training.csv", "val.csv", "metrics.json", "report/report.md",
              "report/loss.png",
              "SHA256SUMS", "env.txt", "checkpoints/checkpoint_step4.pt"):
        assert f in names, f"bundle lacks {f}: {sorted(names)}"
