"""The cluster recipe of docs/scaling.md, run on this machine: text and image shards on Dask.

What users rely on: ``--runner dask --dask-address tcp://...`` sends the text and image
shard jobs to an existing cluster (a scheduler process and worker processes started on
their own, as on a real cluster), and the features written are byte for byte those of
the default threads runner; text shards under the default runner equal one shard.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("prefect")
pytest.importorskip("distributed")

from sand.pipeline.config import load_config  # noqa: E402

SMALL = [
    "acquire.sample_users=150",
    "acquire.sample_items=100",
    "image_features.image_size=32",
    "image_features.num_workers=0",
    "image_features.shard_size=16",
    "text_features.batch_size=1",  # encoding groups of 32 unique texts: several shards
    "text_features.shard_size=32",
]


def small_config(root, *extra):
    return load_config(None, {"data_root": str(root)}, [*SMALL, *extra])


def _feature_bytes(ref: dict) -> bytes:
    path = Path(ref["path"])
    name = "text_feat.npy" if ref["stage"] == "text_features" else "image_feat.npy"
    return (path / name).read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler process and two worker processes on loopback, as ``dask scheduler`` / ``dask worker``."""
    distributed = pytest.importorskip("distributed")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        stdout=open(logs / "scheduler.log", "wb"), stderr=subprocess.STDOUT, env=env,
    )]
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dask", "worker", address, "--nworkers", "2", "--nthreads", "1",
             "--no-dashboard", "--local-directory", str(tmp_path / "dask-workers")],
            stdout=open(logs / "workers.log", "wb"), stderr=subprocess.STDOUT, env=env,
        ))
        with distributed.Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=180)
            assert len(client.scheduler_info()["workers"]) == 2
        yield address
    finally:
        for p in reversed(procs):  # only the processes this fixture started, by their handle
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_text_shards_default_runner_equal_one_shard(prefect_server, tmp_path):
    from sand.flows.pipeline_flows import RunOptions, text_features_flow

    sharded = text_features_flow(config=small_config(tmp_path / "a"), options=RunOptions())
    assert sharded["manifest"]["shards"] > 2
    single = text_features_flow(
        config=small_config(tmp_path / "b", "text_features.shard_size=1000000"), options=RunOptions()
    )
    assert single["manifest"]["shards"] == 1
    assert _feature_bytes(sharded) == _feature_bytes(single)


def _threads_and_dask(flow, address, root):
    from sand.flows.pipeline_flows import RunOptions

    threads = flow(config=small_config(root / "threads"), options=RunOptions())
    dask = flow(config=small_config(root / "dask"), options=RunOptions(runner="dask", dask_address=address))
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
