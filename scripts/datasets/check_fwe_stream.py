#!/usr/bin/env python3
"""Dataset pre-flight: stream a few FineWeb-Edu batches exactly as the trainer would open them.

    python scripts/datasets/check_fwe_stream.py [--config configs/m7c_125m_80g.yaml]
                                                [--batches 3] [--batch-size 4] [--timeout 120]

Opens `data.hf_path` / `data.subset` (defaults: HuggingFaceFW/fineweb-edu, sample-10BT) with
Hugging Face `datasets` streaming, tokenizes with the trainer's GPT-2 BPE loader (nsa.data), and
prints one line per batch:

    ok batch[0] lens: [812, 1290, 377, 2051]      (tokens per document)

then the measured stream throughput (docs/s, tok/s) to compare with the trainer's tok/s. On failure it
says which kind of problem it is, with the fix, and exits with a code a script can act on:

    10  network  DNS, connection refused/reset, timeouts, proxy/TLS, HTTP 5xx or 429 from the hub
    11  auth     HTTP 401/403, gated or private dataset: a token is missing, wrong or lacks access
    12  cache    HF cache not writable / disk full / corrupt, or offline mode with nothing cached
     1  other    anything else (the message is printed as is)
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere: import nsa/

EXIT = {"network": 10, "auth": 11, "cache": 12, "other": 1}

FIXES = {
    "network": "check that this node reaches https://huggingface.co (curl -sI https://huggingface.co), "
    "DNS, proxy variables (HTTPS_PROXY) and CA certificates; HTTP 429 means rate-limited: set HF_TOKEN "
    "for higher limits; offline, train on --dataset embedded or local:<path>",
    "auth": "export HF_TOKEN=<a read token from https://huggingface.co/settings/tokens> (or run "
    "`hf auth login`), and accept the dataset's terms on its page if it is gated; the token value "
    "is never printed or logged",
    "cache": "make the Hugging Face cache writable and give it space (HF_HOME / HF_DATASETS_CACHE, df -h), "
    "delete a corrupt entry under ~/.cache/huggingface, or unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE when "
    "the data is not cached yet",
    "other": "read the message above; re-run with --batches 1 to reproduce quickly",
}

_NETWORK_NAMES = ("ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "Timeout", "TimeoutError",
                  "TimeoutException", "NewConnectionError", "MaxRetryError", "ProtocolError", "RemoteDisconnected",
                  "NetworkError", "ProxyError", "SSLError", "gaierror", "ChunkedEncodingError", "IncompleteRead")
_AUTH_NAMES = ("GatedRepoError", "RepositoryNotFoundError", "Unauthorized", "Forbidden", "AuthenticationError")
_CACHE_NAMES = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "Timeout(filelock)", "CacheError", "ChecksumError")

_NETWORK_TEXT = ("name or service not known", "temporary failure in name resolution", "connection refused",
                 "connection reset", "timed out", "max retries exceeded", "network is unreachable",
                 "no route to host", "failed to establish a new connection", "remote end closed", "ssl",
                 "certificate verify failed", "proxy", "503 ", "502 ", "504 ", "500 ", "429", "too many requests",
                 "couldn't reach", "could not reach", "cannot reach")
_AUTH_TEXT = ("401", "403", "unauthorized", "forbidden", "gated", "authenticat", "invalid user token",
              "invalid token", "access to dataset", "is restricted", "private")
_CACHE_TEXT = ("no space left", "read-only file system", "disk quota", "offline mode", "hf_hub_offline",
               "hf_datasets_offline", "couldn't find cache", "not cached", "cannot find the requested files in the "
               "local cache", "cache", "corrupt")


def _chain(e: BaseException) -> list[BaseException]:
    """The exception and everything it was raised from or while handling (cause/context), in order."""
    seen, out = set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _names(e: BaseException) -> list[str]:
    return [c.__name__ for c in type(e).__mro__]


def _status(e: BaseException) -> int | None:
    for obj in (getattr(e, "response", None), e):
        code = getattr(obj, "status_code", None) or getattr(obj, "status", None)
        if isinstance(code, int):
            return code
    return None


def classify(exc: BaseException) -> str:
    """network | auth | cache | other, from the exception chain (types first, then HTTP status, then text)."""
    chain = _chain(exc)
    offline = any(os.environ.get(v, "0").lower() not in ("", "0", "false", "no")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    # 1. HTTP status codes are unambiguous
    for e in chain:
        code = _status(e)
        if code in (401, 403):
            return "auth"
        if code is not None and (code >= 500 or code == 429):
            return "network"
    # 2. exception types
    for e in chain:
        names = _names(e)
        if any(n in _AUTH_NAMES for n in names):
            return "auth"
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES):
            return "cache"
        if isinstance(e, PermissionError):
            return "cache"
        if any(n in _CACHE_NAMES for n in names):
            # LocalEntryNotFound also means "hub unreachable and not cached": network unless offline was asked for
            return "cache" if offline or "OfflineModeIsEnabled" in names else "network"
        if any(n in _NETWORK_NAMES for n in names) or isinstance(e, (ConnectionError, TimeoutError)):
            return "network"
    # 3. message text (libraries wrap errors in generic types)
    text = " | ".join(str(e).lower() for e in chain)
    if any(t in text for t in _AUTH_TEXT):
        return "auth"
    if any(t in text for t in ("no space left", "read-only file system", "disk quota")):
        return "cache"
    if any(t in text for t in _NETWORK_TEXT):
        return "cache" if offline else "network"
    if any(t in text for t in _CACHE_TEXT):
        return "cache"
    return "other"


def _load_dataset(hf_path: str, subset: str) -> Iterable[dict]:
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets.load_dataset(hf_path, name=subset, split="train", streaming=True)


def _load_tokenizer(name: str, timeout_s: float):
    from nsa.data import load_tokenizer

    return load_tokenizer(name, timeout_s=timeout_s)


def _on_alarm(signum, frame):  # noqa: ARG001
    raise TimeoutError("no batch within the --timeout limit: the stream timed out")


def check(hf_path: str, subset: str, text_field: str, tokenizer: str, batches: int, batch_size: int,
          timeout_s: float, load_dataset: Callable[..., Iterable[dict]] | None = None,
          load_tok: Callable[..., Any] | None = None, out=sys.stdout) -> int:
    load_dataset = load_dataset or _load_dataset
    load_tok = load_tok or _load_tokenizer
    stage = "loading the tokenizer"
    use_alarm = timeout_s > 0 and hasattr(signal, "SIGALRM")
    if use_alarm:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(int(max(1, timeout_s)))
    t0 = time.perf_counter()
    try:
        tok = load_tok(tokenizer, min(timeout_s, 10.0) if timeout_s > 0 else 10.0)
        print(f"tokenizer: {getattr(tok, 'source', tokenizer)}", file=out, flush=True)
        stage = f"opening {hf_path} (subset {subset})"
        ds = load_dataset(hf_path, subset)
        stage = f"streaming {hf_path} (subset {subset})"
        it, n_docs, n_tok = iter(ds), 0, 0
        for b in range(batches):
            texts = []
            while len(texts) < batch_size:
                row = next(it)
                if text_field not in row:
                    print(f"FAILED (other): the stream has no column '{text_field}' (columns: {', '.join(row)}). "
                          "Fix: set data.text_field in the config.", file=out)
                    return EXIT["other"]
                texts.append(row[text_field])
            lens = [len(ids) for ids in tok.encode_batch(texts)]
            n_docs += len(lens)
            n_tok += sum(lens)
            print(f"ok batch[{b}] lens: {lens}", file=out, flush=True)
            if use_alarm:
                signal.alarm(int(max(1, timeout_s)))
        dt = max(time.perf_counter() - t0, 1e-9)
        print(f"stream OK: {n_docs} documents, {n_tok} tokens in {dt:.1f} s ({n_docs / dt:.1f} docs/s, "
              f"{n_tok / dt:.0f} tok/s incl. startup)", file=out)
        return 0
    except StopIteration:
        print(f"FAILED (other): {hf_path} (subset {subset}) ended before {batches} batches of {batch_size}. "
              "Fix: check the subset name.", file=out)
        return EXIT["other"]
    except Exception as e:  # noqa: BLE001 - every failure is classified and explained
        kind = classify(e)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"FAILED ({kind}) while {stage}: {type(e).__name__}: {first}", file=out)
        print(f"fix ({kind}): {FIXES[kind]}", file=out)
        return EXIT[kind]
    finally:
        if use_alarm:
            signal.alarm(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="take data.hf_path/subset/text_field/tokenizer from this config")
    ap.add_argument("--hf-path", help="dataset repo (default: the config's data.hf_path)")
    ap.add_argument("--subset", help="dataset config name (default: the config's data.subset)")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per batch (0: no limit)")
    a = ap.parse_args(argv)

    from nsa.config import DataConfig
    from nsa.errors import UserError

    data = DataConfig()
    if a.config:
        from nsa.config import load_config

        try:
            data = load_config(a.config).data
        except UserError as e:
            print(f"FAILED (other): {e}")
            return 2
    hf_path, subset = a.hf_path or data.hf_path, a.subset or data.subset
    print(f"checking {hf_path} (subset {subset}, column {data.text_field!r}, tokenizer {data.tokenizer}): "
          f"{a.batches} batches of {a.batch_size} documents", flush=True)
    return check(hf_path, subset, data.text_field, data.tokenizer, a.batches, a.batch_size, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
