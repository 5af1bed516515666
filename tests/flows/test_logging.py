"""What the ``sand`` command prints on stderr: one progress display, and --quiet / --verbose.

Log lines are written through ``tqdm.write``, so a line never lands inside a progress bar;
``--quiet`` shows warnings and errors only and draws no bars; ``--verbose`` adds the
pipeline's DEBUG lines and Prefect's flow-run lines. Bars are drawn only on a terminal, so
the end-to-end checks run the command with stderr on a pseudo-terminal.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest
from conftest import run_sand

TINY = ["--set", "acquire.sample_users=40", "--set", "acquire.sample_items=30"]
#: A console log record starts a row with its timestamp (``CONSOLE_FORMAT``).
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def rendered_rows(text: str) -> list[str]:
    """The rows a terminal shows for ``text``: each ``\\r`` returns to the row's start and what
    follows overwrites it (tqdm redraws a bar in place and clears it with spaces)."""
    rows = []
    for line in text.replace("\r\n", "\n").split("\n"):
        row: list[str] = []
        col = 0
        for char in line:
            if char == "\r":
                col = 0
                continue
            if col < len(row):
                row[col] = char
            else:
                row.append(char)
            col += 1
        rows.append("".join(row).rstrip())
    return [r for r in rows if r]


def log_rows(rows: list[str]) -> list[str]:
    """Rows that hold a log record, wherever it starts in the row."""
    return [r for r in rows if re.search(r"\d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ", r)]


# ------------------------------------------------------------------------------------------ in process
def _log_while_a_bar_is_drawn(handler_class: type[logging.StreamHandler]) -> list[str]:
    """Rows on screen after a WARNING is logged halfway through a bar, with ``handler_class`` on the console."""
    from tqdm import tqdm

    from sand.flows.cli_logging import CONSOLE_FORMAT

    stream = io.StringIO()
    handler = handler_class(stream)
    handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    logger = logging.getLogger(f"sand.test_logging.{handler_class.__name__}")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with tqdm(total=4, desc="reading reviews", file=stream, ncols=70, mininterval=0) as bar:
            bar.update(2)
            logger.warning("skipped 2 lines")
            bar.update(2)
    finally:
        logger.removeHandler(handler)
    return rendered_rows(stream.getvalue())


def test_a_log_line_written_while_a_bar_is_drawn_gets_a_row_of_its_own():
    from sand.flows.cli_logging import ProgressAwareHandler

    rows = _log_while_a_bar_is_drawn(ProgressAwareHandler)
    [line] = log_rows(rows)
    assert RECORD.match(line) and line.endswith("skipped 2 lines")
    assert rows[-1].startswith("reading reviews: 100%")  # the bar was redrawn below the line


def test_rendering_shows_a_line_appended_to_a_bar_as_broken():
    """The check above can fail: a plain stream handler leaves the line inside the bar's row."""
    [line] = log_rows(_log_while_a_bar_is_drawn(logging.StreamHandler))
    assert not RECORD.match(line) and line.startswith("reading reviews")


