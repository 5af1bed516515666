"""Grid expansion, validation, selection by validation, failure handling and reuse."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sand.pipeline.base.config import PipelineConfig, build_config, set_dotted
from sand.pipeline.base.errors import ConfigError
from sand.pipeline.base.store import ArtifactStore
from sand.pipeline.experiments.grid import PRESETS, expand_grid, preset, run_grid, select_best


def _base(tmp_path: Path, **train: Any) -> PipelineConfig:
    return build_config({"data_root": str(tmp_path), "acquire": {"dataset": "baby"}, "train": train})


def _summary(valid: float, test: float, **extra: Any) -> dict[str, Any]:
    return {
        "metrics": {
            "valid": {"recall@10": valid / 2, "recall@20": valid, "ndcg@20": valid / 3},
            "test": {"recall@10": test / 2, "recall@20": test, "ndcg@20": test / 3},
        },
        "train": {"seconds_per_epoch": 1.5, "peak_memory_mb": 100.0, "best_epoch": 3},
        **extra,
    }


# ------------------------------------------------------------------------------------- expansion
def test_expand_grid_is_the_product_with_first_axis_slowest(tmp_path):
    combos = expand_grid(_base(tmp_path), {"train.alpha": [0.001, 0.012], "train.variant": ["a", "b"]})
    assert [v for v, _ in combos] == [
        {"train.alpha": 0.001, "train.variant": "a"},
        {"train.alpha": 0.001, "train.variant": "b"},
        {"train.alpha": 0.012, "train.variant": "a"},
        {"train.alpha": 0.012, "train.variant": "b"},
    ]
    for values, cfg in combos:
        assert cfg.train.alpha == values["train.alpha"] and cfg.train.variant == values["train.variant"]
        assert cfg.data_root == tmp_path and cfg.acquire.dataset == "baby"  # the rest comes from the base


def test_expand_grid_without_axes_is_the_base(tmp_path):
    base = _base(tmp_path, epochs=3)
    [(values, cfg)] = expand_grid(base, {})
    assert values == {} and cfg == base


@pytest.mark.parametrize(
    ("axes", "needles"),
    [
        ({"train.alpha": [0.01, -1.0]}, ["train.alpha", "-1.0"]),
        ({"train.variant": ["a", "zz"]}, ["train.variant", "zz"]),
        ({"train.model": ["sand", "nosuchmodel"]}, ["train.model", "nosuchmodel"]),
        ({"train.alhpa": [0.1]}, ["train.alhpa", "no such config field"]),
        ({"train": [1]}, ["'train'", "no such config field"]),
        ({"train.tau": []}, ["train.tau", "non-empty list"]),
        ({"train.tau": 0.2}, ["train.tau", "non-empty list"]),
        ({"graphs.k": [10, 0]}, ["graphs.k", "0"]),
        ({"train.model": ["bpr"], "train.alpha": [0.1]}, ["train.alpha", "0.1", "'bpr'"]),
        ({"train.model": ["bpr"], "train.variant": ["a", "b"]}, ["train.variant", "'a'", "'bpr'"]),
        ({"train.extra.nonsense": [1]}, ["train.extra.nonsense", "1"]),
    ],
)
def test_expand_grid_rejects_bad_combinations_naming_field_and_value(tmp_path, axes, needles):
    with pytest.raises(ConfigError) as err:
        expand_grid(_base(tmp_path), axes)
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_invalid_value_fails_before_any_run(tmp_path):
    calls = []
    with pytest.raises(ConfigError, match="train.alpha"):
        run_grid(_base(tmp_path), {"train.alpha": [0.01, 0.02, -5]}, name="g", run_one=calls.append)
    assert calls == []
    assert not (tmp_path / "grids").exists()


def test_bad_grid_name_and_metric_fail_before_any_run(tmp_path):
    calls = []
    with pytest.raises(ConfigError, match="grid name"):
        run_grid(_base(tmp_path), {"train.alpha": [0.01]}, name="../escape", run_one=calls.append)
    with pytest.raises(ConfigError, match="recall@7"):
        run_grid(_base(tmp_path), {"train.alpha": [0.01]}, name="g", run_one=calls.append, select_metric="recall@7")
    assert calls == []


def _dotted(cfg: PipelineConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_expand_on_the_default_config(tmp_path, name):
    """Each cell's config holds that cell's values (product order, first axis slowest); nothing else moves."""
    axes = preset(name)
    base = _base(tmp_path)
    combos = expand_grid(base, axes)
    assert [values for values, _ in combos] == [
        dict(zip(axes, cell, strict=True)) for cell in itertools.product(*axes.values())
    ]
    for values, cfg in combos:
        assert {dotted: _dotted(cfg, dotted) for dotted in values} == values
        rest = cfg.model_dump()
        for dotted in values:  # put the base's values back: the rest must be the base itself
            set_dotted(rest, dotted, _dotted(base, dotted))
        assert rest == base.model_dump()


def test_table3_preset_runs_both_fusions_and_trains_backbones_once(tmp_path):
    from sand.pipeline.training.stage import train_key_params

    combos = expand_grid(_base(tmp_path), preset("table3"))
    keys = {(v["train.model"], json.dumps(train_key_params(c.train), sort_keys=True)) for v, c in combos}
    per_model = {m: sum(1 for model, _ in keys if model == m) for m in ("vbpr", "vbpr-sand", "freedom", "freedom-sand")}
    assert per_model == {"vbpr": 1, "vbpr-sand": 1, "freedom": 1, "freedom-sand": 2}


def test_sensitivity_presets_bracket_the_paper_values():
    for name, ref in (("sensitivity-alpha", 0.012), ("sensitivity-beta", 0.006), ("sensitivity-tau", 0.2)):
        (values,) = preset(name).values()
        assert ref in values and min(values) < ref < max(values)
    assert preset("ablations")["train.variant"] == ["a", "no-align", "no-distance", "no-align-no-distance"]
    assert preset("variants")["train.variant"] == ["a", "b", "c", "d"]
    with pytest.raises(ConfigError, match="unknown grid preset"):
        preset("table9")


# ------------------------------------------------------------------------------------- running
def test_selection_uses_validation_not_test(tmp_path):
    # valid peaks at alpha=0.005, test peaks at alpha=0.1: the grid must pick 0.005.
    scores = {0.001: (0.10, 0.30), 0.005: (0.20, 0.25), 0.1: (0.15, 0.40)}
    seen = []

    def run_one(cfg):
        seen.append(cfg.train.alpha)
        return _summary(*scores[cfg.train.alpha])

    result = run_grid(_base(tmp_path), {"train.alpha": list(scores)}, name="alpha", run_one=run_one)
    assert seen == list(scores)
    assert result.selected is not None and result.selected.values == {"train.alpha": 0.005}
    assert result.selected.test["recall@20"] == 0.25

    table = pd.read_csv(tmp_path / "grids" / "alpha" / "runs.csv")
    assert list(table["train.alpha"]) == [0.001, 0.005, 0.1]
    assert list(table["valid_recall@20"]) == [0.10, 0.20, 0.15]
    assert list(table["test_recall@20"]) == [0.30, 0.25, 0.40]
    assert list(table["status"]) == ["ok"] * 3
    assert list(table["seconds_per_epoch"]) == [1.5] * 3
    assert list(table["dataset"]) == ["baby"] * 3
    selected = json.loads((tmp_path / "grids" / "alpha" / "selected.json").read_text())
    assert selected["selected"]["values"] == {"train.alpha": 0.005}
    assert selected["selected"]["test"]["recall@20"] == 0.25
    assert selected["selected_by"] == "valid recall@20"
    assert selected["n_runs"] == 3 and selected["n_failed"] == 0


def test_select_metric_can_be_another_validation_metric(tmp_path):
    def run_one(cfg):
        valid = {0.1: {"recall@20": 0.3, "ndcg@20": 0.1}, 0.2: {"recall@20": 0.2, "ndcg@20": 0.2}}[cfg.train.tau]
        return {"metrics": {"valid": valid, "test": {"recall@20": 0.0, "ndcg@20": 0.0}}}

    result = run_grid(_base(tmp_path), {"train.tau": [0.1, 0.2]}, name="tau", run_one=run_one, select_metric="ndcg@20")
    assert result.selected.values == {"train.tau": 0.2}


def test_failed_run_is_recorded_and_grid_goes_on(tmp_path):
    def run_one(cfg):
        if cfg.train.variant == "b":
            raise RuntimeError("CUDA out of memory\nlong traceback text")
        return _summary({"a": 0.1, "c": 0.3, "d": 0.2}[cfg.train.variant], 0.1)

    result = run_grid(_base(tmp_path), preset("variants"), name="variants", run_one=run_one)
    assert [r.status for r in result.runs] == ["ok", "failed", "ok", "ok"]
    assert result.runs[1].error == "RuntimeError: CUDA out of memory"
    assert result.selected.values == {"train.variant": "c"}
    assert len(result.failed) == 1
    table = pd.read_csv(tmp_path / "grids" / "variants" / "runs.csv")
    assert list(table["status"]) == ["ok", "failed", "ok", "ok"]
    assert table.loc[1, "error"] == "RuntimeError: CUDA out of memory"
    assert pd.isna(table.loc[1, "valid_recall@20"])


def test_run_without_the_selection_metric_is_a_failure(tmp_path):
    result = run_grid(
        _base(tmp_path),
        {"train.alpha": [0.1]},
        name="g",
        run_one=lambda cfg: {"metrics": {"valid": {"recall@10": 0.1}, "test": {}}},
    )
    assert result.runs[0].status == "failed" and "recall@20" in result.runs[0].error
    assert result.selected is None
    assert json.loads(result.selected_path.read_text())["selected"] is None


def test_all_failed_grid_selects_nothing(tmp_path):
    def run_one(cfg):
        raise ValueError("broken")

    result = run_grid(_base(tmp_path), {"train.alpha": [0.1, 0.2]}, name="g", run_one=run_one)
    assert result.selected is None and len(result.failed) == 2


def test_select_best_ties_go_to_the_earlier_run(tmp_path):
    result = run_grid(
        _base(tmp_path), {"train.alpha": [0.1, 0.2, 0.3]}, name="g", run_one=lambda cfg: _summary(0.5, cfg.train.alpha)
    )
    assert result.selected.index == 1
    assert select_best(result.runs[::-1], "recall@20").index == 3


def _store_backed_run_one(builds: list[str]):
    """A stand-in for the pipeline that trains through the artifact store (cached by key)."""

    def run_one(cfg: PipelineConfig) -> dict[str, Any]:
        store = ArtifactStore(cfg.data_root)
        params = cfg.train.model_dump(mode="json")

        def build(out: Path) -> dict[str, Any]:
            builds.append(cfg.train.variant)
            v = {"a": 0.2, "b": 0.1}[cfg.train.variant]
            return {"metrics": {"valid": {"recall@20": v}, "test": {"recall@20": v / 2}}}

        outcome = store.run("evaluate", "1", params, {}, build)
        return {"metrics": outcome.artifact.manifest["metrics"], "stages": {"evaluate": outcome.summary()}}

    return run_one


def test_rerun_reuses_stored_runs_and_rewrites_the_table(tmp_path):
    builds: list[str] = []
    run_one = _store_backed_run_one(builds)
    axes = {"train.variant": ["a", "b"]}
    first = run_grid(_base(tmp_path), axes, name="v", run_one=run_one)
    table = tmp_path / "grids" / "v" / "runs.csv"
    first_text = table.read_text()
    table.write_text("stale")
    second = run_grid(_base(tmp_path), axes, name="v", run_one=run_one)
    assert builds == ["a", "b"]  # the second grid built nothing
    assert [r.cached for r in first.runs] == [{"evaluate": False}] * 2
    assert [r.cached for r in second.runs] == [{"evaluate": True}] * 2
    assert [(r.values, r.valid, r.test, r.keys) for r in first.runs] == [
        (r.values, r.valid, r.test, r.keys) for r in second.runs
    ]
    assert second.selected.values == {"train.variant": "a"}
    rewritten = pd.read_csv(table)
    assert list(rewritten["cached"]) == [True, True]
    assert rewritten.drop(columns=["cached", "seconds"]).equals(
        pd.read_csv(pd.io.common.StringIO(first_text)).drop(columns=["cached", "seconds"])
    )
    assert len(rewritten["evaluate_key"].unique()) == 2
