"""The one-line-error promise, end to end: whatever goes wrong, stderr holds exactly one line.

A user-fixable error exits 2, a bug exits 1; both name the log file that holds the
traceback once a run has started. Bad values are rejected before any stage runs; a
read-only data root still serves everything it has cached.

Commands run in this process (``invoke_sand``: the console entry point under CliRunner);
the read-only cases run the installed command in a real process, because only a process
started without root's write override sees a ``chmod a-w`` folder as read-only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import invoke_sand, run_sand

TINY = ["--set", "acquire.sample_users=40", "--set", "acquire.sample_items=30"]


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{stderr[-3000:]}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def named_log(line: str) -> Path:
    match = re.search(r"\(details: (.+\.log)\)$", line)
    assert match, f"the error line names no log file: {line}"
    return Path(match.group(1))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--device", "foo"], "train.device='foo'"),
        (["--set", "text_features.device=gpu"], "text_features.device='gpu'"),
        (["--seed", "-1"], "seed=-1"),
        (["--set", "train.seed=4294967296"], "train.seed=4294967296"),
        (["--set", "acquire.sample_seed=-3"], "acquire.sample_seed=-3"),
        (["--model", "bpr", "--set", "train.extra={gamma: 2}"], "train.extra.gamma=2: model 'bpr' has no"),
    ],
)
def test_bad_device_or_seed_is_one_line_before_any_stage(args, needle, tmp_path):
    result = invoke_sand(["run", "--data-root", str(tmp_path / "data"), *TINY, *args], cwd=tmp_path)
    assert result.exit_code == 2
    assert needle in one_error_line(result.stderr)
    assert not (tmp_path / "data").exists()  # rejected before anything was written


def test_cuda_without_cuda_is_one_line(tmp_path):
    if _cuda_available():
        pytest.skip("this machine has CUDA")
    result = invoke_sand(["run", "--device", "cuda", "--data-root", str(tmp_path / "data")], cwd=tmp_path)
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "train.device=cuda" in line and "CUDA is not available" in line


def test_data_root_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = invoke_sand(["run", "--data-root", str(blocker / "data")], cwd=tmp_path)
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert str(blocker / "data") in line and "not writable" in line


@pytest.mark.slow
def test_read_only_empty_data_root_is_one_line(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        result = run_sand(["run", "--data-root", str(root)], cwd=tmp_path, drop_write_override=True)
    finally:
        root.chmod(0o755)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert str(root) in line and "not writable" in line and "Permission denied" in line


@pytest.mark.slow
def test_error_raised_inside_a_flow_is_one_line_naming_the_log(prefect_server, tmp_path):
    root = tmp_path / "data"
    missing = tmp_path / "no-such-folder"
    result = invoke_sand(["run", "--dataset", str(missing), "--data-root", str(root)], api_url=prefect_server,
                         cwd=tmp_path)
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert f"dataset path does not exist: {missing}" in line
    log = named_log(line)
    assert log.parent == root / "logs"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ConfigError" in text


@pytest.mark.slow
def test_bad_reviews_file_fails_in_a_later_stage_with_one_line(prefect_server, tmp_path):
    reviews = tmp_path / "reviews_Toys_5.json"
    good = {"reviewerID": "u1", "asin": "i1", "overall": 5.0, "unixReviewTime": 1}
    reviews.write_text(json.dumps(good) + "\n{not json at all\n")
    root = tmp_path / "data"
    result = invoke_sand(["run", "--dataset", str(reviews), "--format", "amazon2014", "--model", "bpr",
                          "--data-root", str(root), "--set", "interactions.max_bad_lines=0"],
                         api_url=prefect_server, cwd=tmp_path)
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "reviews_Toys_5.json" in line
    assert named_log(line).parent == root / "logs"
    acquired = list((root / "artifacts" / "acquire").iterdir())
    assert len(acquired) == 1  # the stage before the failure is kept for the rerun


def _main_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: BaseException):
    """``sand run`` whose flow raises ``error``: the console entry point's last line of defence."""
    import sand.flows.cli as cli
    import sand.flows.pipeline_flows as flows

    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli, "_prefect_api", lambda required_by=None: None)
    monkeypatch.setattr(flows, "pipeline_flow", boom)
    return invoke_sand(["run", "--data-root", str(tmp_path / "data")], cwd=tmp_path)


