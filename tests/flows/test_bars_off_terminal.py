"""Progress bars are drawn only on a terminal: a captured stderr holds log lines, never a bar."""

from __future__ import annotations

import pytest
from conftest import run_sand

TINY = ["--set", "acquire.sample_users=40", "--set", "acquire.sample_items=30",
        "--set", "image_features.image_size=32"]


@pytest.mark.slow
def test_a_run_with_stderr_captured_draws_no_bar(prefect_server, tmp_path):
    """Through every stage with a bar of ours or a library's (image encoding, the text model's weights)."""
    args = ["run", "--until", "graphs", "--data-root", str(tmp_path / "data"), *TINY]
    out = run_sand(args, api_url=prefect_server, cwd=tmp_path, env={"SAND_LOG_LEVEL": "INFO"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "image_features" in out.stderr and "text_features" in out.stderr  # the stages ran and logged
    assert "%|" not in out.stderr and "\r" not in out.stderr, out.stderr[-3000:]
