"""Shared test fixtures.

The only thing faked is the internet: ``http_server`` serves scripted
responses from a loopback HTTP server so download/image tests exercise the real
client code (timeouts, retries, Range requests) without leaving the machine.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sand.pipeline.base.torch_env import apply_torch_env_defaults

os.environ.setdefault("HF_HUB_OFFLINE", "1")
apply_torch_env_defaults()  # as the sand command does, before torch is imported by any test module
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
    method: str = "GET"


class _Host(ThreadingHTTPServer):
    """Accepts connections as fast as a real image host. Why: socketserver's listen backlog is 5, the image fetcher
    opens 16 connections at once, and each SYN the kernel drops is retried only after a second."""

    request_queue_size = 1024
    daemon_threads = True


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

        self._httpd = _Host(("127.0.0.1", 0), _H)
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

        info = RequestInfo(path=h.path, headers={k: v for k, v in h.headers.items()}, method=h.command)
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


def _logging_state() -> dict[str, tuple[list[logging.Handler], int, bool]]:
    """Handlers, level and propagation of the root logger and every logger that exists now."""
    loggers = [logging.getLogger(), *(obj for obj in logging.Logger.manager.loggerDict.values()
                                      if isinstance(obj, logging.Logger))]
    return {lg.name: (list(lg.handlers), lg.level, lg.propagate) for lg in loggers}


def _restore_logging(saved: dict[str, tuple[list[logging.Handler], int, bool]]) -> None:
    """Undo what a CLI run did to logging: close and drop the handlers it added, reset levels.

    Loggers created during the run keep their handlers, except those the CLI itself owns
    (``sand.*``): Prefect configures its loggers once per process and must keep working.
    """
    current = _logging_state()
    for name, (handlers, _, _) in current.items():
        if name in saved:
            before, level, propagate = saved[name]
        elif name.startswith("sand"):
            before, level, propagate = [], logging.NOTSET, True
        else:
            continue
        lg = logging.getLogger() if name == "root" else logging.getLogger(name)
        for handler in handlers:
            if handler not in before:
                lg.removeHandler(handler)
                handler.close()
        lg.setLevel(level)
        lg.propagate = propagate


def invoke_sand(args, *, api_url: str | None = None, env: dict[str, str] | None = None, cwd=None):
    """``sand ARGS`` in this process: the console entry point under ``typer.testing.CliRunner``.

    Why the entry point (``sand.flows.cli.main``) and not ``CliRunner.invoke(app)``: the
    one-line ``error:`` and the exit codes 1/2/130 are made by ``main`` around the typer app,
    and they are what the tests check. The run sees what a user's process would (argv, the
    environment with ``SAND_LOG_LEVEL=WARNING`` like ``run_sand``, a fresh run log) and leaves
    nothing behind: the environment, argv, the working directory and the logging handlers it
    installed are restored, so runs in one test process do not see each other's state.
    Returns a ``typer.testing.Result`` (``exit_code``, ``stdout``, ``stderr`` kept apart).
    """
    import contextlib
    import sys

    from typer.testing import CliRunner, Result

    from sand.flows import cli, cli_logging

    overrides = {"SAND_LOG_LEVEL": "WARNING", **(env or {})}
    if api_url is not None:
        overrides["PREFECT_API_URL"] = api_url
    runner = CliRunner()
    saved_env, saved_argv, saved_logging = dict(os.environ), sys.argv, _logging_state()
    saved_run_log = cli_logging.RUN_LOG
    cli_logging.RUN_LOG = cli_logging.RunLog()  # each command opens its own log file
    exit_code, exception = 0, None
    try:
        with runner.isolation(env=overrides) as (out, err, mixed), contextlib.chdir(cwd or os.getcwd()):
            sys.argv = ["sand", *map(str, args)]
            try:
                cli.main()
            except SystemExit as done:
                exit_code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
                exception = done if exit_code else None
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
            captured = out.getvalue(), err.getvalue(), mixed.getvalue()
    finally:
        _restore_logging(saved_logging)
        cli_logging.RUN_LOG = saved_run_log
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
    return Result(runner=runner, stdout_bytes=captured[0], stderr_bytes=captured[1], output_bytes=captured[2],
                  return_value=None, exit_code=exit_code, exception=exception)


def foreground_signals() -> None:
    """``preexec_fn`` for a child that gets Ctrl-C as a terminal's foreground job would.

    Why: a test runner started in the background (``nohup``, ``&``, some CI agents) ignores
    SIGINT, children inherit that, and Python then leaves SIGINT ignored: a Ctrl-C test
    would wait forever. A terminal's foreground job always starts with the default.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
