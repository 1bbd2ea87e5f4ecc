"""nsa/watchdog.py and nsa/alerts.py on their own: a stand-in trainer process, a local HTTP webhook.

The stand-in is a small Python child that registers the same stack dumper as nsa.train and beats the same
heartbeat, then goes quiet inside a function with a recognisable name; the watchdog must notice within
its timeout, collect that stack, write stalled.json and stop the child (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nsa import alerts
from nsa.watchdog import HEARTBEAT, STALLED, Heartbeat, Watchdog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from nsa.watchdog import Heartbeat, install_stack_dumper
    watch, beats, deaf = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "deaf"
    keep = install_stack_dumper(watch, 0)
    if deaf:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    hb = Heartbeat(os.path.join(watch, "heartbeat.json"), 0, min_interval_s=0.0)
    hb.beat("startup", 0)
    def a_step_that_never_returns():
        while True:
            time.sleep(0.05)
    for step in range(1, beats + 1):
        time.sleep(0.1)
        hb.beat("train", step)
    print("going quiet", flush=True)
    a_step_that_never_returns()
""")


def _child(tmp_path, beats: int, deaf: bool = False) -> subprocess.Popen:
    watch = tmp_path / "watch"
    watch.mkdir(exist_ok=True)
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=REPO))
    return subprocess.Popen([sys.executable, str(script), str(watch), str(beats), "deaf" if deaf else "ok"],
                            start_new_session=True, stdout=subprocess.PIPE, text=True)


def _watchdog(tmp_path, pid: int, timeout: float, startup: float = 30.0, grace: float = 1.0) -> Watchdog:
    return Watchdog(pid, str(tmp_path / "watch"), timeout, startup, grace, str(tmp_path / "stalls"),
                    csv_path=str(tmp_path / "training.csv"), poll_s=0.1, log_path=str(tmp_path / "runner.log"))


@pytest.mark.parametrize("deaf", [False, True], ids=["answers-sigterm", "deaf-to-sigterm"])
def test_watchdog_catches_a_quiet_trainer_dumps_its_stack_and_stops_it(tmp_path, deaf):
    p = _child(tmp_path, beats=10, deaf=deaf)
    try:
        assert p.stdout.readline().strip() == "going quiet"
        quiet_since = time.time()
        wd = _watchdog(tmp_path, p.pid, timeout=1.5)
        wd.run()
        detected = time.time() - quiet_since
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    # detected after the timeout, but not much later (poll 0.1 s + the 1 s heartbeat granularity)
    assert 1.5 <= detected <= 1.5 + 2.0, detected
    stalled = json.loads((tmp_path / "watch" / STALLED).read_text())
    assert stalled["phase"] == "train" and stalled["step"] == 10 and stalled["ranks_dumped"] == 1
    report = open(stalled["stack_file"]).read()
    assert "a_step_that_never_returns" in report and "===== rank 0" in report
    assert os.path.dirname(stalled["stack_file"]) == str(tmp_path / "stalls")
    # stopped: SIGTERM is enough for a live Python; a deaf one needs the SIGKILL after the grace period
    assert p.returncode == (-9 if deaf else -15)
    log = (tmp_path / "runner.log").read_text()
    assert "STALL: no progress" in log and ("SIGKILL" in log) == deaf


def test_watchdog_leaves_a_beating_trainer_alone_and_exits_with_it(tmp_path):
    p = _child(tmp_path, beats=30)  # beats for ~3 s at 0.1 s, then quiet; the watchdog timeout is 2 s
    wd = _watchdog(tmp_path, p.pid, timeout=2.0)
    t = threading.Thread(target=wd.run)
    t.start()
    assert p.stdout.readline().strip() == "going quiet"
    assert not (tmp_path / "watch" / STALLED).exists()  # 3 s of steady beats never tripped it
    p.kill()
    p.wait()
    t.join(timeout=5)
    assert not t.is_alive()  # the watchdog ends with its trainer
    assert not (tmp_path / "watch" / STALLED).exists()


