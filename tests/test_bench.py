"""The benchmark tooling on CPU: bench/bench_attention.py (rows, table, fla skip rows, the issue's checks),
bench/bench_decode.py (both cache modes), bench/bench_trainer.py (the real trainer, a failing run) and bench/gpu_suite.sh (syntax, dry run, and a real run of its step machinery with a fake interpreter:
timeouts, failures, budget, JSON-line collection, summary). No GPU needed; ~25 s on 2 cores."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from nsa.model import HAS_CHUNKED_LOSS
from tests.conftest import REPO, offline_env

BENCH = os.path.join(REPO, "bench")
SUITE = os.path.join(BENCH, "gpu_suite.sh")
ROW_FIELDS = {"impl", "layout", "scope", "seq_len", "pass", "ms", "peak_mem_mb", "device", "dtype", "batch", "dim",
              "n_heads", "n_kv_heads", "head_dim", "nsa", "torch"}


@pytest.fixture(scope="module")
def bench_attention():
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location("bench_attention_under_test", os.path.join(BENCH, "bench_attention.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(BENCH)


def test_bench_attention_cli_cpu_rows_and_table():
    """The CLI on CPU (a subprocess per measurement): both scopes, nsa/full measured, fla a skipped row."""
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "bench_attention.py"), "--device", "cpu", "--seq-lens", "256",
         "--repeats", "1", "--layout", "m7c", "--scope", "both", "--passes", "fwd_bwd", "--impls", "nsa,full,fla"],
        cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["scope"], r["impl"]) for r in rows] == [
        ("layer", "nsa"), ("layer", "full"), ("layer", "fla"), ("core", "nsa"), ("core", "full"), ("core", "fla")]
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert (r["layout"], r["seq_len"], r["pass"], r["n_heads"], r["n_kv_heads"], r["head_dim"]) == (
            "m7c", 256, "fwd_bwd", 12, 2, 64)
        if r["impl"] == "fla":
            assert r["ms"] is None and "error" not in r
            if importlib.util.find_spec("fla") is None:  # same sys.path as the subprocess
                assert "not installed" in r["skipped"]
            else:
                assert "power of two >= 16" in r["skipped"] and "12/2 = 6" in r["skipped"]
        else:
            assert r["ms"] > 0 and r["peak_mem_mb"] >= 0 and "skipped" not in r and "error" not in r
    assert rows[0]["nsa_path"] == "torch" and rows[1]["sdpa"].startswith("auto")
    out = proc.stdout
    for block in ("scope layer", "scope core"):
        assert f"== layout m7c (12 query heads, 2 KV heads, head dim 64), {block}" in out
    assert out.count("full/nsa") == 2 and "speedup = other_ms / nsa_ms" in out
    assert "fla: skipped:" in out and "break-even:" in out


@pytest.mark.parametrize("scope", ["layer", "core"])
@pytest.mark.parametrize("impl", ["nsa", "full"])
def test_measure_forward_in_process(bench_attention, impl, scope):
    row = bench_attention.measure(impl, "m7c", scope, 128, "fwd", "cpu", "fp32", 1, 1)
    assert ROW_FIELDS <= set(row)
    assert (row["impl"], row["scope"], row["pass"]) == (impl, scope, "fwd") and row["ms"] > 0


def test_fla_skip_reasons(bench_attention, monkeypatch):
    monkeypatch.setattr(bench_attention, "fla_installed", lambda: False)
    assert "not installed" in bench_attention.fla_skip_reason("paper", "core")
    monkeypatch.setattr(bench_attention, "fla_installed", lambda: True)
    assert bench_attention.fla_skip_reason("paper", "core") is None  # 64/4 = 16 heads per group
    assert "--scope core only" in bench_attention.fla_skip_reason("paper", "layer")
    assert "12/2 = 6" in bench_attention.fla_skip_reason("m7c", "core")


def test_table_checks_from_gpu_like_rows(bench_attention, capsys):
    """The issue's checks: speedup at 65536, break-even, NSA vs fla (synthetic rows, as a GPU would give)."""
    base = {"layout": "paper", "scope": "core", "pass": "fwd_bwd", "device": "NVIDIA H100 80GB HBM3", "dtype": "bf16",
            "batch": 1, "peak_mem_mb": 1.0}
    times = {4096: (2.0, 1.0, 3.0), 8192: (3.0, 4.0, 3.5), 65536: (20.0, 150.0, 25.0)}  # nsa, full, fla
    rows = [dict(base, impl=impl, seq_len=s, ms=t[i]) for s, t in times.items() for i, impl in enumerate(("nsa", "full", "fla"))]
    rows.append({**base, "impl": "fla", "seq_len": 4096, "pass": "fwd", "ms": None, "skipped": "why"})
    bench_attention.print_table(rows)
    out = capsys.readouterr().out
    assert "fwd+bwd @65536: full_ms / nsa_ms = 7.50x (NSA faster; target: NSA >= 6x faster @65536): met" in out
    assert "break-even: first seq_len where NSA fwd+bwd <= full: 8192 (target <= 8192): met" in out
    assert "(fla_ms / nsa_ms, target >= 1.0x i.e. no slower): 4096: 1.50x, 8192: 1.17x, 65536: 1.25x: met" in out
    assert "fla: skipped: why" in out
    rows[2]["ms"] = 1.0  # fla at 4096 twice as fast as NSA
    rows[4]["ms"] = 2.0  # full at 8192 faster than NSA: break-even moves to 65536
    bench_attention.print_table(rows)
    out = capsys.readouterr().out
    assert "4096: 0.50x, 8192: 1.17x, 65536: 1.25x: NOT met" in out
    assert "first seq_len where NSA fwd+bwd <= full: 65536 (target <= 8192): NOT met" in out


