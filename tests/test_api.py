"""The notebook API: ``from sand import run; result = run(dataset="sample", model="sand", epochs=2)``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_sand

from sand.pipeline.base.errors import ConfigError

TINY = {"acquire.sample_users": 40, "acquire.sample_items": 30}
TINY_CLI = [arg for field, value in TINY.items() for arg in ("--set", f"{field}={value}")]


def test_import_sand_stays_light():
    code = (
        "import sys, sand; heavy = lambda: [m for m in ('torch', 'prefect', 'pandas') if m in sys.modules]; "
        "print(heavy()); from sand import run, RunResult; print(heavy())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split("\n")[:2] == ["[]", "[]"]


def test_an_unknown_name_is_an_attribute_error():
    import sand

    with pytest.raises(AttributeError, match="no attribute 'runn'"):
        sand.runn  # noqa: B018


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"overrides": {"train.lr": -1.0}}, ConfigError, "train.lr"),
        ({"model": "nope"}, ConfigError, "train.model"),
        ({"until": "nowhere"}, ConfigError, "nowhere"),
        ({"refresh": "nowhere"}, ConfigError, "nowhere"),
        ({"device": "foo"}, ConfigError, "foo"),
        ({"variant": "z"}, ConfigError, "train.variant"),  # every option of CLI_FIELDS is a keyword
        ({"image_source": "nope"}, ConfigError, "image_features.source"),
        ({"learning_rate": 0.1}, TypeError, "overrides="),
    ],
)
def test_bad_arguments_raise_before_any_stage(kwargs, exc, needle, tmp_path):
    from sand import run

    with pytest.raises(exc, match=needle):
        run(data_root=tmp_path / "data", **kwargs)
    assert not (tmp_path / "data" / "artifacts").exists()


def test_bad_data_raises_the_projects_error_not_system_exit(tmp_path):
    from sand import run

    with pytest.raises(ConfigError, match="dataset path does not exist"):
        run(dataset=str(tmp_path / "no-such-dataset"), data_root=tmp_path / "data", progress=False)


def _three_lines(data_root: Path):
    from sand import run

    return run(dataset="sample", model="bpr", epochs=2, data_root=data_root, overrides=TINY, progress=False)


def _artifact_keys(summary: dict) -> dict[str, str]:
    return {stage: Path(info["artifact"]).name for stage, info in summary["stages"].items()}


@pytest.mark.slow
def test_three_lines_give_the_runners_metrics_and_artifacts_and_a_second_call_is_cached(tmp_path):
    from sand.pipeline.base.config import load_config
    from sand.pipeline.runner import run_pipeline
    from sand.pipeline.stages import Context

    result = _three_lines(tmp_path / "api")
    assert not any(result.cached.values())
    assert set(result.metrics) == {"valid", "test"}
    assert {"recall@10", "recall@20", "ndcg@10", "ndcg@20"} <= set(result.metrics["test"])
    assert result.data_root == (tmp_path / "api").resolve()
    assert result.checkpoint.is_file() and result.checkpoint.parent.parent.name == "train"
    assert (result.report / "report.md").is_file()
    assert result.features == {}  # an ID-only model skips the feature stages
    assert "recall@20=" in repr(result)

    # The settings as `sand run --model bpr --epochs 2 --set ...` builds them, run again in another root.
    cfg = load_config(None, {"data_root": str(tmp_path / "runner"), "train.model": "bpr", "train.epochs": 2},
                      [f"{field}={value}" for field, value in TINY.items()])
    summary = run_pipeline(Context.create(cfg, progress=False)).summary()
    assert summary["metrics"] == result.metrics and summary["dataset"] == result.summary["dataset"]
    assert _artifact_keys(summary) == _artifact_keys(result.summary)  # same keys: same settings

    again = _three_lines(tmp_path / "api")
    assert all(again.cached.values()) and again.cached.keys() == result.cached.keys()
    assert again.metrics == result.metrics and again.artifacts == result.artifacts


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two trainings and a Prefect run: 5 minutes on a loaded 2-core machine
def test_three_lines_give_the_metrics_of_sand_run_json(prefect_server, tmp_path):
    result = _three_lines(tmp_path / "api")
    cli = run_sand(["run", "--json", "--model", "bpr", "--epochs", "2", *TINY_CLI,
                    "--data-root", str(tmp_path / "cli")], api_url=prefect_server, cwd=tmp_path, timeout=1500)
    assert cli.returncode == 0, cli.stderr[-3000:]
    summary = json.loads(cli.stdout.strip().splitlines()[-1])
    assert summary["metrics"] == result.metrics
    assert _artifact_keys(summary) == _artifact_keys(result.summary)


@pytest.mark.slow
def test_a_multimodal_run_returns_its_features_and_takes_overrides(tmp_path):
    from sand import run

    result = run(model="sand", epochs=1, data_root=tmp_path / "data", overrides={**TINY, "train.lr": 1e-3},
                 until="train", progress=False)
    assert list(result.cached) == ["acquire", "interactions", "text_features", "image_features", "graphs", "train"]
    assert {"text_feat", "image_feat"} <= set(result.features) and all(p.is_file() for p in result.features.values())
    assert result.summary["train"]["lr"] == 1e-3 and result.checkpoint.is_file()
    assert result.metrics == {} and result.report is None  # until="train": not evaluated
    assert "not evaluated" in repr(result)
