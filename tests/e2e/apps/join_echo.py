"""A workload for the `diktyo join` tests: answers JSON with its POD_NAME, the path and the
request headers it got (the tests read the mesh's headers from them); ``/healthz`` answers 503
while the file named by the first argument exists."""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FLAG = sys.argv[1] if len(sys.argv) > 1 else ""


class H(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/healthz":
            code = 503 if FLAG and os.path.exists(FLAG) else 200
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body = json.dumps(
            {
                "pod": os.environ["POD_NAME"],
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: object) -> None:
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