def test_a_bug_is_one_line_exit_1_with_the_traceback_in_the_log(monkeypatch, tmp_path):
    result = _main_with(monkeypatch, tmp_path, KeyError("surprise"))
    assert result.exit_code == 1
    line = one_error_line(result.stderr)
    assert "unexpected KeyError" in line and "bug" in line
    log = named_log(line)
    assert log.parent == tmp_path / "data" / "logs"
    assert "Traceback (most recent call last)" in log.read_text() and "surprise" in log.read_text()


def test_out_of_memory_is_one_line_exit_2_saying_what_to_reduce(monkeypatch, tmp_path):
    result = _main_with(monkeypatch, tmp_path, MemoryError())
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "out of memory" in line and "train.batch_size" in line
    assert "MemoryError" in named_log(line).read_text()


@pytest.fixture(scope="module")
def cached_read_only_root(tmp_path_factory):
    """A data root holding a whole trained, evaluated and reported run (built without Prefect), then
    made read-only."""
    from sand.pipeline.base.config import load_config
    from sand.pipeline.runner import run_pipeline
    from sand.pipeline.stages import Context

    root = tmp_path_factory.mktemp("ro") / "data"
    settings = [s for s in TINY if s != "--set"] + ["train.model=bpr", "train.epochs=2"]
    cfg = load_config(None, {"data_root": str(root)}, settings)
    run_pipeline(Context.create(cfg, progress=False))
    paths = [root, *root.rglob("*")]
    for path in paths:
        path.chmod(path.stat().st_mode & ~0o222)
    yield root
    for path in paths:
        path.chmod(path.stat().st_mode | 0o200)


@pytest.mark.parametrize("command", [["run", "--json"], ["recommend", "--user", "0", "-k", "3", "--json"],
                                     ["report", "--json"]])
@pytest.mark.slow
def test_read_only_root_serves_cached_results(cached_read_only_root, prefect_server, tmp_path, command):
    args = [*command, "--data-root", str(cached_read_only_root), *TINY, "--model", "bpr", "--epochs", "2"]
    result = run_sand(args, api_url=prefect_server, cwd=tmp_path, drop_write_override=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    if command[0] == "recommend":
        assert len(out["recommendations"]) == 3
    else:
        assert out["stages"] and all(stage["cached"] for stage in out["stages"].values())


@pytest.mark.slow
def test_read_only_root_without_the_artifact_is_one_line(cached_read_only_root, prefect_server, tmp_path):
    args = ["run", "--data-root", str(cached_read_only_root), *TINY, "--model", "bpr", "--epochs", "3"]
    result = run_sand(args, api_url=prefect_server, cwd=tmp_path, drop_write_override=True)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert f"data root {cached_read_only_root} is not writable" in line and "cannot build train" in line
    assert Path(named_log(line)).is_file()  # in the temp dir: the data root cannot take it


def test_flows_started_elsewhere_check_the_device_too(tmp_path):
    """A deployment's worker runs stages without the CLI: the stage context checks the device."""
    if _cuda_available():
        pytest.skip("this machine has CUDA")
    from sand.pipeline.base.config import load_config
    from sand.pipeline.base.errors import ConfigError
    from sand.pipeline.stages import Context

    cfg = load_config(None, {"data_root": str(tmp_path)}, ["image_features.device=cuda:0"])
    with pytest.raises(ConfigError, match=r"image_features.device=cuda:0: CUDA is not available"):
        Context.create(cfg)


def test_a_grid_checks_train_extra_against_each_combinations_model(tmp_path):
    """``--set train.extra.X`` in a grid belongs to the models of its axis, not to the base config's default model."""
    extra = ["--set", "train.extra={train_features: false}"]
    mixed = invoke_sand(["grid", "--axis", "train.model=freedom,sand", *extra, "--data-root", str(tmp_path / "d")],
                        cwd=tmp_path)
    assert mixed.exit_code == 2
    assert "train.extra.train_features=False: model 'sand' has no" in one_error_line(mixed.stderr)
    assert not (tmp_path / "d").exists()  # rejected before anything was written

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    freedom_only = invoke_sand(["grid", "--axis", "train.model=freedom", *extra, "--data-root",
                                str(blocker / "d")], cwd=tmp_path)
    assert freedom_only.exit_code == 2
    assert "not writable" in one_error_line(freedom_only.stderr)  # past the model check, stopped by the data root
