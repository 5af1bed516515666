"""The columnar (chunked, bounded-memory) interactions path equals the per-line reference path.

The oracle is the original implementation, kept in the code base:
``build_interactions(read_reviews(...), read_meta(...))``. Generated dumps in the three
raw formats, with duplicates, dirty lines of every kind the readers count, and several
chunk sizes (so clean and dirty chunks mix), must give identical tables, stats and skip
reports under every k-core / split variant.
"""

from __future__ import annotations

import gzip

import numpy as np
import orjson
import pandas as pd
import pytest

from sand.pipeline.base.errors import DataError
from sand.pipeline.dataset.columnar import _has_nan_or_inf_token, interactions_from_dumps, read_review_columns
from sand.pipeline.dataset.interactions import build_interactions
from sand.pipeline.dataset.readers import read_meta, read_reviews

REVIEW_KEYS = {
    "amazon2014": ("reviewerID", "asin", "overall", "unixReviewTime", 1),
    "amazon2018": ("reviewerID", "asin", "overall", "unixReviewTime", 1),
    "amazon2023": ("user_id", "parent_asin", "rating", "timestamp", 1000),
}

# Lines the readers must skip and count (or, for the last few, read like any clean line),
# each of them a case where Arrow's JSON parser and orjson could disagree.
DIRTY_REVIEW_LINES = [
    b"{not json",
    b"[1, 2, 3]",
    b"null",
    b"{}",
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": NaN, "%(t)s": 5}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": 5, "%(t)s": 5, "x": Infinity}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": 5, "%(t)s": 5, "x": [1, - Infinity]}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": 5, "%(t)s": 5, "x": "\xff"}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": 5, "%(t)s": 5, "x": "\\ud800"}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": 5, "%(t)s": 5} {"%(u)s": "U2", "%(i)s": "I2", "%(r)s": 5, "%(t)s": 5}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": 5, "%(t)s": 5}\r{"%(u)s": "U2", "%(i)s": "I2", "%(r)s": 5, "%(t)s": 5}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": 5, "%(t)s": 5, "x": ' + b"[" * 1100 + b"]" * 1100 + b"}",
    b'{"%(u)s": "   ", "%(i)s": "I1", "%(r)s": 5, "%(t)s": 5}',
    b'{"%(u)s": "", "%(i)s": "I1", "%(r)s": 5, "%(t)s": 5}',
    b'{"%(u)s": "U1", "%(i)s": null, "%(r)s": 5, "%(t)s": 5}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": true, "%(t)s": 5}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": "five", "%(t)s": 5}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": 5, "%(t)s": -3}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": 5, "%(t)s": 1.5}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": 5, "%(t)s": 99999999999999999999999}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": 5, "%(t)s": "soon"}',
    b'{"%(u)s": "U1", "%(u)s": "U9", "%(i)s": "I1", "%(r)s": 5, "%(t)s": 5}',
    # read, not skipped, by the per-line rules: the fast path must hand them over intact
    b"",
    b"   ",
    b'{"%(u)s": 12345, "%(i)s": "I1", "%(r)s": 4, "%(t)s": 7}',
    b'{"%(u)s": " U1", "%(i)s": "I1", "%(r)s": "4.5", "%(t)s": "7000"}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": 0, "%(t)s": 7000.0}',
    b'{"%(u)s": "\\u00e9U", "%(i)s": "I\\u00e9", "%(r)s": 3, "%(t)s": 7000}',
    b'{"%(u)s": "U1", "%(i)s": "I1", "%(r)s": 40, "%(t)s": 7000}',
]


def _review_line(fmt: str, user: str, item: str, rating: float, stamp: int, rng: np.random.Generator) -> bytes:
    ukey, ikey, rkey, tkey, _ = REVIEW_KEYS[fmt]
    rec = {ukey: user, ikey: item, rkey: rating, tkey: stamp}
    if fmt == "amazon2023":
        rec.update(
            asin=item + "X",
            title="nice",
            text="a b " * int(rng.integers(0, 5)),
            images=[],
            helpful_vote=0,
            verified_purchase=True,
        )
    else:
        rec.update(reviewText="ok", summary="fine", helpful=[0, 0])
    return orjson.dumps(rec)


