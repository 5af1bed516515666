"""Scheduled retraining end to end, in-process: detect, train, register, decide, publish.

Two snapshots of one raw dataset (the bundled generator's files, cut by user): the first
holds 70% of the users, the second every review, so it adds reviews and new users.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import invoke_sand
from support import background_processes, wait_until_final

from sand.pipeline.acquire.bundled_sample import REVIEWS_NAME as REVIEWS
from sand.pipeline.acquire.bundled_sample import generate_sample, write_user_share
from sand.pipeline.base.config import PipelineConfig, load_config
from sand.pipeline.runner import run_pipeline
from sand.pipeline.serving.publish import MANIFEST_NAME, TABLE_NAME
from sand.pipeline.serving.registry import ModelRegistry
from sand.pipeline.serving.retrain import promote_by_hand, retrain_once
from sand.pipeline.stages import Context


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    generate_sample(out, seed=3, n_users=150, n_items=60)
    return out


def retrain_config(root: Path, raw: Path, *extra: str) -> PipelineConfig:
    return load_config(None, {"data_root": str(root), "acquire.dataset": str(raw), "acquire.format": "amazon2014",
                              "train.model": "bpr", "train.epochs": 3}, ["train.batch_size=256", *extra])


def in_process(cfg: PipelineConfig):
    return run_pipeline(Context.create(cfg, progress=False), until="evaluate").artifacts()


def published(root: Path, dataset: str) -> tuple[pd.DataFrame, dict]:
    folder = root / "published" / dataset
    return pd.read_parquet(folder / TABLE_NAME), json.loads((folder / MANIFEST_NAME).read_text())


def test_retrain_registers_skips_unchanged_data_promotes_and_publishes(generated, tmp_path):
    root, raw = tmp_path / "data", tmp_path / "raw"
    first_users = write_user_share(generated, raw, 0.7)
    cfg = retrain_config(root, raw)

    one = retrain_once(cfg, in_process)
    assert one.status == "retrained" and one.registered
    assert one.decision["promoted"] and one.decision["champion"] is None
    registry = ModelRegistry(root)
    assert [m.key for m in registry.models()] == [one.challenger]
    assert registry.champion(one.dataset, "bpr").key == one.challenger
    table, manifest = published(root, one.dataset)
    assert list(table.columns) == ["user_id", "rank", "item_id", "score"]
    assert set(table["user_id"]) <= first_users and table.groupby("user_id")["rank"].max().eq(20).all()
    assert manifest["model_key"] == one.challenger and manifest["k"] == 20
    assert manifest["snapshot"] == registry.get(one.challenger).snapshot
    assert "recall@20" in manifest["metrics"]["valid"]

    calls = []
    two = retrain_once(cfg, lambda c: calls.append(c) or in_process(c))
    assert two.status == "no new data" and "no new data" in two.message and calls == []
    assert len(registry.models()) == 1 and len(registry.decisions()) == 1

    os.utime(raw / REVIEWS)  # touched, same bytes: the hash says nothing changed
    assert retrain_once(cfg, in_process).status == "no new data"

    write_user_share(generated, raw, 1.0)
    three = retrain_once(cfg, in_process)
    assert three.status == "retrained" and three.registered and three.challenger != one.challenger
    assert any("reviews" in reason or REVIEWS in reason for reason in three.changes)
    details = three.decision["details"]
    assert three.decision["champion"] == one.challenger
    assert details["metric"] == "recall@20" and 0 < details["users"] <= len(first_users)
    assert details["challenger_value"] is not None and details["champion_value"] is not None
    new_snapshot = registry.get(three.challenger).snapshot
    assert new_snapshot != registry.get(one.challenger).snapshot
    table, manifest = published(root, one.dataset)
    champion = registry.champion(one.dataset, "bpr").key
    assert manifest["model_key"] == champion
    promoted = details["challenger_value"] >= details["champion_value"] * (1 - 0.05)
    assert three.decision["promoted"] == promoted and champion == (three.challenger if promoted else one.challenger)
    assert registry.decisions()[-1].details == details
    if promoted:
        assert set(table["user_id"]) - first_users  # the new users are served


def cli_options(root: Path, raw: Path) -> list[str]:
    """The CLI spelling of :func:`retrain_config`."""
    return ["--data-root", str(root), "--dataset", str(raw), "--format", "amazon2014", "--model", "bpr",
            "--epochs", "3", "--set", "train.batch_size=256"]


def test_models_commands_roll_back_and_recommend_reads_the_champion(generated, tmp_path):
    root, raw = tmp_path / "data", tmp_path / "raw"
    write_user_share(generated, raw, 0.7)
    cfg = retrain_config(root, raw)
    one = retrain_once(cfg, in_process)
    write_user_share(generated, raw, 1.0)
    three = retrain_once(cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"max_drop": 1.0})}),
                         in_process)
    assert three.decision["promoted"]  # max_drop 1: any challenger wins
    options = cli_options(root, raw)

    listed = invoke_sand(["models", "list", "--json", "--data-root", root])
    assert listed.exit_code == 0, listed.stderr
    rows = json.loads(listed.stdout)["models"]
    assert [(r["key"], r["champion"]) for r in rows] == [(one.challenger, False), (three.challenger, True)]

    # unchanged sources: answered at once, without a Prefect run (no server is configured here)
    again = invoke_sand(["retrain", "--json", *options], env={"PREFECT_API_URL": ""})
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "no new data"

    user = json.loads(invoke_sand(["recommend", "--user", "0", "-k", "3", "--json", *options]).stdout)
    assert user["model_key"] == three.challenger and len(user["recommendations"]) == 3

    rolled = invoke_sand(["models", "promote", one.challenger[:8], "-k", "5", "--data-root", root])
    assert rolled.exit_code == 0, rolled.stderr
    assert f"{one.challenger} is now the bpr champion" in rolled.stdout
    table, manifest = published(root, one.dataset)
    assert manifest["model_key"] == one.challenger and manifest["k"] == 5
    assert table.groupby("user_id")["rank"].max().max() == 5
    new_users = set(table["user_id"])
    shown = json.loads(invoke_sand(["models", "show", one.challenger, "--data-root", root]).stdout)
    assert shown["champion"] and shown["decisions"][-1]["details"]["reason"].startswith("promoted by hand")
    user = json.loads(invoke_sand(["recommend", "--user", "0", "-k", "3", "--json", *options]).stdout)
    assert user["model_key"] == one.challenger  # the champion, not the latest run

    out = tmp_path / "all.parquet"
    written = invoke_sand(["recommend", "--all", "--out", out, "-k", "4", "--json", *options])
    assert written.exit_code == 0, written.stderr
    everyone = pd.read_parquet(out)
    assert list(everyone.columns) == ["user_id", "rank", "item_id", "score"]
    assert set(everyone["user_id"]) > new_users  # the configured run: the newer snapshot's users too
    assert json.loads(written.stdout)["model_key"] == three.challenger

    unknown = invoke_sand(["models", "promote", "feedbeef", "--data-root", root])
    assert unknown.exit_code == 2 and "no registered model with key 'feedbeef'" in unknown.stderr


KILL_MID_PUBLISH = """
import os, signal, sys
from pathlib import Path
import pandas as pd
from sand.pipeline.serving.registry import ModelRegistry
from sand.pipeline.serving.retrain import publish_model