def test_gpu_suite_syntax_and_dry_run(tmp_path):
    assert subprocess.run(["bash", "-n", SUITE]).returncode == 0
    env = dict(os.environ, SUITE_DRY_RUN="1", OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", SUITE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    dry = [line for line in proc.stdout.splitlines() if line.startswith("[dry-run]")]
    names = [line.split()[1] for line in dry]
    # most important first
    assert names[:5] == ["kernel_tests", "decode", "decode_compiled", "kernels", "attention_paper"]
    text = "\n".join(dry)
    for needle in ("tests/test_triton_kernels.py", "tests/test_triton_window.py", "tests/test_model.py",
                   "tests/test_triton_decode.py", "--modes graph_torch,compiled",
                   "bench/bench_kernels.py --device cuda",
                   "bench/bench_attention.py --device cuda --layout m7c --scope layer",
                   "bench/bench_attention.py --device cuda --layout paper --scope core",
                   "--impls nsa,full", "--impls nsa,fla",
                   "bench/bench_train.py --device cuda --seq-lens 4096 --batch-tokens 32768 --compile 0",
                   "bench/bench_train.py --device cuda --seq-lens 16384 --batch-tokens 32768 --compile 0",
                   "--compile 1", "bench/bench_decode.py --device cuda --contexts 8192,16384,32768,65536",
                   "scripts/demo_64k.py --device cuda", "4096,8192,16384,32768,65536", "env NSA_TUNE=off",
                   "bench/bench_trainer.py --config configs/m7c_125m_80g.yaml"):
        assert needle in text, needle
    assert all("timeout" in line for line in dry)
    # SUITE_ONLY runs its steps in its own order
    env["SUITE_ONLY"] = "train_4096,decode,kernel_tests"
    proc = subprocess.run(["bash", SUITE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("[dry-run]")] == \
        ["train_4096", "decode", "kernel_tests"]
    # variant_tests (the tile-variant parity subset of kernel_tests) runs only without kernel_tests
    assert "variant_tests" not in names
    env["SUITE_ONLY"] = "variant_tests,kernels"
    proc = subprocess.run(["bash", SUITE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    dry = [line for line in proc.stdout.splitlines() if line.startswith("[dry-run]")]
    assert [line.split()[1] for line in dry] == ["variant_tests", "kernels"]
    assert "tile_variants" in dry[0] and "tests/test_triton_window.py" in dry[0] and "fused_decode" in dry[0]


def test_bench_decode_eager_and_static_modes():
    """bench_decode.py on CPU: NSA and full attention with the growing caches ("eager") and the static
    ones ("graph": the CUDA-graph path, eager on CPU; "graph_torch": NSA's attention in PyTorch ops)
    read the same tokens per step, NSA the paper's count + 1, and the table pairs them per mode."""
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, "bench_decode.py"), "--device", "cpu", "--contexts", "1024",
         "--steps", "2", "--modes", "eager,graph,graph_torch"],
        cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    modes = ("eager", "graph", "graph_torch")
    assert [(r["mode"], r["impl"]) for r in rows] == [(m, i) for m in modes for i in ("nsa", "full")]
    by = {(r["mode"], r["impl"]): r for r in rows}
    for mode in modes:
        assert by[(mode, "nsa")]["tokens_read"] == by[(mode, "nsa")]["paper_tokens"] + 1
        assert by[(mode, "nsa")]["ms_per_step"] > 0 and by[(mode, "nsa")]["ms_mean"] > 0
        assert not by[(mode, "nsa")]["fused"]  # no Triton kernels on CPU
    assert by[("eager", "full")]["tokens_read"] == 1024 + 3  # context + the warm-up and 2 timed steps
    assert by[("graph", "full")]["tokens_read"] == 1024 + 17 + 2  # warm-up: d + 1 (both step graphs)
    for mode in modes:
        assert re.search(rf"^ *{mode} +1 +1024 ", proc.stdout, re.M), mode
    assert "check: NSA reads = floor((S - l)/d) + 1 + n*l' + w" in proc.stdout and "met in all 3 rows" in proc.stdout


def test_bench_decode_one_row_in_a_fresh_process(bench_attention):  # the fixture puts bench/ on sys.path
    """The protocol behind a CUDA "compiled" row (each in a fresh process, as a failed graph capture
    spoils the process's CUDA RNG state): `--_one impl:context:batch:mode` prints one row (here with
    --profile); a failure exits non-zero and its traceback reaches the parent's error."""
    from common import run_isolated

    script = os.path.join(BENCH, "bench_decode.py")
    row = run_isolated(script, ["--device", "cpu", "--steps", "2", "--profile", "3", "--_one", "nsa:1024:1:graph"])
    assert (row["impl"], row["mode"], row["context"], row["tokens_read"]) == ("nsa", "graph", 1024, row["paper_tokens"] + 1)
    # --profile: the costliest operators (CPU: self time) of 10 more steps, per step; the read count is the timed steps'
    prof = row["profile"]
    assert len(prof["top"]) == 3 and prof["busy_ms_per_step"] > 0 and prof["launches_per_step"] > 0
    assert all(t["us_per_step"] == pytest.approx(t["ms"] * 100, rel=1e-2, abs=0.02) for t in prof["top"])
    with pytest.raises(RuntimeError, match=r"(?s)Traceback.*attention"):
        run_isolated(script, ["--device", "cpu", "--steps", "2", "--_one", "dense:256:1:graph"])


def test_bench_train_chunked_loss_rows_say_when_torch_lacks_it(bench_attention, monkeypatch, capsys):  # bench/ on sys.path
    """bench_train.py --loss chunked on a torch without F.linear_cross_entropy's chunked path: a skipped row
    naming why, not a row that silently measured the logits path again (nothing is measured here)."""
    spec = importlib.util.spec_from_file_location("bench_train_under_test", os.path.join(BENCH, "bench_train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "HAS_CHUNKED_LOSS", False)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--device", "cpu", "--seq-lens", "64", "--attention", "nsa",
                                      "--loss", "chunked", "--json-only"])
    mod.main()
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert (row["attention"], row["loss"]) == ("nsa", "chunked") and "no chunked" in row["skipped"]
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--loss", "fused"])
    with pytest.raises(SystemExit):  # argparse's usage error: exit 2
        mod.main()
    assert "--loss 'fused'" in capsys.readouterr().err


def test_demo_64k_runs_on_cpu_at_reduced_length():
    """scripts/demo_64k.py end to end on CPU (a few training steps, two short contexts): one row per
    context with timings, the decode step's reads by branch (compressed blocks complete by t = S - 1,
    n selected blocks of l', the window) and a summary table; on CPU the step is not a CUDA graph."""
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "demo_64k.py"), "--device", "cpu", "--train-steps", "20",
         "--train-len", "128", "--contexts", "256,1024", "--depths", "0.5"],
        cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["context"] for r in rows] == [256, 1024]
    spec = importlib.util.spec_from_file_location("demo_64k", os.path.join(REPO, "scripts", "demo_64k.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)  # definitions only: main() runs under __main__
    geometry = demo.MODEL["nsa"]
    l, d, lp, n, w = (geometry[k] for k in ("cmp_block", "cmp_stride", "slc_block", "n_selected", "window"))
    for r in rows:
        t = r["context"] - 1
        assert r["tokens_read_by_branch"] == {"cmp": (t - l + 1) // d + 1, "slc": n * lp, "win": w}
        assert r["tokens_read_nsa"] == sum(r["tokens_read_by_branch"].values())
        assert r["tokens_read_full"] == r["context"] and r["trials"] == 1 and 0 <= r["retrieved"] <= 1
        assert r["prefill_s"] > 0 and r["decode_step_ms"] > 0 and r["decode_graph"] is False
    assert re.search(r"^ +1024 +[01]/1 ", proc.stdout, re.M)


def test_bench_trainer_runs_the_real_trainer_and_reports_failures(tmp_path):
    """bench_trainer.py: the shipped trainer on synthetic tokens gives one row with medians from its
    training.csv; a trainer that fails (here: a bad override) gives a row with its error and exit 1.
    The two bench_trainer.py runs are independent: started together, the failing one (mostly imports)
    overlaps the good one."""
    script = os.path.join(BENCH, "bench_trainer.py")
    env = dict(offline_env(), NSA_SLC_QTILE="2")
    good = subprocess.Popen([sys.executable, script, "--config", "configs/smoke.yaml", "--device", "cpu", "--steps", "4",
                             "--compile", "0", "--attention", "nsa", "--skip-logs", "1", "--loss", "chunked"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        bad = subprocess.run([sys.executable, script, "--config", "configs/smoke.yaml", "--device", "cpu", "--steps", "2",
                              "--compile", "0", "--attention", "dense"],
                             cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
        stdout, stderr = good.communicate(timeout=300)
    finally:
        if good.poll() is None:
            good.kill()
    assert good.returncode == 0, stderr[-3000:]
    (row,) = [json.loads(line) for line in stdout.splitlines()]
    assert (row["bench"], row["attention"], row["compile"], row["rc"], row["logged_steps"]) == ("trainer", "nsa", False, 0, 4)
    assert row["toks_per_s"] > 0 and row["step_ms"] > 0 and row["seq_len"] == 64 and "error" not in row
    assert 0 < row["loss_last"] < row["loss_first"] < 20  # the loss curve's ends (it learns in 4 steps)
    assert row["nsa_env"] == {"NSA_SLC_QTILE": "2", "NSA_LOSS": "chunked"}  # the switches a row ran with are on the row
    assert row["loss"] == ("chunked" if HAS_CHUNKED_LOSS else "full")  # as the trainer resolved it
    assert row["tuned"] == {}  # kernel tuning (the run's kernel_tuning.json) happens on CUDA only
    (row,) = [json.loads(line) for line in bad.stdout.splitlines()]
    assert bad.returncode == 1 and row["rc"] == 2 and "model.attention" in row["error"], row


FAKE_PYTHON = """#!/usr/bin/env bash
case "$*" in
  *bench_kernels*) echo '{"kernel": "slc_fwd", "ms": 0.5}' ;;
  *bench_attention*paper*) echo '{"impl": "nsa", "ms": 1.0}'; echo '{"impl": "full", "ms": 2.0}'; echo "the table" ;;
  *bench_attention*m7c*) echo "Traceback: boom" >&2; exit 3 ;;
  *bench_train*) echo '{"attention": "nsa"}'; sleep 60 ;;
  *) echo "fake python $*" ;;
esac
"""


def test_gpu_suite_steps_with_fake_python(tmp_path):
    """Real mode with a stand-in interpreter: an ok step, a failing one, one that times out at the budget,
    the rest skipped; JSON lines collected and tagged; summary written; exit status 1."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), OUT=str(out), SUITE_BUDGET_S="3", SUITE_RESERVE_S="0", SUITE_MIN_STEP_S="1")
    env.pop("SUITE_DRY_RUN", None)
    proc = subprocess.run(["bash", SUITE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    status = {line.split()[0]: line for line in summary.splitlines() if line.strip()}
    assert all(" ok " in status[s] for s in ("kernel_tests", "decode", "decode_compiled", "kernels", "attention_paper"))
    assert "FAILED (rc=3)" in status["attention_m7c"] and "TIMED OUT" in status["train_4096"]
    assert "skipped (budget" in status["train_16384"] and "skipped (budget" in status["attention_m7c_core"]
    rows = [json.loads(line) for line in (out / "attention.jsonl").read_text().splitlines()]
    assert [(r["suite_step"], r["impl"]) for r in rows] == [("attention_paper", "nsa"), ("attention_paper", "full")]
    assert [json.loads(line)["suite_step"] for line in (out / "train.jsonl").read_text().splitlines()] == ["train_4096"]
    log = (out / "suite.log").read_text()
    assert "Traceback: boom" in log and "the table" in log and "gpu_suite environment" in log
    names = sorted(p.name for p in out.iterdir())
    assert names == ["attention.jsonl", "kernels.jsonl", "suite.log", "summary.txt", "train.jsonl"]  # <= 8 files
    assert "gpu_suite summary" in proc.stdout


FAKE_PYTHON_FLA = """#!/usr/bin/env bash
case "$*" in
  *"import fla"*) exit 0 ;;
  *"import xdist"*) exit 1 ;;
  *pytest*) sleep 1; echo "tests ran" ;;
  *"--impls fla "*) echo "fla warm-up ran" ;;
  *bench_attention*) echo '{"impl": "fla", "ms": 1.0}' ;;
  *) echo "fake python $*" ;;
