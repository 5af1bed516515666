"""Scheduled retraining end to end, in-process: detect, train, register, decide, publish.

Two snapshots of one raw dataset (the bundled generator's files, cut by user): the first
holds 70% of the users, the second every review, so it adds reviews and new users.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sand.pipeline.acquire.bundled_sample import generate_sample
from sand.pipeline.base.config import PipelineConfig, load_config
from sand.pipeline.runner import run_pipeline
from sand.pipeline.serving.publish import MANIFEST_NAME, TABLE_NAME
from sand.pipeline.serving.registry import ModelRegistry
from sand.pipeline.serving.retrain import promote_by_hand, retrain_once
from sand.pipeline.stages import Context

REVIEWS, META = "reviews_Sample_5.json.gz", "meta_Sample.json.gz"


def write_snapshot(generated: Path, raw: Path, share: float) -> set[str]:
    """Write the reviews of the first ``share`` of users (in file order) into ``raw``; returns their ids."""
    lines = gzip.decompress((generated / REVIEWS).read_bytes()).decode().splitlines()
    order: list[str] = []
    for line in lines:
        try:
            user = json.loads(line)["reviewerID"]
        except (ValueError, KeyError):
            continue
        if user not in order:
            order.append(user)
    keep = set(order[: int(len(order) * share)])
    kept = [ln for ln in lines if any(f'"reviewerID": "{u}"' in ln for u in keep)] if share < 1 else lines
    raw.mkdir(parents=True, exist_ok=True)
    tmp = raw / f".{REVIEWS}.tmp"
    tmp.write_bytes(gzip.compress(("\n".join(kept) + "\n").encode(), mtime=0))
    os.replace(tmp, raw / REVIEWS)
    shutil.copy2(generated / META, raw / META)
    return keep


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    generate_sample(out, seed=3, n_users=150, n_items=60)
    return out


def retrain_config(root: Path, raw: Path, *extra: str) -> PipelineConfig:
    return load_config(None, {"data_root": str(root), "acquire.dataset": str(raw), "acquire.format": "amazon2014",
                              "train.model": "bpr", "train.epochs": 3}, ["train.batch_size=256", *extra])


def in_process(cfg: PipelineConfig):
    return run_pipeline(Context.create(cfg, progress=False), until="evaluate").artifacts()


def published(root: Path, dataset: str) -> tuple[pd.DataFrame, dict]:
    folder = root / "published" / dataset
    return pd.read_parquet(folder / TABLE_NAME), json.loads((folder / MANIFEST_NAME).read_text())


def test_retrain_registers_skips_unchanged_data_promotes_and_publishes(generated, tmp_path):
    root, raw = tmp_path / "data", tmp_path / "raw"
    first_users = write_snapshot(generated, raw, 0.7)
    cfg = retrain_config(root, raw)

    one = retrain_once(cfg, in_process)
    assert one.status == "retrained" and one.registered
    assert one.decision["promoted"] and one.decision["champion"] is None
    registry = ModelRegistry(root)
    assert [m.key for m in registry.models()] == [one.challenger]
    assert registry.champion(one.dataset, "bpr").key == one.challenger
    table, manifest = published(root, one.dataset)
    assert list(table.columns) == ["user_id", "rank", "item_id", "score"]
    assert set(table["user_id"]) <= first_users and table.groupby("user_id")["rank"].max().eq(20).all()
    assert manifest["model_key"] == one.challenger and manifest["k"] == 20
    assert manifest["snapshot"] == registry.get(one.challenger).snapshot
    assert "recall@20" in manifest["metrics"]["valid"]

    calls = []
    two = retrain_once(cfg, lambda c: calls.append(c) or in_process(c))
    assert two.status == "no new data" and "no new data" in two.message and calls == []
    assert len(registry.models()) == 1 and len(registry.decisions()) == 1

    os.utime(raw / REVIEWS)  # touched, same bytes: the hash says nothing changed
    assert retrain_once(cfg, in_process).status == "no new data"

    write_snapshot(generated, raw, 1.0)
    three = retrain_once(cfg, in_process)
    assert three.status == "retrained" and three.registered and three.challenger != one.challenger
    assert any("reviews" in reason or REVIEWS in reason for reason in three.changes)
    details = three.decision["details"]
    assert three.decision["champion"] == one.challenger
    assert details["metric"] == "recall@20" and 0 < details["users"] <= len(first_users)
    assert details["challenger_value"] is not None and details["champion_value"] is not None
    new_snapshot = registry.get(three.challenger).snapshot
    assert new_snapshot != registry.get(one.challenger).snapshot
    table, manifest = published(root, one.dataset)
    champion = registry.champion(one.dataset, "bpr").key
    assert manifest["model_key"] == champion
    promoted = details["challenger_value"] >= details["champion_value"] * (1 - 0.05)
    assert three.decision["promoted"] == promoted and champion == (three.challenger if promoted else one.challenger)
    assert registry.decisions()[-1].details == details
    if promoted:
        assert set(table["user_id"]) - first_users  # the new users are served


def test_promote_rolls_back_and_republishes(generated, tmp_path):
    root, raw = tmp_path / "data", tmp_path / "raw"
    write_snapshot(generated, raw, 0.7)
    cfg = retrain_config(root, raw)
    one = retrain_once(cfg, in_process)
    write_snapshot(generated, raw, 1.0)
    three = retrain_once(cfg, in_process)
    registry = ModelRegistry(root)
    registry_champion = registry.champion(one.dataset, "bpr").key
    older = one.challenger if registry_champion == three.challenger else three.challenger

    decision, manifest = promote_by_hand(root, older[:8], k=5)
    assert decision.promoted and registry.champion(one.dataset, "bpr").key == older
    table, on_disk = published(root, one.dataset)
    assert on_disk == manifest and on_disk["model_key"] == older and on_disk["k"] == 5
    assert table.groupby("user_id")["rank"].max().max() == 5
    assert registry.decisions()[-1].details["reason"].startswith("promoted by hand")
