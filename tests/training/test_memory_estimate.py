"""Training memory is estimated before a model is built: refused in one line when it cannot fit,
recorded next to the measured peak when it can."""

from __future__ import annotations

import time

import pytest

from sand.pipeline.base.errors import ConfigError
from sand.pipeline.training.memory_estimate import check_fits, estimate_training_memory

TINY = {"acquire.sample_users": 40, "acquire.sample_items": 30}
BABY = {"n_users": 19_445, "n_items": 7_050, "n_train_edges": 120_000}


@pytest.mark.parametrize("dim", [3_000_000, 10**12])
def test_an_oversized_model_is_refused_in_one_line_naming_the_field_before_it_is_built(dim, tmp_path):
    from sand import run

    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        run(model="bpr", epochs=1, data_root=tmp_path, progress=False,
            overrides={**TINY, "train.embedding_dim": dim})
    message = str(err.value)
    assert "train.embedding_dim" in message and "\n" not in message, message
    assert "train.model=bpr needs about" in message
    assert time.monotonic() - start < 120  # nothing of that size was allocated first
    assert not list((tmp_path / "artifacts").glob("train/*/manifest.json"))


def test_a_budget_refuses_what_the_machine_would_allow(tmp_path):
    from sand import run

    with pytest.raises(ConfigError, match=r"more than train.memory_budget_gb=0.01: reduce "):
        run(model="bpr", epochs=1, data_root=tmp_path, progress=False,
            overrides={**TINY, "train.memory_budget_gb": 0.01})


def test_the_estimate_is_in_the_summary_next_to_the_measured_peak(tmp_path):
    from sand import run

    train = run(model="lightgcn", epochs=1, data_root=tmp_path, progress=False, overrides=TINY).summary["train"]
    estimate = train["memory_estimate"]
    assert estimate["total_mb"] > 0 and "embeddings" in estimate["parts_mb"]
    ratio = estimate["estimated_peak_memory_mb"] / train["peak_memory_mb"]
    assert 1 / 1.5 <= ratio <= 1.5, (estimate, train["peak_memory_mb"])


def test_the_fields_named_are_those_that_drive_the_size():
    sand = estimate_training_memory("sand", **BABY, feature_dims={"image": 4096, "text": 384},
                                    hyperparameters={"embedding_dim": 64})
    wide = estimate_training_memory("bpr", **BABY, feature_dims={}, hyperparameters={"embedding_dim": 3_000_000})
    assert wide.drivers()[0] == "train.embedding_dim"
    assert wide.total > 100 * 2**30 and sand.total < 4 * 2**30
    freedom = estimate_training_memory("freedom", **BABY, feature_dims={"image": 4096, "text": 384})
    frozen = estimate_training_memory("freedom", **BABY, feature_dims={"image": 4096, "text": 384},
                                      hyperparameters={"train_features": False})
    assert frozen.total < freedom.total  # FREEDOM's trainable features: value, gradient, two moments
    with pytest.raises(ConfigError, match="more than the memory available on cpu"):
        check_fits(wide, available=16 * 2**30, where="cpu")
    check_fits(sand, available=16 * 2**30, where="cpu")  # fits: no error


@pytest.mark.slow
def test_the_command_refuses_an_oversized_model_in_one_error_line_exit_2(prefect_server, tmp_path):
    from conftest import run_sand

    args = ["run", "--model", "bpr", "--epochs", "1", "--data-root", str(tmp_path / "data"),
            "--set", "acquire.sample_users=40", "--set", "acquire.sample_items=30",
            "--set", "train.embedding_dim=3000000"]
    out = run_sand(args, api_url=prefect_server, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], out.stderr[-3000:]
    assert "train.embedding_dim" in errors[0] and "train.model=bpr needs about" in errors[0]
