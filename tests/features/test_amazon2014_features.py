"""The Amazon 2014 release's own image features: a generated ``.b`` file, served from a loopback server.

Files are made here in the release's layout (10-byte ASIN + 4,096 little-endian
float32 per record); the stage must keep exactly the dataset's rows, fill the
others, count what it skipped, and refuse a file of another layout in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support import range_headers, range_route

from sand.flows.ui import image_coverage_rows
from sand.pipeline.base.config import load_config
from sand.pipeline.base.errors import ConfigError, DataError
from sand.pipeline.experiments.grid import with_paper_inputs
from sand.pipeline.features.amazon2014 import (
    ABSENT,
    ASIN_BYTES,
    FEATURE_DIM,
    NONFINITE,
    RECORD_BYTES,
    read_item_features,
)
from sand.pipeline.features.image_stage import run_image_features
from sand.pipeline.runner import run_pipeline
from sand.pipeline.stages import Context


def write_feature_file(path: Path | str, rows: Sequence[tuple[str | bytes, np.ndarray]]) -> None:
    """Write ``(asin, 4096 floats)`` records in the release's layout (the tests' fixture files)."""
    with open(path, "wb") as fh:
        for asin, vec in rows:
            key = asin.encode("ascii") if isinstance(asin, str) else bytes(asin)
            if len(key) != ASIN_BYTES:
                raise ValueError(f"ASIN {asin!r} is not {ASIN_BYTES} bytes")
            fh.write(key)
            fh.write(np.asarray(vec, dtype="<f4").reshape(FEATURE_DIM).tobytes())


TINY = ["acquire.sample_users=40", "acquire.sample_items=30"]
FAST_DOWNLOAD = ["acquire.timeout=5", "acquire.retries=2"]


def vector(asin: str, salt: int = 0) -> np.ndarray:
    """A distinct, reproducible 4,096-d row per ASIN."""
    seed = int.from_bytes(hashlib.sha256(f"{asin}/{salt}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(FEATURE_DIM).astype(np.float32)


def foreign_asins(n: int) -> list[str]:
    return [f"X{i:09d}" for i in range(n)]


@pytest.fixture(scope="module")
def sample_items(tmp_path_factory) -> tuple[str, list[str]]:
    """The tiny sample's interactions (built once): its data root and item ASINs in item order."""
    root = tmp_path_factory.mktemp("a2014") / "data"
    cfg = load_config(None, {"data_root": str(root)}, TINY)
    result = run_pipeline(Context.create(cfg, progress=False), until="interactions")
    items = pd.read_parquet(result.artifact("interactions").file("items.parquet")).sort_values("item")
    return str(root), items["asin"].astype(str).tolist()


def _ctx(root, tmp_path, *settings: str) -> Context:
    """A fresh data root that shares the prebuilt acquire/interactions artifacts."""
    data = tmp_path / "data"
    shutil.copytree(root, data, symlinks=True)
    cfg = load_config(None, {"data_root": str(data)}, [*TINY, *FAST_DOWNLOAD, *settings])
    return Context.create(cfg, progress=False)


def _run_image_stage(ctx: Context):
    inter = run_pipeline(ctx, until="interactions").artifact("interactions")
    return run_image_features(ctx, inter)


def _dirty_file_rows(asins: list[str]) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """Most dataset items (in scrambled order) among foreign records, one repeated ASIN; returns rows, absent."""
    absent = asins[:3]
    present = asins[3:]
    rows = [(a, vector(a)) for a in foreign_asins(5)]
    rows += [(a, vector(a)) for a in reversed(present[1:])]
    rows.insert(2, (present[0], vector(present[0])))  # its first record...
    rows.append((present[0], vector(present[0], salt=1)))  # ...and a later repeat, ignored
    rows += [(a, vector(a)) for a in foreign_asins(8)[5:]]
    return rows, absent


