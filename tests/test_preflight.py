"""nsa/preflight.py: one test per failure the pre-flight must catch, the happy path on the CPU config, and
the promise that a token's value never reaches the output.

End-to-end cases run `python -m nsa.preflight` as a subprocess; the rest call the check functions. No test
needs the internet: the hub is either switched off (HF_HUB_OFFLINE), a closed port on 127.0.0.1
(HF_ENDPOINT), or a tiny fake hub served from this process that answers like a gated dataset."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import yaml

from nsa import preflight as pf
from nsa.config import config_from_dict, load_config
from nsa.model import build_model
from tests.conftest import REPO, offline_env, tiny_config

GPU_CONFIG = "configs/m7c_125m_80g.yaml"
CPU_CONFIG = "configs/m7c_cpu.yaml"
FAKE_TOKEN = "hf_" + "x" * 34  # assembled at run time: no token-shaped literal in the repo


def run_preflight(*args: str, env: dict | None = None, timeout: float = 120) -> tuple[int, str, str, float]:
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "nsa.preflight", *args], cwd=REPO, env=env or offline_env(),
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.time() - t0


def line_of(stdout: str, level: str, name: str) -> str:
    """The output line `[preflight] LEVEL name : ...` (the first one)."""
    prefix = f"[preflight] {level:<4} {name:<4} : "
    hits = [ln for ln in stdout.splitlines() if ln.startswith(prefix)]
    assert hits, f"no {level} {name} line in:\n{stdout}"
    return hits[0]


def no_token_env(tmp_path, **extra) -> dict:
    """Offline env with no Hugging Face token anywhere (HF_HOME is an empty folder), then `extra`."""
    env = offline_env(HF_HOME=str(tmp_path / "empty_hf_home"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE"):
        env.pop(var, None)
    env.update(extra)
    return env


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cfg_of(**sections):
    return config_from_dict(tiny_config(**sections))


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Every end-to-end case's own `python -m nsa.preflight` process, one per core at a time: each is mostly
    single-threaded imports, so run one after another they would leave a core idle. Returns
    {case: (code, stdout, stderr, seconds, tmp folder)} and the closed "hub_port"; each test below asserts on
    its own case."""
    tmp = tmp_path_factory.mktemp("preflight_cli")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    gated_hub = f"http://127.0.0.1:{server.server_address[1]}"
    port = closed_port()

    def folder(name):
        d = tmp / name
        d.mkdir()
        return d

    def config(d, **sections):
        path = d / "cfg.yaml"
        path.write_text(yaml.safe_dump(tiny_config(**sections)))
        return str(path)

    d_cpu, d_gpu, d_key, d_tok, d_hub, d_gated = (folder(n) for n in ("cpu", "gpu", "key", "token_resume", "hub", "gated"))
    (d_tok / "run").mkdir()
    (d_tok / "run" / "checkpoint_step4.pt").write_bytes(b"x")
    hub_data = {"dataset": "fineweb_edu", "hub_timeout_s": 2}
    jobs = {
        "cpu": (("--config", CPU_CONFIG, "--out-dir", str(d_cpu / "run")), None),
        "gpu": (("--config", GPU_CONFIG, "--out-dir", str(d_gpu / "run")), None),
        "key": (("--config", CPU_CONFIG, "--out-dir", str(d_key / "r"), "train.stpes=5"), None),
        # two planted mistakes in one run: data.hf_token_required=true with no token anywhere (HF_TOKEN unset,
        # HF_HOME empty), and --resume none over an out_dir holding a checkpoint
        "token_resume": (("--config", config(d_tok, data={"hf_token_required": True}, train={"out_dir": str(d_tok / "run")}),
                          "--resume", "none"), no_token_env(d_tok)),
        # fineweb_edu with HF_ENDPOINT on a closed local port
        "hub": (("--config", config(d_hub, model={"vocab_size": 50257}, data=hub_data, train={"out_dir": str(d_hub / "run")}),),
                no_token_env(d_hub, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{port}",
                             HF_TOKEN=FAKE_TOKEN)),
        # the fake hub below answers like a gated dataset seen without a token
        "gated": (("--config", config(d_gated, model={"vocab_size": 50257}, data=hub_data,
                                      train={"out_dir": str(d_gated / "run")}),
                   "data.hf_path=acme/gated-corpus", "data.subset=en"),
                  no_token_env(d_gated, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0", HF_ENDPOINT=gated_hub)),
    }
    if torch.cuda.is_available():  # the GPU config would pass there: test_gpu_config_without_gpu... is skipped
        del jobs["gpu"]
    try:
        # one per core: each case still runs (and is timed: `took`) as if alone
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            futures = {k: pool.submit(run_preflight, *args, env=env) for k, (args, env) in jobs.items()}
            results = {k: f.result() for k, f in futures.items()}
    finally:
        server.shutdown()
        server.server_close()
    return {**{k: (*r, tmp / k) for k, r in results.items()}, "hub_port": port}


def test_cpu_config_passes_offline_and_the_summary_is_right(cli):
    code, stdout, stderr, took, tmp = cli["cpu"]
    out_dir = tmp / "run"
    assert code == 0, stdout + stderr
    lines = stdout.splitlines()
    assert all(ln.startswith("[preflight] ") for ln in lines), stdout
    assert lines[-1].startswith("[preflight] all 6 checks passed"), stdout
    assert "Traceback" not in stderr
    # the summary is first and its numbers are the config's and the model's
    cfg = load_config(CPU_CONFIG, [f"train.out_dir={out_dir}"])
    t = cfg.train
    params = build_model(cfg.model).num_params()
    per_step = t.batch_size * t.seq_len * cfg.resolve_accumulation(1)
    assert per_step == 1024 and t.steps == 100  # what configs/m7c_cpu.yaml says; guards the arithmetic below
    head = lines[0]
    assert head.startswith(f"[preflight] config : {CPU_CONFIG} | M7C attention=nsa "), head
    assert f" {params / 1e6:.1f}M params " in head
    assert f"| seq_len {t.seq_len} |" in head
    assert f"| {per_step:,} tokens/step ({t.batch_size} x {t.seq_len} x 1 accum x 1 rank) |" in head
    assert f"| {t.steps:,} steps = {per_step * t.steps:,} tokens |" in head
    assert f"| data embedded | out_dir {out_dir} |" in head
    for name in ("disk", "data", "tokenizer", "schedule"):
        line_of(stdout, "OK", name)
    assert "[15496, 995]" in line_of(stdout, "OK", "tokenizer")
    if torch.cuda.is_available():  # runtime.device=auto trains on a visible GPU, so pre-flight tests it
        assert "fp32+bf16 matmul OK" in line_of(stdout, "OK", "gpu")
    else:
        assert "skipped (CPU config" in line_of(stdout, "SKIP", "gpu")
    assert not out_dir.exists()  # pre-flight writes nothing
    assert took < 45, f"pre-flight took {took:.0f} s"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_gpu_config_without_gpu_fails_naming_the_config_and_the_fix(cli):
    code, stdout, stderr, _, tmp = cli["gpu"]
    out_dir = tmp / "run"
    assert code == 2, stdout + stderr
    gpu = line_of(stdout, "FAIL", "gpu")
    assert f"config {GPU_CONFIG} needs a CUDA GPU (runtime.device=cuda) but none is visible" in gpu
    assert "Fix: run on a GPU node, or use CONFIG=configs/m7c_cpu.yaml" in gpu
    # the summary still shows the run that was asked for: 124.9M params, 4096, 524,288 tokens/step
    assert "124.9M params" in stdout and "seq_len 4096" in stdout and "524,288 tokens/step" in stdout
    assert stdout.splitlines()[-1].startswith("[preflight] ") and "nothing was trained" in stdout.splitlines()[-1]
    assert "Traceback" not in stderr
    assert not out_dir.exists()


def test_bad_config_key_is_one_line_exit_2(cli):
    code, stdout, stderr, _, _ = cli["key"]
    assert code == 2
    assert stdout.strip().splitlines() == [stdout.strip()], stdout  # exactly one line
    assert stdout.startswith("[preflight] FAIL config : unknown config key(s) train.stpes.")
    assert "Traceback" not in stdout + stderr
    for argv, start in ((["--world-size", "0"], "--world-size must be >= 1"),
                        (["--expect-gpus", "two"], "argument --expect-gpus: invalid int value: 'two'"),
                        (["--bogus"], "unrecognized arguments: --bogus. Usage: python -m nsa.preflight --config")):
        buf = io.StringIO()
        assert pf.run(["--config", CPU_CONFIG, *argv], stream=buf) == 2
        assert buf.getvalue().startswith(f"[preflight] FAIL config : {start}"), buf.getvalue()
        assert buf.getvalue().count("\n") == 1


def test_missing_token_fails_and_names_the_fix(cli):
    code, stdout, stderr, _, _ = cli["token_resume"]
    assert code == 2, stdout + stderr
    line = line_of(stdout, "FAIL", "hf token")
    assert "dataset synthetic needs a Hugging Face token (data.hf_token_required=true) and none is set" in line
    assert "Fix: export HF_TOKEN=<read token from https://huggingface.co/settings/tokens>" in line
    assert "2 of 6 checks failed (hf token, schedule); nothing was trained." in stdout


def test_resume_none_over_existing_checkpoints_fails_now(cli):
    code, stdout, _, _, tmp = cli["token_resume"]
    out_dir = tmp / "run"
    assert code == 2, stdout
    line = line_of(stdout, "FAIL", "schedule")
    assert f"--resume none but {out_dir} already holds 1 checkpoint(s)" in line
    assert "Use --resume auto to continue it, or pick a new --out-dir." in line  # the trainer's own fix text
    assert "| resume none" in stdout.splitlines()[0]


def test_unreachable_hub_fails_fast_and_the_token_never_shows(cli):
    """fineweb_edu with HF_ENDPOINT on a closed local port: data FAIL (network) with the fix, quickly."""
    (code, stdout, stderr, took, _), port = cli["hub"], cli["hub_port"]
    assert code == 2, stdout + stderr
    data = line_of(stdout, "FAIL", "data")
    assert f"cannot reach the Hugging Face Hub at http://127.0.0.1:{port} to stream HuggingFaceFW/fineweb-edu" in data
    assert "Fix: check that this node reaches https://huggingface.co" in data
    assert "present (from HF_TOKEN; value not shown)" in line_of(stdout, "OK", "hf token")
    assert FAKE_TOKEN not in stdout + stderr and "x" * 34 not in stdout + stderr
    assert took < 60, f"took {took:.0f} s"


class _GatedHub(BaseHTTPRequestHandler):
    """Answers like the Hub for a gated dataset seen without a token: metadata yes, files 403 GatedRepo."""

    def do_GET(self):
        if self.path.startswith("/api/datasets/"):
            repo = self.path[len("/api/datasets/"):].split("?")[0]
            code, body, headers = 200, {"id": repo, "_id": "0", "private": False, "gated": "manual", "sha": "0" * 40,
                                        "siblings": [], "tags": [], "downloads": 0, "likes": 0, "author": "x",
                                        "lastModified": "2024-01-01T00:00:00.000Z", "disabled": False}, {}
        else:
            code, body = 403, {"error": "Access to dataset is restricted. You must be authenticated to access it."}
            headers = {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to dataset is restricted"}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_gated_hub_dataset_without_token_fails_token_and_stream(cli):
    """The hub says gated: the token check fails although the config did not ask for one, and the real stream
    check (scripts/datasets/check_fwe_stream.py, run on the resolved config with its overrides) reports auth."""
    code, stdout, stderr, _, _ = cli["gated"]
    assert code == 2, stdout + stderr
    token = line_of(stdout, "FAIL", "hf token")
    assert "dataset acme/gated-corpus needs a Hugging Face token (the hub marks it gated (manual))" in token
    data = line_of(stdout, "FAIL", "data")
    assert data.startswith("[preflight] FAIL data : auth problem while opening acme/gated-corpus (subset en)"), data
    assert "Fix: export HF_TOKEN=" in data


# ------------------------------------------------------------------------------------ gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_gpu_messages_tell_cpu_build_driver_and_no_gpu_apart(monkeypatch):
    cfg = cfg_of(runtime={"device": "cuda"})
    [f] = pf.check_gpu(cfg, 0, "cfg.yaml")
    assert f.level == "FAIL" and "config cfg.yaml needs a CUDA GPU (runtime.device=cuda) but none is visible" in f.text
    if torch.version.cuda is None:
        assert "CPU-only build" in f.text
        [f] = pf.check_gpu(cfg, 2, "cfg.yaml")
        assert "nvidia-smi shows 2 GPU(s) but torch" in f.text and "CPU-only build" in f.text
        assert "bash scripts/prime_bootstrap.sh" in f.text
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA wheel that still sees no device
    [f] = pf.check_gpu(cfg, 2, "cfg.yaml")
    assert "cannot use the 2 GPU(s) nvidia-smi shows" in f.text and "driver is probably older" in f.text
    [f] = pf.check_gpu(cfg, 0, "cfg.yaml")
    assert "none is visible to torch" in f.text and "CUDA 13.0" in f.text and "CPU-only" not in f.text
    # the same function backs scripts/verify_env.py
    lines, problems = pf.hardware.check_gpus(2)
    assert lines == [] and len(problems) == 1 and "driver is probably older" in problems[0]


def test_cpu_config_skips_gpu_but_catches_gpu_precision():
    [f] = pf.check_gpu(cfg_of(runtime={"device": "cpu"}), 0, "c.yaml")
    assert f.level == "SKIP" and "CPU config" in f.text
    [f] = pf.check_gpu(cfg_of(runtime={"device": "cpu", "precision": "bf16"}), 0, "c.yaml")
    assert f.level == "FAIL" and "runtime.precision=bf16 needs a CUDA device" in f.text


# ------------------------------------------------------------------------------------ disk


def test_disk_too_small_is_reported_with_numbers_and_fix(tmp_path):
    """The full M7C model with keep_last_k=10**7 needs petabytes: no disk has that (disk_usage is not mocked)."""
    cfg = config_from_dict({"train": {"keep_last_k": 10**7, "out_dir": str(tmp_path / "a" / "b")}})
    params = pf.count_params(cfg.model)
    assert 120e6 < params < 130e6  # the real M7C, counted on the meta device
    [f] = pf.check_disk(cfg, params)
    assert f.level == "FAIL"
    assert f"at {tmp_path} for keep_last_k=10,000,000 checkpoints of ~1.4 GiB" in f.text  # nearest existing folder
    assert "only" in f.text and "GiB free" in f.text
    assert "Fix: free space, point train.out_dir/OUT_DIR at a bigger disk, or lower train.keep_last_k" in f.text
    [f] = pf.check_disk(config_from_dict({"train": {"keep_last_k": 3, "out_dir": str(tmp_path)}}), 10_000)
    assert f.level == "OK" and "3+1 checkpoints" in f.text and f"free at {tmp_path}" in f.text


def test_disk_need_counts_the_rotation_and_existing_checkpoints(tmp_path):
    one = pf.checkpoint_bytes(1_000_000)
    est = pf.disk_need_bytes(1_000_000, keep_last_k=3)
    assert est["need"] == 4 * one + 2 * 4 * 1_000_000 + pf.LOG_MARGIN_BYTES
    # checkpoints already in out_dir are part of the rotation, but a new one is always written first
    assert pf.disk_need_bytes(1_000_000, 3, existing_ckpt_bytes=2 * one)["checkpoints"] == 2 * one
    assert pf.disk_need_bytes(1_000_000, 3, existing_ckpt_bytes=9 * one)["checkpoints"] == one
    (tmp_path / "checkpoint_step10.pt").write_bytes(b"\0" * 1000)
    [f] = pf.check_disk(config_from_dict({"train": {"out_dir": str(tmp_path)}}), 10_000)
    assert f.level == "OK" and "3+1 checkpoints x" in f.text and "already there" in f.text


def test_checkpoint_estimate_covers_a_real_checkpoint():
    """12 bytes/parameter (+ overhead) against torch.save of real weights + AdamW state after a step."""
    model = build_model(dict(tiny_config()["model"], vocab_size=50257, dim=32))
    params = model.num_params()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 50257, (1, 16))).sum().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    actual = buf.tell()
    assert 12 * params <= actual <= pf.checkpoint_bytes(params)


# ------------------------------------------------------------------------------------ data, tokenizer


def test_offline_mode_with_a_hub_dataset_fails(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = cfg_of(model={"vocab_size": 50257}, data={"dataset": "fineweb_edu"})
    [f] = pf.check_data(cfg)
    assert f.level == "FAIL" and "offline mode is on (HF_HUB_OFFLINE=1" in f.text
    assert "Fix: unset HF_HUB_OFFLINE" in f.text and "--dataset embedded or local:<path>" in f.text


def test_local_dataset_missing_empty_wrong_column_and_good(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def check(path, **data):
        return pf.check_data(cfg_of(model={"vocab_size": 50257}, data={"dataset": f"local:{path}", **data}))

    [f] = check("/nonexistent/train.jsonl")
    assert f.level == "FAIL" and "'local:/nonexistent/train.jsonl' does not exist" in f.text
    good = tmp_path / "train.jsonl"
    good.write_text(json.dumps({"body": "A first document."}) + "\n")
    [f] = check(good)
    assert f.level == "FAIL" and "has no column 'text'" in f.text and "data.text_field" in f.text
    [f] = check(good, text_field="body")
    assert f.level == "OK" and "first document read (17 characters of 'body')" in f.text
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    [f] = check(empty)
    assert f.level == "FAIL" and "holds no documents" in f.text


def test_embedded_and_synthetic_need_nothing():
    assert [f.level for f in pf.check_data(cfg_of())] == ["OK"]  # synthetic
    [f] = pf.check_data(cfg_of(model={"vocab_size": 50257}, data={"dataset": "embedded"}))
    assert f.level == "OK" and "built from" in f.text and "on first use" in f.text


def test_tokenizer_check_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    [f] = pf.check_tokenizer(cfg_of(model={"vocab_size": 50257}, data={"dataset": "embedded"}))
    assert f.level == "OK" and "'Hello world' -> [15496, 995]" in f.text and "gpt2 from" in f.text
    [f] = pf.check_tokenizer(cfg_of(model={"vocab_size": 50257}, data={"dataset": "embedded", "tokenizer": "no/such-tok"}))
    assert f.level == "FAIL" and "tokenizer 'no/such-tok'" in f.text
    assert pf.check_tokenizer(cfg_of())[0].level == "SKIP"  # synthetic


# ------------------------------------------------------------------------------------ token


def test_token_needed_by_hub_answer(monkeypatch, tmp_path):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(pf, "hf_token", lambda: (None, ""))  # isolate from a login cached on this machine
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    cfg = cfg_of(model={"vocab_size": 50257}, data={"dataset": "fineweb_edu", "hf_path": "acme/private"})
    [f] = pf.check_hf_token(cfg, pf.HubInfo("http://hub", True, private=True))
    assert f.level == "FAIL" and "dataset acme/private needs a Hugging Face token (the hub marks it private)" in f.text
    [f] = pf.check_hf_token(cfg, pf.HubInfo("http://hub", True))
    assert f.level == "OK" and "not needed (acme/private is public)" in f.text
    monkeypatch.setattr(pf, "hf_token", lambda: (FAKE_TOKEN, "HF_TOKEN"))
    [f] = pf.check_hf_token(cfg, pf.HubInfo("http://hub", True, private=True))
    assert f.level == "OK" and f.text.startswith("present (from HF_TOKEN; value not shown)") and FAKE_TOKEN not in f.text


def test_printer_redacts_the_token_value():
    buf = io.StringIO()
    pf._Printer([FAKE_TOKEN], buf).item("FAIL", "data", f"some library echoed Bearer {FAKE_TOKEN}\nsecond line")
    assert FAKE_TOKEN not in buf.getvalue() and "Bearer ***" in buf.getvalue()
    assert buf.getvalue().count("\n") == 1  # one line per finding


# ------------------------------------------------------------------------------------ schedule


def _schedule(num_params=1_000_000, resume="auto", world_size=1, **train):
    return pf.check_schedule(cfg_of(train=train), num_params, resume, world_size)


def levels(findings, level):
    return [f.text for f in findings if f.level == level]


def test_save_every_beyond_steps_fails_with_a_suggestion():
    [msg] = levels(_schedule(steps=1000, save_every=5000), "FAIL")
    assert "train.save_every=5,000 > train.steps=1,000" in msg and "preemption" in msg
    assert "Fix: train.save_every=100" in msg


def test_absurdly_many_checkpoints_fail_and_many_warn():
    [msg] = levels(_schedule(steps=100_000, save_every=1, eval_every=0), "FAIL")
    assert "writes 100,000 checkpoints over 100,000 steps" in msg and "Fix: train.save_every=1000" in msg
    assert "GiB of writes" in msg  # 100,000 x ~19.5 MiB
    findings = _schedule(steps=50_000, save_every=100, eval_every=0)
    assert not levels(findings, "FAIL") and "writes 500 checkpoints" in levels(findings, "WARN")[0]
    assert not levels(_schedule(steps=5000, save_every=250, eval_every=250), "WARN")


def test_eval_every_beyond_steps_fails_and_early_stop_without_eval_warns():
    [msg] = levels(_schedule(steps=1000, save_every=100, eval_every=5000), "FAIL")
    assert "train.eval_every=5,000 > train.steps=1,000: only the final evaluation would run" in msg
    assert "train.eval_every=0 to disable periodic evaluation" in msg
    [w] = levels(_schedule(steps=1000, save_every=100, eval_every=0, early_stop_patience=3), "WARN")
    assert "early stopping can never trigger" in w


def test_global_batch_not_divisible_for_world_size():
    train = dict(steps=100, save_every=10, batch_size=2, seq_len=32, accumulate_grad_batches=1, global_batch_tokens=256)
    assert not levels(_schedule(world_size=2, **train), "FAIL")  # 256 = 2 x 32 x 2 accum x 2 ranks
    [msg] = levels(_schedule(world_size=3, **train), "FAIL")
    assert "not divisible by batch_size x seq_len x ranks = 2 x 32 x 3 = 192" in msg


def test_summary_tokens_per_step_for_several_ranks():
    cfg = load_config(GPU_CONFIG)
    head = pf.summary(cfg, GPU_CONFIG, 124_906_416, 2, "auto")
    assert "124.9M params" in head and "524,288 tokens/step (8 x 4096 x 8 accum x 2 ranks)" in head
    assert "5,000 steps = 2.62B tokens" in head and "fineweb_edu (HuggingFaceFW/fineweb-edu, subset sample-10BT)" in head
    assert "tokens/step unknown" in pf.summary(cfg, GPU_CONFIG, 1, 3, "auto")


def test_resume_checks_use_out_dir_without_loading_checkpoints(tmp_path):
    out = tmp_path / "run"
    [msg] = levels(_schedule(resume=str(tmp_path / "nope.pt"), out_dir=str(out)), "FAIL")
    assert "no such checkpoint file" in msg
    out.mkdir()
    (out / "checkpoint_step8.pt").write_bytes(b"not loaded by pre-flight")
    saved = tiny_config(train={"out_dir": str(out)})
    saved["model"]["dim"] = 64  # the run in out_dir had another architecture
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    [msg] = levels(_schedule(out_dir=str(out)), "FAIL")
    assert "cannot resume" in msg and "model.dim: checkpoint 64 vs config 32" in msg
    saved["model"]["dim"] = 32
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    (out / "metrics.json").write_text(json.dumps({"world_size": 2}))
    [msg] = levels(_schedule(out_dir=str(out)), "FAIL")
    assert "written by 2 process(es) but this run has 1" in msg
    findings = _schedule(out_dir=str(out), world_size=2)
    assert not levels(findings, "FAIL") and "continues from checkpoint_step8.pt" in levels(findings, "OK")[0]
