"""A tiny HTTP app for platform tests: answers its identity; /call/<svc> calls another service via HTTP_PROXY."""

import json
import os
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class H(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/call/"):
            target = self.path[len("/call/") :]
            try:
                with urllib.request.urlopen(
                    f"http://{target}", timeout=5
                ) as r:  # through HTTP_PROXY
                    body = r.read()
            except urllib.error.HTTPError as exc:
                body = f"upstream answered {exc.code}: {exc.read()[:200]!r}".encode()
                self.send_response(502)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
        else:
            body = json.dumps(
                {"pod": os.environ["POD_NAME"], "version": os.environ.get("SERVICE_VERSION", "")}
            ).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


if __name__ == "__main__":
    print(f"listening on {os.environ['PORT']}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
