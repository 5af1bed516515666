"""The image stage at real shape: several shards under the default runner and settings.

What users rely on: a dataset bigger than one shard finishes with the default
threads runner and DataLoader-style decode workers; the features do not depend on
how items were split into shards, on the runner, on resume or on the data root;
``--refresh image_features`` really re-encodes.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sand.pipeline.acquire.stage import run_acquire
from sand.pipeline.base.config import load_config
from sand.pipeline.dataset.stage import run_interactions
from sand.pipeline.features.image_stage import run_image_features
from sand.pipeline.stages import Context

SMALL = [
    "acquire.sample_users=60",
    "acquire.sample_items=40",
    "image_features.image_size=32",
]


def prepared(root, *extra, refresh=()):
    cfg = load_config(None, {"data_root": str(root)}, [*SMALL, *extra])
    ctx = Context.create(cfg, refresh=refresh, progress=False)
    inter = run_interactions(ctx, run_acquire(ctx).artifact).artifact
    return ctx, inter


def threads(fn, jobs):
    """What the default Prefect runner does: every shard at once, each in its own thread."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(fn, jobs))


def features(outcome):
    return np.load(outcome.artifact.file("image_feat.npy"))


@pytest.mark.timeout(300)
def test_many_shards_with_threads_and_decode_workers_finish_and_match_one_shard(tmp_path):
    ctx, inter = prepared(tmp_path / "a", "image_features.shard_size=8", "image_features.num_workers=2")
    sharded = run_image_features(ctx, inter, threads)
    assert sharded.artifact.manifest["shards"] > 3
    ctx1, inter1 = prepared(tmp_path / "b", "image_features.shard_size=1024", "image_features.num_workers=0")
    single = run_image_features(ctx1, inter1)
    assert single.artifact.manifest["shards"] == 1
    assert features(sharded).tobytes() == features(single).tobytes()


def processes(fn, jobs):
    """What ``--runner processes`` / Dask do: shards in fresh interpreters (spawned, not forked)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(fn, jobs))


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """Reference features: one shard, each batch decoded between two forward passes, on a data root of its own."""
    ctx, inter = prepared(tmp_path_factory.mktemp("ref"), "image_features.num_workers=0")
    outcome = run_image_features(ctx, inter)
    assert outcome.artifact.manifest["shards"] == 1
    return features(outcome)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_processes_runner_gives_the_same_bytes(tmp_path, one_shard):
    ctx, inter = prepared(tmp_path, "image_features.shard_size=12")
    outcome = run_image_features(ctx, inter, processes)
    assert outcome.artifact.manifest["shards"] > 2
    assert features(outcome).tobytes() == one_shard.tobytes()


@pytest.mark.timeout(600)
def test_resumed_and_refreshed_runs_equal_a_fresh_run_on_another_root(tmp_path, one_shard):
    import shutil

    ctx, inter = prepared(tmp_path, "image_features.shard_size=8")
    first = run_image_features(ctx, inter, threads)
    manifest = first.artifact.manifest
    assert manifest["shards_encoded"] == manifest["shards"] > 3 and manifest["shards_resumed"] == 0
    assert manifest["weights_description"] == "random init (seed 0)"
    assert features(first).tobytes() == one_shard.tobytes()  # same seed, another data root: same bytes

    # A killed run: the artifact never appeared and only some shards were written.
    shutil.rmtree(first.artifact.path)
    shard_files = sorted((tmp_path / "work" / "image_features").glob("*/shard-*.npz"))
    for path in shard_files[::2]:
        path.unlink()
    resumed = run_image_features(ctx, inter, threads)
    assert resumed.artifact.manifest["shards_resumed"] == len(shard_files) // 2
    assert resumed.artifact.manifest["shards_encoded"] == len(shard_files) - len(shard_files) // 2
    assert features(resumed).tobytes() == one_shard.tobytes()

    ctx_refresh, _ = prepared(tmp_path, "image_features.shard_size=8", refresh=("image_features",))
    before = {p: p.stat().st_mtime_ns for p in shard_files}
    refreshed = run_image_features(ctx_refresh, inter, threads)
    assert not refreshed.cached
    assert refreshed.artifact.manifest["shards_encoded"] == len(shard_files)
    assert refreshed.artifact.manifest["shards_resumed"] == 0
    assert all(p.stat().st_mtime_ns != mtime for p, mtime in before.items())
    assert features(refreshed).tobytes() == one_shard.tobytes()


def test_image_urls_in_downloaded_metadata_cannot_read_local_files(http_server, tmp_path):
    """The sample's metadata names its images by file:// URL: fine from disk, refused once downloaded."""
    from conftest import Reply

    from sand.pipeline.acquire.bundled_sample import generate_sample
    from sand.pipeline.base.errors import DataError

    files = generate_sample(tmp_path / "gen", seed=0, n_users=60, n_items=40)
    for route, path in (("/reviews.json.gz", files.reviews), ("/meta.json.gz", files.meta)):
        http_server.routes[route] = Reply(200, path.read_bytes())
    remote = {"acquire.dataset": "mydata", "acquire.format": "amazon2014",
              "acquire.reviews": http_server.url("/reviews.json.gz"), "acquire.meta": http_server.url("/meta.json.gz"),
              "image_features.weights": "random", "image_features.backbone": "resnet18"}
    cfg = load_config(None, {"data_root": str(tmp_path / "net"), **remote}, SMALL[2:])
    ctx = Context.create(cfg, progress=False)
    inter = run_interactions(ctx, run_acquire(ctx).artifact).artifact
    with pytest.raises(DataError, match=r"no item has a usable image .*refused x"):
        run_image_features(ctx, inter)

    local = {**remote, "acquire.reviews": str(files.reviews), "acquire.meta": files.meta.as_uri()}
    cfg = load_config(None, {"data_root": str(tmp_path / "local"), **local}, SMALL[2:])
    ctx = Context.create(cfg, progress=False)
    inter = run_interactions(ctx, run_acquire(ctx).artifact).artifact
    outcome = run_image_features(ctx, inter)
    assert outcome.artifact.manifest["url_policy"]["local_files"] is True
    assert "refused" not in outcome.artifact.manifest["missing_reasons"]


