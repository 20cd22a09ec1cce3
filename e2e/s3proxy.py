"""A faulty S3 server: an HTTP proxy in front of a real S3-compatible server
(moto) that fails a fraction of requests the ways object stores fail, and
can be told to fail everything for a while (an outage).

    python3 e2e/s3proxy.py --listen 127.0.0.1:PORT --upstream http://127.0.0.1:MOTO \
        [--seed 7] [--fail 0.05] [--fail-after 0.05] [--reset 0.03] [--slow 0.03 --slow-seconds 2]

Per request, at random (seeded):
  --fail        answer 500 InternalError without forwarding it;
  --fail-after  forward it (the server does it), then answer 500 anyway: the
                client must not assume a failed write did not happen;
  --reset       close the connection without an answer;
  --slow        wait --slow-seconds, then forward it.
Control (not forwarded):
  POST /__faults/outage?seconds=N   answer 503 SlowDown to everything for N seconds
  POST /__faults/off | /__faults/on switch the random faults
  GET  /__faults                    counts of requests and of each fault, as JSON
"""

import argparse
import http.client
import json
import random
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


class State:
    def __init__(self, args):
        self.args = args
        self.random = random.Random(args.seed)
        self.lock = threading.Lock()
        self.enabled = True
        self.outage_until = 0.0
        self.counts = {"requests": 0, "fail": 0, "fail_after": 0, "reset": 0, "slow": 0, "outage": 0}

    def pick(self):
        with self.lock:
            self.counts["requests"] += 1
            if time.monotonic() < self.outage_until:
                self.counts["outage"] += 1
                return "outage"
            if not self.enabled:
                return None
            r = self.random.random()
            for fault, p in (("fail", self.args.fail), ("fail_after", self.args.fail_after),
                             ("reset", self.args.reset), ("slow", self.args.slow)):
                if r < p:
                    self.counts[fault] += 1
                    return fault
                r -= p
            return None


def make_handler(state, upstream):
    up = urllib.parse.urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status, body=b"", headers=()):
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def s3_error(self, status, code):
            body = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                    f"<Message>injected by s3proxy</Message></Error>").encode()
            self.reply(status, body, [("Content-Type", "application/xml")])

        def control(self):
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/__faults/outage":
                seconds = float(urllib.parse.parse_qs(url.query).get("seconds", ["10"])[0])
                with state.lock:
                    state.outage_until = time.monotonic() + seconds
            elif url.path == "/__faults/off":
                state.enabled = False
            elif url.path == "/__faults/on":
                state.enabled = True
            with state.lock:
                body = json.dumps(dict(state.counts, enabled=state.enabled,
                                       outage_left=max(0.0, state.outage_until - time.monotonic()))).encode()
            self.reply(200, body, [("Content-Type", "application/json")])

        def forward(self, body):
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            conn.close()
            return response.status, [(k, v) for k, v in response.getheaders()
                                     if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"], data

        def handle_any(self):
            if self.path.startswith("/__faults"):
                return self.control()
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            fault = state.pick()
            if fault == "outage":
                return self.s3_error(503, "SlowDown")
            if fault == "fail":
                return self.s3_error(500, "InternalError")
            if fault == "reset":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if fault == "slow":
                time.sleep(state.args.slow_seconds)
            status, headers, data = self.forward(body)
            if fault == "fail_after":
                return self.s3_error(500, "InternalError")
            self.reply(status, data, headers)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fail", type=float, default=0.0)
    parser.add_argument("--fail-after", type=float, default=0.0)
    parser.add_argument("--reset", type=float, default=0.0)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--slow-seconds", type=float, default=2.0)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), make_handler(State(args), args.upstream))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
