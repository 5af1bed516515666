"""Tests of the bundled offline sample generator.

They read the generated files the way the pipeline would (json, ast.literal_eval,
PIL) and check the promises made to the rest of the pipeline: determinism, the
2014 format, the sizes after a 5-core, the planted dirt, and that the planted
preference structure is real and visible in the content.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from sand.pipeline.acquire.bundled_sample import COLOURS, MATERIALS, SHAPES, TYPES, generate_sample
from sand.pipeline.base.errors import ConfigError

SMALL = {"n_users": 120, "n_items": 60}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return generate_sample(tmp_path_factory.mktemp("sample"), seed=7)


def _read_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def _reviews(path: Path) -> tuple[list[dict], list[int]]:
    """Parsed reviews and the 1-based numbers of lines that are not JSON."""
    good, bad = [], []
    for n, line in enumerate(_read_lines(path), start=1):
        try:
            good.append(json.loads(line))
        except json.JSONDecodeError:
            bad.append(n)
    return good, bad


def _meta(path: Path) -> dict[str, dict]:
    return {m["asin"]: m for m in (ast.literal_eval(line) for line in _read_lines(path))}


def _five_core(pairs: set[tuple[str, str]], k: int = 5) -> set[tuple[str, str]]:
    while True:
        users = Counter(u for u, _ in pairs)
        items = Counter(i for _, i in pairs)
        kept = {(u, i) for u, i in pairs if users[u] >= k and items[i] >= k}
        if kept == pairs:
            return kept
        pairs = kept


def _digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_sample(tmp_path / "a", seed=3, **SMALL)
    first = _digests(tmp_path / "a")
    generate_sample(tmp_path / "a", seed=3, **SMALL)
    assert _digests(tmp_path / "a") == first
    assert len(first) > 50

    # Another directory: only the file:// prefix in the metadata may differ.
    b = generate_sample(tmp_path / "b", seed=3, **SMALL)
    assert b.reviews.read_bytes() == a.reviews.read_bytes()
    meta_a = gzip.decompress(a.meta.read_bytes()).replace(a.images_dir.as_uri().encode(), b"IMG")
    meta_b = gzip.decompress(b.meta.read_bytes()).replace(b.images_dir.as_uri().encode(), b"IMG")
    assert meta_a == meta_b
    assert _digests(a.images_dir) == _digests(b.images_dir)
    assert a.truth == b.truth

    c = generate_sample(tmp_path / "c", seed=4, **SMALL)
    assert c.reviews.read_bytes() != a.reviews.read_bytes()
    assert _digests(c.images_dir) != _digests(a.images_dir)


def test_gzip_header_has_no_time_or_name(sample):
    for path in (sample.reviews, sample.meta):
        head = path.read_bytes()[:10]
        assert head[:2] == b"\x1f\x8b"
        assert head[4:8] == b"\x00\x00\x00\x00"  # mtime
        assert head[3] & 0x08 == 0  # FNAME flag


def test_reviews_follow_the_2014_format(sample):
    reviews, bad = _reviews(sample.reviews)
    assert bad == sample.truth["malformed_review_lines"] and len(bad) >= 1
    keys = {"reviewerID", "asin", "reviewerName", "helpful", "reviewText", "overall", "summary"}
    keys |= {"unixReviewTime", "reviewTime"}
    for r in reviews:
        assert set(r) == keys
        assert isinstance(r["overall"], float) and 1.0 <= r["overall"] <= 5.0
        assert isinstance(r["unixReviewTime"], int) and r["helpful"] == [0, 0]
        month, day, year = r["reviewTime"].replace(",", "").split()
        assert (len(month), len(day), len(year)) == (2, 2, 4)
    assert len(reviews) + len(bad) == sample.truth["n_review_lines"]


def test_meta_is_python_literals_with_2014_fields(sample):
    lines = _read_lines(sample.meta)
    assert all(line.startswith("{'asin': '") for line in lines)  # repr(dict), not JSON
    meta = _meta(sample.meta)
    assert len(meta) == len(lines) == sample.truth["n_items"] - len(sample.truth["items_without_meta"])
    for m in meta.values():
        assert set(m) == {
            "asin",
            "title",
            "imUrl",
            "brand",
            "categories",
            "description",
            "price",
            "salesRank",
        }
        assert m["categories"][0][0] == "Baby" and len(m["categories"][0]) == 3
        assert isinstance(m["price"], float) and m["salesRank"]["Baby"] >= 1
        if m["imUrl"]:
            assert m["imUrl"] == (sample.images_dir / f"{m['asin']}.png").as_uri()


def test_sizes_after_five_core(sample):
    reviews, _ = _reviews(sample.reviews)
    pairs = {(r["reviewerID"], r["asin"]) for r in reviews}
    assert len(pairs) == sample.truth["n_interactions"]
    per_user = Counter(u for u, _ in pairs)
    assert min(per_user.values()) >= 6 and max(per_user.values()) <= 16
    core = _five_core(pairs)
    users = {u for u, _ in core}
    items = {i for _, i in core}
    assert len(users) == 1000
    assert len(items) >= 490
    assert 10_000 <= len(core) <= 12_000


def test_dirty_records_are_present_as_recorded(sample):
    t = sample.truth
    reviews, bad = _reviews(sample.reviews)
    assert bad == t["malformed_review_lines"]

    times = defaultdict(list)
    for r in reviews:
        times[(r["reviewerID"], r["asin"])].append(r["unixReviewTime"])
    dups = {key: sorted(ts) for key, ts in times.items() if len(ts) > 1}
    assert dups == {(d["reviewerID"], d["asin"]): sorted(d["unixReviewTime"]) for d in t["duplicate_reviews"]}
    assert len(dups) >= 2 and all(a != b for a, b in dups.values())

    meta = _meta(sample.meta)
    reviewed = {r["asin"] for r in reviews}
    assert set(t["items_without_meta"]) == reviewed - set(meta)
    assert {a for a, m in meta.items() if m["imUrl"] == ""} == set(t["empty_imurl"])
    missing = {a for a, m in meta.items() if m["imUrl"] and not (sample.images_dir / f"{a}.png").exists()}
    assert missing == set(t["missing_image_files"])
    groups = [t[k] for k in ("items_without_meta", "missing_image_files", "empty_imurl", "corrupt_images")]
    assert all(len(g) >= 1 for g in groups)
    assert len(set().union(*groups)) == sum(len(g) for g in groups)  # distinct items


def test_images_decode_except_the_planted_corrupt_ones(sample):
    meta = _meta(sample.meta)
    broken = set()
    for asin, m in meta.items():
        if not m["imUrl"] or asin in sample.truth["missing_image_files"]:
            continue
        path = sample.images_dir / f"{asin}.png"
        try:
            with Image.open(path) as img:
                img.load()
                assert img.size == (64, 64) and img.mode == "RGB"
        except UnidentifiedImageError:
            broken.add(asin)
    assert broken == set(sample.truth["corrupt_images"])


def test_attributes_are_visible_in_the_right_modality(sample):
    """Colour in the pixels; material and type in the text; shape never in the text."""
    meta = _meta(sample.meta)
    attrs = sample.truth["item_attributes"]
    named = set(sample.truth["named_colours"])
    palette = {c: np.array(rgb) for c, (rgb, _) in COLOURS.items()}
    checked = 0
    for asin, m in meta.items():
        a = attrs[asin]
        text = f"{m['title']} {m['description']}".lower()
        assert a["material"] in text and TYPES[a["type"]][0].lower() in text
        assert m["categories"][0] == TYPES[a["type"]][1]
        assert not any(s in text for s in SHAPES)
        assert (a["colour"] in text) == (a["colour"] in named)
        assert not any(c in text for c in COLOURS if c != a["colour"])
        path = sample.images_dir / f"{asin}.png"
        if asin in sample.truth["corrupt_images"] or not m["imUrl"] or not path.exists():
            continue
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64).reshape(-1, 3)
        shape_pixels = pixels[pixels.min(axis=1) < 200]  # background is light grey
        centre = np.median(shape_pixels, axis=0)
        nearest = min(palette, key=lambda c: np.abs(palette[c] - centre).sum())
        assert nearest == a["colour"], asin
        checked += 1
    assert checked >= 480
    assert len(named) and len(named) < len(COLOURS)
    assert {a["material"] for a in attrs.values()} == set(MATERIALS)


def test_images_are_not_identical(sample):
    imgs = sorted(sample.images_dir.glob("*.png"))
    assert len({hashlib.sha256(p.read_bytes()).digest() for p in imgs}) == len(imgs)


def test_planted_preferences_predict_held_out_items(sample):
    """Attribute values a user favours in training are far likelier than chance in held-out items.

    Uses only the interactions and the item attributes (not the users' true tastes):
    for each user, hold one item out, find the attribute value most over-represented
    in the rest (relative to its share of the catalogue), and see whether the held-out
    item has it.
    """
    reviews, _ = _reviews(sample.reviews)
    attrs = sample.truth["item_attributes"]
    by_user = defaultdict(set)
    for r in reviews:
        by_user[r["reviewerID"]].add(r["asin"])
    share = Counter((k, a[k]) for a in attrs.values() for k in ("colour", "shape", "material", "type"))
    share = {kv: c / len(attrs) for kv, c in share.items()}
    rng = np.random.default_rng(0)
    hits, chance = 0, 0.0
    for user in sorted(by_user):
        items = sorted(by_user[user])
        held = items[int(rng.integers(len(items)))]
        train = Counter(
            (k, attrs[i][k]) for i in items if i != held for k in ("colour", "shape", "material", "type")
        )
        fav = max(sorted(train), key=lambda kv: train[kv] / share[kv])
        hits += attrs[held][fav[0]] == fav[1]
        chance += share[fav]
    n = len(by_user)
    assert hits / n > 0.45
    assert hits / n > 2.5 * chance / n

    # And against the true tastes: most interactions have a liked value.
    tastes = sample.truth["user_tastes"]
    liked = [any(attrs[i][k] == v for k, v in tastes[u]) for u in by_user for i in by_user[u]]
    assert np.mean(liked) > 0.7


def test_bad_arguments_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="n_items"):
        generate_sample(tmp_path, n_items=3)
    with pytest.raises(ConfigError, match="interactions_per_user"):
        generate_sample(tmp_path, n_items=20, interactions_per_user=(6, 30))
    with pytest.raises(ConfigError, match="n_users"):
        generate_sample(tmp_path, n_users=0)


def test_cli_writes_the_sample(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sand.pipeline.acquire.bundled_sample",
            str(tmp_path),
            "--seed",
            "1",
            "--users",
            "50",
            "--items",
            "30",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "malformed_review_lines" in done.stdout
    assert (tmp_path / "reviews_Sample_5.json.gz").exists() and (tmp_path / "meta_Sample.json.gz").exists()


def test_content_beats_ids_on_held_out_items(sample):
    """With perfect attribute features a trivial content scorer beats a strong ID-only one (EASE).

    This is the property the sample exists for: IDs are data-starved, content generalises.
    """
    reviews, _ = _reviews(sample.reviews)
    pairs = sorted(_five_core({(r["reviewerID"], r["asin"]) for r in reviews}))
    users = {u: k for k, u in enumerate(sorted({u for u, _ in pairs}))}
    items = {i: k for k, i in enumerate(sorted({i for _, i in pairs}))}
    by_user = defaultdict(list)
    for u, i in pairs:
        by_user[users[u]].append(items[i])
    rng = np.random.default_rng(0)
    train = np.zeros((len(users), len(items)))
    test = {}
    for u, its in by_user.items():
        its = rng.permutation(its)
        n_test = max(1, len(its) // 10)
        test[u] = set(its[:n_test].tolist())
        train[u, its[n_test:]] = 1.0

    attrs = sample.truth["item_attributes"]
    values = sorted({(k, a[k]) for a in attrs.values() for k in ("colour", "shape", "material", "type")})
    feats = np.array([[float(attrs[i][k] == v) for k, v in values] for i in sorted(items)])
    profile = (train @ feats) / train.sum(axis=1, keepdims=True) / feats.mean(axis=0)
    content = profile @ feats.T

    gram = train.T @ train + 200.0 * np.eye(len(items))
    inv = np.linalg.inv(gram)
    ease = -inv / np.diag(inv)
    np.fill_diagonal(ease, 0.0)
    ids = train @ ease

    def recall(scores: np.ndarray, k: int = 20) -> float:
        scores = np.where(train > 0, -np.inf, scores)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return float(np.mean([len(set(top[u].tolist()) & test[u]) / len(test[u]) for u in test]))

    r_content, r_ids = recall(content), recall(ids)
    assert r_content > 1.4 * r_ids, (r_content, r_ids)
    assert r_ids > 0.05  # the ID model is not broken, just starved
