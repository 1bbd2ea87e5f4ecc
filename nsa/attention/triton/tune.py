"""Pick the fastest correct variant of a kernel step on this device by timing the variants on real inputs.

Some steps have several Triton variants that compute the same result: the selected-attention forward
and dQ with query tiles of 1, 2, 4 or 8 queries (one query also at other K/V pipeline depths) or one
head's 64 or 128 queries, its dK/dV with one head or all heads per row tile, with or without dQ folded
in; the selection's tile; the compressed kernels' tiles; for head dim > 64, the window forward with 64
or 128 queries per program. Which is fastest depends on the GPU, the head layout and the sequence
length, so the first call for a shape times them on a slice of its real inputs (SLICE_QUERIES queries
with the keys they see, of as many batch elements as make up about SLICE_TOKENS query tokens: bounded
scratch memory, yet a batch-8 call of 4096 tokens is timed whole, so a variant's per-call host cost
does not decide what the GPU time should; the LAST queries for the selected, selection and compressed
steps, whose work per query grows with its position, the first for the window) and the process keeps
the fastest:

* once per key: step, device name, dtype, head layout, sequence length rounded up to a power of two;
  inputs of fewer than MIN_QUERIES queries (decode, tests) keep the reference: too little to gain;
* every variant's result is compared with the reference variant's (the first, the long-standing
  default, which the device self-check and the GPU tests verify against PyTorch); a variant that
  differs by more than rounding (VARIANT_TOL: the variants do the same arithmetic in another order
  or tiling, so they agree to about one unit in the last place of the output dtype) or raises is
  dropped with a warning and never chosen;
* timing: a warm-up call each (compiles), then `REPS` rounds calling every variant once per round,
  CUDA events around each call; the median decides;
* NSA_TUNE=auto (default) tunes on CUDA only, on: everywhere (tests, through the interpreter),
  off: the reference variants. An explicit switch (NSA_SLC_QTILE, NSA_SLC_DKV, NSA_SLC_DKV_ROWS)
  pins its own dimension;
* a cache file (NSA_TUNE_CACHE=<file.json>, else use_cache_file()'s): choices are read from and added
  to it. The trainer uses <out_dir>/kernel_tuning.json, so a resumed run uses the kernels its first
  launch chose (same numerics) without timing them again. Under DDP only rank 0 writes it (the others
  read it: ranks that rewrote it at the same time lost each other's entries); a resumed run's ranks
  all use rank 0's choices;
* retune(): time again (the trainer calls it once, at runtime.retune_step: the first choice saw a
  randomly initialised model, whose block selections are scattered; a trained model's neighbouring
  queries pick mostly the same blocks, which favours the query tiles and the block-centric forward).
  The new choices replace the old in the cache file, so a run resumed after that step uses them.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

REPS = 7
MIN_QUERIES = 512
SLICE_QUERIES = 8192
SLICE_TOKENS = 32768
# relative to the reference's largest magnitude: ~4 ulps of a value near the maximum. A miscompiled
# 128-key compressed dK/dV tile (H100, Triton 3.6) was off by 3-6e-2 and passed a 5e-2 bound.
VARIANT_TOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 4e-3}
# tests replace this: (variant name, fn) -> milliseconds
TIMER: Callable[[str, Callable[[], Any]], float] | None = None

_CHOICES: dict[str, str] = {}  # key -> chosen variant, this process
_CACHE_LOADED: set[str] = set()
_DEFAULT_CACHE: list[str | None] = [None]
_CACHE_WRITABLE = [True]


def mode() -> str:
    value = os.environ.get("NSA_TUNE", "auto")
    if value not in ("auto", "on", "off"):
        raise ValueError(f"NSA_TUNE={value!r}: expected auto, on or off")
    return value


def enabled(device: torch.device) -> bool:
    m = mode()
    return m == "on" or (m == "auto" and device.type == "cuda")


def wanted(q: torch.Tensor) -> bool:
    """Tune for these queries [B, H, Sq, D]?"""
    return q.shape[2] >= MIN_QUERIES and enabled(q.device)


def slice_len(q: torch.Tensor) -> int:
    return min(q.shape[2], SLICE_QUERIES)


def slice_batch(q: torch.Tensor) -> int:
    """Batch elements in the tuning slice: enough for ~SLICE_TOKENS query tokens, at least one."""
    return max(1, min(q.shape[0], SLICE_TOKENS // slice_len(q)))


def prefix(q: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tuning slice of q and of each other tensor (shaped like q in dims 0 and 2): the first
    slice_batch(q) batch elements and the first slice_len(q) positions."""
    b, s = slice_batch(q), slice_len(q)
    return [t[:b, :, :s] for t in (q, *tensors)]


def shape_key(step: str, q: torch.Tensor, k: torch.Tensor, *extra) -> str:
    """Key of a tuning decision for queries q [B, H, Sq, D] over keys k [B, G, N, D]."""
    return make_key(step, q.device, str(q.dtype).replace("torch.", ""), f"H{q.shape[1]}", f"G{k.shape[1]}",
                    f"D{q.shape[-1]}", *extra, f"S{1 << max(slice_len(q) - 1, 0).bit_length()}")


def differs(got, want) -> str | None:
    """None when each tensor of `got` matches `want`'s within VARIANT_TOL (relative to want's largest
    magnitude, as the device self-check measures)."""
    from nsa.attention.triton.selfcheck import rel_error

    for i, (a, b) in enumerate(zip(got, want)):
        with torch.no_grad():  # no graph: this can run inside a model's forward (activation checkpointing)
            err = rel_error(a, b)
        if not err <= VARIANT_TOL[b.dtype]:  # (NaN fails too)
            return f"output {i} differs from the reference variant's by {err:.2e} (relative)"
    return None


