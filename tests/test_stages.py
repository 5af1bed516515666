"""Stages over an MMRec folder that holds only interactions: ID-only models train, multimodal
models name the missing feature file."""

from __future__ import annotations

import numpy as np
import pytest

from sand.pipeline.base.config import load_config
from sand.pipeline.base.errors import StageError
from sand.pipeline.runner import run_pipeline
from sand.pipeline.stages import Context


@pytest.fixture
def inter_only_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "tiny"
    folder.mkdir()
    lines = ["userID\titemID\tx_label"]
    for user in range(30):
        items = rng.choice(25, 8, replace=False)
        labels = [0] * 6 + [1, 2]
        lines += [f"{user}\t{item}\t{label}" for item, label in zip(items, labels, strict=True)]
    (folder / "tiny.inter").write_text("\n".join(lines) + "\n")
    return folder


def _run(folder, root, *settings):
    cfg = load_config(None, {"data_root": str(root), "acquire.dataset": str(folder)}, list(settings))
    return run_pipeline(Context.create(cfg, progress=False))


def test_id_only_model_trains_on_interactions_alone(inter_only_folder, tmp_path):
    result = _run(inter_only_folder, tmp_path / "data", "train.model=lightgcn", "train.epochs=2")
    summary = result.summary()
    assert "text_features" not in summary["stages"] and "graphs" not in summary["stages"]
    assert summary["dataset"]["users"] == 30 and summary["dataset"]["valid"] == 30
    assert set(summary["metrics"]) == {"valid", "test"}


def test_multimodal_model_names_the_missing_feature_file(inter_only_folder, tmp_path):
    with pytest.raises(StageError, match=r"model 'sand' needs text features.*tiny has no text_feat\.npy"):
        _run(inter_only_folder, tmp_path / "data", "train.model=sand", "train.epochs=1")


# ---------------------------------------------------------------------------- acquire of local file:// sources


def _raw_2014(folder, n_users=8):
    import gzip
    import json

    folder.mkdir(parents=True, exist_ok=True)
    reviews = [json.dumps({"reviewerID": f"U{u}", "asin": f"B{i}", "overall": 4.0, "unixReviewTime": 1_300_000_000,
                           "helpful": [0, 0]}) for u in range(n_users) for i in range(3)]
    meta = [repr({"asin": f"B{i}", "title": f"item {i}", "categories": [["Baby"]]}) for i in range(3)]
    (folder / "reviews_Mine_5.json.gz").write_bytes(gzip.compress(("\n".join(reviews) + "\n").encode()))
    (folder / "meta_Mine.json.gz").write_bytes(gzip.compress(("\n".join(meta) + "\n").encode()))
    return folder / "reviews_Mine_5.json.gz", folder / "meta_Mine.json.gz"


@pytest.mark.parametrize("form", ["file:///{p}", "file://localhost/{p}"])
def test_edited_file_url_source_is_acquired_again(tmp_path, form):
    from urllib.parse import quote

    from sand.pipeline.acquire.stage import run_acquire

    reviews, meta = _raw_2014(tmp_path / "my dumps")
    url = form.format(p=quote(str(reviews).lstrip("/")))
    assert "%20" in url
    settings = [f"acquire.reviews={url}", f"acquire.meta={meta.as_uri()}"]
    cfg = load_config(None, {"data_root": str(tmp_path / "data"), "acquire.dataset": "mine"}, settings)

    def acquire():
        outcome = run_acquire(Context.create(cfg, progress=False))
        return outcome, outcome.artifact.file(outcome.artifact.manifest["files"]["reviews"]).read_bytes()

    first, first_bytes = acquire()
    again, _ = acquire()
    assert not first.cached and again.cached and again.artifact.key == first.artifact.key
    _raw_2014(tmp_path / "my dumps", n_users=12)  # the user edits the file in place
    edited, edited_bytes = acquire()
    assert not edited.cached and edited.artifact.key != first.artifact.key
    assert edited_bytes == reviews.read_bytes() != first_bytes


