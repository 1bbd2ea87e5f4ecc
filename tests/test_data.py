"""Data pipeline: offline tokenizer, sources, EOS packing, sharding, held-out split, exact resume, retries."""

import json

import pytest
import torch

from nsa.config import config_from_dict
from nsa.data import (GPT2_EOS, DataModule, PackedStream, Prefetcher, SyntheticStream, embedded_documents,
                      is_val_doc, load_tokenizer, open_text_source, _val_threshold)
from nsa.errors import UserError
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2", timeout_s=1.0)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def make_docs(n=120):
    return [f"Document {i} says: " + " ".join(f"w{i}_{j}" for j in range(i % 13 + 3)) + "." for i in range(n)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = make_docs()
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return str(path), docs


def cfg_for(dataset, **train):
    base = {"seq_len": 16, "batch_size": 2, "eval_batches": 2}
    base.update(train)
    return config_from_dict(tiny_config(model={"vocab_size": 50257}, train=base,
                                        data={"dataset": dataset, "val_fraction": 0.2, "val_min_docs": 2,
                                              "docs_per_chunk": 5}))


def test_offline_gpt2_tokenizer(tok):
    assert tok.encode_batch(["Hello world"]) == [[15496, 995]]
    assert tok.eos_id == GPT2_EOS and tok.vocab_size == 50257
    assert tok.decode([15496, 995]) == "Hello world"


def test_packing_keeps_whole_documents_with_eos(jsonl, tok):
    path, docs = jsonl
    cfg = cfg_for(f"local:{path}")
    dm = DataModule(cfg, 0, 1)
    stream = PackedStream(dm._train_factory(), tok, 16, 2, docs_per_chunk=5, loop=False)
    windows = []
    while (b := stream.next_batch()) is not None:
        assert b.shape == (2, 17)
        windows.append(b.reshape(-1))
    flat = torch.cat(windows).tolist()
    thr = _val_threshold(0.2)
    train_docs = [d for d in docs if not is_val_doc(d, thr)]
    expected = [t for ids in tok.encode_batch(train_docs) for t in (*ids, GPT2_EOS)]
    # every window is a contiguous slice of the EOS-joined stream; only the final partial window is dropped
    assert flat == expected[: len(flat)] and len(expected) - len(flat) < 2 * 17


def test_validation_never_overlaps_training(jsonl, tok):
    path, docs = jsonl
    thr = _val_threshold(0.2)
    val = {d for d in docs if is_val_doc(d, thr)}
    assert 0 < len(val) < len(docs)
    make = open_text_source(cfg_for(f"local:{path}").data)
    dm = DataModule(cfg_for(f"local:{path}"), 0, 1)
    seen = [ex["text"] for ex in dm._train_factory()()]
    assert not (set(seen) & val) and set(seen) | val == set(docs)
    assert len(list(make())) == len(docs)
    batches = dm.val_batches()
    assert 1 <= len(batches) <= 2


def test_rank_shards_are_disjoint_and_complete(jsonl):
    path, docs = jsonl
    cfg = cfg_for(f"local:{path}")
    shards = [[ex["text"] for ex in DataModule(cfg, r, 2)._train_factory()()] for r in range(2)]
    assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
    thr = _val_threshold(0.2)
    assert sorted(shards[0] + shards[1]) == sorted(d for d in docs if not is_val_doc(d, thr))


def test_stream_resume_is_exact_across_epochs(jsonl, tok):
    path, _ = jsonl
    dm = DataModule(cfg_for(f"local:{path}"), 0, 1)
    a = PackedStream(dm._train_factory(), tok, 16, 2, docs_per_chunk=5)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(150)]  # more than one epoch of this small file
    assert a.epoch >= 1  # crossed an epoch boundary after the saved state
    b = PackedStream(dm._train_factory(), tok, 16, 2, docs_per_chunk=5, state=state)
    again = [b.next_batch() for _ in range(150)]
    assert all(torch.equal(x, y) for x, y in zip(rest, again))


def test_prefetcher_state_tracks_consumed_batches(jsonl, tok):
    path, _ = jsonl
    dm = DataModule(cfg_for(f"local:{path}"), 0, 1)
    p = Prefetcher(PackedStream(dm._train_factory(), tok, 16, 2, docs_per_chunk=5), depth=4)
    got = [p.next() for _ in range(3)]
    import time
    time.sleep(0.3)  # let the thread run ahead; the state must still describe batch 3
    state = p.state_dict()
    nxt = p.next()
    p.close()
    assert state["batches"] == 3
    resumed = PackedStream(dm._train_factory(), tok, 16, 2, docs_per_chunk=5, state=state)
    assert torch.equal(resumed.next_batch(), nxt) and len(got) == 3


