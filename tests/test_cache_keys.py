"""Artifact keys hold everything that changes a result; only proven speed knobs are left out.

A field in ``PERFORMANCE_FIELDS`` must come with a test here showing the same artifact
(same key, same bytes) under a changed value; the others (batch and block sizes, devices,
the ks a training run reports) are part of their stage's key.
"""

from __future__ import annotations

import pytest

from sand.models.registry import MODELS
from sand.pipeline.base.config import PipelineConfig, TrainConfig, load_config
from sand.pipeline.base.hardware import cpu_bf16_support
from sand.pipeline.features.image_stage import image_settings
from sand.pipeline.runner import run_pipeline
from sand.pipeline.stage_context import PERFORMANCE_FIELDS, key_params
from sand.pipeline.stages import Context
from sand.pipeline.training.stage import run_train, train_key_params

TINY = ["acquire.sample_users=40", "acquire.sample_items=30", "image_features.image_size=32",
        "image_features.shard_size=8"]

#: field -> (section, baseline value, another value): both must give the same artifact bytes.
SAME_RESULT = {
    "num_workers": ("image_features", 0, 2),
    "concurrency": ("image_features", 1, 16),
}
BASELINE = [f"{section}.{field}={a}" for field, (section, a, _) in SAME_RESULT.items()]


def _image_artifact(root, *settings):
    cfg = load_config(None, {"data_root": str(root)}, [*TINY, *settings])
    result = run_pipeline(Context.create(cfg, progress=False), until="image_features")
    return result.artifact("image_features")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    return root, _image_artifact(root, *BASELINE)


@pytest.mark.parametrize("field", sorted(PERFORMANCE_FIELDS))
def test_performance_field_changes_no_byte(field, baseline, tmp_path):
    assert field in SAME_RESULT, f"{field} is left out of keys without a test that it changes no result"
    section, _, other = SAME_RESULT[field]
    base_root, first = baseline
    second = _image_artifact(tmp_path, *BASELINE, f"{section}.{field}={other}")
    assert first.manifest["shards"] > 1  # the parallel path, over several shards
    files = sorted(p.name for p in first.path.iterdir() if p.name != "manifest.json")
    assert files == sorted(p.name for p in second.path.iterdir() if p.name != "manifest.json")
    for name in files:  # the sample's image URLs name their data root: compare with it masked
        masked = [(art.path / name).read_bytes().replace(str(root).encode(), b"ROOT")
                  for art, root in ((first, base_root), (second, tmp_path))]
        assert masked[0] == masked[1], name


@pytest.mark.parametrize(
    "dotted, value",
    [
        ("train.batch_size", 64),
        ("evaluate.batch_users", 7),
        ("graphs.block_size", 5),
        ("image_features.batch_size", 4),
        ("image_features.engine", "eager"),
        # the precision auto does not resolve to on this machine (bf16 only where it is native)
        ("image_features.precision", "fp32" if cpu_bf16_support() else "bf16"),
        ("text_features.batch_size", 8),
        ("evaluate.ks", [5, 100]),  # train reports metrics at these ks
    ],
)
def test_fields_that_change_results_change_the_key(dotted, value, tmp_path):
    base = load_config(None, {"data_root": str(tmp_path)})
    changed = load_config(None, {"data_root": str(tmp_path)}, [f"{dotted}={value}"])
    assert _stage_params(base, dotted) != _stage_params(changed, dotted)


def _stage_params(cfg: PipelineConfig, dotted: str) -> dict:
    ctx = Context.create(cfg, progress=False)
    section = dotted.split(".")[0]
    if section == "image_features":
        return image_settings(ctx, None)
    if section == "train" or dotted == "evaluate.ks":
        captured = {}

        class _Stop(Exception):
            pass

        def fake_run(stage, version, params, inputs, build, refresh=False):
            captured.update(params)
            raise _Stop

        ctx.store.run = fake_run
        with pytest.raises(_Stop):
            run_train(ctx, _FakeArtifact(), {})
        return captured
    return key_params(getattr(ctx.cfg, section))


class _FakeArtifact:
    key = "inputs"


def test_device_enters_the_key_as_the_resolved_type():
    import torch

    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert train_key_params(TrainConfig())["device"] == here
    assert train_key_params(TrainConfig(device="cuda:1"))["device"] == "cuda"
    assert train_key_params(TrainConfig(device="cpu"))["device"] == "cpu"


def test_the_profile_is_part_of_the_train_key():
    """A fast-profile run never serves (or resumes) a paper-protocol run, nor the other way round."""
    default, fast = TrainConfig(), TrainConfig(profile="fast")
    assert "profile" not in train_key_params(default)
    assert train_key_params(fast)["profile"] == "fast"
    assert (train_key_params(fast)["batch_size"], train_key_params(fast)["lr"]) == (8192, 2e-4)
    assert train_key_params(fast) != train_key_params(TrainConfig(batch_size=8192, lr=2e-4))


def test_default_training_keys_did_not_move_with_the_profiles():
    """The default batch size is resolved into the key, so runs stored before profiles keep their keys."""
    assert train_key_params(TrainConfig()) == train_key_params(TrainConfig(batch_size=2048))
    assert train_key_params(TrainConfig())["batch_size"] == 2048 and train_key_params(TrainConfig())["lr"] is None


def test_a_model_fix_retrains_that_model_alone():
    """A model's revision (bumped by a fix that changes what it computes) enters its train key and no other's, so
    stored runs of the unchanged models stay served. FREEDOM+SAND is at revision 1 (the scoring fusion's scale)."""
    for name, spec in MODELS.items():
        params = train_key_params(TrainConfig(model=name))
        assert params.get("model_revision") == (spec.revision or None), name
    assert train_key_params(TrainConfig(model="freedom-sand"))["model_revision"] == 1
    assert "model_revision" not in train_key_params(TrainConfig(model="freedom"))
