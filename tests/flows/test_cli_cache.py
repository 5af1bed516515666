"""``sand cache info`` and ``sand cache prune``: what the caches hold, and dropping what no run used lately."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from conftest import invoke_sand

from sand.pipeline.features.vector_cache import FeatureCache

DAY = 86400


def _age(path, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(path, (t, t))


@pytest.fixture
def data_root(tmp_path):
    """A data root with an old and a fresh image file and an old and a fresh feature cache chunk."""
    images = tmp_path / "cache" / "images" / "ab"
    images.mkdir(parents=True)
    (images / "old.img").write_bytes(b"x" * 100)
    (images / "new.img").write_bytes(b"y" * 50)
    _age(images / "old.img", 40)
    cache = FeatureCache(tmp_path / "cache" / "image_features", "f" * 64)
    cache.describe({"backbone": "resnet18", "image_size": 32, "engine": "fast", "precision": "fp32"})
    old = cache.append(["a" * 64], np.ones((1, 4), np.float32))
    cache.append(["b" * 64], np.zeros((1, 4), np.float32))
    _age(old, 40)
    return tmp_path


def test_info_reports_each_cache_and_encoder(data_root):
    result = invoke_sand(["cache", "info", "--data-root", data_root, "--json"])
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["caches"]}
    assert rows["images"]["files"] == 2 and rows["images"]["bytes"] == 150
    encoder = next(r for name, r in rows.items() if name.startswith("image_features/"))
    assert encoder["files"] == 2 and encoder["identity"]["backbone"] == "resnet18"
    text = invoke_sand(["cache", "info", "--data-root", data_root])
    assert "resnet18" in text.stdout and "image_features" in text.stdout


def test_prune_deletes_only_what_is_older_and_a_pruned_entry_is_a_miss(data_root):
    dry = invoke_sand(["cache", "prune", "--older-than", "30d", "--dry-run", "--data-root", data_root])
    assert dry.exit_code == 0 and "would delete 2 files" in dry.stdout
    assert (data_root / "cache" / "images" / "ab" / "old.img").exists()

    only = invoke_sand(["cache", "prune", "--older-than", "30d", "--only", "images", "--data-root", data_root])
    assert only.exit_code == 0 and "deleted 1 files" in only.stdout
    assert not (data_root / "cache" / "images" / "ab" / "old.img").exists()
    assert (data_root / "cache" / "images" / "ab" / "new.img").exists()

    done = invoke_sand(["cache", "prune", "--older-than", "30d", "--data-root", data_root])
    assert done.exit_code == 0 and "deleted 1 files" in done.stdout
    cache = FeatureCache(data_root / "cache" / "image_features", "f" * 64)
    assert set(cache.lookup({"a" * 64, "b" * 64})) == {"b" * 64}


def test_a_used_entry_survives_prune(data_root):
    cache = FeatureCache(data_root / "cache" / "image_features", "f" * 64)
    assert set(cache.lookup({"a" * 64})) == {"a" * 64}  # a hit refreshes the chunk's age
    invoke_sand(["cache", "prune", "--older-than", "30d", "--only", "image_features", "--data-root", data_root])
    assert set(cache.lookup({"a" * 64, "b" * 64})) == {"a" * 64, "b" * 64}


@pytest.mark.parametrize("args, message", [
    (["--older-than", "soon"], "--older-than 'soon': expected a number and a unit"),
    (["--older-than", "1d", "--only", "nope"], "--only 'nope': no such cache"),
])
def test_bad_prune_options_are_one_line_errors(data_root, args, message):
    result = invoke_sand(["cache", "prune", *args, "--data-root", data_root])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
