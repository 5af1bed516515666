"""Interrupted training, from the CLI: the same settings resume, changed settings restart cleanly.

The kill is a hard process exit right after an epoch's checkpoint is written (what a
SIGKILL at that moment leaves behind). Each run says what it did in the train manifest:
``resumed_from_epoch`` or ``restarted`` (with the parameters that changed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_training import COMMON, Kill, TinyMF, planted_data

from sand.pipeline.base.errors import ConfigError
from sand.pipeline.training.trainer import train_model

TINY = ["--set", "acquire.sample_users=40", "--set", "acquire.sample_items=30", "--model", "bpr",
        "--epochs", "5", "--set", "train.patience=50"]

#: The CLI in a fresh process; with a kill epoch, it dies right after writing that epoch's checkpoint.
_CLI = """
import sys
import sand.flows.cli as cli
kill_after = int(sys.argv[1])
if kill_after:
    import os
    import sand.pipeline.training.trainer as training
    real = training._atomic_torch_save
    def save(obj, path):
        real(obj, path)
        if path.name == training.LAST_NAME and obj["epoch"] == kill_after:
            os._exit(137)
    training._atomic_torch_save = save
sys.argv = ["sand", *sys.argv[2:]]
cli.main()
"""


def sand_train(api_url, root, batch_size, kill_after=0) -> dict:
    args = ["stage", "train", "--json", "--data-root", str(root), *TINY, "--set",
            f"train.batch_size={batch_size}"]
    env = {**os.environ, "PREFECT_API_URL": api_url, "SAND_LOG_LEVEL": "WARNING"}
    result = subprocess.run([sys.executable, "-c", _CLI, str(kill_after), *args], capture_output=True, text=True,
                            env=env, timeout=600)
    if kill_after:
        assert result.returncode == 137, result.stderr[-3000:]
        return {}
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_killed_training_resumes_and_changed_settings_restart(prefect_server, tmp_path):
    root = tmp_path / "data"
    sand_train(prefect_server, root, 256, kill_after=3)
    [work] = (root / "work" / "train").iterdir()
    assert (work / "last.pt").is_file()

    # other settings: a clean start in its own directory, saying what changed
    restarted = sand_train(prefect_server, root, 96)
    assert not restarted["stages"]["train"]["cached"]
    assert restarted["train"]["resumed_from_epoch"] is None
    assert "batch_size 256 -> 96" in restarted["train"]["restarted"]
    assert restarted["train"]["epochs_run"] == 5
    assert (work / "last.pt").is_file()  # the interrupted run's checkpoints are kept

    # the same settings resume the interrupted run; batch size is part of the key, so the
    # 96-batch model just built is not served for it
    resumed = sand_train(prefect_server, root, 256)
    assert not resumed["stages"]["train"]["cached"]
    assert resumed["stages"]["train"]["artifact"] != restarted["stages"]["train"]["artifact"]
    assert resumed["train"]["resumed_from_epoch"] == 3 and resumed["train"]["restarted"] is None
    assert resumed["train"]["epochs_run"] == 5
    assert not work.exists()  # a finished run's checkpoints are not kept twice


def test_checkpoint_written_under_other_settings_is_never_continued(tmp_path):
    data = planted_data(1)

    def die_after_2(epoch, row):
        if epoch == 2:
            raise Kill

    with pytest.raises(Kill):
        train_model(TinyMF(data.n_users, data.n_items, seed=5), data, out_dir=tmp_path / "run", epochs=4,
                    patience=50, signature={"alpha": 1}, on_epoch_end=die_after_2, **COMMON)
    with pytest.raises(ConfigError, match=r"signature.alpha 1 -> 2"):
        train_model(TinyMF(data.n_users, data.n_items, seed=5), data, out_dir=tmp_path / "run", epochs=4,
                    patience=50, signature={"alpha": 2}, **COMMON)
    restarted_model = TinyMF(data.n_users, data.n_items, seed=5)
    restarted = train_model(restarted_model, data, out_dir=tmp_path / "run", epochs=4, patience=50,
                            signature={"alpha": 2}, restart_on_change=True, **COMMON)
    assert restarted.restarted == "parameters changed: signature.alpha 1 -> 2"
    assert restarted.resumed_from_epoch is None and [h["epoch"] for h in restarted.history] == [1, 2, 3, 4]

    fresh_model = TinyMF(data.n_users, data.n_items, seed=5)
    train_model(fresh_model, data, out_dir=tmp_path / "fresh", epochs=4, patience=50, signature={"alpha": 2},
                **COMMON)
    for (name, a), (_, b) in zip(restarted_model.state_dict().items(), fresh_model.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name  # nothing of the discarded checkpoint was mixed in
