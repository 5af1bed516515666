"""A run whose every stage is in the store is answered from it, without Prefect.

Why: starting Prefect's temporary API server and one flow run per stage was most of a
warm run (about 45 of 48 seconds on a Baby-sized dataset), for nothing to orchestrate.
"""

from __future__ import annotations

import json

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
