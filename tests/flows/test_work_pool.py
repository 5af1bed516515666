"""The work-pool variant of the cluster recipe (docs/scaling.md), run on this machine.

What users rely on: ``sand deploy --work-pool NAME`` registers the deployments of
``sand serve`` with an existing Prefect work pool, carrying the run options given
(``--runner dask --dask-address``) as their defaults; a ``prefect worker`` of that pool
picks up a run of a stage deployment, its shards go to the Dask cluster, and the
features written are byte for byte those of the threads runner in-process. Without a
server, with an unreachable one, or with a pool that does not exist, the command says
so in one line and exits 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import invoke_sand
from support import (
    SMALL_SHARDED,
    background_processes,
    free_port,
    small_sharded_config,
    start_dask_cluster,
    wait_until_final,
)

POOL = "sand-test-pool"


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_deploy_needs_a_server(tmp_path):
    """Prefect's temporary server would vanish with the command, and the deployments with it."""
    line = _one_error_line(invoke_sand(["deploy", "--work-pool", POOL], env={"PREFECT_API_URL": ""}, cwd=tmp_path))
    assert "sand deploy needs a Prefect server" in line and "PREFECT_API_URL" in line


def test_deploy_to_an_unreachable_server(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api"
    line = _one_error_line(invoke_sand(["deploy", "--work-pool", POOL], api_url=url, cwd=tmp_path))
    assert url in line and "unreachable" in line and "unset PREFECT_API_URL" not in line


@pytest.mark.slow
def test_work_pool_runs_text_shards_on_dask_like_threads(prefect_server, tmp_path):
    pytest.importorskip("distributed")
    from prefect import get_client
    from prefect.deployments import run_deployment

    from sand.flows.pipeline_flows import RunOptions, text_features_flow

    pool_root = tmp_path / "pool"
    prefect_env = {"PREFECT_API_URL": prefect_server}
    with start_dask_cluster(tmp_path) as address, background_processes(tmp_path / "logs") as start:
        deploy = ["deploy", "--work-pool", POOL, "--data-root", str(pool_root), "--runner", "dask",
                  "--dask-address", address, "--cron", "15 4 * * 1", "--json",
                  *(arg for field in SMALL_SHARDED for arg in ("--set", field))]
        line = _one_error_line(invoke_sand(deploy, api_url=prefect_server, cwd=tmp_path))
        assert f"work pool {POOL!r} does not exist" in line and f"prefect work-pool create {POOL}" in line

        subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process"],
                       env={**os.environ, **prefect_env}, check=True,
                       capture_output=True, timeout=120)
        start("worker", "prefect", "worker", "start", "--pool", POOL,
              env={**prefect_env, "PREFECT_WORKER_QUERY_SECONDS": "1"})
        deployer = tmp_path / "deployer"  # the deploying machine's directory, absent on the worker's
        deployer.mkdir()
        deployed = invoke_sand(deploy, api_url=prefect_server, cwd=deployer)
        assert deployed.exit_code == 0, deployed.stderr
        deployer.rmdir()
        summary = json.loads(deployed.stdout)
        assert summary["work_pool"] == POOL and summary["work_pool_type"] == "process"
        assert {d["name"] for d in summary["deployments"]} >= {"sand-pipeline/retrain", "sand-text-features/on-demand"}

        with get_client(sync_client=True) as client:
            retrain = client.read_deployment_by_name("sand-pipeline/retrain")
            assert retrain.work_pool_name == POOL and retrain.schedules[0].schedule.cron == "15 4 * * 1"
            assert retrain.parameters["options"] == {**RunOptions().model_dump(mode="json"), "runner": "dask",
                                                     "dask_address": address}
            assert retrain.parameters["config"]["data_root"] == str(pool_root)
            assert retrain.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "."}}]

            flow_run = run_deployment("sand-text-features/on-demand", timeout=0)
            threads = text_features_flow(config=small_sharded_config(tmp_path / "threads"), options=RunOptions())
            flow_run = wait_until_final(client, flow_run.id, timeout=300)
        assert flow_run.state.is_completed(), flow_run.state
        assert flow_run.work_pool_name == POOL

        written = list(pool_root.rglob("text_feat.npy"))
        assert len(written) == 1
        manifest = json.loads((written[0].parent / "manifest.json").read_text())
        assert manifest["shards"] == threads["manifest"]["shards"] > 2
        import distributed

        with distributed.Client(address, timeout=60) as dask:
            executed = dask.run(lambda dask_worker: dask_worker.state.executed_count)
        assert sum(executed.values()) == manifest["shards"]
        assert written[0].read_bytes() == (Path(threads["path"]) / "text_feat.npy").read_bytes()

        # Deploying again updates the same deployments in place (the text summary this time);
        # a relative data root is registered as the absolute path it names where `sand deploy` ran.
        again = invoke_sand(["deploy", "--work-pool", POOL, "--cron", "0 5 * * *", "--data-root", "data"],
                            api_url=prefect_server, cwd=tmp_path)
        assert again.exit_code == 0, again.stderr
        assert f"registered {len(summary['deployments'])} deployments with work pool {POOL!r}" in again.stdout
        assert "sand-pipeline/retrain  (cron 0 5 * * *)" in again.stdout
        with get_client(sync_client=True) as client:
            updated = client.read_deployment_by_name("sand-pipeline/retrain")
        assert updated.id == retrain.id and [s.schedule.cron for s in updated.schedules] == ["0 5 * * *"]
        assert updated.parameters["config"]["data_root"] == str(tmp_path / "data")
        assert updated.parameters["options"]["runner"] == "threads"
