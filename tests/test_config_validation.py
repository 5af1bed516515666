"""Every config field is checked when the config loads, before any stage starts.

Why: a value that is only checked by the stage that reads it (``evaluate.ks=[0]``) lets
the earlier stages run for minutes (or hours) before the run fails. The table below
holds one bad value for every field; a new field without an entry fails the first test.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from sand.pipeline.base.config import PipelineConfig, load_config
from sand.pipeline.base.errors import ConfigError, SandError

#: One bad value per field (dotted name), each one the config itself must refuse.
BAD_VALUES: dict[str, Any] = {
    "seed": -1,
    "acquire.dataset": "", "acquire.format": "amazon2099", "acquire.reviews": "", "acquire.meta": "",
    "acquire.timeout": 0, "acquire.retries": -1, "acquire.sample_seed": 2**32, "acquire.sample_users": 5,
    "acquire.sample_items": 5,
    "interactions.k_core": 0, "interactions.split": "random", "interactions.seed": -1,
    "interactions.max_bad_lines": -1, "interactions.max_line_bytes": 10,
    "text_features.model": "", "text_features.batch_size": 0, "text_features.device": "tpu",
    "text_features.shard_size": 0, "text_features.threads": 0,
    "image_features.source": "flickr", "image_features.amazon2014_url": "", "image_features.backbone": "vit",
    "image_features.weights": "", "image_features.image_size": 8, "image_features.batch_size": 0,
    "image_features.num_workers": -1, "image_features.concurrency": 0, "image_features.timeout": -1,
    "image_features.retries": 99, "image_features.max_bytes": 1, "image_features.max_pixels": 1,
    "image_features.allow_hosts": ["http://mirror.lan/x"], "image_features.min_side": 0,
    "image_features.fill": "noise", "image_features.shard_size": 0, "image_features.seed": -1,
    "image_features.device": "gpu", "image_features.engine": "jit", "image_features.precision": "fp8",
    "graphs.k": 0, "graphs.include_self": "maybe", "graphs.block_size": 0, "graphs.method": "annoy",
    "graphs.auto_threshold": 0, "graphs.nlist": 0, "graphs.nprobe": 0, "graphs.target_recall": 1.5,
    "graphs.recall_sample": 1, "graphs.faiss_storage": "int8", "graphs.seed": -1,
    "train.model": "nope", "train.variant": "z", "train.epochs": 0, "train.batch_size": 0, "train.lr": -1.0,
    "train.weight_decay": -1.0, "train.patience": 0, "train.early_stop": "late", "train.eval_every": 0,
    "train.seed": -1, "train.device": "cuda:x", "train.precision": "fp8", "train.profile": "mine",
    "train.embedding_dim": 0, "train.alpha": -1.0, "train.beta": -1.0, "train.tau": 0, "train.club_steps": -1,
    "train.mm_image_weight": 2.0, "train.reg_weight": -1.0, "train.n_layers": 99, "train.solosim_scope": "some",
    "train.distance_scope": "some", "train.l2_form": "l1", "train.plugin_fusion": "concat",
    "train.head_dims": [32, 0], "train.club_fit_order": "during", "train.extra": {"dropout": [1, 2]},
    "train.memory_budget_gb": 0,
    "evaluate.ks": [0], "evaluate.top_k": 0, "evaluate.batch_users": 0,
    "report.tsne_items": 1, "report.select_metric": "precision@20", "report.seed": -1,
    "acquire.revision": "v2", "retrain.metric": "precision@20", "retrain.max_drop": 1.5, "retrain.top_k": 0,
    "retrain.warm_start": "maybe", "retrain.warm_start_from": "../x",
}
#: Fields whose bad values are checked before any stage, but against this machine, not by the config.
CHECKED_AT_PREFLIGHT = {"data_root"}


def _dotted_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            names += _dotted_fields(kind, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def test_every_field_has_a_bad_value_in_the_table():
    fields = set(_dotted_fields(PipelineConfig))
    assert fields - set(BAD_VALUES) - CHECKED_AT_PREFLIGHT == set()
    assert set(BAD_VALUES) - fields == set()


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_a_bad_value_is_refused_when_the_config_loads(field):
    with pytest.raises(ConfigError) as err:
        load_config(None, {field: BAD_VALUES[field]})
    assert str(err.value).startswith(f"invalid config value {field}"), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field", [*sorted(BAD_VALUES), *sorted(CHECKED_AT_PREFLIGHT)])
def test_no_stage_starts_with_a_bad_value(field, tmp_path):
    from sand import run

    root = tmp_path / "data"
    bad = BAD_VALUES.get(field)
    overrides = {field: bad}
    if field == "data_root":  # a regular file where the data root's folder should be
        (tmp_path / "file").write_text("x")
        root, overrides = tmp_path / "file" / "data", {}
    with pytest.raises(SandError):
        run(data_root=root, overrides=overrides, progress=False)
    assert not (root / "artifacts").exists() or not any((root / "artifacts").iterdir())
