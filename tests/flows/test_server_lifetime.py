"""A child of ``sand`` (Prefect's temporary API server) ends when ``sand`` is killed with SIGKILL."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sand.flows.server_lifetime import _alive

#: Stands in for ``sand``: arm the guard, start a long-lived child (as Prefect starts its
#: server: subprocess.Popen with our environment), print the child's pid, die by SIGKILL.
PARENT = textwrap.dedent("""
    import os, signal, subprocess, sys
    from sand.flows.server_lifetime import keep_children_with_this_process
    keep_children_with_this_process()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(child.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _wait_until_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the guard needs /proc (Linux)")
def test_a_child_ends_when_its_parent_is_killed_with_sigkill():
    parent = subprocess.run([sys.executable, "-c", PARENT], capture_output=True, text=True, timeout=120)
    assert parent.returncode == -9, parent.stderr
    child = int(parent.stdout.split()[0])
    try:
        assert _wait_until_gone(child, 30), "the child outlived its killed parent"
    finally:
        if _alive(child):
            os.kill(child, 9)


def test_an_unmarked_process_is_left_alone():
    from sand.flows.server_lifetime import terminate_marked

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert terminate_marked("no-such-token", grace=0.1) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the guard needs /proc (Linux)")
def test_prefects_temporary_server_ends_when_sand_is_killed_with_sigkill(tmp_path):
    import shutil

    exe = shutil.which("sand", path=os.path.dirname(sys.executable)) or "sand"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), SAND_LOG_LEVEL="WARNING")
    args = ["run", "--until", "interactions", "--data-root", str(tmp_path / "data"),
            "--set", "acquire.sample_users=40", "--set", "acquire.sample_items=30"]
    sand = subprocess.Popen([exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=tmp_path)
    server = None
    try:
        deadline = time.monotonic() + 300
        while server is None and time.monotonic() < deadline and sand.poll() is None:
            server = next((c for c in _children(sand.pid) if "uvicorn" in _cmdline(c)), None)
            time.sleep(0.2)
        assert server is not None, "sand never started Prefect's temporary server"
        sand.kill()
        sand.wait()
        assert _wait_until_gone(server, 30), "Prefect's temporary server outlived the killed sand process"
    finally:
        if sand.poll() is None:
            sand.kill()
        if server is not None and _alive(server):
            os.kill(server, 9)
