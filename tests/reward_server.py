"""A real HTTP reward server on 127.0.0.1 for tests, speaking the protocol of rlhf_ray/rewards/http.py."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RewardServer:
    """A real HTTP reward server on 127.0.0.1: answers with `reply(payload)`, or fails first `failures` times."""

    def __init__(self, reply, failures: int = 0, status: int = 503):
        self.requests, self.failures, self.status = [], failures, status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(payload)
                if len(outer.requests) <= outer.failures:
                    self.send_response(outer.status)
                    self.end_headers()
                    self.wfile.write(b"not now")
                    return
                body = json.dumps(reply(payload)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
