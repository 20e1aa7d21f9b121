"""A real local reward server for the tests: http.server in a thread, on a free port.

`plan` is a list of actions taken one per request (then `default` for every later one):
  "ok"          score each response by its share of digit characters (the tiny task's rule)
  "slow"        sleep `delay_s`, then answer "ok"
  ("status", n) answer HTTP n with a short body
  ("body", b)   answer 200 with the raw bytes b
Every request's JSON body and headers are recorded in `seen`.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlhf_pipe.assets.tiny import digit_reward


class RewardServer:
    def __init__(self, plan=(), default="ok", delay_s: float = 2.0):
        self.plan, self.default, self.delay_s = list(plan), default, delay_s
        self.seen: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.seen.append({"body": body, "headers": dict(self.headers)})
                    action = server.plan.pop(0) if server.plan else server.default
                if action == "slow":
                    time.sleep(server.delay_s)
                    action = "ok"
                if action == "ok":
                    data = json.dumps(digit_reward(body["prompts"], body["responses"])).encode()
                    self._answer(200, data)
                elif action[0] == "status":
                    self._answer(action[1], b'{"error": "server says no"}')
                else:
                    self._answer(200, action[1])

            def _answer(self, status, data):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test): nothing to answer

            def log_message(self, *args):  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # a sleeping handler must not hold up the test
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, userinfo: str = "", path: str = "/score") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
