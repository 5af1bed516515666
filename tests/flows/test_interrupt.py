"""Ctrl-C and SIGTERM while image shards encode in worker threads, as a terminal sends them.

Why a test of its own: a terminal's Ctrl-C goes to the whole process group, so it
also reaches the temporary Prefect API server ``sand`` starts, and the shard work
runs in worker threads that the interpreter joins at exit. Before, ``sand run``
kept encoding for minutes after Ctrl-C and then died with a connection error.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import foreground_signals

pytestmark = pytest.mark.slow

SAND = shutil.which("sand", path=os.path.dirname(sys.executable)) or "sand"


def _start(root: Path) -> subprocess.Popen:
    """``sand run`` on the bundled sample until the image stage, 8 image shards, in its own session."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # its own temporary server
    cmd = [SAND, "run", "--dataset", "sample", "--data-root", str(root), "--until", "image_features",
           "--image-weights", "random", "--set", "image_features.shard_size=64"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=foreground_signals)


def _wait_for_first_shard(proc: subprocess.Popen, root: Path, timeout: float = 480) -> None:
    deadline = time.monotonic() + timeout
    while not list(root.glob("work/image_features/*/shard-*.npz")):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no image shard finished"
        time.sleep(0.1)


def _server_children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Prefect's temporary API server is one)."""
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            out.append(int(status.parent.name))
    return out


def _still_running(pids: list[int], wait: float) -> list[int]:
    """The processes of ``pids`` still alive (not zombies) after up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for pid in pids:
            try:
                if "zombie" not in Path(f"/proc/{pid}/status").read_text().lower():
                    alive.append(pid)
            except OSError:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@pytest.mark.parametrize(("signum", "code", "line"), [
    (signal.SIGINT, 130, "interrupted: rerun the same command to resume"),
    (signal.SIGTERM, 143, "terminated: rerun the same command to resume"),
])
def test_signal_during_image_shards_exits_at_once_and_rerun_resumes(tmp_path, signum, code, line):
    root = tmp_path / "data"
    proc = _start(root)
    try:
        _wait_for_first_shard(proc, root)
        children = _server_children(proc.pid)
        started = time.monotonic()
        os.killpg(proc.pid, signum) if signum == signal.SIGINT else proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == line, stderr[-2000:]
    assert "Traceback" not in stderr and "ConnectError" not in stderr, stderr[-3000:]
    assert took < 20, f"took {took:.1f}s to stop"
    assert not _still_running(children, wait=10), "Prefect's temporary server was left running"

    finished = {p.name for p in root.glob("work/image_features/*/shard-*.npz")}
    assert finished
    rerun = subprocess.run([SAND, "run", "--dataset", "sample", "--data-root", str(root), "--until",
                            "image_features", "--image-weights", "random", "--set", "image_features.shard_size=64",
                            "--json"], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{len(finished)} finished by an earlier run" in rerun.stderr, rerun.stderr[-3000:]
