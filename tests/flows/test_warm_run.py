"""A run whose every stage is in the store is answered from it, without Prefect; when Prefect
runs it, its flow goes through the runner's one loop, as ``sand.run`` does.

Why: starting Prefect's temporary API server and one flow run per stage was most of a
warm run (about 45 of 48 seconds on a Baby-sized dataset), for nothing to orchestrate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_sand

pytestmark = pytest.mark.slow

#: Nothing listens here: a run that tried to reach Prefect would fail.
DEAD_API = "http://127.0.0.1:9/api"


def test_fully_cached_run_needs_no_prefect_and_gives_the_same_summary(prefect_server, tmp_path):
    args = ["run", "--data-root", str(tmp_path / "data"), "--model", "bpr", "--epochs", "2", "--json"]
    cold = run_sand(args, api_url=prefect_server)
    assert cold.returncode == 0, cold.stderr[-2000:]
    warm = run_sand(args, api_url=DEAD_API)
    assert warm.returncode == 0, warm.stderr[-2000:]
    first, second = json.loads(cold.stdout), json.loads(warm.stdout)
    assert all(stage["cached"] for stage in second["stages"].values())
    assert {k: v for k, v in first.items() if k != "stages"} == {k: v for k, v in second.items() if k != "stages"}
    assert [s["artifact"] for s in first["stages"].values()] == [s["artifact"] for s in second["stages"].values()]

    one_stage = run_sand(["stage", "evaluate", *args[1:]], api_url=DEAD_API)
    assert one_stage.returncode == 0, one_stage.stderr[-2000:]
    assert json.loads(one_stage.stdout)["stages"]["evaluate"]["artifact"] == first["stages"]["evaluate"]["artifact"]


def test_a_missing_stage_still_goes_through_prefect(prefect_server, tmp_path):
    root = tmp_path / "data"
    base = ["--data-root", str(root), "--model", "bpr", "--epochs", "1", "--json"]
    assert run_sand(["run", "--until", "interactions", *base], api_url=prefect_server).returncode == 0
    needs_training = run_sand(["run", *base], api_url=DEAD_API)
    assert needs_training.returncode != 0  # train is not in the store: it must be run through Prefect
    refreshed = run_sand(["run", "--until", "interactions", "--refresh", "interactions", *base], api_url=DEAD_API)
    assert refreshed.returncode != 0  # a refresh is work, even when the artifact exists


TINY = {"acquire.sample_users": 40, "acquire.sample_items": 30}


@pytest.fixture(scope="module")
def api_built_root(tmp_path_factory):
    """A data root where ``sand.run`` (in this process, no Prefect) ran BPR end to end."""
    from sand import run

    root = tmp_path_factory.mktemp("api") / "data"
    run(model="bpr", epochs=1, data_root=root, overrides=TINY, progress=False)
    return root


def test_a_cached_run_never_imports_prefect(api_built_root, tmp_path):
    """No temporary API server, not even Prefect's import: the runner answers from the store."""
    args = ["run", "--model", "bpr", "--epochs", "1", "--data-root", str(api_built_root), "--json",
            *(arg for field, value in TINY.items() for arg in ("--set", f"{field}={value}"))]
    code = ("import sys; from sand.flows.cli import main; sys.argv = ['sand', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as done:\n    assert not done.code, done.code\n"
            "print('prefect' in sys.modules, [m for m in sys.modules if m.startswith('prefect.server')])")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # it would start a temporary server
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    summary, imported = out.stdout.strip().splitlines()
    assert all(stage["cached"] for stage in json.loads(summary)["stages"].values())
    assert imported == "False []"


def test_the_prefect_flow_and_sand_run_go_through_one_runner_loop(api_built_root, prefect_server, monkeypatch):
    from sand import run
    from sand.flows.pipeline_flows import RunOptions, pipeline_flow
    from sand.pipeline import runner
    from sand.pipeline.base.config import load_config

    loops = []
    the_loop = runner.run_stages

    def counted(ctx, names, *args, **kwargs):
        loops.append(list(names))
        return the_loop(ctx, names, *args, **kwargs)

    monkeypatch.setattr(runner, "run_stages", counted)
    in_process = run(model="bpr", epochs=1, data_root=api_built_root, overrides=TINY, progress=False)
    cfg = load_config(None, {"data_root": str(api_built_root), "train.model": "bpr", "train.epochs": 1},
                      [f"{field}={value}" for field, value in TINY.items()])
    in_prefect = pipeline_flow(config=cfg, options=RunOptions(progress=False))
    planned = ["acquire", "interactions", "train", "evaluate", "report"]
    assert loops == [planned, planned]  # one loop each, over the same stages
    assert all(in_process.cached.values()) and all(o.cached for o in in_prefect.outcomes.values())
    assert {s: o.artifact.path for s, o in in_prefect.outcomes.items()} == in_process.artifacts
