"""scripts/datasets/check_fwe_stream.py offline: failure classification (network / auth / cache) with
mocked exceptions shaped like those of requests/httpx/huggingface_hub/datasets, and the streaming
path with a mocked dataset and tokenizer."""

from __future__ import annotations

import errno
import importlib.util
import io
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_fwe_stream", REPO / "scripts" / "datasets" / "check_fwe_stream.py")
fwe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fwe)


def _named(name: str, base: type = Exception, **attrs):
    """An exception instance of a class called `name` (like a library's, without importing it)."""
    cls = type(name, (base,), {})
    e = cls(attrs.pop("msg", name))
    for k, v in attrs.items():
        setattr(e, k, v)
    return e


class _Resp:
    def __init__(self, code):
        self.status_code = code


def _wrapped(inner: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            raise outer from None  # like nsa.data's UserError: context kept, display suppressed
    except BaseException as e:
        return e


@pytest.mark.parametrize(
    "exc, kind",
    [
        (ConnectionError("HTTPSConnectionPool: Max retries exceeded"), "network"),
        (socket.gaierror(-2, "Name or service not known"), "network"),
        (TimeoutError("no batch within the --timeout limit"), "network"),
        (_named("ConnectTimeout", msg="timed out connecting"), "network"),
        (_named("ConnectError", msg="[Errno -3] Temporary failure in name resolution"), "network"),
        (_named("SSLError", msg="certificate verify failed"), "network"),
        (_named("HfHubHTTPError", msg="503 Server Error", response=_Resp(503)), "network"),
        (_named("HfHubHTTPError", msg="429 Too Many Requests", response=_Resp(429)), "network"),
        (_named("HfHubHTTPError", msg="401 Client Error: Unauthorized", response=_Resp(401)), "auth"),
        (_named("HTTPError", msg="403 Forbidden", response=_Resp(403)), "auth"),
        (_named("GatedRepoError", msg="Access to dataset is restricted"), "auth"),
        (_named("RepositoryNotFoundError", msg="Repository Not Found"), "auth"),
        (ValueError("Invalid user token."), "auth"),
        (OSError(errno.ENOSPC, "No space left on device"), "cache"),
        (OSError(errno.EROFS, "Read-only file system"), "cache"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/.cache/huggingface/datasets"), "cache"),
        (_named("OfflineModeIsEnabled", base=ConnectionError, msg="Offline mode is enabled."), "cache"),
        (RuntimeError("Couldn't find cache for HuggingFaceFW/fineweb-edu"), "cache"),
        (ValueError("something unrelated"), "other"),
    ],
)
def test_classify(exc, kind, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert fwe.classify(exc) == kind


def test_classify_follows_the_exception_chain():
    wrapped = _wrapped(ConnectionError("Connection refused"), RuntimeError("cannot open the streaming dataset"))
    assert fwe.classify(wrapped) == "network"
    wrapped = _wrapped(_named("X", response=_Resp(401)), RuntimeError("cannot open"))
    assert fwe.classify(wrapped) == "auth"


def test_local_entry_not_found_is_network_online_and_cache_offline(monkeypatch):
    e = _named("LocalEntryNotFoundError", base=FileNotFoundError, msg="cannot find the requested files in the local cache")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert fwe.classify(e) == "network"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fwe.classify(e) == "cache"


class _Tok:
    source = "fake-bpe"

    def encode_batch(self, texts):
        return [t.split() for t in texts]


def _rows(n):
    return [{"text": " ".join(["w"] * (i + 1)), "id": i} for i in range(n)]


def test_streams_batches_and_prints_lens():
    out = io.StringIO()
    rc = fwe.check("HuggingFaceFW/fineweb-edu", "sample-10BT", "text", "gpt2", batches=3, batch_size=2, timeout_s=5,
                   load_dataset=lambda p, s: _rows(10), load_tok=lambda n, t: _Tok(), out=out)
    text = out.getvalue()
    assert rc == 0, text
    assert "ok batch[0] lens: [1, 2]" in text
    assert "ok batch[1] lens: [3, 4]" in text
    assert "ok batch[2] lens: [5, 6]" in text
    assert "stream OK: 6 documents, 21 tokens" in text


@pytest.mark.parametrize(
    "exc, kind, code",
    [
        (ConnectionError("Name or service not known"), "network", 10),
        (_named("HfHubHTTPError", msg="401 Unauthorized", response=_Resp(401)), "auth", 11),
        (OSError(errno.ENOSPC, "No space left on device"), "cache", 12),
    ],
)
def test_open_failure_says_which_kind(exc, kind, code, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def boom(p, s):
        raise exc

    out = io.StringIO()
    rc = fwe.check("HuggingFaceFW/fineweb-edu", "sample-10BT", "text", "gpt2", 2, 2, 5,
                   load_dataset=boom, load_tok=lambda n, t: _Tok(), out=out)
    assert rc == code
    assert f"FAILED ({kind}) while opening HuggingFaceFW/fineweb-edu" in out.getvalue()
    assert f"fix ({kind}):" in out.getvalue()


def test_failure_mid_stream_after_good_batches(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def stream(p, s):
        yield from _rows(2)
        raise _named("HfHubHTTPError", msg="403 Forbidden", response=_Resp(403))

    out = io.StringIO()
    rc = fwe.check("x/y", "s", "text", "gpt2", 3, 2, 5, load_dataset=stream, load_tok=lambda n, t: _Tok(), out=out)
    assert rc == 11
    assert "ok batch[0] lens: [1, 2]" in out.getvalue()
    assert "FAILED (auth) while streaming x/y" in out.getvalue()


def test_missing_column_and_short_stream():
    out = io.StringIO()
    rc = fwe.check("x/y", "s", "content", "gpt2", 1, 2, 5, load_dataset=lambda p, s: _rows(4),
                   load_tok=lambda n, t: _Tok(), out=out)
    assert rc == 1 and "no column 'content'" in out.getvalue()
    out = io.StringIO()
    rc = fwe.check("x/y", "s", "text", "gpt2", 5, 2, 5, load_dataset=lambda p, s: _rows(3),
                   load_tok=lambda n, t: _Tok(), out=out)
    assert rc == 1 and "ended before 5 batches" in out.getvalue()


def test_secrets_scan_module():
    """scripts/secrets_scan.py: what counts as a secret, and what does not (commit ids, tokens_seen)."""
    spec = importlib.util.spec_from_file_location("secrets_scan", REPO / "scripts" / "secrets_scan.py")
    ss = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ss)
    env = ss.env_secret_values({"MY_API_TOKEN": "plantedvalue99", "PATH": "/usr/bin", "SHORT_KEY": "1"})
    assert env == [b"plantedvalue99"]
    # fake secrets, split so no token-shaped literal is committed
    bad = [b"HF_TOKEN=hf_" + b"abcdefghijklmnopqrstuvwxyzABCDEFGH", b"https://hooks.slack" + b".com/services/T0/B0/xyz",
           b"wandb login 0123456789abcdef0123456789abcdef01234567", b'"api_key": "sk-12345678abc"',
           b"x plantedvalue99 y", b"https://discord.com/api/webhooks/1/abc"]
    good = [b'"tokens_seen": 123456789,', b"commit: 0123456789abcdef0123456789abcdef01234567",
            b"password: ${PASSWORD_VAR}", b"step,loss,lr,toks_per_s", b"max_token: 12345678"]
    for line in bad:
        assert ss.find(line, env), line
        assert b"***" in ss.redact(line, env)
    for line in good:
        assert not ss.find(line, env), line
        assert ss.redact(line, env) == line
