"""Prefect's temporary API server ends with the ``sand`` process that started it, however that ends. Why: Prefect stops
its ephemeral server (a child process) at exit or on our Ctrl-C/SIGTERM handler, but SIGKILL and the OOM killer skip
both, and the server ran on, orphaned. Prefect starts it with ``subprocess.Popen`` itself (no hook for a parent-death
signal), and a process group does not help (a SIGKILL reaches one process). But the child inherits our environment: we
mark it with a token, and a guard process in a session of its own waits on a pipe only we hold. When we exit, however we
die, the pipe closes and the guard ends every process of this user carrying the token. Linux only (``/proc``)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

#: The environment variable that marks this run's child processes.
TOKEN_VARIABLE = "SAND_RUN_GUARD"
#: Seconds the guard gives the marked processes to stop after SIGTERM before SIGKILL.
GRACE_SECONDS = 5.0
_PROC = Path("/proc")

_guard: subprocess.Popen[bytes] | None = None


def keep_children_with_this_process() -> None:
    """Start this process's guard (once); every child started from now on ends with this process."""
    global _guard
    running = _guard is not None and _guard.poll() is None and os.environ.get(TOKEN_VARIABLE)
    if running or not _PROC.is_dir():  # no /proc: Prefect's own cleanup is all there is
        return
    token = f"{os.getpid()}-{secrets.token_hex(8)}"
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE}  # the guard must not find itself
    _guard = subprocess.Popen(  # a session of its own: Ctrl-C does not reach the guard
        [sys.executable, "-m", "sand.flows.server_lifetime", token], stdin=subprocess.PIPE, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.environ[TOKEN_VARIABLE] = token


def marked_processes(token: str) -> list[int]:
    """Live processes whose environment carries ``token`` (others' environments cannot be read: skipped)."""
    needle = f"{TOKEN_VARIABLE}={token}".encode()
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            marked = needle in (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if marked and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie has ended: only its parent's wait is missing)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def terminate_marked(token: str, grace: float = GRACE_SECONDS) -> list[int]:
    """SIGTERM every process carrying ``token``, SIGKILL those still running after ``grace`` seconds."""
    pids = marked_processes(token)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _guard_main(token: str) -> None:
    """The guard: wait for the parent's end (EOF on stdin), then end what it left behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while sys.stdin.buffer.read(65536):
        pass
    terminate_marked(token)


if __name__ == "__main__":
    _guard_main(sys.argv[1])
