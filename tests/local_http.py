"""A tiny HTTP server on 127.0.0.1 for download tests: serves in-memory files, honours ``Range``,
and can cut a response short (an interrupted download) or ignore ``Range`` (a server without resume)."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Served:
    files: dict = field(default_factory=dict)  # path -> bytes
    cut_after: dict = field(default_factory=dict)  # path -> send only this many body bytes, once
    ignore_range: bool = False
    requests: list = field(default_factory=list)  # (path, Range header or None, status)


def _handler(served: Served):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):
            data = served.files.get(self.path)
            if data is None:
                served.requests.append((self.path, None, 404))
                self.send_error(404)
                return
            start, status = 0, 200
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and not served.ignore_range:
                start, status = int(match.group(1)), 206
                if start >= len(data):  # as real servers do: nothing past the end
                    served.requests.append((self.path, self.headers.get("Range"), 416))
                    self.send_error(416)
                    return
            served.requests.append((self.path, self.headers.get("Range"), status))
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            cut = served.cut_after.pop(self.path, None)
            self.wfile.write(body if cut is None else body[:cut])
            self.wfile.flush()
            if cut is not None:
                self.close_connection = True

    return Handler


class LocalServer:
    """Context manager: ``with LocalServer(served) as url: ...`` (url ends without a slash)."""

    def __init__(self, served: Served):
        self.served = served
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))

    def __enter__(self) -> str:
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
