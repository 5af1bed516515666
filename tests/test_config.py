"""Config: YAML + CLI overrides, validation errors naming the field."""

from __future__ import annotations

import pytest

from sand.pipeline.base.config import PipelineConfig, load_config
from sand.pipeline.base.errors import ConfigError


def test_defaults_are_the_papers():
    cfg = PipelineConfig()
    assert cfg.acquire.dataset == "sample"
    assert cfg.interactions.k_core == 5 and cfg.interactions.split == "mmrec"
    assert cfg.graphs.k == 10 and cfg.train.with_profile().batch_size == 2048
    assert cfg.train.with_profile().lr is None  # the model's published lr (SAND 1e-4), resolved by the stage
    assert cfg.train.early_stop == "mmrec" and cfg.train.plugin_fusion == "auxiliary"


@pytest.mark.parametrize(("model", "batch_size", "lr"), [
    ("sand", 8192, 2e-4), ("freedom", 8192, 2e-3), ("lightgcn", 8192, 2e-3), ("vbpr", 8192, 2e-3),
    ("freedom-sand", 8192, 2e-3), ("bpr", 2048, 1e-3),
])
def test_the_fast_profile_resolves_to_the_documented_values(model, batch_size, lr):
    """docs/convergence.md: train.profile=fast is batch 8192 and 2x the published lr; MF-BPR trains as the paper."""
    fast = load_config(None, {"train.model": model, "train.profile": "fast"}).train.with_profile()
    assert fast.batch_size == batch_size and fast.lr == pytest.approx(lr)
    assert fast.patience is None  # the paper's early stop (patience 20) is kept


def test_explicit_training_settings_win_over_the_profile():
    cfg = load_config(None, {"train.profile": "fast"}, ["train.batch_size=1024", "train.lr=0.01"])
    assert (cfg.train.with_profile().batch_size, cfg.train.with_profile().lr) == (1024, 0.01)


@pytest.mark.parametrize(
    ("dataset", "patience", "expected"),
    [("baby", None, 20), ("sports", None, 20), ("clothing", None, 30), ("/data/mmrec/clothing", None, 30),
     ("clothing", 5, 5), ("sample", None, 20)],
)
def test_patience_per_dataset_follows_the_authors_logs(dataset, patience, expected):
    cfg = load_config(None, {"acquire.dataset": dataset, "train.patience": patience})
    assert cfg.train.resolved_patience(cfg.acquire.dataset) == expected


def test_yaml_then_overrides_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("acquire: {dataset: baby}\ntrain: {model: lightgcn, epochs: 5}\n")
    cfg = load_config(path, {"train.epochs": 7, "train.variant": None}, ["graphs.k=20", "train.extra={x: 1}"])
    assert cfg.acquire.dataset == "baby" and cfg.train.model == "lightgcn"
    assert cfg.train.epochs == 7 and cfg.graphs.k == 20 and cfg.train.extra == {"x": 1}


@pytest.mark.parametrize(
    "assignment, field",
    [
        ("train.lr=-1", "train.lr"),
        ("graphs.k=0", "graphs.k"),
        ("train.model=nope", "train.model"),
        ("train.variant=z", "train.variant"),
        ("interactions.split=random", "interactions.split"),
        ("train.nonsense=1", "train.nonsense"),
        ("train.early_stop=late", "train.early_stop"),
        ("train.plugin_fusion=concat", "train.plugin_fusion"),
        ("train.distance_scope=some", "train.distance_scope"),
        ("train.profile=mine", "train.profile"),
        ("acquire.format=amazon2099", "acquire.format"),
    ],
)
def test_invalid_values_name_the_field(assignment, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, None, [assignment])
    assert str(err.value).startswith(f"invalid config value {field}=")
    assert "\n" not in str(err.value)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(path)


def test_global_seed_reaches_every_stage():
    cfg = load_config(None, {"seed": 7}).resolved()
    assert cfg.interactions.seed == cfg.train.seed == cfg.image_features.seed == cfg.acquire.sample_seed == 7


@pytest.mark.parametrize(
    ("assignment", "choices"),
    [
        ("train.model=nope", "bpr, lightgcn, vbpr, freedom, sand, vbpr-sand, freedom-sand"),
        ("acquire.format=amazon2099", "amazon2014, amazon2018, amazon2023, mmrec, sample"),
        ("train.profile=mine", "default, fast, authors"),
    ],
)
def test_table_backed_fields_list_the_tables_choices(assignment, choices):
    """Models, formats and profiles are validated against their one table, whose names the error lists."""
    with pytest.raises(ConfigError) as err:
        load_config(None, None, [assignment])
    assert str(err.value).endswith(f"choose one of {choices}")


def test_schema_offers_the_tables_choices():
    """The Prefect UI's parameter form shows the registry's models, the format table's formats."""
    from sand.models.registry import MODELS
    from sand.pipeline.base.formats import FORMATS

    defs = PipelineConfig.model_json_schema()["$defs"]
    assert defs["TrainConfig"]["properties"]["model"]["enum"] == list(MODELS)
    assert defs["TrainConfig"]["properties"]["profile"]["enum"] == ["default", "fast", "authors"]
    (fmt,) = [a for a in defs["AcquireConfig"]["properties"]["format"]["anyOf"] if a.get("type") == "string"]
    assert fmt["enum"] == list(FORMATS)
