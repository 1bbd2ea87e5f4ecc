"""Run alerts to a chat webhook: `python -m nsa.alerts EVENT MESSAGE [--run ID] [--log FILE]`.

The URL comes only from the environment (`ALERT_WEBHOOK_URL`), never from argv (visible in `ps`), and
is never printed: failures are logged with the URL replaced by `<webhook>`. The payload is Slack's
incoming-webhook JSON (`{"text": ...}`); `event`, `run_id` and `host` ride along as extra keys for
receivers that want structure (Slack ignores them). Delivery is bounded: ALERT_TIMEOUT_S per try
(default 5), ALERT_RETRIES tries (default 3) with 1 s, 2 s, ... backoff; then it gives up with one log
line. The runner starts it detached, so a slow or dead webhook never delays training. Stdlib only.

Events: started, preflight_failed, smoke_failed, diverged, stalled, preempted, crashed, failed,
early_stopped, completed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

EVENTS = ("started", "preflight_failed", "smoke_failed", "diverged", "stalled", "preempted", "crashed", "failed",
          "early_stopped", "completed")
_ICON = {"started": ":rocket:", "completed": ":white_check_mark:", "early_stopped": ":white_check_mark:",
         "preempted": ":pause_button:"}


def payload(event: str, message: str, run_id: str = "", host: str = "") -> dict:
    icon = _ICON.get(event, ":warning:")
    where = " ".join(x for x in (run_id, f"on {host}" if host else "") if x)
    return {"text": f"{icon} [nsa] {event}{(' ' + where) if where else ''}: {message}",
            "event": event, "run_id": run_id, "host": host}


def _scrub(text: str, url: str) -> str:
    """The URL (and its path, which is the secret part of Slack/Discord hooks) must not reach a log."""
    for s in {url, url.split("://", 1)[-1]}:
        if s:
            text = text.replace(s, "<webhook>")
    return text


def send(url: str, body: dict, timeout_s: float = 5.0, retries: int = 3, backoff_s: float = 1.0,
         log=print) -> bool:
    data = json.dumps(body).encode()
    last = ""
    for attempt in range(1, max(1, retries) + 1):
        try:
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                if 200 <= r.status < 300:
                    return True
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, socket.timeout, ValueError) as e:
            last = type(e).__name__ + (f": {getattr(e, 'reason', e)}" if str(e) else "")
        if attempt < retries:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    log(_scrub(f"alert '{body.get('event')}' not delivered after {retries} tries ({last}); training is unaffected", url))
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nsa.alerts", description="Send one run alert to ALERT_WEBHOOK_URL.")
    ap.add_argument("event", choices=EVENTS)
    ap.add_argument("message")
    ap.add_argument("--run", default="", help="run id shown in the alert")
    ap.add_argument("--log", default=None, help="append delivery failures to this file (the runner log)")
    a = ap.parse_args(argv)
    url = os.environ.get("ALERT_WEBHOOK_URL", "").strip()
    if not url:
        return 0

    def log(msg: str) -> None:
        line = f"[alerts] WARNING: {msg}"
        print(line, file=sys.stderr, flush=True)
        if a.log:
            try:
                with open(a.log, "a") as f:
                    f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {line}\n")
            except OSError:
                pass

    def num(name: str, default: float) -> float:
        try:
            return float(os.environ.get(name, default))
        except ValueError:
            return default

    host = os.environ.get("HOSTNAME") or os.uname().nodename
    ok = send(url, payload(a.event, _scrub(a.message, url), a.run, host), timeout_s=num("ALERT_TIMEOUT_S", 5.0),
              retries=int(num("ALERT_RETRIES", 3)), log=log)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
