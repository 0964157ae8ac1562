"""`slurmexecutor report RUN --serve`: the report page, live, on 127.0.0.1 only.

Each request re-reads the run (at most once per `refresh` seconds, whoever asks); the
page reloads its report in place every `refresh` seconds. From a laptop, reach a login
node's page with `ssh -L PORT:127.0.0.1:PORT LOGIN_NODE`.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from slurmexecutor._log import log
from slurmexecutor.reports.report import read_report
from slurmexecutor.reports.report_data import Reader
from slurmexecutor.reports.report_html import render

HOST = "127.0.0.1"  # never another interface: the page shows a user's run


class ReportServer:
    """Serves one run's live report; `start()` in a daemon thread or `serve_forever()`."""

    def __init__(self, run_dir: Path, port: int = 0, refresh: float = 2.0,
                 reader: Reader | None = None) -> None:
        self.run_dir, self.refresh, self.reader = Path(run_dir), refresh, reader
        self._lock = threading.Lock()
        self._page: tuple[float, bytes] | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/", "/index.html"):
                    self.send_error(404)
                    return
                try:
                    body, status = server.page(), 200
                except Exception as error:  # noqa: BLE001  (show it, keep serving)
                    log.warning("report of %s failed: %r", server.run_dir, error)
                    body, status = f"report failed: {error!r}".encode(), 500
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("report server: " + format, *args)

        self.httpd = ThreadingHTTPServer((HOST, port), Handler)
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.httpd.server_address[1]}/"

    def page(self) -> bytes:
        """The page, made again when older than `refresh` seconds."""
        with self._lock:
            if self._page is None or time.monotonic() - self._page[0] >= self.refresh:
                data = read_report(self.run_dir, self.reader)
                self._page = (time.monotonic(), render(data, self.refresh).encode())
            return self._page[1]

    def start(self) -> ReportServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name="slurmexecutor-report")
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        """Stop serving and free the port (again: nothing)."""
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join()
            self.thread = None
        self.httpd.server_close()