original = pd.DataFrame.to_parquet

def half_then_die(self, path, *args, **kwargs):
    original(self, path, *args, **kwargs)
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    os.kill(os.getpid(), signal.SIGKILL)

pd.DataFrame.to_parquet = half_then_die
root = Path(sys.argv[1])
publish_model(root, ModelRegistry(root).get(sys.argv[2]), 7)
"""


def test_a_publish_killed_halfway_leaves_the_previous_file(generated, tmp_path):
    root, raw = tmp_path / "data", tmp_path / "raw"
    write_user_share(generated, raw, 0.7)
    one = retrain_once(retrain_config(root, raw), in_process)
    folder = root / "published" / one.dataset
    before = {name: (folder / name).read_bytes() for name in (TABLE_NAME, MANIFEST_NAME)}

    killed = subprocess.run([sys.executable, "-c", KILL_MID_PUBLISH, str(root), one.challenger],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert list(folder.glob(f".{TABLE_NAME}.*"))  # the killed writer's half file, beside the intact one
    table, manifest = published(root, one.dataset)
    assert manifest["rows"] == len(table) and manifest["k"] == 20

    decision, republished = promote_by_hand(root, one.challenger, k=7)  # the next publish clears it
    assert not list(folder.glob(f".{TABLE_NAME}.*")) and republished["k"] == 7


@pytest.mark.slow
def test_the_sand_retrain_deployment_through_a_prefect_server(generated, prefect_server, tmp_path):
    """`sand serve` serves the sand-retrain deployment: a run trains and publishes, the next finds no new data."""
    import yaml
    from prefect import get_client
    from prefect.deployments import run_deployment

    root, raw = tmp_path / "data", tmp_path / "raw"
    write_user_share(generated, raw, 0.7)
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump({
        "data_root": str(root), "acquire": {"dataset": str(raw), "format": "amazon2014"},
        "train": {"model": "bpr", "epochs": 3, "batch_size": 256},
    }))
    with background_processes(tmp_path / "logs") as start:
        start("serve", "sand.flows.cli", "serve", "--config", str(config), "--cron", "0 3 * * 0",
              env={"PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "1"})
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 180
            while True:  # registered by this `sand serve` (the session's server may hold an older one)
                try:
                    deployment = client.read_deployment_by_name("sand-retrain/scheduled")
                    if deployment.parameters["config"]["data_root"] == str(root):
                        break
                except Exception:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "logs" / "serve.log").read_text()[-3000:]
                time.sleep(1)
            assert deployment.schedules[0].schedule.cron == "0 3 * * 0"
            assert deployment.parameters["config"]["train"]["model"] == "bpr"

            first = wait_until_final(client, run_deployment("sand-retrain/scheduled", timeout=0).id, timeout=480)
            assert first.state.is_completed(), (tmp_path / "logs" / "serve.log").read_text()[-3000:]
            second = wait_until_final(client, run_deployment("sand-retrain/scheduled", timeout=0).id, timeout=240)
            assert second.state.is_completed() and second.state.name == "No new data"
            assert "no new data" in second.state.message
            decision = client.read_artifacts()
        assert any(a.key == "sand-retrain-decision" and "promoted" in str(a.data) for a in decision)
    registry = ModelRegistry(root)
    [model] = registry.models()
    table, manifest = published(root, model.dataset)
    assert manifest["model_key"] == model.key == registry.champion(model.dataset, "bpr").key and len(table)


def test_warm_start_copies_the_champions_rows_for_shared_users_and_items(generated, tmp_path):
    import torch

    from sand.pipeline.training.checkpoints import read_checkpoint
    from sand.pipeline.training.model_io import build_model_for
    from sand.pipeline.training.warm_start import id_maps, warm_start

    root, raw = tmp_path / "data", tmp_path / "raw"
    write_user_share(generated, raw, 0.7)
    cfg = retrain_config(root, raw, "retrain.warm_start=true")
    one = retrain_once(cfg, in_process)
    write_user_share(generated, raw, 1.0)
    grown = run_pipeline(Context.create(cfg, progress=False), until="interactions").artifacts()
    registry = ModelRegistry(root)
    old_inter = Context.create(cfg).store.lookup("interactions", registry.get(one.challenger).artifacts["interactions"])

    model, _ = build_model_for(cfg.train, grown["interactions"], {})
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    copied = warm_start(model, grown["interactions"], Context.create(cfg).store, one.challenger)
    old = read_checkpoint(root / "artifacts" / "train" / one.challenger / "best.pt")["model"]
    (new_u, new_i), (old_u, old_i) = id_maps(grown["interactions"]), id_maps(old_inter)
    shared = new_u.index.intersection(old_u.index)
    new_only = new_u.index.difference(old_u.index)
    assert copied["user_rows"] == len(shared) > 0 and copied["item_rows"] > 0 and len(new_only)
    state = model.state_dict()
    assert torch.equal(state["user_embedding.weight"][torch.tensor(new_u[shared].to_numpy())],
                       old["user_embedding.weight"][torch.tensor(old_u[shared].to_numpy())])
    # new users start fresh
    assert torch.equal(state["user_embedding.weight"][torch.tensor(new_u[new_only].to_numpy())],
                       fresh["user_embedding.weight"][torch.tensor(new_u[new_only].to_numpy())])
    items = new_i.index.intersection(old_i.index)
    assert torch.equal(state["item_embedding.weight"][torch.tensor(new_i[items].to_numpy())],
                       old["item_embedding.weight"][torch.tensor(old_i[items].to_numpy())])

    three = retrain_once(cfg, in_process)  # the retrain itself trains the challenger from the champion
    train = Context.create(cfg).store.lookup("train", three.challenger)
    assert train.manifest["params"]["warm_start_from"] == one.challenger
    assert registry.get(three.challenger).config["retrain"]["warm_start_from"] == one.challenger
