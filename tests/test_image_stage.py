"""The image stage at real shape: several shards under the default runner and settings.

What users rely on: a dataset bigger than one shard finishes with the default
threads runner and DataLoader-style decode workers; the features do not depend on
how items were split into shards, on the runner, on resume or on the data root;
``--refresh image_features`` really re-encodes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sand.pipeline.config import load_config
from sand.pipeline.stages import Context, run_acquire, run_image_features, run_interactions

SMALL = [
    "acquire.sample_users=60",
    "acquire.sample_items=40",
    "image_features.image_size=32",
]


def prepared(root, *extra, refresh=()):
    cfg = load_config(None, {"data_root": str(root)}, [*SMALL, *extra])
    ctx = Context.create(cfg, refresh=refresh, progress=False)
    inter = run_interactions(ctx, run_acquire(ctx).artifact).artifact
    return ctx, inter


def threads(fn, jobs):
    """What the default Prefect runner does: every shard at once, each in its own thread."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(fn, jobs))


def features(outcome):
    return np.load(outcome.artifact.file("image_feat.npy"))


@pytest.mark.timeout(300)
def test_many_shards_with_threads_and_decode_workers_finish_and_match_one_shard(tmp_path):
    ctx, inter = prepared(tmp_path / "a", "image_features.shard_size=8", "image_features.num_workers=2")
    sharded = run_image_features(ctx, inter, threads)
    assert sharded.artifact.manifest["shards"] > 3
    ctx1, inter1 = prepared(tmp_path / "b", "image_features.shard_size=1024", "image_features.num_workers=0")
    single = run_image_features(ctx1, inter1)
    assert single.artifact.manifest["shards"] == 1
    assert features(sharded).tobytes() == features(single).tobytes()