class FlakyDataset:
    """Wraps an IterableDataset; each fresh iterator raises ConnectionError after `fail_after` examples
    (until `budget` failures have happened). fail_after=0 means no progress at all between failures."""

    failures = 0

    def __init__(self, ds, fail_after, budget):
        self.ds, self.fail_after, self.budget = ds, fail_after, budget

    def set_epoch(self, e):
        self.ds.set_epoch(e)

    def load_state_dict(self, s):
        self.ds.load_state_dict(s)

    def state_dict(self):
        return self.ds.state_dict()

    def __iter__(self):
        for i, ex in enumerate(self.ds):
            if i == self.fail_after and FlakyDataset.failures < self.budget:
                FlakyDataset.failures += 1
                raise ConnectionError("simulated network drop")
            yield ex


def test_transient_errors_are_retried_then_reported(jsonl, tok):
    path, _ = jsonl
    dm = DataModule(cfg_for(f"local:{path}"), 0, 1)
    make = dm._train_factory()
    clean = PackedStream(make, tok, 16, 2, docs_per_chunk=5)
    expected = [clean.next_batch() for _ in range(20)]
    FlakyDataset.failures = 0
    flaky = PackedStream(lambda: FlakyDataset(make(), 5, budget=2), tok, 16, 2, docs_per_chunk=5, backoff_s=0.01)
    got = [flaky.next_batch() for _ in range(20)]
    assert FlakyDataset.failures == 2 and all(torch.equal(x, y) for x, y in zip(expected, got))
    FlakyDataset.failures = 0
    broken = PackedStream(lambda: FlakyDataset(make(), 0, budget=99), tok, 16, 2, docs_per_chunk=5,
                          max_retries=2, backoff_s=0.01)
    with pytest.raises(UserError, match="failed 3 times"):
        for _ in range(20):
            broken.next_batch()


def test_local_text_and_parquet_sources(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(60)
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n")
    pq.write_table(pa.table({"content": docs}), str(tmp_path / "a.parquet"))
    for ds, extra in ((f"local:{tmp_path / 'a.txt'}", {}), (f"local:{tmp_path / 'a.parquet'}", {"text_field": "content"})):
        cfg = config_from_dict(tiny_config(model={"vocab_size": 50257}, train={"seq_len": 16, "batch_size": 2},
                                           data={"dataset": ds, "val_fraction": 0.2, "val_min_docs": 2, **extra}))
        texts = [ex["text"] for ex in open_text_source(cfg.data)()]
        assert texts == docs


def test_wrong_column_is_a_user_error(jsonl):
    path, _ = jsonl
    cfg = config_from_dict(tiny_config(model={"vocab_size": 50257}, train={"seq_len": 16},
                                       data={"dataset": f"local:{path}", "text_field": "body"}))
    with pytest.raises(UserError, match="no column 'body'"):
        open_text_source(cfg.data)()


def test_synthetic_is_deterministic_and_resumable():
    a = SyntheticStream(512, 16, 2, seed=1, rank=0)
    first = [a.next_batch() for _ in range(5)]
    b = SyntheticStream(512, 16, 2, seed=1, rank=0, state={"batches": 3})
    assert torch.equal(b.next_batch(), first[3])
    other_rank = SyntheticStream(512, 16, 2, seed=1, rank=1).next_batch()
    assert not torch.equal(other_rank, first[0]) and int(first[0].max()) < 512


def test_embedded_corpus_is_real_text():
    docs = embedded_documents(20000)
    assert len(docs) > 500 and sum(map(len, docs)) > 500_000
    assert docs == embedded_documents(20000)  # deterministic (and served from the cache the 2nd time)
    words = " ".join(docs[:50]).split()
    assert sum(w.isalpha() for w in words) / len(words) > 0.5  # prose, not noise


def test_fineweb_path_calls_datasets_streaming(monkeypatch, jsonl):
    """The real fineweb_edu code path, with `datasets.load_dataset` redirected to a local stream."""
    import datasets

    path, docs = jsonl
    real = datasets.load_dataset
    calls = []

    def fake(repo, name=None, split=None, streaming=False, **kw):
        calls.append((repo, name, split, streaming))
        return real("json", data_files=[path], split="train", streaming=True)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(datasets, "load_dataset", fake)
    cfg = cfg_for("fineweb_edu")
    texts = [ex["text"] for ex in open_text_source(cfg.data)()]
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)] and texts == docs

    def unreachable(*a, **k):
        raise ConnectionError("Couldn't reach the Hub")
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    stream = PackedStream(open_text_source(cfg.data), load_tokenizer("gpt2", 1.0), 16, 2, max_retries=1, backoff_s=0.01)
    with pytest.raises(UserError, match="failed 2 times.*Couldn't reach"):
        stream.next_batch()


def test_fineweb_in_offline_mode_fails_fast():
    with pytest.raises(UserError, match="offline mode is on"):
        open_text_source(cfg_for("fineweb_edu").data)