esac
"""


def test_gpu_suite_compiles_fla_during_the_kernel_tests(tmp_path):
    """With attention_fla to run, fla's kernels compile in the background while kernel_tests runs (its
    first backward autotunes for minutes), and the suite waits for that before the next step; without
    attention_fla there is no warm-up."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON_FLA)
    fake.chmod(0o755)

    def suite(only):
        out = tmp_path / only.replace(",", "_")
        env = dict(os.environ, PYTHON=str(fake), OUT=str(out), SUITE_ONLY=only, SUITE_BUDGET_S="120",
                   SUITE_RESERVE_S="0")
        env.pop("SUITE_DRY_RUN", None)
        proc = subprocess.run(["bash", SUITE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return (out / "suite.log").read_text()

    log = suite("kernel_tests,attention_fla")
    order = [log.index(text) for text in ("fla warm-up (background", "step kernel_tests", "tests ran",
                                          "fla warm-up: rc=0", "fla warm-up ran", "step attention_fla")]
    assert order == sorted(order), log
    assert "fla warm-up" not in suite("kernel_tests,decode")


def test_idle_gaps_names_where_the_gpu_waited(bench_attention):
    """idle_gaps: the time inside the span no kernel ran (overlapping kernels merged, any input order) and
    the longest gaps with their neighbours."""
    from common import idle_gaps  # bench/ is on sys.path while the module fixture is active

    kernels = [(100.0, 400.0, "b"), (0.0, 100.0, "a"), (150.0, 200.0, "inside_b"), (1400.0, 1500.0, "d"),
               (450.0, 500.0, "c")]
    got = idle_gaps(kernels, top=2)
    assert got["idle_ms"] == 0.95  # 400 -> 450 and 500 -> 1400
    assert got["gaps"] == [{"us": 900.0, "after": "c", "before": "d"}, {"us": 50.0, "after": "b", "before": "c"}]
    assert idle_gaps([]) == {"idle_ms": 0.0, "gaps": []}


def test_profile_top_ranks_operators(bench_attention):
    """--profile: one run under torch.profiler, the costliest operators (CPU) first, with counts."""
    from common import profile_top  # bench/ is on sys.path while the module fixture is active

    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def work():
        for _ in range(3):
            torch.mm(a, b)
        a.add(1.0)

    prof = profile_top(work, "cpu", top=2)
    assert len(prof["top"]) == 2 and prof["busy_ms"] > 0 and prof["launches"] >= 4
    assert prof["top"][0]["ms"] >= prof["top"][1]["ms"]
    mm = [t for t in prof["top"] if t["name"] == "aten::mm"]
    assert mm and mm[0]["calls"] == 3


def test_bench_host_counts_launches_and_host_time():
    """bench_host.py (no GPU): per pass, NSA and full, host microseconds and the launches a call makes;
    NSA launches its Triton kernels (stubbed) and more PyTorch ops than full attention."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_host.py"), "--repeats", "1", "--inner", "2"],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by = {(r["attention"], r["pass"]): r for r in rows}
    assert set(by) == {(a, p) for a in ("nsa", "full") for p in ("fwd", "fwd_bwd", "decode", "decode_static")}
    assert all(r["host_us"] > 0 for r in rows)
    # forward: compressed, selection, selected, window, gate-combine and 3-4 RoPE kernels; full: 2 RoPE
    assert by[("nsa", "fwd")]["triton_launches"] >= 8 and by[("full", "fwd")]["triton_launches"] == 2
    assert by[("nsa", "fwd_bwd")]["triton_launches"] > by[("nsa", "fwd")]["triton_launches"]
    assert by[("nsa", "fwd_bwd")]["torch_ops"] > by[("full", "fwd_bwd")]["torch_ops"]
    # a launch budget: the selected backward's query lists are 3 Triton kernels, a sort and a cumsum
    # (segments.py; ~45 PyTorch ops before), the gates, phi and projections the rest (63 ops at torch 2.13)
    assert by[("nsa", "fwd_bwd")]["torch_ops"] <= 70, by[("nsa", "fwd_bwd")]
    # the static step (the CUDA graph's kernels): NSA's RoPE and cache writes, and its three branches, are
    # one kernel each (triton/decode.py), beside the gate-and-combine; no more PyTorch ops than full's
    assert by[("nsa", "decode_static")]["triton_launches"] == 3 and by[("full", "decode_static")]["triton_launches"] == 2
    assert by[("nsa", "decode_static")]["torch_ops"] <= by[("full", "decode_static")]["torch_ops"]
    assert "nsa/full" in proc.stdout


def test_table_cuda_graph_times(bench_attention, capsys):
    """Rows with "graph_ms" (--cuda-graph) get their own table and checks, beside the eager ones."""
    base = {"layout": "m7c", "scope": "layer", "pass": "fwd_bwd", "device": "NVIDIA H100 80GB HBM3", "dtype": "bf16",
            "batch": 1, "peak_mem_mb": 1.0}
    times = {4096: ((12.0, 2.0), (3.3, 3.0)), 65536: ((35.0, 34.0), (83.0, 82.0))}  # (eager, graph) nsa, full
    rows = [dict(base, impl=impl, seq_len=s, ms=t[i][0], graph_ms=t[i][1])
            for s, t in times.items() for i, impl in enumerate(("nsa", "full"))]
    bench_attention.print_table(rows)
    out = capsys.readouterr().out
    assert "first seq_len where NSA fwd+bwd <= full: 65536 (target <= 8192): NOT met" in out  # eager
    assert "CUDA graph replay (GPU time, no launch cost), ms:" in out
    assert "checks on CUDA-graph replay times" in out
    assert "first seq_len where NSA fwd+bwd <= full: 4096 (target <= 8192): met" in out  # graph: 2.0 <= 3.0
