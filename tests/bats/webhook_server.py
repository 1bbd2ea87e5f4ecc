#!/usr/bin/env python3
"""A local Slack-style webhook for the alert tests: `webhook_server.py MODE PORT_FILE LOG_FILE`.

Listens on 127.0.0.1 (a free port, written to PORT_FILE once listening) and appends every POST as one
JSON line {"path": ..., "body": <parsed JSON or raw text>} to LOG_FILE. MODE: ok (HTTP 200), error
(HTTP 500 to everything), hang (read the request, never answer: a webhook that is down but accepts
connections). Runs until killed.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

mode, port_file, log_file = sys.argv[1], sys.argv[2], sys.argv[3]
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode("utf-8", "replace")
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        with lock, open(log_file, "a") as f:
            f.write(json.dumps({"path": self.path, "body": body, "mode": mode}) + "\n")
        if mode == "hang":
            time.sleep(3600)
            return
        self.send_response(500 if mode == "error" else 200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):  # keep the test output clean
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
import os  # noqa: E402

os.replace(port_file + ".tmp", port_file)
server.serve_forever()
