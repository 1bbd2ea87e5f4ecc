#!/usr/bin/env python3
"""Find and redact things that look like secrets (stdlib only, so it runs before the venv exists).

Used by the runbook scripts so that tokens never land in logs, run.info or handoff bundles:

    secrets_scan.py tee LOGFILE      # stdin -> stdout and LOGFILE (appended), secrets replaced by ***
    secrets_scan.py redact           # stdin -> stdout, secrets replaced by ***
    secrets_scan.py scan PATH...     # exit 6 and list "path:line: kind" (never the value) on any hit

What counts as a secret:
- Hugging Face tokens (``hf_`` + 30 or more alphanumerics),
- Slack / Discord webhook URLs, Slack bot/user tokens (``xox?-``),
- W&B API keys given as ``WANDB_API_KEY=<40 hex>`` / ``wandb login <40 hex>``,
- ``name=value`` / ``name: value`` pairs whose name ends in token, api_key/_key, secret, webhook(_url),
  password, passwd or credential(s) (value of 8+ non-space characters, not a plain number;
  ``tokens_seen: 123`` is therefore fine),
- the current value (8+ characters) of every environment variable with such a name.
A bare 40-hex string (a git commit id) is *not* a secret on its own.
"""

from __future__ import annotations

import os
import re
import signal
import sys

SECRET_NAME = re.compile(r"(TOKEN|KEY|SECRET|WEBHOOK|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
EXIT_SECRET = 6

PATTERNS: list[tuple[str, re.Pattern[bytes]]] = [
    ("huggingface-token", re.compile(rb"hf_[A-Za-z0-9]{30,}")),
    ("slack-webhook", re.compile(rb"https?://hooks\.slack\.com/[A-Za-z0-9/_\-]+")),
    ("discord-webhook", re.compile(rb"https?://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/[A-Za-z0-9/_\-]+")),
    ("slack-token", re.compile(rb"xox[abposr]-[A-Za-z0-9\-]{10,}")),
    ("wandb-key", re.compile(rb"(?i)(?:wandb[_a-z]*\s*[=:]\s*['\"]?|wandb\s+login\s+)([0-9a-f]{40})\b")),
    (
        "secret-assignment",
        re.compile(
            rb"(?i)(?:token|api[_\-]?key|_key|secret|webhook(?:[_\-]?url)?|password|passwd|credentials?)"
            rb"['\"]?\s*[=:]\s*['\"]?([^\s'\",}]{8,})"
        ),
    ),
]

# Values that are obviously not secrets even when a secret-like name points at them.
_HARMLESS = re.compile(
    rb"^(?:\*+|<[^>]*>|\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|null|none|true|false|redacted|[0-9.eE+\-]+)$", re.I
)


def env_secret_values(environ: dict[str, str] | None = None) -> list[bytes]:
    """Values (8+ chars) of environment variables whose names look secret, longest first."""
    environ = os.environ if environ is None else environ
    vals = {v for k, v in environ.items() if SECRET_NAME.search(k) and len(v) >= 8}
    return sorted((v.encode() for v in vals), key=len, reverse=True)


def find(data: bytes, env_values: list[bytes]) -> list[tuple[str, int, int]]:
    """All (kind, start, end) spans in `data` that hold a secret value."""
    hits = []
    for kind, pat in PATTERNS:
        for m in pat.finditer(data):
            if m.groups():
                s, e = m.span(1)
                if _HARMLESS.match(data[s:e]):
                    continue
            else:
                s, e = m.span()
            hits.append((kind, s, e))
    for v in env_values:
        start = 0
        while (i := data.find(v, start)) >= 0:
            hits.append(("value-of-secret-env-var", i, i + len(v)))
            start = i + 1
    return hits


def redact(data: bytes, env_values: list[bytes] | None = None) -> bytes:
    env_values = env_secret_values() if env_values is None else env_values
    hits = sorted(find(data, env_values), key=lambda h: h[1])
    if not hits:
        return data
    out, pos = [], 0
    for _, s, e in hits:
        if e <= pos:
            continue
        s = max(s, pos)
        out.append(data[pos:s])
        out.append(b"***")
        pos = e
    out.append(data[pos:])
    return b"".join(out)


def scan_file(path: str, env_values: list[bytes], chunk: int = 1 << 24) -> list[str]:
    """Report lines 'path:line: kind' (text) or 'path:@offset: kind' (binary) for every hit."""
    reports = []
    overlap = 4096
    with open(path, "rb") as f:
        head = f.read(8192)
        binary = b"\0" in head
        f.seek(0)
        if not binary:
            for lineno, line in enumerate(f, 1):
                for kind, _, _ in find(line, env_values):
                    reports.append(f"{path}:{lineno}: {kind}")
            return reports
        offset, tail = 0, b""
        while True:
            block = f.read(chunk)
            if not block:
                break
            data = tail + block
            base = offset - len(tail)
            for kind, s, _ in find(data, env_values):
                if s >= len(tail) or offset == 0:
                    reports.append(f"{path}:@{base + s}: {kind}")
            offset += len(block)
            tail = data[-overlap:]
    return reports


def cmd_tee(logfile: str) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # outlive the trainer: its last lines are the save
    env_values = env_secret_values()
    out = sys.stdout.buffer
    with open(logfile, "ab", buffering=0) as log:
        for line in iter(sys.stdin.buffer.readline, b""):
            clean = redact(line, env_values)
            try:
                out.write(clean)
                out.flush()
            except (BrokenPipeError, OSError):
                pass  # terminal gone (disconnect): keep logging to the file
            log.write(clean)
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    mode, rest = argv[0], argv[1:]
    if mode == "tee" and len(rest) == 1:
        return cmd_tee(rest[0])
    if mode == "redact" and not rest:
        env_values = env_secret_values()
        for line in iter(sys.stdin.buffer.readline, b""):
            sys.stdout.buffer.write(redact(line, env_values))
            sys.stdout.buffer.flush()
        return 0
    if mode == "scan" and rest:
        env_values = env_secret_values()
        reports = []
        for root in rest:
            paths = [root]
            if os.path.isdir(root):
                paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
            for p in paths:
                if os.path.isfile(p) and not os.path.islink(p):
                    reports.extend(scan_file(p, env_values))
        for r in reports:
            print(r)
        return EXIT_SECRET if reports else 0
    print(f"usage: {sys.argv[0]} tee LOGFILE | redact | scan PATH...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
