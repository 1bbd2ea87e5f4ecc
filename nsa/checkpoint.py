"""Checkpoints: atomic full-state `.pt` files for resume, and model-only safetensors snapshots.

A full checkpoint is a plain dict (see `build_state` in nsa/train.py): `format_version`, `step`,
`tokens_seen`, the resolved `config`, `model`, `optimizer`, `scheduler`, `scaler`, per-rank `rng` and
`data` states, the metrics cursor `run_state` and `world_size`. It is written to a temp file in the same
folder, fsync'ed, then renamed over the final name (and the folder fsync'ed), so a reader never sees a
half-written `checkpoint_step{N}.pt`. Loading uses `torch.load(weights_only=True)`: the `.pt` files only
hold tensors and plain Python values, so even a tampered file cannot run code; still, `.pt` is meant for
trusted local resume state, the safetensors snapshots are what you share.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time

import torch

from nsa.errors import UserError

FORMAT_VERSION = 1
_CKPT_RE = re.compile(r"^checkpoint_step(\d+)\.pt$")
REQUIRED_KEYS = ("format_version", "step", "tokens_seen", "config", "model", "optimizer", "scheduler",
                 "rng", "data", "run_state", "world_size")


def log(msg: str) -> None:
    print(f"[nsa.checkpoint] {msg}", flush=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """`write(fileobj)` into `path` atomically: temp file, flush, fsync, rename, fsync the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"checkpoint_step{step}.pt")


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint file name in out_dir, newest step first (validity unchecked)."""
    found = []
    for path in glob.glob(os.path.join(out_dir, "checkpoint_step*.pt")):
        m = _CKPT_RE.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def clean_temp_files(out_dir: str) -> None:
    """Remove temp files left by a writer that was killed mid-write (they never carry a final name)."""
    for path in glob.glob(os.path.join(out_dir, ".*.tmp*")):
        try:
            os.remove(path)
            log(f"removed leftover partial write {os.path.basename(path)}")
        except OSError:
            pass


class CorruptCheckpoint(Exception):
    pass


def load_checkpoint(path: str) -> dict:
    """Load and sanity-check one checkpoint; CorruptCheckpoint if unreadable or malformed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, I/O error
        raise CorruptCheckpoint(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{path}: not a checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CorruptCheckpoint(f"{path}: missing {', '.join(missing)}")
    if state["format_version"] != FORMAT_VERSION:
        raise UserError(
            f"checkpoint {path} has format_version {state['format_version']}, this trainer reads "
            f"{FORMAT_VERSION}. Resume it with the matching version of the code, or start fresh with --resume none "
            f"and a new --out-dir."
        )
    return state


def find_latest_valid(out_dir: str) -> tuple[str | None, dict | None]:
    """Newest loadable checkpoint in out_dir; unreadable ones are reported and skipped (never deleted)."""
    for step, path in list_checkpoints(out_dir):
        try:
            return path, load_checkpoint(path)
        except CorruptCheckpoint as e:
            log(f"WARNING: skipping invalid checkpoint {e}; trying an older one")
    return None, None


def prune(out_dir: str, keep_last_k: int) -> None:
    """Keep the newest `keep_last_k` full checkpoints (best/final safetensors are separate files)."""
    for _, path in list_checkpoints(out_dir)[keep_last_k:]:
        try:
            os.remove(path)
        except OSError:
            pass


def save_checkpoint(out_dir: str, step: int, state: dict, keep_last_k: int) -> str:
    path = checkpoint_path(out_dir, step)
    atomic_write(path, lambda f: torch.save(state, f))
    prune(out_dir, keep_last_k)
    return path


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_compatible(ckpt_config: dict, model_config: dict, world_size: int, ckpt_world: int) -> None:
    """Architecture must match exactly; say which keys differ. World size must match for exact data resume."""
    # Fields that change how the model runs, not what it is.
    runtime_only = {"activation_checkpointing", "max_seq_len", "nsa.impl", "nsa.query_chunk"}
    old, new = _flatten(ckpt_config.get("model", {})), _flatten(model_config)
    diffs = [f"model.{k}: checkpoint {old.get(k)!r} vs config {new.get(k)!r}"
             for k in sorted(set(old) | set(new)) if k not in runtime_only and old.get(k) != new.get(k)]
    if diffs:
        raise UserError(
            "the checkpoint's model architecture differs from the config: " + "; ".join(diffs) + ". "
            "Use the config the checkpoint was trained with (its out_dir has config.yaml), or start a new run "
            "with --resume none and a different --out-dir."
        )
    if world_size != ckpt_world:
        raise UserError(
            f"the checkpoint was written by {ckpt_world} process(es) but this run has {world_size}; each rank's "
            f"data position and RNG state cannot be mapped exactly. Relaunch with {ckpt_world} process(es) "
            f"(e.g. NGPU={ckpt_world}), or start a new run in a different --out-dir."
        )


def export_safetensors(model: torch.nn.Module, path: str, meta: dict) -> None:
    """Model-only snapshot (`path` = .../name.safetensors) plus a JSON sidecar (name.json), both atomic."""
    from safetensors.torch import save_file

    # Tied weights share storage; safetensors refuses aliases, so keep the first name of each tensor.
    seen, tensors = set(), {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.device.type != "meta" else name
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().to("cpu").contiguous()
    header = {k: str(v) for k, v in meta.items() if not isinstance(v, (dict, list))}
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    save_file(tensors, tmp, metadata=header)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sidecar = dict(meta, file=os.path.basename(path), saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   tensors=len(tensors), tied={"head.weight": "embed.weight"} if "head.weight" not in tensors else {})
    atomic_write_text(os.path.splitext(path)[0] + ".json", json.dumps(sidecar, indent=2, default=str) + "\n")
