"""The cluster recipe of docs/scaling.md, run on this machine: text and image shards on Dask.

What users rely on: ``--runner dask --dask-address tcp://...`` sends the text and image
shard jobs to an existing cluster (a scheduler process and worker processes started on
their own, as on a real cluster), and the features written are byte for byte those of
the default threads runner; text shards under the default runner equal one shard.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import small_sharded_config, start_dask_cluster

pytest.importorskip("prefect")
pytest.importorskip("distributed")


def _feature_bytes(ref: dict) -> bytes:
    path = Path(ref["path"])
    name = "text_feat.npy" if ref["stage"] == "text_features" else "image_feat.npy"
    return (path / name).read_bytes()


@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler process and two worker processes on loopback, as ``dask scheduler`` / ``dask worker``."""
    with start_dask_cluster(tmp_path) as address:
        yield address


@pytest.mark.slow
def test_text_shards_default_runner_equal_one_shard(prefect_server, tmp_path):
    from sand.flows.pipeline_flows import RunOptions, text_features_flow

    sharded = text_features_flow(config=small_sharded_config(tmp_path / "a"), options=RunOptions())
    assert sharded["manifest"]["shards"] > 2
    single = text_features_flow(
        config=small_sharded_config(tmp_path / "b", "text_features.shard_size=1000000"), options=RunOptions()
    )
    assert single["manifest"]["shards"] == 1
    assert _feature_bytes(sharded) == _feature_bytes(single)


def _threads_and_dask(flow, address, root):
    from sand.flows.pipeline_flows import RunOptions

    threads = flow(config=small_sharded_config(root / "threads"), options=RunOptions())
    dask = flow(config=small_sharded_config(root / "dask"), options=RunOptions(runner="dask", dask_address=address))
    assert dask["manifest"]["shards"] > 2 and not dask["cached"]
    return threads, dask


@pytest.mark.slow
def test_cluster_recipe_text_shards_on_dask_equal_threads(prefect_server, dask_cluster, tmp_path):
    from sand.flows.pipeline_flows import text_features_flow

    threads, dask = _threads_and_dask(text_features_flow, dask_cluster, tmp_path)
    assert _feature_bytes(dask) == _feature_bytes(threads)


@pytest.mark.slow
def test_cluster_recipe_image_shards_on_dask_equal_threads(prefect_server, dask_cluster, tmp_path):
    from sand.flows.pipeline_flows import image_features_flow

    threads, dask = _threads_and_dask(image_features_flow, dask_cluster, tmp_path)
    assert _feature_bytes(dask) == _feature_bytes(threads)
