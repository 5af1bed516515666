"""Shared test fixtures.

The only thing faked is the internet: ``http_server`` serves scripted
responses from a loopback HTTP server so download/image tests exercise the real
client code (timeouts, retries, Range requests) without leaving the machine.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported by any test module
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class Reply:
    """One scripted response: status, headers, body; ``delay`` seconds before answering."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    truncate_to: int | None = None  # send a Content-Length of len(body) but only this many bytes


Handler = Callable[["RequestInfo"], Reply]


@dataclass
class RequestInfo:
    path: str
    headers: dict[str, str]


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 with per-path scripted handlers.

    ``routes[path]`` is a Reply, a list of Replies (consumed one per request, the
    last one repeating) or a callable ``RequestInfo -> Reply``. ``hits[path]``
    counts requests so tests can assert "fetched once".
    """

    def __init__(self) -> None:
        self.routes: dict[str, Reply | list[Reply] | Handler] = {}
        self.hits: dict[str, int] = {}
        self.requests: list[RequestInfo] = []
        self._lock = threading.Lock()
        server = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                server._serve(self)

            def do_HEAD(self) -> None:  # noqa: N802
                server._serve(self, head=True)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def _next_reply(self, info: RequestInfo) -> Reply:
        with self._lock:
            self.hits[info.path] = self.hits.get(info.path, 0) + 1
            self.requests.append(info)
            route = self.routes.get(info.path)
            if route is None:
                return Reply(404, b"not found")
            if isinstance(route, list):
                return route.pop(0) if len(route) > 1 else route[0]
        if callable(route) and not isinstance(route, Reply):
            return route(info)
        return route

    def _serve(self, h: BaseHTTPRequestHandler, head: bool = False) -> None:
        import time

        info = RequestInfo(path=h.path, headers={k: v for k, v in h.headers.items()})
        reply = self._next_reply(info)
        if reply.delay:
            time.sleep(reply.delay)
        try:
            h.send_response(reply.status)
            headers = dict(reply.headers)
            headers.setdefault("Content-Length", str(len(reply.body)))
            for k, v in headers.items():
                h.send_header(k, v)
            if reply.truncate_to is not None:
                h.send_header("Connection", "close")
            h.end_headers()
            if not head:
                body = reply.body if reply.truncate_to is None else reply.body[: reply.truncate_to]
                h.wfile.write(body)
                h.wfile.flush()
            if reply.truncate_to is not None:
                h.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            pass

    def start(self) -> LoopbackServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def http_server() -> Iterator[LoopbackServer]:
    server = LoopbackServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One temporary Prefect API server (and database) for the whole test session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from sand.flows.settings import apply_prefect_defaults

    apply_prefect_defaults()
    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def run_sand(args, *, api_url: str | None = None, cwd=None, env=None, drop_write_override: bool = False,
             timeout: float = 600):
    """The installed ``sand`` console script in a fresh process, as a user runs it (quiet console).

    ``drop_write_override`` runs it without root's power to write where permission bits forbid
    it (so a ``chmod a-w`` data root is really read-only even for root); it skips the test when
    that cannot be arranged.
    """
    import shutil
    import subprocess
    import sys

    exe = shutil.which("sand", path=os.path.dirname(sys.executable)) or "sand"
    cmd = [exe, *args]
    if drop_write_override and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make a directory read-only")
        cmd = [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner", *cmd]
    full_env = {**os.environ, "SAND_LOG_LEVEL": "WARNING", **(env or {})}
    if api_url is not None:
        full_env["PREFECT_API_URL"] = api_url
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout)