@pytest.mark.timeout(300)
def test_mmrec_item_images_may_name_local_files_but_never_block_on_special_ones(http_server, tmp_path):
    """An MMRec folder is the user's own: local paths and a private mirror work; a FIFO or device is a skip."""
    import csv
    import os

    import pandas as pd
    from conftest import Reply
    from PIL import Image

    folder = tmp_path / "mm"
    folder.mkdir()
    rows = [(u, i, 0 if k < 6 else k - 5) for u in range(30) for k, i in enumerate((u + np.arange(8)) % 10)]
    pd.DataFrame(rows, columns=["userID", "itemID", "x_label"]).to_csv(folder / "mm.inter", sep="\t", index=False)
    Image.effect_noise((48, 48), 40).convert("RGB").save(tmp_path / "own.png")
    os.mkfifo(tmp_path / "fifo.png")
    http_server.routes["/mirror.png"] = Reply(200, (tmp_path / "own.png").read_bytes())
    urls = [str(tmp_path / "own.png"), (tmp_path / "own.png").as_uri(), http_server.url("/mirror.png"),
            str(tmp_path / "fifo.png"), "/dev/zero", str(tmp_path / "absent.png")]
    with open(folder / "item_images.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["itemID", "asin", "imUrl"])
        writer.writerows((i, f"A{i}", urls[i % len(urls)]) for i in range(10))
    cfg = load_config(None, {"data_root": str(tmp_path / "data"), "acquire.dataset": str(folder)},
                      ["image_features.image_size=32", "image_features.weights=random"])
    ctx = Context.create(cfg, progress=False)
    inter = run_interactions(ctx, run_acquire(ctx).artifact).artifact
    outcome = run_image_features(ctx, inter)
    missing = pd.read_csv(outcome.artifact.file("missing_images.csv"))
    assert sorted(missing["reason"]) == ["file-not-found", "not-a-file", "not-a-file", "not-a-file"]
    assert outcome.artifact.manifest["url_policy"] == {"local_files": True, "private_hosts": True, "allowed_hosts": []}
