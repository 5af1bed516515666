"""The `sand` command: fast help, one-line errors, JSON output, export and recommend.

Commands run in this process (``invoke_sand``: the console entry point under CliRunner),
except the checks only a real process can make: the installed console script end to end,
its exit status and stderr, Ctrl-C, and which modules ``sand --help`` imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import foreground_signals, invoke_sand, run_sand

TINY = ["--set", "acquire.sample_users=40", "--set", "acquire.sample_items=30"]


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys, sand.flows.cli; "
        "heavy = [m for m in ('torch', 'prefect', 'transformers', 'sentence_transformers') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--set", "train.lr=-1"], "train.lr"),
        (["run", "--model", "nope"], "train.model"),
        (["run", "--until", "nowhere"], "nowhere"),
        (["stage", "nowhere"], "nowhere"),
        (["run", "--refresh", "nowhere"], "nowhere"),
        (["run", "--runner", "cloud"], "cloud"),
        (["run", "--config", "/no/such/file.yaml"], "file.yaml"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle, tmp_path):
    result = invoke_sand(args, cwd=tmp_path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert result.stdout == ""


def test_installed_command_prints_one_line_and_exits_2(tmp_path):
    """The same promise from a real process: the installed console script, its exit status and stderr."""
    result = run_sand(["run", "--until", "nowhere"], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0]


def test_unreachable_prefect_server_is_one_clear_line(tmp_path):
    result = invoke_sand(["run", "--until", "acquire", "--data-root", str(tmp_path / "data")],
                         env={"PREFECT_API_URL": "http://127.0.0.1:9/api"}, cwd=tmp_path)
    assert result.exit_code == 2
    assert "prefect server start" in result.stderr and "PREFECT_API_URL" in result.stderr


def test_in_process_runs_leave_no_state_behind(tmp_path):
    """A run that opened its log file leaves the logging handlers, environment, argv and working
    directory as it found them, and no file open: in-process CLI tests cannot see each other."""
    import logging
    import os

    root = logging.getLogger()
    before = (list(root.handlers), root.level, dict(os.environ), list(sys.argv), os.getcwd())
    result = invoke_sand(["run", "--until", "acquire", "--data-root", str(tmp_path / "data")],
                         env={"PREFECT_API_URL": "http://127.0.0.1:9/api"}, cwd=tmp_path)
    assert result.exit_code == 2 and list((tmp_path / "data" / "logs").glob("sand-*.log"))
    assert (list(root.handlers), root.level, dict(os.environ), list(sys.argv), os.getcwd()) == before
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.islink(f"/proc/self/fd/{fd}")]
    assert not [path for path in open_files if path.startswith(str(tmp_path))]


def _last_json(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, f"--json must print exactly one line on stdout, got: {stdout[:500]}"
    return json.loads(lines[0])


@pytest.mark.slow
def test_json_run_export_and_recommend(prefect_server, tmp_path):
    root = ["--data-root", str(tmp_path / "data"), *TINY]
    result = run_sand(["run", "--until", "interactions", "--json", *root], api_url=prefect_server, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = _last_json(result.stdout)
    assert set(summary["stages"]) == {"acquire", "interactions"}
    assert summary["dataset"]["users"] > 0 and summary["dataset"]["interactions"] > 0
    assert set(summary["stages"]["acquire"]) == {"cached", "seconds", "artifact"}

    out = tmp_path / "mmrec"
    result = run_sand(["export", "mmrec", "--out", str(out), "--until", "image_features", "--json", *root],
                      api_url=prefect_server, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    exported = _last_json(result.stdout)["export"]
    inter = next(out.glob("*.inter"))
    header = inter.read_text().splitlines()[0].split("\t")
    assert header == ["userID", "itemID", "rating", "timestamp", "x_label"]
    assert (out / "i_id_mapping.csv").exists() and (out / "u_id_mapping.csv").exists()
    # what MMRec-family code needs beside the interactions: the user graph and the dataset yaml
    graph = np.load(out / "user_graph_dict.npy", allow_pickle=True).item()
    assert sorted(graph) == list(range(summary["dataset"]["users"]))
    config = yaml.safe_load((out / f"{inter.stem}.yaml").read_text())
    assert config["inter_file_name"] == inter.name and config["vision_feature_file"] == "image_feat.npy"
    # the sample's random resnet18 gives 512-d features: one warning line, also in the manifest
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "512-d" in warnings[0]
    assert exported["image_dim"] == 512 and exported["warnings"] == [warnings[0].removeprefix("warning: ")]
    assert json.loads((out / "sand_export.json").read_text())["warnings"] == exported["warnings"]

    # the exported folder is itself a dataset, with its split kept, row for row
    result = run_sand(["run", "--until", "interactions", "--json", "--dataset", str(out),
                       "--data-root", str(tmp_path / "data2")], api_url=prefect_server, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    again = _last_json(result.stdout)
    for key in ("users", "items", "interactions", "train", "valid", "test"):
        assert again["dataset"][key] == summary["dataset"][key]
    columns = ["user", "item", "split"]
    rows = [
        pd.read_parquet(Path(s["stages"]["interactions"]["artifact"]) / "interactions.parquet")[columns]
        .sort_values(columns).reset_index(drop=True)
        for s in (summary, again)
    ]
    pd.testing.assert_frame_equal(rows[0], rows[1])

    result = run_sand(["recommend", "--user", "0", "-k", "5", "--model", "bpr", "--epochs", "1", "--json",
                       *root], api_url=prefect_server, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    recs = _last_json(result.stdout)["recommendations"]
    assert len(recs) == 5 and {"item", "asin", "title", "score"} <= set(recs[0])


@pytest.mark.slow
def test_grid_then_report_by_cli(prefect_server, tmp_path):
    root = ["--data-root", str(tmp_path / "data"), *TINY, "--epochs", "2"]
    result = invoke_sand(["grid", "--axis", "train.model=bpr,lightgcn,nope", "--json", *root],
                         api_url=prefect_server, cwd=tmp_path)
    assert result.exit_code == 2 and "train.model" in result.stderr  # validated before anything runs
    result = invoke_sand(["grid", "--axis", "train.model=bpr,lightgcn", "--name", "ids", "--json", *root],
                         api_url=prefect_server, cwd=tmp_path)
    assert result.exit_code == 0, result.stderr[-2000:]
    grid = _last_json(result.stdout)
    assert grid["n_runs"] == 2 and grid["n_failed"] == 0 and grid["selected_by"] == "valid recall@20"
    assert (tmp_path / "data" / "grids" / "ids" / "runs.csv").is_file()
    out = tmp_path / "report"
    result = invoke_sand(["report", "--out", str(out), "--json", *root], api_url=prefect_server, cwd=tmp_path)
    assert result.exit_code == 0, result.stderr[-2000:]
    table = (out / "table2_main.md").read_text()
    assert "MF-BPR" in table and "LightGCN" in table
    assert (out / "report.md").is_file() and list(out.glob("curves_*.png"))


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_exits_130(prefect_server, http_server, tmp_path):
    """SIGINT during a slow download: one 'interrupted' line on stderr (after Prefect's own log), exit 130."""
    import os
    import shutil
    import signal
    import time

    from conftest import Reply

    http_server.routes["/reviews_Slow_5.json.gz"] = Reply(200, b"x" * 100, delay=120)
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "SAND_LOG_LEVEL": "WARNING"}
    exe = shutil.which("sand", path=os.path.dirname(sys.executable)) or "sand"
    args = ["run", "--until", "acquire", "--dataset", "slow", "--format", "amazon2014", "--data-root",
            str(tmp_path / "data"), "--set", f"acquire.reviews={http_server.url('/reviews_Slow_5.json.gz')}"]
    proc = subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path, preexec_fn=foreground_signals)
    try:
        deadline = time.monotonic() + 240
        while not http_server.hits.get("/reviews_Slow_5.json.gz") and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        assert http_server.hits.get("/reviews_Slow_5.json.gz"), "the download never started"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert lines[-1] == "interrupted: rerun the same command to resume", stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]