def choices() -> dict[str, str]:
    """Every choice made (or loaded) in this process: key -> variant (for benchmark rows and logs)."""
    return dict(_CHOICES)


_DEVICE_NAMES: dict[torch.device, str] = {}


def make_key(step: str, device: torch.device, *fields) -> str:
    """"step|device name|field|...": a choice holds for one GPU model and shape class."""
    if device not in _DEVICE_NAMES:
        _DEVICE_NAMES[device] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return "|".join([step, _DEVICE_NAMES[device], *(str(f) for f in fields)])


def use_cache_file(path: str | None, writable: bool = True) -> None:
    """The cache file when NSA_TUNE_CACHE is not set (the trainer: <out_dir>/kernel_tuning.json);
    writable=False: read choices from it, never write it (every DDP rank but 0)."""
    _DEFAULT_CACHE[0] = path
    _CACHE_WRITABLE[0] = writable


def _cache_file() -> str | None:
    return os.environ.get("NSA_TUNE_CACHE") or _DEFAULT_CACHE[0]


def _load_cache() -> None:
    path = _cache_file()
    if not path or path in _CACHE_LOADED:
        return
    _CACHE_LOADED.add(path)
    try:
        with open(path) as f:
            stored = json.load(f).get("choices", {})
        for key, entry in stored.items():
            _CHOICES.setdefault(key, entry["choice"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # a bad cache only costs a re-tune
        print(f"[nsa] WARNING: ignoring kernel tuning cache {path} ({type(e).__name__}: {e})", file=sys.stderr)


def _save_cache(key: str, choice: str, times: dict[str, float]) -> None:
    path = _cache_file()
    if not path or not _CACHE_WRITABLE[0]:
        return
    from nsa.checkpoint import atomic_write_text

    try:
        try:
            with open(path) as f:
                data = json.load(f)
            data.setdefault("choices", {})
        except (OSError, ValueError):
            data = {"choices": {}}
        data["choices"][key] = {"choice": choice, "ms": {k: round(v, 4) for k, v in times.items()}}
        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError as e:  # tuning still holds for this process
        print(f"[nsa] WARNING: could not write kernel tuning cache {path} ({e})", file=sys.stderr)


def _measure(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def pick(key: str, variants: dict[str, Callable[[], Any]], differs: Callable[[Any, Any], str | None],
         device: torch.device) -> str:
    """The name of the fastest variant whose result matches the first's (the reference).

    variants: name -> fn() returning the result (run on the same inputs each call, no side effects
    the caller keeps); differs(result, reference_result) -> None when they agree, else why not."""
    names = list(variants)
    if len(names) == 1:
        return names[0]
    _load_cache()
    if _CHOICES.get(key) in variants:
        return _CHOICES[key]
    try:
        reference = variants[names[0]]()
    except Exception as e:  # noqa: BLE001 - e.g. out of memory on a full GPU: run untuned, let the real call decide
        print(f"[nsa] WARNING: kernel tuning of {key} skipped ({type(e).__name__}: {str(e)[:200]}); "
              f"using {names[0]}", file=sys.stderr, flush=True)
        _CHOICES[key] = names[0]  # for this process; not stored
        return names[0]
    valid = [names[0]]
    for name in names[1:]:
        try:
            problem = differs(variants[name](), reference)
        except Exception as e:  # noqa: BLE001 - a variant that cannot run here is simply not a candidate
            problem = f"{type(e).__name__}: {str(e)[:200]}"
        if problem:
            print(f"[nsa] WARNING: kernel variant {name} of {key.split('|')[0]} dropped: {problem}",
                  file=sys.stderr, flush=True)
        else:
            valid.append(name)
    del reference
    timer = TIMER or (lambda _name, fn: _measure(fn, device))
    samples: dict[str, list[float]] = {name: [] for name in valid}
    try:
        for _ in range(REPS):  # round robin: a clock or thermal drift hits every variant alike
            for name in valid:
                samples[name].append(timer(name, variants[name]))
    except Exception as e:  # noqa: BLE001 - timing is an optimisation: never let it stop the run
        print(f"[nsa] WARNING: kernel tuning of {key} failed ({type(e).__name__}: {str(e)[:200]}); "
              f"using {names[0]}", file=sys.stderr, flush=True)
        _CHOICES[key] = names[0]  # for this process; not stored, so a later run tries again
        return names[0]
    times = {name: statistics.median(s) for name, s in samples.items()}
    best = min(valid, key=lambda name: times[name])
    _CHOICES[key] = best
    _save_cache(key, best, times)
    ranked = " · ".join(f"{n} {times[n]:.3f}" for n in sorted(valid, key=times.get))
    print(f"[nsa] kernel tuning {key}: {best} (ms: {ranked})", file=sys.stderr, flush=True)
    return best


def retune() -> None:
    """Forget this process's choices so that each step times its variants again on its next call and
    overwrites its entry in the cache file (the trainer does this once, at runtime.retune_step)."""
    _CHOICES.clear()


def reset() -> None:
    """Forget every choice and the default cache file (tests)."""
    _CHOICES.clear()
    _CACHE_LOADED.clear()
    _DEFAULT_CACHE[0] = None
    _CACHE_WRITABLE[0] = True
