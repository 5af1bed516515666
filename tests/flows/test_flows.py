"""Prefect flows on a tiny generated dataset, against one test server for the module.

What users rely on: the end-to-end flow completes, handing each stage flow its
upstream results; a second run is fully cached; changing one graph parameter reruns
exactly graphs/train/evaluate/report; a failing stage leaves upstream artifacts cached
and the rerun starts from it; the image shards run on a Dask cluster and under the
default threads runner; every flow of the stage table is deployed, loadable from its
module path, and the end-to-end one is scheduled.
"""

from __future__ import annotations

import pytest

pytest.importorskip("prefect")

pytestmark = pytest.mark.slow  # second tier (README: Tests)

from sand.pipeline.base.config import load_config  # noqa: E402
from sand.pipeline.base.errors import SandError  # noqa: E402

TINY = [
    "acquire.sample_users=40",
    "acquire.sample_items=30",
    "train.epochs=2",
    "train.batch_size=256",
    "train.club_steps=2",
    "image_features.image_size=32",
    "image_features.num_workers=0",
    "image_features.shard_size=8",
]


def tiny_config(root, *extra):
    return load_config(None, {"data_root": str(root)}, [*TINY, *extra])


def run(cfg, **options):
    from sand.flows.pipeline_flows import RunOptions, pipeline_flow

    return pipeline_flow(config=cfg, options=RunOptions(**options)).summary()


def cached(summary):
    return {stage: info["cached"] for stage, info in summary["stages"].items()}


def test_end_to_end_then_cached_then_graph_change(prefect_server, tmp_path, monkeypatch):
    import sand.flows.pipeline_flows as flows

    def no_second_resolution(ctx, stage):
        raise AssertionError(f"stage flow {stage} resolved its upstream again instead of using the passed results")

    # the pipeline flow hands every stage flow its upstream results
    monkeypatch.setattr(flows, "resolve_upstream", no_second_resolution)
    cfg = tiny_config(tmp_path)
    first = run(cfg)
    assert list(first["stages"]) == [
        "acquire", "interactions", "text_features", "image_features", "graphs", "train", "evaluate", "report",
    ]
    assert not any(cached(first).values())
    assert first["dataset"]["users"] > 0
    assert 0.0 <= first["metrics"]["test"]["recall@20"] <= 1.0

    second = run(cfg)
    assert all(cached(second).values())
    assert second["metrics"] == first["metrics"]

    changed = run(tiny_config(tmp_path, "graphs.k=5"))
    assert cached(changed) == {
        "acquire": True, "interactions": True, "text_features": True, "image_features": True,
        "graphs": False, "train": False, "evaluate": False, "report": False,
    }


def test_failed_stage_keeps_upstream_and_rerun_starts_there(prefect_server, tmp_path):
    bad = tiny_config(tmp_path, "train.model=bpr", "train.extra={no_such_param: 1}")
    with pytest.raises(SandError, match="no_such_param"):
        run(bad)
    fixed = run(tiny_config(tmp_path, "train.model=bpr"))
    assert cached(fixed) == {
        "acquire": True, "interactions": True, "train": False, "evaluate": False, "report": False,
    }


def test_image_shards_on_local_dask_cluster(prefect_server, tmp_path):
    from sand.flows.pipeline_flows import RunOptions, image_features_flow

    ref = image_features_flow(config=tiny_config(tmp_path), options=RunOptions(runner="dask", workers=2))
    import json
    import math
    from pathlib import Path

    assert not ref["cached"]
    inter = Path(ref["manifest"]["inputs"]["interactions"]["path"])
    n_items = json.loads((inter / "manifest.json").read_text())["stats"]["items"]
    assert ref["manifest"]["shape"][0] == n_items
    assert ref["manifest"]["shards"] == math.ceil(n_items / 8) > 1


def test_deployments_registered_with_schedule(prefect_server, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.flows import load_flow_from_entrypoint

    from sand.flows.serve import build_deployments
    from sand.pipeline.stages import STAGE_TABLE

    deployments = build_deployments(tiny_config(tmp_path), cron="15 4 * * 1")
    expected = {"sand-pipeline/retrain", "sand-retrain/scheduled",
                *(f"{row.flow_name}/on-demand" for row in STAGE_TABLE)}
    assert {f"{d.flow_name}/{d.name}" for d in deployments} == expected
    # `sand serve` runs each deployment in a fresh process that imports its entrypoint: a module
    # path of the installed package, which must load the very flow the deployment was made for.
    for deployment in deployments:
        assert deployment.entrypoint.startswith(("sand.flows.pipeline_flows.", "sand.flows.retrain."))
        assert load_flow_from_entrypoint(deployment.entrypoint).name == deployment.flow_name
    for deployment in deployments:
        deployment.apply()

    async def read():
        async with get_client() as client:
            registered = await client.read_deployments()
            retrain = await client.read_deployment_by_name("sand-pipeline/retrain")
            flows = {f.id: f.name for f in await client.read_flows()}
            return ({f"{flows[d.flow_id]}/{d.name}" for d in registered}, retrain.schedules[0].schedule.cron,
                    retrain.parameters)

    names, cron, params = asyncio.run(read())
    assert names >= expected
    assert cron == "15 4 * * 1"
    assert params["config"]["acquire"]["sample_users"] == 40


def test_image_shards_default_runner_with_decode_workers_match_processes(prefect_server, tmp_path):
    """Several shards under the default threads runner and decode workers finish (no fork deadlock)
    and give the bytes the processes runner gives."""
    from pathlib import Path

    import numpy as np

    from sand.flows.pipeline_flows import RunOptions, image_features_flow

    settings = ("image_features.num_workers=2",)
    by_threads = image_features_flow(config=tiny_config(tmp_path / "t", *settings), options=RunOptions())
    by_processes = image_features_flow(
        config=tiny_config(tmp_path / "p", *settings), options=RunOptions(runner="processes", workers=2)
    )
    assert by_threads["manifest"]["shards"] == by_processes["manifest"]["shards"] > 1
    feats = [np.load(Path(ref["path"]) / "image_feat.npy") for ref in (by_threads, by_processes)]
    assert feats[0].tobytes() == feats[1].tobytes()
