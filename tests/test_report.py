"""scripts/report.py: the run report (report.md + loss/val/throughput PNGs) from a real tiny CPU run.

One module-scoped run of the real trainer with an OOM fallback (step 3), a skipped non-finite step (6) and a
crash (10) followed by a resume from checkpoint_step8.pt, plus a hand-written runner folder (run.info with the
restart and a stall, stalls/ with a stack dump). Every number the tests expect is computed here from the CSVs.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, offline_env, run_train, tiny_config

REPORT = os.path.join(REPO, "scripts", "report.py")
PNG_NAMES = ("loss.png", "val_loss.png", "throughput.png")
PNG_SHAPE = (600, 1000)  # height, width: figsize (10, 6) at 100 dpi
RUN_ID = "m7c_20260101-000000"


def report(*args: str, **extra_env) -> subprocess.CompletedProcess:
    env = offline_env()
    env.pop("OUT_DIR", None)  # report.py honours it (like handoff.sh); only the tests that mean to set it do
    env.update(extra_env)
    return subprocess.run([sys.executable, REPORT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def expected(out_dir) -> dict:
    """The numbers report.md must show, computed independently from the run's CSVs."""
    train, val = rows(os.path.join(out_dir, "training.csv")), rows(os.path.join(out_dir, "val.csv"))
    best = min(val, key=lambda r: float(r["loss"]))
    return {
        "final_loss": f"{float(train[-1]['loss']):.4f}", "final_step": int(train[-1]["step"]),
        "first_loss": f"{float(train[0]['loss']):.4f}",
        "tokens": f"{int(train[-1]['tokens_seen']):,}",
        "median_tps": f"{statistics.median(float(r['toks_per_s']) for r in train if r['toks_per_s']):,.0f}",
        "last_tps": f"{float(train[-1]['toks_per_s']):,.0f}",
        "best_val": f"{float(best['loss']):.4f}", "best_ppl": f"{float(best['ppl']):,.2f}", "best_step": int(best["step"]),
        "last_val": f"{float(val[-1]['loss']):.4f}", "n_rows": len(train),
    }


def check_pngs(folder) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    for name in PNG_NAMES:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
        assert os.path.getsize(path) > 10_000, f"{name} is suspiciously small"
        img = mpimg.imread(path)
        assert img.shape[:2] == PNG_SHAPE, (name, img.shape)
        assert img[..., :3].std() > 0.05, f"{name} is blank"