def test_quiet_and_verbose_together_is_one_line_exit_2():
    out = subprocess.run([sys.executable, "-m", "sand.flows.cli", "run", "--quiet", "--verbose"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["error: --quiet and --verbose contradict each other: choose one"]


# ------------------------------------------------------------------------------------------ end to end
def run_on_terminal(args: list[str], api_url: str, cwd, timeout: float = 600) -> tuple[int, str, str]:
    """The installed ``sand`` with stderr on a 160-column pseudo-terminal, as a user watching it."""
    import fcntl
    import pty
    import struct
    import termios

    exe = shutil.which("sand", path=os.path.dirname(sys.executable)) or "sand"
    env = {**os.environ, "SAND_LOG_LEVEL": "INFO", "PREFECT_API_URL": api_url}
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # tqdm sizes bars to it
    proc = subprocess.Popen([exe, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                            env=env, cwd=cwd)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # read while it runs: a full terminal buffer would block the command
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO once the command has exited and closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    finally:
        reader.join(30)
        os.close(master)
    return proc.returncode, stdout.decode(), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_default_run_on_a_terminal_draws_bars_and_keeps_log_lines_off_them(prefect_server, tmp_path):
    args = ["run", "--until", "interactions", "--data-root", str(tmp_path / "data"), *TINY]
    code, stdout, stderr = run_on_terminal(args, prefect_server, tmp_path)
    assert code == 0, stderr[-3000:]
    rows = rendered_rows(stderr)
    assert any(r.startswith("reading reviews:") for r in rows), stderr[-3000:]  # a bar was drawn
    lines = log_rows(rows)
    assert lines and all(RECORD.match(r) for r in lines), stderr[-3000:]  # no line inside a bar's row
    assert any("interactions: built in" in r for r in lines)  # which stages ran, and where
    assert any("skipped 2 (2 malformed JSON)" in r for r in lines)  # what was skipped and why
    assert not any(" DEBUG " in r or "prefect.flow_runs" in r for r in lines), stderr[-3000:]
    assert "interactions" in stdout


@pytest.mark.slow
def test_quiet_run_on_a_terminal_prints_no_info_and_no_bars(prefect_server, tmp_path):
    args = ["run", "--quiet", "--until", "interactions", "--data-root", str(tmp_path / "data"), *TINY]
    code, stdout, stderr = run_on_terminal(args, prefect_server, tmp_path)
    assert code == 0, stderr[-3000:]
    rows = rendered_rows(stderr)
    assert "reading reviews" not in stderr and "\r" not in stderr.replace("\r\n", "\n"), stderr[-3000:]
    assert rows and all(RECORD.match(r) and " WARNING " in r for r in rows), stderr[-3000:]
    assert "skipped 2 (2 malformed JSON)" in rows[0]  # the dirty lines are still reported
    assert "interactions" in stdout  # the result itself is not quieted


@pytest.mark.slow
def test_verbose_run_shows_debug_lines_and_prefect_run_lines(prefect_server, tmp_path):
    args = ["run", "--verbose", "--until", "interactions", "--data-root", str(tmp_path / "data"), *TINY]
    result = run_sand(args, api_url=prefect_server, cwd=tmp_path, env={"SAND_LOG_LEVEL": "INFO"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert any(" DEBUG sand.pipeline." in line for line in lines), result.stderr[-3000:]
    assert any(" INFO prefect.flow_runs: " in line for line in lines), result.stderr[-3000:]
    assert not any(" DEBUG prefect" in line or " DEBUG PIL" in line for line in lines)  # sand's DEBUG only


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--quiet", None, "--verbose"])
def test_an_error_inside_a_flow_is_still_one_line(flag, prefect_server, tmp_path):
    """The dataset path is checked by the acquire stage, inside its Prefect flow run."""
    args = ["run", "--until", "interactions", "--data-root", str(tmp_path / "data"),
            "--dataset", str(tmp_path / "no-such-dataset"), *([flag] if flag else [])]
    result = run_sand(args, api_url=prefect_server, cwd=tmp_path, env={"SAND_LOG_LEVEL": "INFO"})
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("error: dataset path does not exist"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if flag != "--verbose":
        assert len(lines) == 1, result.stderr[-3000:]


@pytest.mark.slow
def test_quiet_error_after_a_stage_ran_is_one_line(prefect_server, tmp_path):
    """acquire runs (its INFO line is quieted), then interactions fails on the sample's dirty lines."""
    args = ["run", "--quiet", "--until", "interactions", "--data-root", str(tmp_path / "data"), *TINY,
            "--set", "interactions.max_bad_lines=0"]
    result = run_sand(args, api_url=prefect_server, cwd=tmp_path, env={"SAND_LOG_LEVEL": "INFO"})
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and "malformed" in line, result.stderr[-3000:]