def test_out_of_range_ratings_are_counted_in_the_interactions_manifest(tmp_path, caplog):
    import gzip

    from sand.pipeline.acquire.stage import run_acquire
    from sand.pipeline.dataset.stage import run_interactions

    reviews, meta = _raw_2014(tmp_path / "raw")
    lines = gzip.decompress(reviews.read_bytes()).decode().splitlines()
    lines[1] = lines[1].replace('"overall": 4.0', '"overall": 7.0')
    lines[2] = lines[2].replace('"overall": 4.0', '"overall": 0')
    reviews.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    settings = [f"acquire.reviews={reviews}", f"acquire.meta={meta}", "interactions.k_core=1"]
    cfg = load_config(None, {"data_root": str(tmp_path / "data"), "acquire.dataset": "mine"}, settings)
    ctx = Context.create(cfg, progress=False)
    with caplog.at_level("WARNING"):
        inter = run_interactions(ctx, run_acquire(ctx).artifact).artifact
    skipped = inter.manifest["skipped"]["reviews"]
    assert skipped["counts"] == {"overall out of range 1..5": 2} and skipped["records"] == len(lines) - 2
    assert "skipped 2 (2 overall out of range 1..5)" in caplog.text
    assert inter.manifest["stats"]["raw_reviews"] == len(lines) - 2


# ---------------------------------------------------------------------------- the stage table


def test_every_row_names_a_run_function_that_takes_its_inputs():
    """A row and its function agree: the runner calls ``fn(ctx, **row.inputs, ...)`` by name."""
    import inspect

    from sand.pipeline.base.config import PipelineConfig
    from sand.pipeline.stages import STAGE_TABLE

    seen: list[str] = []
    for row in STAGE_TABLE:
        params = list(inspect.signature(row.function).parameters)
        expected = ["ctx", *row.inputs, *(["feature_arts"] if row.reads_model_features else []),
                    *(["map_shards"] if row.sharded else [])]
        assert params == expected, f"{row.name}: {row.run} takes {params}, the row says {expected}"
        assert row.section in PipelineConfig.model_fields, f"{row.name}: no config section {row.section!r}"
        assert all(source in seen for source in row.inputs.values()), f"{row.name} reads a later stage"
        seen.append(row.name)


def test_upstream_resolution_builds_only_what_a_stage_reads(tmp_path):
    """``sand stage image_features`` needs acquire and interactions, not the text features."""
    from sand.pipeline.runner import planned_stages, resolve_upstream, upstream_stages
    from sand.pipeline.stages import STAGE_VERSIONS

    cfg = load_config(None, {"data_root": str(tmp_path)}, ["acquire.sample_users=30", "acquire.sample_items=20"])
    assert upstream_stages(cfg, "image_features") == ["acquire", "interactions"]
    assert upstream_stages(cfg, "evaluate") == planned_stages(cfg, "train")
    bpr = cfg.model_copy(update={"train": cfg.train.model_copy(update={"model": "bpr"})})
    assert upstream_stages(bpr, "evaluate") == ["acquire", "interactions", "train"]
    assert upstream_stages(cfg, "report") == []

    ctx = Context.create(cfg, refresh=["acquire"], progress=False)
    done = resolve_upstream(ctx, "image_features")
    assert list(done) == ["acquire", "interactions"]
    assert not (tmp_path / "artifacts" / "text_features").exists()
    # the stage helper stamps each artifact with its row's version
    assert all(o.artifact.manifest["version"] == STAGE_VERSIONS[s] for s, o in done.items())
    # upstream is never refreshed: --refresh applies to the named stage only
    assert all(o.cached for o in resolve_upstream(ctx, "image_features").values())


def test_a_stage_without_its_upstream_outcomes_fails_naming_them(tmp_path):
    from sand.pipeline.runner import run_stage

    cfg = load_config(None, {"data_root": str(tmp_path)}, [])
    with pytest.raises(StageError, match="needs the outcome of acquire"):
        run_stage(Context.create(cfg, progress=False), "interactions", {})


def test_unknown_stage_names_are_one_line_config_errors():
    from sand.pipeline.base.errors import ConfigError
    from sand.pipeline.runner import planned_stages
    from sand.pipeline.stages import STAGE_NAMES, check_stage_names

    with pytest.raises(ConfigError, match=r"unknown stage 'trian': choose one of acquire, interactions"):
        check_stage_names([None, "train", "trian"])
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        planned_stages(load_config(None, {}, []), "nope")
    check_stage_names([None, *STAGE_NAMES])


@pytest.mark.parametrize("args", [
    ["run", "--until", "trian"], ["run", "--refresh", "grpahs"], ["stage", "evalute"],
])
def test_bad_stage_names_answer_before_prefect_or_torch_is_imported(tmp_path, args):
    """A typo costs well under a second: it is rejected from the stage table alone."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from sand.flows import cli\n"
        f"sys.argv = ['sand', *{args!r}, '--data-root', {str(tmp_path / 'data')!r}]\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit as done:\n"
        "    heavy = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'torch', 'transformers'})\n"
        "    print(json.dumps({'code': done.code, 'heavy': heavy}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"code": 2, "heavy": []}, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: unknown stage ")
    assert not (tmp_path / "data").exists()  # nothing was created before the answer