def write_dumps(tmp_path, fmt: str, seed: int, n: int = 3000, dirty: bool = True) -> tuple:
    """A power-law review dump with re-reviews and (optionally) every dirty-line kind, plus its meta."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(n // 6, 10), max(n // 15, 10)
    users = (n_users * rng.random(n) ** 2).astype(int)
    items = (n_items * rng.random(n) ** 2.5).astype(int)
    redo = rng.integers(0, n, n // 20)
    users, items = np.r_[users, users[redo]], np.r_[items, items[redo]]
    scale = REVIEW_KEYS[fmt][4]
    lines = [
        _review_line(
            fmt,
            f"U{u:05d}",
            f"I{i:05d}",
            float(rng.integers(1, 6)) if rng.random() < 0.5 else int(rng.integers(1, 6)),
            int(rng.integers(1_000_000, 1_000_400)) * scale,  # few distinct stamps: ties in dedup
            rng,
        )
        for u, i in zip(users, items, strict=True)
    ]
    if dirty:
        ukey, ikey, rkey, tkey, _ = REVIEW_KEYS[fmt]
        keys = {b"u": ukey.encode(), b"i": ikey.encode(), b"r": rkey.encode(), b"t": tkey.encode()}
        for bad in DIRTY_REVIEW_LINES:
            line = bad
            for short, key in keys.items():
                line = line.replace(b"%(" + short + b")s", key)
            lines.insert(int(rng.integers(0, len(lines))), line)
    reviews = tmp_path / f"reviews-{fmt}-{seed}.json.gz"
    reviews.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    meta_lines = []
    for i in rng.permutation(n_items)[: int(n_items * 0.9)]:  # some items have no metadata
        asin = f"I{i:05d}"
        if fmt == "amazon2014":
            rec = {"asin": asin, "title": f"t{i}", "categories": [["Baby", f"c{i % 3}"]], "imUrl": f"http://x/{i}.jpg"}
            meta_lines.append(repr(rec).encode())
        elif fmt == "amazon2018":
            rec = {"asin": asin, "title": f"t{i}", "category": ["Baby"], "feature": ["f"], "imageURL": [f"u{i}"]}
            meta_lines.append(orjson.dumps(rec))
        else:
            images = [{"thumb": f"t{i}", "large": f"l{i}", "hi_res": None, "variant": "MAIN"}]
            rec = {"parent_asin": asin, "title": f"t{i}", "store": "s", "categories": ["Baby"], "images": images}
            meta_lines.append(orjson.dumps(rec))
        if rng.random() < 0.05:  # duplicated asin: the first record wins
            meta_lines.append(meta_lines[-1].replace(b"t%d" % i, b"second"))
    if dirty:
        meta_lines[3:3] = [b"{broken", b"__import__('os').system('echo pwned')", b"[1]", b'{"title": "no asin"}']
    meta = tmp_path / f"meta-{fmt}-{seed}.json.gz"
    meta.write_bytes(gzip.compress(b"\n".join(meta_lines) + b"\n"))
    return reviews, meta


def reference(reviews, meta, fmt, **options):
    df, report_r = read_reviews(reviews, fmt, max_bad_lines=options.pop("max_bad_lines", 100))
    table, report_m = read_meta(meta, fmt) if meta is not None else (None, None)
    reports = {"reviews": report_r} if meta is None else {"reviews": report_r, "meta": report_m}
    return build_interactions(df, table, **options), reports


def assert_same(got, want) -> None:
    (res, reports), (ref, ref_reports) = got, want
    for name in ("interactions", "items", "user_map", "item_map"):
        pd.testing.assert_frame_equal(getattr(res, name), getattr(ref, name), check_exact=True)
    assert res.stats == ref.stats
    assert {k: r.to_dict() for k, r in reports.items()} == {k: r.to_dict() for k, r in ref_reports.items()}


@pytest.mark.parametrize("fmt", ["amazon2014", "amazon2018", "amazon2023"])
@pytest.mark.parametrize(("chunk_lines", "seed"), [(64, 0), (1000, 1), (100_000, 2)])
def test_columnar_equals_per_line_reference(tmp_path, fmt, chunk_lines, seed):
    reviews, meta = write_dumps(tmp_path, fmt, seed)
    got = interactions_from_dumps(reviews, meta, fmt, seed=seed, chunk_lines=chunk_lines)
    assert_same(got, reference(reviews, meta, fmt, seed=seed))
    assert got[1]["reviews"].total > 10 and got[1]["meta"].total == 4  # the dirty lines were seen


@pytest.mark.parametrize(
    ("k_core", "split_rule"),
    [(5, "mmrec"), (5, "mmrec-notebook"), (3, "chronological"), (0, "mmrec"), (1, "chronological")],
)
def test_columnar_equals_reference_for_every_kcore_and_split(tmp_path, k_core, split_rule):
    reviews, meta = write_dumps(tmp_path, "amazon2023", seed=7, n=5000)
    options = {"k_core": k_core, "split_rule": split_rule, "seed": 3}
    got = interactions_from_dumps(reviews, meta, "amazon2023", chunk_lines=500, **options)
    assert_same(got, reference(reviews, meta, "amazon2023", **options))


def test_columnar_without_meta(tmp_path):
    reviews, _ = write_dumps(tmp_path, "amazon2018", seed=4)
    assert_same(interactions_from_dumps(reviews, None, "amazon2018"), reference(reviews, None, "amazon2018"))


def test_clean_chunks_take_the_fast_path_and_dirty_ones_the_per_line_rules(tmp_path):
    clean, _ = write_dumps(tmp_path, "amazon2023", seed=5, dirty=False)
    cols = read_review_columns(clean, "amazon2023", chunk_lines=500)
    assert cols.chunks["per-line"] == 0 and cols.chunks["fast"] >= 6
    dirty, _ = write_dumps(tmp_path, "amazon2023", seed=6)
    cols = read_review_columns(dirty, "amazon2023", chunk_lines=50)
    assert cols.chunks["per-line"] >= 1 and cols.chunks["fast"] >= 1
    # No Python object per review: codes and numbers are numpy arrays, ids Arrow strings.
    assert cols.user_codes.dtype == np.int64 and cols.rating.dtype == np.float32
    assert len(cols.users) < len(cols)


def test_bad_line_budget_fails_with_the_same_message(tmp_path):
    reviews, _ = write_dumps(tmp_path, "amazon2014", seed=8)
    with pytest.raises(DataError) as ref:
        read_reviews(reviews, "amazon2014", max_bad_lines=5)
    with pytest.raises(DataError) as got:
        read_review_columns(reviews, "amazon2014", max_bad_lines=5, chunk_lines=128)
    assert str(got.value) == str(ref.value) and "more than 5 bad lines" in str(got.value)


def test_truncated_gzip_fails_like_the_per_line_reader(tmp_path):
    reviews, _ = write_dumps(tmp_path, "amazon2018", seed=9, dirty=False)
    cut = tmp_path / "cut.json.gz"
    cut.write_bytes(reviews.read_bytes()[:-200])
    with pytest.raises(DataError) as ref:
        read_reviews(cut, "amazon2018")
    with pytest.raises(DataError) as got:
        read_review_columns(cut, "amazon2018", chunk_lines=256)
    assert str(got.value) == str(ref.value) and "truncated gzip" in str(got.value)


def test_nan_token_check_tells_values_from_words():
    assert _has_nan_or_inf_token(b'{"a": NaN}') and _has_nan_or_inf_token(b'{"a": [1,\n -Infinity]}')
    assert not _has_nan_or_inf_token(b'{"text": "Infant seat and NaNa brand", "b": "x Inf"}')
