"""A killed grid resumes: finished runs come from the store, the interrupted one from its last epoch.

Why it matters: the paper's grids run for hours on a CPU (docs/convergence.md); a machine
that reboots or a Ctrl-C must cost at most the epoch in flight, never the finished runs.
The kill is a hard process exit right after the second run's second epoch is checkpointed
(what a SIGKILL at that moment leaves behind).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

TINY = ["--set", "acquire.sample_users=40", "--set", "acquire.sample_items=30", "--epochs", "4",
        "--set", "train.patience=50", "--set", "train.batch_size=256"]

#: ``sand`` in a fresh process; with a kill count N it dies after the N-th checkpoint of an epoch 2.
_CLI = """
import sys
import sand.flows.cli as cli
kill_at = int(sys.argv[1])
if kill_at:
    import os
    import sand.pipeline.training.trainer as training
    real, seen = training._atomic_torch_save, []
    def save(obj, path):
        real(obj, path)
        if path.name == training.LAST_NAME and obj["epoch"] == 2:
            seen.append(path)
            if len(seen) == kill_at:
                os._exit(137)
    training._atomic_torch_save = save
sys.argv = ["sand", *sys.argv[2:]]
cli.main()
"""


def sand_grid(api_url: str, root: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    args = ["grid", "--axis", "train.model=bpr,lightgcn", "--name", "g", "--json", "--data-root", str(root), *TINY]
    env = {**os.environ, "PREFECT_API_URL": api_url, "SAND_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-c", _CLI, str(kill_at), *args], capture_output=True, text=True,
                          env=env, timeout=900)


def _train_result(root: Path, key: str) -> dict:
    return json.loads((root / "artifacts" / "train" / key / "manifest.json").read_text())["result"]


@pytest.mark.slow
def test_a_killed_grid_resumes_without_retraining_its_finished_runs(prefect_server, tmp_path):
    root = tmp_path / "data"
    killed = sand_grid(prefect_server, root, kill_at=2)  # dies in the second run (lightgcn), after epoch 2
    assert killed.returncode == 137, killed.stderr[-3000:]
    table = pd.read_csv(root / "grids" / "g" / "runs.csv")
    assert list(table["train.model"]) == ["bpr"]  # the finished run was recorded before the kill
    first_key = table["train_key"][0]

    resumed = sand_grid(prefect_server, root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    table = pd.read_csv(root / "grids" / "g" / "runs.csv")
    assert list(table["train.model"]) == ["bpr", "lightgcn"] and list(table["status"]) == ["ok", "ok"]
    assert table["train_key"][0] == first_key
    assert list(table["cached"]) == [True, False]  # bpr served from the store, not retrained
    assert _train_result(root, first_key)["resumed_from_epoch"] is None
    lightgcn = _train_result(root, table["train_key"][1])
    assert lightgcn["resumed_from_epoch"] == 2 and lightgcn["epochs_run"] == 4
