"""Two-process torchrun (gloo, CPU): trains, writes outputs once, preempts on one rank's signal, resumes exactly."""

import os
import signal
import sys
import time

import pytest
import yaml

from tests.conftest import finish, read_csv, read_metrics, start_train, tiny_config, wait_for_output
from tests.test_train import assert_same_run, losses

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def worker_pid(agent_pid: int, rank: int) -> int:
    """PID of the torchrun worker with RANK=rank (children of the agent)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            if env.get(b"RANK") == str(rank).encode():
                return int(pid)
        except (OSError, ValueError, IndexError):
            continue
    raise AssertionError(f"no worker with RANK={rank} under {agent_pid}")


@pytest.fixture(scope="module")
def ddp_ref(tmp_path_factory):
    """An uninterrupted two-rank run (eager) that the tests compare against: (config path, out_dir, log)."""
    base = tmp_path_factory.mktemp("ddp")
    cfg = base / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(train={"batch_size": 2, "accumulate_grad_batches": 1,
                                                     "global_batch_tokens": 256})))
    ref = str(base / "ref")
    code, log = finish(start_train(str(cfg), "--out-dir", ref, launcher=TORCHRUN), timeout=400)
    assert code == 0, log
    return str(cfg), ref, log


@pytest.mark.slow
def test_ddp_two_ranks_preempt_and_exact_resume(tmp_path, ddp_ref):
    cfg, ref, log = ddp_ref
    m = read_metrics(ref)
    assert m["status"] == "completed" and m["world_size"] == 2 and m["accumulate_grad_batches"] == 2
    assert m["tokens_seen"] == 8 * 256  # global tokens: 2 ranks x 2 micro-batches x 2 x 32
    rows = [r["step"] for r in read_csv(os.path.join(ref, "training.csv"))]
    assert rows == [str(s) for s in range(1, 9)]  # written once, by rank 0 only
    assert log.count("step 8/8 |") == 1 and log.count("completed: reached") == 1

    out = str(tmp_path / "pre")
    p = start_train(cfg, "--out-dir", out, "train.fault_inject=stall@3", launcher=TORCHRUN)
    wait_for_output(p, "stalling at step 3", timeout=300)
    time.sleep(0.5)
    os.kill(worker_pid(p.pid, 1), signal.SIGTERM)  # only rank 1 is told; rank 0 must agree via all-reduce
    code, log = finish(p, timeout=300)
    assert code != 0, log  # torchrun reports the workers' exit 143 as a failure of the job
    assert "exitcode  : 143" in log or "exit code 143" in log.lower() or "143" in log, log
    m = read_metrics(out)
    assert m["status"] == "preempted" and m["step"] == 3 and "another rank" in m["stop_reason"]
    assert os.path.exists(os.path.join(out, "checkpoint_step3.pt"))

    p = start_train(cfg, "--out-dir", out, "--resume", "auto", "train.fault_inject=", launcher=TORCHRUN)
    code, log = finish(p, timeout=400)
    assert code == 0 and "at step 3" in log, log
    assert_same_run(ref, out)


@pytest.mark.slow
def test_ddp_fallbacks_on_one_rank(tmp_path, ddp_ref):
    """Fallbacks that only rank 1 needs: with runtime.compile=true its compiled step 1 fails, and its step 2 runs
    out of memory. Rank 1 retries each step within the same DDP wrapper while rank 0 waits for it in the
    gradient all-reduce (the compile fallback used to build a new DDP wrapper, a collective rank 0 never joined:
    the job hung), and at the step's end every rank takes the fallback, so they run the same code and the
    checkpoint records the OOM setting. The run completes with both on record and matches the eager run."""
    import torch

    cfg, ref, _ = ddp_ref
    out = str(tmp_path / "fallbacks")
    p = start_train(cfg, "--out-dir", out, "runtime.compile=true", "train.fault_inject=compile@1:1,oom@2:1",
                    launcher=TORCHRUN)
    code, log = finish(p, timeout=300)
    assert code == 0, log
    assert "torch.compile failed on rank 1 at step 1 (InternalTorchDynamoError: injected" in log, log
    assert "torch.compile failed on another rank at step 1; all ranks continue without it" in log, log
    assert "another rank ran out of memory at step 2: every rank now uses micro-batch 1" in log, log
    m = read_metrics(out)
    assert m["status"] == "completed" and m["compile_fallback"]["step"] == 1, m
    assert m["oom_fallback"] == {"micro_batch": 1, "activation_checkpointing": False}, m
    assert [(i["kind"], i["step"]) for i in m["incidents"]] == [("compile_fallback", 1), ("oom_fallback", 2)]
    assert torch.load(os.path.join(out, "checkpoint_step8.pt"), weights_only=False)["oom_split"] == 2
    la, lb = losses(ref), losses(out)
    assert [s for s, _ in la] == [s for s, _ in lb]
    for (s, a), (_, b) in zip(la, lb):  # rank 0's step 1 ran compiled; from step 2 on, two chunks a micro-batch
        assert abs(a - b) < 1e-4, (s, a, b)