def _gzip_bomb(path, n_bytes: int):
    """One good review, then ``n_bytes`` of 'a' in one line, streamed through gzip (a ~100 KB file)."""
    import gzip

    good = json.dumps({"reviewerID": "U1", "asin": "B1", "overall": 5.0, "unixReviewTime": 1, "helpful": [0, 0]})
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(good.encode() + b"\n")
        for _ in range(n_bytes >> 20):
            fh.write(b"a" * (1 << 20))
        fh.write(b"\n" + good.encode() + b"\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gzip-bomb", "remote-file-host", "over-long-lines"])
def test_hostile_raw_input_is_one_error_line_and_exit_2(prefect_server, tmp_path, case):
    reviews = tmp_path / "reviews_Evil_5.json.gz"
    settings = []
    if case == "gzip-bomb":
        source, needle = str(_gzip_bomb(reviews, 64 << 20)), "gzip bomb"
    elif case == "remote-file-host":
        source, needle = f"file://fileserver{_gzip_bomb(reviews, 0)}", "names the host 'fileserver'"
    else:
        _gzip_bomb(reviews, 2 << 20)
        source, needle = str(reviews), "line too long (over 1024 bytes) (more than 0 bad lines)"
        settings = ["--set", "interactions.max_line_bytes=1024", "--set", "interactions.max_bad_lines=0"]
    args = ["run", "--until", "interactions", "--dataset", "evil",
            "--data-root", str(tmp_path / "data"), "--set", f"acquire.reviews={source}", *settings]
    result = invoke_sand(args, api_url=prefect_server, cwd=tmp_path)
    assert result.exit_code == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-2000:]
    assert needle in errors[0], result.stderr[-2000:]


def test_options_and_choices_come_from_their_tables(monkeypatch):
    """Every config-field option of the table is an option of every stage-running command (and a
    keyword of ``sand.run``); the variant and grid preset lists are the registry's and grid's."""
    from typer.testing import CliRunner

    from sand.flows.cli import app
    from sand.models.registry import VARIANTS
    from sand.pipeline.base.config import CLI_FIELDS
    from sand.pipeline.experiments.grid import PRESETS

    monkeypatch.setenv("COLUMNS", "400")  # one option per line: names are never wrapped
    helps = {cmd: CliRunner().invoke(app, [*cmd.split(), "--help"]).stdout
             for cmd in ("run", "stage", "export mmrec", "recommend", "grid", "report", "deploy")}
    for cmd, text in helps.items():
        missing = [name for name in CLI_FIELDS if f"--{name.replace('_', '-')} " not in text]
        assert not missing, (cmd, missing)
        assert "--refresh" in text and "--runner" in text and "--json" in text
    assert "SAND variant: " + " | ".join(VARIANTS) in helps["run"]
    assert " | ".join(PRESETS) in helps["grid"]