def test_startup_gets_its_own_longer_limit_and_old_heartbeats_do_not_count(tmp_path):
    watch = tmp_path / "watch"
    watch.mkdir()
    hb = watch / HEARTBEAT
    hb.write_text(json.dumps({"phase": "train", "step": 99}))
    os.utime(hb, (time.time() - 3600, time.time() - 3600))  # left by an earlier launch
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        wd = _watchdog(tmp_path, sleeper.pid, timeout=0.5, startup=2.0)
        last, phase, beat = wd.progress()
        assert phase == "startup" and beat is None and last == wd.start
        t0 = time.time()
        wd.run()  # no heartbeat at all: only the startup limit applies
        assert 2.0 <= time.time() - t0 <= 3.5
        stalled = json.loads((watch / STALLED).read_text())
        assert stalled["phase"] == "startup" and stalled["ranks_dumped"] == 0
        assert "hung before nsa.train started up" in open(stalled["stack_file"]).read()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_heartbeat_is_throttled_but_phase_changes_are_written_at_once(tmp_path):
    path = tmp_path / "hb.json"
    hb = Heartbeat(str(path), rank=3, min_interval_s=60)
    hb.beat("train", 1)
    hb.beat("train", 2)  # within the interval, same phase: skipped
    assert json.loads(path.read_text())["step"] == 1
    hb.beat("eval", 2)
    d = json.loads(path.read_text())
    assert d["phase"] == "eval" and d["step"] == 2 and d["rank"] == 3 and d["pid"] == os.getpid()
    Heartbeat(None, 0).beat("train", 1)  # ranks without a heartbeat file: a no-op


# ------------------------------------------------------------------------------------------- alerts


class _Hook(BaseHTTPRequestHandler):
    received: list = []
    status = 200
    delay = 0.0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append((self.path, body))
        time.sleep(type(self).delay)
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def webhook():
    _Hook.received, _Hook.status, _Hook.delay = [], 200, 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = "T0/B0/" + "k" * 24
    yield _Hook, f"http://127.0.0.1:{server.server_address[1]}/services/{secret}", secret
    server.shutdown()


def _cli(url: str | None, *args: str, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "ALERT_WEBHOOK_URL"}
    if url:
        e["ALERT_WEBHOOK_URL"] = url
    e.update(env)
    return subprocess.run([sys.executable, "-m", "nsa.alerts", *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=60)


def test_alert_cli_posts_slack_json_with_the_event_and_no_secret(webhook, tmp_path):
    hook, url, secret = webhook
    r = _cli(url, "stalled", f"no progress for 1200s (posting to {url})", "--run", "m7c_x")
    assert r.returncode == 0, r.stderr
    (path, body), = hook.received
    assert path.endswith(secret)
    assert body["event"] == "stalled" and body["run_id"] == "m7c_x"
    assert body["text"].startswith(":warning: [nsa] stalled m7c_x on ") and "no progress for 1200s" in body["text"]
    assert secret not in json.dumps(body)  # a message that quotes the URL is scrubbed
    assert "<webhook>" in body["text"]


def test_alert_retries_are_bounded_and_failures_are_logged_without_the_url(webhook, tmp_path):
    hook, url, secret = webhook
    hook.status = 500
    log = tmp_path / "runner.log"
    t0 = time.time()
    r = _cli(url, "crashed", "boom", "--log", str(log), ALERT_RETRIES="3")
    assert r.returncode == 1 and len(hook.received) == 3
    assert time.time() - t0 < 10  # 1 s + 2 s backoff, not more
    text = log.read_text() + r.stderr
    assert "alert 'crashed' not delivered after 3 tries (HTTP 500)" in text and secret not in text
    # a webhook that never answers costs at most retries x timeout
    hook.status, hook.delay = 200, 30.0
    t0 = time.time()
    r = _cli(url, "completed", "done", ALERT_RETRIES="2", ALERT_TIMEOUT_S="0.5")
    assert r.returncode == 1 and time.time() - t0 < 6
    assert secret not in r.stderr and "timed out" in r.stderr.lower()


def test_no_webhook_means_no_alert_and_unknown_events_are_refused():
    assert _cli(None, "completed", "done").returncode == 0
    r = _cli("http://127.0.0.1:9/x", "exploded", "?")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    assert set(alerts.EVENTS) >= {"started", "smoke_failed", "diverged", "stalled", "preempted", "crashed",
                                  "early_stopped", "completed"}