# ------------------------------------------------------------------------------------- the stage
def test_stage_keeps_the_dataset_rows_and_mean_fills_the_rest(sample_items, tmp_path, http_server):
    root, asins = sample_items
    rows, absent = _dirty_file_rows(asins)
    path = tmp_path / "image_features_Baby.b"
    write_feature_file(path, rows)
    http_server.routes["/cf/image_features_Baby.b"] = range_route(path.read_bytes())
    url = http_server.url("/cf/image_features_Baby.b")
    ctx = _ctx(root, tmp_path, "image_features.source=amazon2014", f"image_features.amazon2014_url={url}")

    outcome = _run_image_stage(ctx)
    feats = np.load(outcome.artifact.file("image_feat.npy"))
    assert feats.shape == (len(asins), FEATURE_DIM) and feats.dtype == np.float32
    present = [i for i, a in enumerate(asins) if a not in absent]
    for i in present:
        np.testing.assert_array_equal(feats[i], vector(asins[i]))  # first record of a repeated ASIN
    mean = np.mean([vector(asins[i]).astype(np.float64) for i in present], axis=0).astype(np.float32)
    for i in range(3):
        np.testing.assert_allclose(feats[i], mean, rtol=1e-6, atol=1e-6)

    manifest = outcome.artifact.manifest
    assert manifest["source"] == "amazon2014" and manifest["url"] == url
    assert manifest["items_found"] == len(asins) - 3
    assert manifest["items_mean_filled"] == manifest["missing"] == 3
    assert manifest["missing_reasons"] == {ABSENT: 3}
    stats = manifest["file_stats"]
    assert stats["records"] == len(rows) and stats["duplicate_records"] == 1
    assert stats["records_kept"] == len(asins) - 3 and stats["truncated_tail_bytes"] == 0
    assert manifest["download"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    missing = pd.read_csv(outcome.artifact.file("missing_images.csv"))
    assert missing.to_dict("list") == {"item": [0, 1, 2], "asin": absent, "reason": [ABSENT] * 3}

    table = {r["statistic"]: r["value"] for r in image_coverage_rows(manifest)}
    assert table["items found"] == str(len(asins) - 3) and table["items filled (mean)"] == "3"

    again = _run_image_stage(ctx)
    assert again.cached and again.artifact.key == outcome.artifact.key
    assert http_server.hits["/cf/image_features_Baby.b"] == 1


def test_truncated_final_record_is_counted_and_ignored(sample_items, tmp_path, http_server):
    root, asins = sample_items
    path = tmp_path / "image_features_Baby.b"
    write_feature_file(path, [(a, vector(a)) for a in asins[1:]])
    body = path.read_bytes() + asins[0].encode() + vector(asins[0]).tobytes()[:1000]  # cut inside a record
    http_server.routes["/image_features_Baby.b"] = range_route(body)
    url = http_server.url("/image_features_Baby.b")
    ctx = _ctx(root, tmp_path, "image_features.source=amazon2014", f"image_features.amazon2014_url={url}")

    manifest = _run_image_stage(ctx).artifact.manifest
    assert manifest["file_stats"]["truncated_tail_bytes"] == 10 + 1000 == len(body) % RECORD_BYTES
    assert manifest["file_stats"]["records"] == len(asins) - 1
    assert manifest["items_found"] == len(asins) - 1 and manifest["missing_reasons"] == {ABSENT: 1}


def test_partial_download_resumes_with_a_range_request(sample_items, tmp_path, http_server):
    root, asins = sample_items
    path = tmp_path / "f.b"
    write_feature_file(path, [(a, vector(a)) for a in asins])
    body = path.read_bytes()
    http_server.routes["/image_features_Baby.b"] = range_route(body)
    ctx = _ctx(root, tmp_path, "image_features.source=amazon2014",
               f"image_features.amazon2014_url={http_server.url('/image_features_Baby.b')}")
    downloads = ctx.store.data_root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    half = len(body) // 2
    (downloads / "image_features_Baby.b.part").write_bytes(body[:half])  # left by a killed run

    manifest = _run_image_stage(ctx).artifact.manifest
    assert range_headers(http_server) == [f"bytes={half}-"]
    assert (downloads / "image_features_Baby.b").read_bytes() == body
    assert manifest["items_found"] == len(asins) and manifest["missing"] == 0


def test_local_file_is_read_in_place_and_hashed(sample_items, tmp_path):
    root, asins = sample_items
    path = tmp_path / "mirror" / "image_features_Baby.b"
    path.parent.mkdir()
    write_feature_file(path, [(a, vector(a)) for a in asins])
    ctx = _ctx(root, tmp_path, "image_features.source=amazon2014", f"image_features.amazon2014_url={path}")
    outcome = _run_image_stage(ctx)
    manifest = outcome.artifact.manifest
    assert manifest["download"] is None and manifest["file"] == str(path)
    assert manifest["file_stats"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not (ctx.store.data_root / "downloads" / path.name).exists()  # no multi-GB copy

    # an edited file is a new input: a new artifact, not the stale one
    write_feature_file(path, [(a, vector(a, salt=2)) for a in asins])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    edited = _run_image_stage(ctx)
    assert not edited.cached and edited.artifact.key != outcome.artifact.key
    np.testing.assert_array_equal(np.load(edited.artifact.file("image_feat.npy"))[0], vector(asins[0], salt=2))


@pytest.mark.slow
def test_cnn_and_amazon2014_artifacts_never_share_a_key(sample_items, tmp_path):
    root, asins = sample_items
    path = tmp_path / "image_features_Baby.b"
    write_feature_file(path, [(a, vector(a)) for a in asins])
    ctx = _ctx(root, tmp_path, f"image_features.amazon2014_url={path}")
    cnn = _run_image_stage(ctx)
    assert cnn.artifact.manifest["source"] == "encoded"
    cfg = ctx.cfg.model_copy(update={"image_features": ctx.cfg.image_features.model_copy(
        update={"source": "amazon2014"})})
    shipped = _run_image_stage(Context.create(cfg, progress=False))
    assert not shipped.cached and shipped.artifact.key != cnn.artifact.key
    assert shipped.artifact.manifest["source"] == "amazon2014"


def test_dataset_without_a_2014_category_needs_an_explicit_file(sample_items, tmp_path):
    root, _ = sample_items
    ctx = _ctx(root, tmp_path, "image_features.source=amazon2014")
    with pytest.raises(ConfigError, match=r"dataset 'sample' is not an Amazon 2014 category.*amazon2014_url"):
        _run_image_stage(ctx)


# ------------------------------------------------------------------------------------- the reader
def test_chunk_size_does_not_change_the_result(tmp_path):
    asins = foreign_asins(40)
    wanted = asins[::3] + ["Q000000000"]  # the last one is in no record
    path = tmp_path / "f.b"
    write_feature_file(path, [(a, vector(a)) for a in asins] + [(asins[3], vector("dup"))])
    whole = read_item_features(path, wanted, chunk_records=1024)
    for chunk in (1, 3, 7):
        part = read_item_features(path, wanted, chunk_records=chunk)
        np.testing.assert_array_equal(part.features, whole.features)
        assert part.stats == whole.stats and part.missing.equals(whole.missing)
    assert whole.stats.duplicate_records == 1 and whole.items_found == len(wanted) - 1


def test_nonfinite_rows_and_unreadable_records_are_counted(tmp_path):
    asins = foreign_asins(20)
    bad = vector(asins[5])
    bad[7] = np.nan
    rows = [(a, vector(a)) for a in asins]
    rows[5] = (asins[5], bad)
    rows[17] = (b"\x00" * 10, vector("garbage"))  # a damaged record far from the start
    path = tmp_path / "f.b"
    write_feature_file(path, rows)
    out = read_item_features(path, asins, fill="zeros")
    assert out.stats.unreadable_records == 1 and out.stats.nonfinite_records == 1
    assert out.missing.set_index("item")["reason"].to_dict() == {5: NONFINITE, 17: ABSENT}
    assert not out.features[[5, 17]].any()  # zero-filled


@pytest.mark.parametrize("floats", [2048, 4097])
def test_a_file_of_another_record_width_is_one_clear_error(tmp_path, floats):
    path = tmp_path / "image_features_Odd.b"
    with open(path, "wb") as fh:
        for a in foreign_asins(6):
            fh.write(a.encode() + np.abs(vector(a))[:1].repeat(floats).astype("<f4").tobytes())
    with pytest.raises(DataError) as err:
        read_item_features(path, foreign_asins(6))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and f"{RECORD_BYTES} bytes" in message


@pytest.mark.parametrize("body", [b"", b"B000000001" + b"\x00" * 100])
def test_a_file_shorter_than_one_record_is_one_clear_error(tmp_path, body):
    path = tmp_path / "short.b"
    path.write_bytes(body)
    with pytest.raises(DataError, match=rf"short\.b: .*less than one record of {RECORD_BYTES} bytes"):
        read_item_features(path, ["B000000001"])


def test_a_file_without_any_dataset_item_names_the_likely_cause(tmp_path):
    path = tmp_path / "image_features_Beauty.b"
    write_feature_file(path, [(a, vector(a)) for a in foreign_asins(4)])
    with pytest.raises(DataError, match=r"none of the dataset's 2 items.*category"):
        read_item_features(path, ["B000000001", "B000000002"])


# ------------------------------------------------------------------------------------- grid defaults
@pytest.mark.parametrize(
    ("options", "settings", "preset", "expected"),
    [
        ({"acquire.dataset": "baby"}, [], "table2", "amazon2014"),
        ({"acquire.dataset": "clothing"}, [], "sensitivity-tau", "amazon2014"),
        ({"acquire.dataset": "Beauty", "acquire.format": "amazon2014"}, [], "ablations", "amazon2014"),
        ({"acquire.dataset": "baby", "image_features.source": "cnn"}, [], "table2", "cnn"),  # --image-source
        ({"acquire.dataset": "baby"}, ["image_features.source=cnn"], "table3", "cnn"),  # --set
        ({"acquire.dataset": "baby"}, [], None, "cnn"),  # --axis only
        ({"acquire.dataset": "baby", "acquire.format": "amazon2023"}, [], "table2", "cnn"),
        ({"acquire.dataset": "sample"}, [], "table2", "cnn"),
    ],
)
def test_paper_presets_read_the_release_features_on_2014_datasets(options, settings, preset, expected):
    cfg = with_paper_inputs(load_config(None, options, settings), preset)
    assert cfg.image_features.source == expected


def test_config_file_choice_of_image_source_is_kept_by_grids(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("acquire: {dataset: baby}\nimage_features: {source: cnn}\n")
    assert with_paper_inputs(load_config(path), "table2").image_features.source == "cnn"


# ------------------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_cli_wrong_width_file_is_one_line_and_exit_2(prefect_server, tmp_path):
    path = tmp_path / "image_features_Odd.b"
    with open(path, "wb") as fh:
        for a in foreign_asins(4):
            fh.write(a.encode() + vector(a)[:2048].tobytes())
    exe = shutil.which("sand", path=os.path.dirname(sys.executable)) or "sand"
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "SAND_LOG_LEVEL": "WARNING"}
    args = ["stage", "image_features", "--data-root", str(tmp_path / "data"), "--image-source", "amazon2014",
            "--set", f"image_features.amazon2014_url={path}", *(x for s in TINY for x in ("--set", s))]
    out = subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(path) in errors[0] and f"{RECORD_BYTES} bytes" in errors[0]
    assert out.stdout.strip() == ""  # nothing on stdout on an error


@pytest.mark.slow
def test_prefect_ui_shows_the_coverage(prefect_server, sample_items, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from sand.flows.pipeline_flows import STAGE_FLOWS, RunOptions

    root, asins = sample_items
    path = tmp_path / "image_features_Baby.b"
    write_feature_file(path, [(a, vector(a)) for a in asins[2:]])
    ctx = _ctx(root, tmp_path, "image_features.source=amazon2014", f"image_features.amazon2014_url={path}")
    STAGE_FLOWS["image_features"](config=ctx.cfg, options=RunOptions())
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sand-image-feature-coverage"])),
            limit=1, sort="CREATED_DESC",
        )
    table = artifact.data if isinstance(artifact.data, list) else json.loads(artifact.data)
    shown = {row["statistic"]: row["value"] for row in table}
    assert shown["items found"] == str(len(asins) - 2) and shown["items filled (mean)"] == "2"
    assert shown[ABSENT.replace("_", " ")] == "2"


@pytest.mark.slow
def test_cli_unnamed_feature_file_fails_before_any_stage_runs(tmp_path):
    root = tmp_path / "data"
    out = subprocess.run(
        [sys.executable, "-m", "sand.flows.cli", "run", "--image-source", "amazon2014", "--data-root", str(root)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"},
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "image_features.amazon2014_url" in lines[0] and "'sample'" in lines[0]
    assert not (root / "artifacts").exists()  # nothing acquired, nothing downloaded