def section(md: str, title: str) -> str:
    m = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", md, re.S | re.M)
    assert m, f"report.md has no '## {title}' section:\n{md}"
    return m.group(1)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real 12-step CPU run that crashed at step 10 and was resumed from step 8, and its runner folder."""
    root = tmp_path_factory.mktemp("report")
    out = root / "out"
    train = {"steps": 12, "log_every": 1, "eval_every": 4, "save_every": 4, "out_dir": str(out)}
    cfg1, cfg2 = root / "cfg_crash.yaml", root / "cfg.yaml"
    cfg1.write_text(yaml.safe_dump(tiny_config(train=dict(train, fault_inject="oom@3,nan@6,crash@10"))))
    cfg2.write_text(yaml.safe_dump(tiny_config(train=train)))
    p = run_train(str(cfg1))
    assert p.returncode == 1, p.stdout + p.stderr
    p = run_train(str(cfg2))
    assert p.returncode == 0, p.stdout + p.stderr

    run_dir = root / "train_runs" / RUN_ID
    (run_dir / "stalls").mkdir(parents=True)
    (run_dir / "stalls" / "stall_1_20260101-003000.txt").write_text(
        "stall at step 9: no progress for 1200s\nThread 0x7f (most recent call first):\n  File \"nsa/train.py\", line 1\n")
    info = [("run_id", RUN_ID), ("started_utc", "2026-01-01T00:00:00Z"), ("config", str(cfg2)),
            ("out_dir", str(out)), ("gpu_count", "0"), ("gpu_models", "none"), ("world_size", "1"),
            ("driver_version", "none"), ("torch_version", "2.0-test"), ("preflight_result", "passed"),
            ("usd_per_gpu_hour", "not set (GPU_HOURLY_USD, or runtime.usd_per_gpu_hour in the config)"),
            ("alerts", "off"),
            ("attempt_1_resume_from", "none (fresh start)"), ("attempt_1_started_utc", "2026-01-01T00:00:05Z"),
            ("attempt_1_exit", "1 (crashed)"), ("restart_1", "after exit 1, backoff 0s"),
            ("attempt_2_resume_from", str(out / "checkpoint_step8.pt")),
            ("attempt_2_started_utc", "2026-01-01T00:10:00Z"),
            ("stall_1", "attempt 2: no progress for 1200s (limit 1200s) in phase train at step 9; stacks of 1 "
                        "rank(s) in stalls/stall_1_20260101-003000.txt"),
            ("attempt_2_exit", "0 (completed (or early-stopped))"),
            ("finished_utc", "2026-01-01T01:02:03Z"), ("exit_code", "0 (completed (or early-stopped))")]
    (run_dir / "run.info").write_text("# run.info — written by scripts/train_m7c_prime.sh\n"
                                      + "".join(f"{k + ':':<22} {v}\n" for k, v in info))
    return {"root": root, "out": out, "run_dir": run_dir}


@pytest.fixture(scope="module")
def run_folder_report(real_run):
    p = report(str(real_run["run_dir"]))
    assert p.returncode == 0, p.stdout + p.stderr
    folder = real_run["run_dir"] / "report"
    return folder, (folder / "report.md").read_text(), p


# ------------------------------------------------------------------------------------------ tests


def test_run_folder_report_pngs(run_folder_report):
    folder, _, p = run_folder_report
    assert p.stdout.strip().count("\n") == 0 and "report.md" in p.stdout and p.stderr == ""
    check_pngs(folder)


def test_run_folder_report_numbers_match_the_csvs(real_run, run_folder_report):
    _, md, _ = run_folder_report
    e = expected(real_run["out"])
    metrics = json.loads((real_run["out"] / "metrics.json").read_text())
    assert md.startswith(f"# Run report: {RUN_ID}\n")
    st = section(md, "Status")
    assert "**Status:** completed — reached train.steps=12" in st
    assert "**Runner exit code:** 0 (completed" in st and "**Trainer exit code:** 0" in st
    assert "**Preflight:** passed" in st
    cfg = section(md, "Config")
    assert f"params {metrics['num_params'] / 1e3:.2f}K ({metrics['num_params']:,})" in cfg
    assert "attention full" in cfg and "**seq_len:** 32" in cfg and "**tokens/step:** 128" in cfg
    assert "**total steps:** 12" in cfg
    hw = section(md, "Hardware")
    assert "0 × none (world size 1" in hw and "torch 2.0-test" in hw and "device cpu" in hw

    prog = section(md, "Progress")
    assert e["final_step"] == 12
    assert "**Step:** 12 / 12 (100.0%)" in prog
    assert f"**Tokens seen:** {e['tokens']} " in prog and e["tokens"] == f"{12 * 128:,}"
    assert (f"**Final training loss:** {e['final_loss']} at step 12 (first: {e['first_loss']} at step 1; "
            f"{e['n_rows']} logged rows)") in prog

    val = section(md, "Validation")
    assert (f"**Best validation loss:** {e['best_val']} (ppl {e['best_ppl']}) at step {e['best_step']:,}") in val
    assert f"**Last validation loss:** {e['last_val']} " in val

    thr = section(md, "Throughput")
    assert f"**Tokens/s:** median {e['median_tps']}, last {e['last_tps']} ({e['n_rows']} rows)" in thr
    assert "**MFU:** median n/a" in thr and "**Peak memory:** n/a" in thr

    tc = section(md, "Time and cost")
    assert "**Node wall time:** 1h02m03s" in tc
    assert "**Price:** n/a (no price set)" in tc


def test_run_folder_report_lists_incidents(real_run, run_folder_report):
    _, md, _ = run_folder_report
    inc = section(md, "Incidents")
    assert "**Restarts:** 1 — attempt 1 (fresh start) exit 1 (crashed) → restart 1 after exit 1, backoff 0s; " \
           "attempt 2 from step 8 exit 0" in inc
    assert "**Stalls:** 1 in run.info, 1 stack dump file(s)" in inc
    assert "stall_1: attempt 2: no progress for 1200s" in inc
    assert "`stalls/stall_1_20260101-003000.txt`" in inc
    # the real trainer recorded these: OOM at step 3, NaN at step 6, crash at 10, resume at 8
    assert "**OOM fallbacks:** 1 incident(s)" in inc
    assert "**Skipped non-finite steps:** 1 (metrics.json), 1 (training.csv's last row), 1 incident(s)" in inc
    assert "**Preemptions / resumes:** 0 preempted, 1 resumed" in inc
    assert "**Other incidents:** crashed × 1" in inc
    assert re.search(r"^\| \S+ \| 8 \| resumed \| from checkpoint_step8\.pt", inc, re.M), inc
    files = section(md, "Files")
    for name in PNG_NAMES:
        assert f"[{name}]({name})" in files


def test_chart_markers_come_from_the_files(real_run):
    spec = importlib.util.spec_from_file_location("report_mod", REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    events = mod.Run(str(real_run["run_dir"])).events()
    # skipped: the CSV counter goes up at step 6; resume: incident + run.info attempt_2_resume_from; stall: step 9
    assert {(6, "skipped step"), (8, "resume"), (9, "stall")} <= set(events), events
    assert any(kind == "OOM fallback" for _, kind in events), events


def test_out_dir_report_without_runner_info(real_run, tmp_path):
    out = real_run["out"]
    p = report(str(out), "--out", str(tmp_path / "r"))
    assert p.returncode == 0, p.stdout + p.stderr
    check_pngs(tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    e = expected(out)
    assert "runner info: not available" in md
    assert f"**Final training loss:** {e['final_loss']} at step 12" in md
    assert f"**Best validation loss:** {e['best_val']} (ppl {e['best_ppl']}) at step {e['best_step']}" in md
    assert f"**Tokens/s:** median {e['median_tps']}," in md
    assert "**Restarts:** n/a (runner info: not available)" in md
    # the default output folder is <out_dir>/report
    p = report(str(out))
    assert p.returncode == 0 and (out / "report" / "report.md").is_file()
    shutil.rmtree(out / "report")


def test_minimal_files_like_the_bats_fake_trainer(tmp_path):
    """training.csv with only step,loss,lr,toks_per_s; metrics.json with status/step/tokens_seen (older trainers)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "training.csv").write_text("step,loss,lr,toks_per_s\n" + "".join(
        f"{i},{10 / (1 + 0.1 * i):.4f},0.0003,{1000 + i}.5\n" for i in range(1, 21)))
    (out / "val.csv").write_text("step,loss,ppl\n10,5.0000,148.413\n20,3.3333,28.031\n")
    (out / "metrics.json").write_text(json.dumps({"status": "completed", "step": 20, "tokens_seen": 81920}))
    p = report(str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    check_pngs(out / "report")
    md = (out / "report" / "report.md").read_text()
    assert "**Step:** 20 / n/a" in md
    assert "**Tokens seen:** 81,920 (81.92K)" in md
    assert "**Final training loss:** 3.3333 at step 20 (first: 9.0909 at step 1; 20 logged rows)" in md
    assert "**Best validation loss:** 3.3333 (ppl 28.03) at step 20" in md
    assert f"**Tokens/s:** median {statistics.median(1000.5 + i for i in range(1, 21)):,.0f}, last 1,020" in md
    assert "**Trainer wall time:** n/a" in md and "**OOM fallbacks:** incidents n/a" in md
    assert "no incident log" in md


def test_bundle_layout_and_out_dir_override(real_run, tmp_path):
    """An unpacked handoff bundle: run.info names an out_dir from another machine, the CSVs sit beside it."""
    bundle = tmp_path / f"handoff_{RUN_ID}"
    shutil.copytree(real_run["run_dir"], bundle, ignore=shutil.ignore_patterns("report"))
    for f in ("training.csv", "val.csv", "metrics.json"):
        shutil.copy(real_run["out"] / f, bundle / f)
    text = (bundle / "run.info").read_text().replace(str(real_run["out"]), "/nonexistent/node/artifacts/m7c_cpu")
    # an alerts line holding a webhook must never reach the report (assembled at run time: no literal in git)
    hook = "https://hooks.slack.com/services/" + "T0000/B0000/" + "q" * 24
    (bundle / "run.info").write_text(text.replace("alerts:                off", f"alerts:                {hook}"))
    p = report(str(bundle))
    assert p.returncode == 0, p.stdout + p.stderr
    md = (bundle / "report" / "report.md").read_text()
    assert f"**Final training loss:** {expected(real_run['out'])['final_loss']} at step 12" in md
    assert hook not in md and "**Alerts:**" in md
    # OUT_DIR wins over run.info (as in handoff.sh)
    (bundle / "training.csv").write_text("step,loss,lr,toks_per_s\n1,7.5,0.001,10\n")
    p = report(str(bundle), "--out", str(tmp_path / "r2"), OUT_DIR=str(real_run["out"]))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "at step 12" in (tmp_path / "r2" / "report.md").read_text()


@pytest.mark.parametrize("case", ["no_training_csv", "header_only", "neither", "not_a_folder", "run_dir_no_out"])
def test_nothing_to_report_is_one_line_and_exit_2(tmp_path, case):
    target = tmp_path / "x"
    target.mkdir()
    if case == "no_training_csv":
        (target / "metrics.json").write_text('{"status": "running"}')
    elif case == "header_only":
        (target / "training.csv").write_text("step,loss,lr,toks_per_s,grad_norm,mfu,step_ms,tokens_seen,skipped_steps,mem_GiB\n")
    elif case == "not_a_folder":
        target = tmp_path / "nope"
    elif case == "run_dir_no_out":
        (target / "run.info").write_text(f"out_dir:               {tmp_path / 'gone'}\n")
    p = report(str(target), "--out", str(tmp_path / "r"))
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stdout == "" and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("report: error: "), p.stderr
    assert not (tmp_path / "r" / "report.md").exists()
    if case in ("no_training_csv", "header_only", "run_dir_no_out"):
        assert "training.csv" in lines[0]


def test_bad_usage_is_one_line_and_exit_2():
    p = report()
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Usage:" in p.stderr
