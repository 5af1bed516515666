"""Tests for sand.pipeline.acquire.sources: presets, categories, explicit files, local folders, format sniffing."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from sand.pipeline.acquire.sources import FORMATS, PRESETS, SourceSpec, category_urls, detect_format, resolve_source
from sand.pipeline.base.errors import ConfigError, DataError

SNAP = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles"
V2 = "https://jmcauley.ucsd.edu/data/amazon_v2"
V23 = "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw"

# One realistic first line per (format, kind), shaped like the published dumps.
LINES = {
    ("amazon2014", "reviews"): json.dumps({
        "reviewerID": "A1HK2FQW6KXQB2", "asin": "097293751X", "reviewerName": "Amanda",
        "helpful": [0, 0], "reviewText": "Perfect for new parents.", "overall": 5.0,
        "summary": "Awesome", "unixReviewTime": 1373932800, "reviewTime": "07 16, 2013",
    }),
    ("amazon2014", "meta"): repr({
        "asin": "0188399313", "imUrl": "http://ecx.images-amazon.com/images/I/41.jpg",
        "related": {"also_bought": ["B0"]}, "categories": [["Baby"]], "title": "Kid's \"Wee\" Spoon",
    }),
    ("amazon2018", "reviews"): json.dumps({
        "overall": 5.0, "verified": True, "reviewTime": "06 3, 2015", "reviewerID": "A180LQZBUWVOLF",
        "asin": "0000032034", "style": {"Size:": " Large"}, "reviewerName": "Michelle A",
        "reviewText": "Fits well", "summary": "Great", "unixReviewTime": 1433289600,
    }),
    ("amazon2018", "meta"): json.dumps({
        "category": ["Sports & Outdoors", "Fan Shop"], "description": ["Shirt"], "title": "Tee",
        "brand": "Acme", "feature": [], "imageURL": [], "imageURLHighRes": [], "asin": "0000032034",
        "main_cat": "Sports & Outdoors", "price": "$9.99",
    }),
    ("amazon2023", "reviews"): json.dumps({
        "rating": 5.0, "title": "Love it", "text": "Soft", "images": [], "asin": "B00YQ6X8EO",
        "parent_asin": "B00YQ6X8EO", "user_id": "AGKHLEW2SOWHNMFQIJGBECAF7INQ",
        "timestamp": 1588687728923, "helpful_vote": 0, "verified_purchase": True,
    }),
    ("amazon2023", "meta"): json.dumps({
        "main_category": "Baby", "title": "Bottle", "features": [], "description": [],
        "images": [{"thumb": "t.jpg", "large": "l.jpg", "hi_res": None, "variant": "MAIN"}],
        "store": "Acme", "categories": ["Baby Products"], "parent_asin": "B00YQ6X8EO",
    }),
}
NAMES = {  # how each release names its files
    "amazon2014": ("reviews_{cat}_5.json", "meta_{cat}.json"),
    "amazon2018": ("{cat}_5.json", "meta_{cat}.json"),
    "amazon2023": ("{cat}.jsonl", "meta_{cat}.jsonl"),
}


def write(path: Path, *lines: str, gz: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def raw_folder(tmp: Path, fmt: str, cat: str = "Toys", gz: bool = True) -> tuple[Path, Path]:
    rev_name, meta_name = NAMES[fmt]
    reviews = write(tmp / rev_name.format(cat=cat), LINES[(fmt, "reviews")], gz=gz)
    meta = write(tmp / meta_name.format(cat=cat), LINES[(fmt, "meta")], gz=gz)
    return reviews, meta


# ---------------------------------------------------------------------------- presets and categories


@pytest.mark.parametrize(
    ("preset", "cat"),
    [("baby", "Baby"), ("sports", "Sports_and_Outdoors"), ("clothing", "Clothing_Shoes_and_Jewelry")],
)
def test_presets_resolve_to_2014_five_core_urls(preset, cat):
    spec = resolve_source(preset)
    assert spec == SourceSpec(
        preset, "amazon2014", f"{SNAP}/reviews_{cat}_5.json.gz", f"{SNAP}/meta_{cat}.json.gz", None
    )
    assert preset in PRESETS and PRESETS[preset].description


def test_preset_names_are_case_insensitive():
    assert resolve_source("Sports") == resolve_source("sports")


def test_preset_in_another_release():
    spec = resolve_source("sports", fmt="amazon2018")
    assert spec.format == "amazon2018" and spec.name == "sports"
    assert spec.reviews == f"{V2}/categoryFilesSmall/Sports_and_Outdoors_5.json.gz"
    assert spec.meta == f"{V2}/metaFiles2/meta_Sports_and_Outdoors.json.gz"
    baby = resolve_source("baby", fmt="amazon2023")
    assert baby.reviews == f"{V23}/review_categories/Baby_Products.jsonl.gz"
    assert baby.meta == f"{V23}/meta_categories/meta_Baby_Products.jsonl.gz"


def test_preset_missing_from_a_release_is_a_config_error():
    expected = r"preset 'baby' has no amazon2018 files \(available: amazon2014, amazon2023\)"
    with pytest.raises(ConfigError, match=expected):
        resolve_source("baby", fmt="amazon2018")


def test_sample_needs_no_download():
    assert resolve_source("sample") == SourceSpec("sample", "sample", None, None, None)
    assert resolve_source("sample", fmt="sample").format == "sample"
    with pytest.raises(ConfigError, match="sample"):
        resolve_source("sample", fmt="amazon2014")


@pytest.mark.parametrize(
    ("category", "fmt", "name", "reviews", "meta"),
    [
        ("Sports_and_Outdoors", "amazon2018", "sports",
         f"{V2}/categoryFilesSmall/Sports_and_Outdoors_5.json.gz",
         f"{V2}/metaFiles2/meta_Sports_and_Outdoors.json.gz"),
        ("Baby_Products", "amazon2023", "baby", f"{V23}/review_categories/Baby_Products.jsonl.gz",
         f"{V23}/meta_categories/meta_Baby_Products.jsonl.gz"),
        ("Toys_and_Games", "amazon2023", "toys_and_games", f"{V23}/review_categories/Toys_and_Games.jsonl.gz",
         f"{V23}/meta_categories/meta_Toys_and_Games.jsonl.gz"),
        ("Baby", "amazon2014", "baby", f"{SNAP}/reviews_Baby_5.json.gz", f"{SNAP}/meta_Baby.json.gz"),
        ("Beauty", "amazon2014", "beauty", f"{SNAP}/reviews_Beauty_5.json.gz", f"{SNAP}/meta_Beauty.json.gz"),
    ],
)
def test_category_with_format(category, fmt, name, reviews, meta):
    assert resolve_source(category, fmt=fmt) == SourceSpec(name, fmt, reviews, meta, None)


def test_category_urls_rejects_bad_names_and_formats():
    with pytest.raises(ConfigError, match="invalid category name '../x'"):
        category_urls("amazon2014", "../x")
    with pytest.raises(ConfigError, match="format 'mmrec' has no published category files"):
        category_urls("mmrec", "Baby")


# ---------------------------------------------------------------------------- explicit files


def test_explicit_urls_override_preset():
    spec = resolve_source("baby", reviews="https://mirror.example/r.json.gz")
    assert spec.reviews == "https://mirror.example/r.json.gz"
    assert spec.meta == f"{SNAP}/meta_Baby.json.gz" and spec.format == "amazon2014"


def test_explicit_urls_with_format_for_a_free_name():
    spec = resolve_source("mydata", fmt="amazon2018", reviews="https://m/r.json.gz", meta="https://m/m.json.gz")
    assert spec == SourceSpec("mydata", "amazon2018", "https://m/r.json.gz", "https://m/m.json.gz", None)


def test_remote_reviews_without_format_is_a_config_error():
    with pytest.raises(ConfigError, match=r"format is required .*valid: amazon2014, amazon2018, amazon2023"):
        resolve_source("mydata", reviews="https://m/r.json.gz")


def test_explicit_local_files_are_sniffed(tmp_path):
    reviews, meta = raw_folder(tmp_path, "amazon2023")
    spec = resolve_source("mydata", reviews=str(reviews), meta=meta.as_uri())
    assert spec == SourceSpec("mydata", "amazon2023", str(reviews), meta.as_uri(), None)


def test_explicit_missing_file_and_bad_scheme(tmp_path):
    with pytest.raises(ConfigError, match=r"reviews file does not exist: .*gone\.json"):
        resolve_source("mydata", reviews=str(tmp_path / "gone.json"))
    with pytest.raises(ConfigError, match="meta: unsupported URL scheme 'ftp'"):
        resolve_source("baby", meta="ftp://h/m.json.gz")


# ---------------------------------------------------------------------------- local paths


def test_mmrec_folder(tmp_path):
    folder = tmp_path / "baby"
    folder.mkdir()
    (folder / "baby.inter").write_text("userID\titemID\trating\ttimestamp\tx_label\n")
    spec = resolve_source(str(folder))
    assert spec == SourceSpec("baby", "mmrec", None, None, folder.resolve())
    assert resolve_source(str(folder / "baby.inter")) == spec
    assert detect_format(folder) == "mmrec"
    with pytest.raises(ConfigError, match="is a mmrec dataset, but format 'amazon2014' was requested"):
        resolve_source(str(folder), fmt="amazon2014")


def test_mmrec_folder_with_several_inter_files(tmp_path):
    folder = tmp_path / "sports"
    folder.mkdir()
    for name in ("sports.inter", "other.inter"):
        (folder / name).write_text("userID\titemID\n")
    assert resolve_source(str(folder)).name == "sports"  # the one named like its folder
    (folder / "sports.inter").unlink()
    (folder / "third.inter").write_text("userID\titemID\n")
    with pytest.raises(ConfigError, match=r"several \.inter files \(other\.inter, third\.inter\)"):
        resolve_source(str(folder))


def test_mmrec_format_needs_inter_file(tmp_path):
    raw_folder(tmp_path, "amazon2014")
    with pytest.raises(ConfigError, match=r"format mmrec needs a folder holding <name>\.inter"):
        resolve_source(str(tmp_path), fmt="mmrec")


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("fmt", ["amazon2014", "amazon2018", "amazon2023"])
def test_raw_folder_is_sniffed(tmp_path, fmt, gz):
    reviews, meta = raw_folder(tmp_path, fmt, cat="Toys", gz=gz)
    (tmp_path / "notes.txt").write_text("not data")
    spec = resolve_source(str(tmp_path))
    assert spec == SourceSpec("toys", fmt, str(reviews.resolve()), str(meta.resolve()), None)
    assert detect_format(tmp_path) == fmt


def test_raw_folder_named_after_preset_category(tmp_path):
    raw_folder(tmp_path, "amazon2014", cat="Clothing_Shoes_and_Jewelry")
    assert resolve_source(str(tmp_path)).name == "clothing"


def test_ambiguous_2014_reviews_are_settled_by_literal_meta(tmp_path):
    review = json.loads(LINES[("amazon2014", "reviews")])
    del review["helpful"]  # now indistinguishable from a 2018 review on its own
    write(tmp_path / "reviews_Toys_5.json", json.dumps(review))
    write(tmp_path / "meta_Toys.json", LINES[("amazon2014", "meta")])
    assert resolve_source(str(tmp_path)).format == "amazon2014"


def test_reviews_and_meta_of_different_releases_conflict(tmp_path):
    write(tmp_path / "reviews_Toys_5.json", LINES[("amazon2023", "reviews")])
    write(tmp_path / "meta_Toys.json", LINES[("amazon2018", "meta")])
    expected = r"look like amazon2023 but meta meta_Toys\.json looks like amazon2018"
    with pytest.raises(ConfigError, match=expected):
        resolve_source(str(tmp_path))


def test_folder_picks_meta_matching_the_reviews(tmp_path):
    reviews, meta = raw_folder(tmp_path, "amazon2014", cat="Toys")
    write(tmp_path / "meta_Beauty.json", LINES[("amazon2014", "meta")], gz=True)
    spec = resolve_source(str(tmp_path))
    assert spec.reviews == str(reviews.resolve()) and spec.meta == str(meta.resolve())


def test_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="no reviews file in"):
        resolve_source(str(tmp_path))
    write(tmp_path / "A_5.json", LINES[("amazon2018", "reviews")])
    write(tmp_path / "B_5.json", LINES[("amazon2018", "reviews")])
    with pytest.raises(ConfigError, match=r"several reviews files .*\(A_5\.json, B_5\.json\)"):
        resolve_source(str(tmp_path))


def test_single_reviews_file_has_no_meta(tmp_path):
    reviews = write(tmp_path / "Sports_and_Outdoors_5.json", LINES[("amazon2018", "reviews")], gz=True)
    spec = resolve_source(str(reviews))
    assert spec == SourceSpec("sports", "amazon2018", str(reviews.resolve()), None, None)


def test_single_meta_file_is_refused(tmp_path):
    meta = write(tmp_path / "meta_Baby.json", LINES[("amazon2014", "meta")])
    with pytest.raises(ConfigError, match="looks like a metadata file"):
        resolve_source(str(meta))


def test_format_given_for_a_folder_is_trusted(tmp_path):
    raw_folder(tmp_path, "amazon2018")
    assert resolve_source(str(tmp_path), fmt="amazon2014").format == "amazon2014"


# ---------------------------------------------------------------------------- detect_format


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize(("fmt", "kind"), sorted(LINES))
def test_detect_format_each_release(tmp_path, fmt, kind, gz):
    later = "{broken later lines are not read"
    path = write(tmp_path / "data.json", "", "   ", LINES[(fmt, kind)], later, gz=gz)
    assert detect_format(path) == fmt


def test_detect_format_sniffs_gzip_by_content_not_name(tmp_path):
    path = tmp_path / "renamed.json"  # gzip bytes without a .gz suffix
    path.write_bytes(gzip.compress((LINES[("amazon2023", "reviews")] + "\n").encode()))
    assert detect_format(path) == "amazon2023"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "file is empty"),
        ("\n\n", "no record found"),
        ("this is not data\n", "line 1: neither JSON nor a Python literal"),
        ("\n[1, 2, 3]\n", "line 2: expected one object per line, got list"),
        ('{"user": "u", "item": "i"}\n', "line 1: unknown record .*found item, user"),
    ],
)
def test_detect_format_bad_content_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        detect_format(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_detect_format_on_corrupt_gzip(tmp_path):
    path = tmp_path / "x.json.gz"
    path.write_bytes(b"\x1f\x8b" + b"definitely not deflate data" * 4)
    with pytest.raises(DataError, match="cannot read"):
        detect_format(path)


def test_detect_format_never_evaluates_code(tmp_path):
    path = tmp_path / "evil.json"
    marker = tmp_path / "pwned"
    path.write_text(f"__import__('pathlib').Path({str(marker)!r}).touch()\n")
    with pytest.raises(DataError, match="neither JSON nor a Python literal"):
        detect_format(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------- errors


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError) as err:
        resolve_source("bogus")
    msg = str(err.value)
    assert "'bogus'" in msg and all(p in msg for p in ("baby", "sports", "clothing", "sample"))
    assert "\n" not in msg


def test_unknown_format_lists_choices():
    with pytest.raises(ConfigError) as err:
        resolve_source("baby", fmt="amazon2099")
    assert "'amazon2099'" in str(err.value) and all(f in str(err.value) for f in FORMATS)


def test_missing_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset path does not exist: .*nope"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="path does not exist"):
        detect_format(tmp_path / "nope.json")


def test_spec_to_dict_is_json_friendly(tmp_path):
    spec = SourceSpec("baby", "mmrec", None, None, tmp_path)
    assert json.loads(json.dumps(spec.to_dict())) == {
        "name": "baby", "format": "mmrec", "reviews": None, "meta": None, "mmrec_dir": str(tmp_path)
    }


# ---------------------------------------------------------------------------- dirty first lines


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize(("fmt", "kind"), sorted(LINES))
def test_sniffer_tolerates_dirty_first_lines(tmp_path, fmt, kind, gz):
    dirty = ["{truncated", "not a record at all", "[1, 2]", '{"no": "asin"}', "{'x': " + "1," * 60_000 + "}"]
    path = write(tmp_path / "data.json", *dirty, LINES[(fmt, kind)], LINES[(fmt, kind)], gz=gz)
    assert detect_format(path) == fmt


def test_sniffer_skips_an_over_long_first_line(tmp_path):
    huge = json.dumps({"reviewerID": "A", "asin": "B", "overall": 5.0, "unixReviewTime": 1, "t": "x" * (5 << 20)})
    path = write(tmp_path / "r.json", huge, LINES[("amazon2023", "reviews")], gz=True)
    assert detect_format(path) == "amazon2023"


def test_sniffer_decides_by_the_majority_of_the_first_good_lines(tmp_path):
    r14, r18 = LINES[("amazon2014", "reviews")], LINES[("amazon2018", "reviews")]
    path = write(tmp_path / "r.json", r18, r14, r14, r14)
    assert detect_format(path) == "amazon2014"


def test_sniffer_gives_up_past_the_dirty_line_budget(tmp_path):
    from sand.pipeline.acquire import sources

    path = write(tmp_path / "r.json", *["{junk"] * (sources.SNIFF_BAD_LINES + 1), LINES[("amazon2014", "reviews")])
    with pytest.raises(DataError, match=r"line 1: neither JSON nor a Python literal"):
        detect_format(path)


# ---------------------------------------------------------------------------- file:// URLs


@pytest.mark.parametrize("form", ["file:///{p}", "file://localhost/{p}", "FILE://LOCALHOST/{p}"])
def test_file_urls_with_escapes_and_localhost_resolve(tmp_path, form):
    from urllib.parse import quote

    folder = tmp_path / "my dumps"
    folder.mkdir()
    reviews, meta = raw_folder(folder, "amazon2014")
    url = form.format(p=quote(str(reviews).lstrip("/")))
    assert "%20" in url
    spec = resolve_source("mine", None, url, meta.as_uri())
    assert spec.format == "amazon2014" and spec.reviews == url


def test_file_url_naming_another_host_is_refused(tmp_path):
    reviews, _ = raw_folder(tmp_path, "amazon2014")
    with pytest.raises(ConfigError, match=r"names the host 'fileserver'.*file:///path") as err:
        resolve_source("mine", None, f"file://fileserver{reviews}")
    assert "\n" not in str(err.value)
