"""Raw Amazon readers on tiny files written by the tests (each release, gzip and plain)."""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from sand.pipeline.base.errors import ConfigError, DataError
from sand.pipeline.dataset.readers import META_COLUMNS, read_meta, read_reviews


def write_lines(path: Path, lines: list[str], compress: bool) -> Path:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def review_2014(user: str, asin: str, rating=5.0, t=1_300_000_000) -> str:
    return json.dumps({"reviewerID": user, "asin": asin, "overall": rating, "unixReviewTime": t, "reviewText": "ok"})


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("fmt", ["amazon2014", "amazon2018"])
def test_reviews_2014_2018(tmp_path, compress, fmt):
    path = write_lines(
        tmp_path / "reviews.json.gz",
        [review_2014("U1", "B001", 4.0, 1_300_000_000), review_2014("U2", "B002", 2, 1_400_000_000)],
        compress,
    )
    df, report = read_reviews(path, fmt)
    assert list(df.columns) == ["user_id", "asin", "rating", "timestamp"]
    assert df["user_id"].tolist() == ["U1", "U2"]
    assert df["asin"].tolist() == ["B001", "B002"]
    assert df["rating"].dtype == np.float32 and df["rating"].tolist() == [4.0, 2.0]
    assert df["timestamp"].dtype == np.int64 and df["timestamp"].tolist() == [1_300_000_000, 1_400_000_000]
    assert report.total == 0 and report.records == 2


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_reviews_2023_parent_asin_and_milliseconds(tmp_path, compress):
    lines = [
        json.dumps(
            {
                "user_id": "AG1",
                "asin": "CHILD1",
                "parent_asin": "P1",
                "rating": 5.0,
                "timestamp": 1588687728923,
            }
        ),
        json.dumps({"user_id": "AG2", "asin": "CHILD2", "parent_asin": "P2", "rating": 3, "timestamp": 1600000000999}),
    ]
    df, report = read_reviews(write_lines(tmp_path / "r.jsonl", lines, compress), "amazon2023")
    assert df["asin"].tolist() == ["P1", "P2"]
    assert df["timestamp"].tolist() == [1588687728, 1600000000]
    assert df["rating"].tolist() == [5.0, 3.0]


def test_dirty_review_lines_are_counted_skips(tmp_path):
    lines = [
        review_2014("U1", "B1"),
        '{"reviewerID": "U2", "asin": "B2", "overall": 5.0',  # truncated JSON
        json.dumps({"asin": "B3", "overall": 5.0, "unixReviewTime": 1}),  # no reviewerID
        json.dumps({"reviewerID": "U4", "overall": 5.0, "unixReviewTime": 1}),  # no asin
        review_2014("U5", "B5", rating="five"),
        review_2014("U6", "B6", t="yesterday"),
        review_2014("U7", "B7", t=-5),
        review_2014("U9", "B9", t=2**63 + 5),
        "",  # blank lines are not records and not errors
        review_2014("U8", "B8"),
    ]
    path = write_lines(tmp_path / "dirty.json", lines, compress=False)
    df, report = read_reviews(path, "amazon2014")
    assert df["user_id"].tolist() == ["U1", "U8"]
    assert report.counts == {
        "malformed JSON": 1,
        "missing reviewerID": 1,
        "missing asin": 1,
        "non-numeric overall": 1,
        "bad unixReviewTime": 3,
    }
    assert report.total == 7 and report.records == 2
    assert report.examples[0] == f"{path}:2: malformed JSON"
    assert any(e.startswith(f"{path}:5: non-numeric overall") and "'five'" in e for e in report.examples)
    assert report.to_dict()["total"] == 7


def test_over_budget_names_file_line_and_reason(tmp_path):
    lines = [review_2014("U1", "B1")] + [review_2014(f"U{i}", "B", rating="bad") for i in range(5)]
    path = write_lines(tmp_path / "bad.json", lines, compress=False)
    with pytest.raises(DataError) as err:
        read_reviews(path, "amazon2014", max_bad_lines=3)
    msg = str(err.value)
    assert msg.startswith(f"{path}:5: non-numeric overall")
    assert msg.endswith("(more than 3 bad lines)")
    assert "\n" not in msg
    # Exactly at the budget is still fine.
    df, report = read_reviews(path, "amazon2014", max_bad_lines=5)
    assert len(df) == 1 and report.total == 5


def test_truncated_gzip_names_the_file(tmp_path):
    lines = [review_2014(f"U{i}", f"B{i % 7}") for i in range(2000)]
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    path = tmp_path / "reviews_Baby_5.json.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated gzip") as err:
        read_reviews(path, "amazon2014")
    assert str(path) in str(err.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.json.gz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_reviews(empty, "amazon2014")
    with pytest.raises(DataError, match="not found"):
        read_reviews(tmp_path / "nope.json", "amazon2018")
    blank_gz = write_lines(tmp_path / "blank.json.gz", [""], compress=True)
    with pytest.raises(DataError, match="no usable records"):
        read_reviews(blank_gz, "amazon2014")


def test_unknown_format_is_config_error(tmp_path):
    path = write_lines(tmp_path / "r.json", [review_2014("U", "B")], compress=False)
    with pytest.raises(ConfigError, match="amazon2014, amazon2018, amazon2023"):
        read_reviews(path, "amazon2020")


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_meta_2014_python_literals_and_no_eval(tmp_path, compress):
    marker = tmp_path / "pwned"
    lines = [
        "{'asin': '0000031852', 'title': \"Girls' Ballet Tutu\", 'imUrl': 'http://x/img1.jpg', "
        "'categories': [['Baby', 'Nursery', 'Bedding'], ['Clothing']], 'description': 'Soft.', "
        "'brand': 'Coxlures', 'price': 3.17, 'salesRank': {'Baby': 1}}",
        f"{{'asin': __import__('os').system('touch {marker}')}}",
        f"__import__('os').system('touch {marker}')",
        "{'asin': 'B2', 'categories': [], 'related': {'also_bought': ['B1']}}",
        "{'title': 'no asin'}",
    ]
    df, report = read_meta(write_lines(tmp_path / "meta_Baby.json.gz", lines, compress), "amazon2014")
    assert not marker.exists()
    assert report.counts == {"malformed Python literal": 2, "missing asin": 1}
    assert list(df.columns) == META_COLUMNS
    first = df.iloc[0]
    assert first["asin"] == "0000031852"
    assert first["title"] == "Girls' Ballet Tutu"
    assert first["brand"] == "Coxlures"
    assert list(first["categories"]) == ["Baby", "Nursery", "Bedding"]
    assert first["description"] == "Soft."
    assert first["image_url"] == "http://x/img1.jpg"
    second = df.iloc[1]
    assert second["asin"] == "B2" and list(second["categories"]) == []
    assert second["title"] == "" and second["image_url"] == "" and second["brand"] == ""


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_meta_2018_json(tmp_path, compress):
    lines = [
        json.dumps(
            {
                "asin": "B01",
                "title": "Ball",
                "brand": "Acme",
                "category": ["Sports & Outdoors", "Balls"],
                "description": ["Round.", "Bouncy."],
                "feature": ["red", "blue"],
                "imageURL": ["http://s/small.jpg"],
                "imageURLHighRes": ["http://s/large.jpg"],
            }
        ),
        json.dumps({"asin": "B02", "title": "Bat", "imageURLHighRes": [], "imageURL": ["http://s/bat.jpg"]}),
        json.dumps({"asin": "B03", "imageURLHighRes": [], "imageURL": []}),
        "{'asin': 'B04'}",  # not JSON in a strict-JSON release
    ]
    df, report = read_meta(write_lines(tmp_path / "meta.json", lines, compress), "amazon2018")
    assert report.counts == {"malformed JSON": 1}
    assert df["asin"].tolist() == ["B01", "B02", "B03"]
    assert list(df.iloc[0]["categories"]) == ["Sports & Outdoors", "Balls"]
    assert df.iloc[0]["description"] == "Round. Bouncy."
    assert df.iloc[0]["features"] == "red blue"
    assert df["image_url"].tolist() == ["http://s/large.jpg", "http://s/bat.jpg", ""]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_meta_2023_jsonl(tmp_path, compress):
    images = [
        {"thumb": "t1", "large": "http://a/pt01.jpg", "hi_res": None, "variant": "PT01"},
        {"thumb": "t0", "large": "http://a/main.jpg", "hi_res": "http://a/main_hi.jpg", "variant": "MAIN"},
    ]
    lines = [
        json.dumps(
            {
                "parent_asin": "P1",
                "title": "Stroller",
                "store": "BabyCo",
                "categories": ["Baby Products", "Strollers"],
                "description": ["Light", "Foldable"],
                "features": ["4 wheels"],
                "images": images,
            }
        ),
        json.dumps({"parent_asin": "P2", "title": "Bib", "images": [], "description": []}),
        json.dumps({"title": "orphan"}),
    ]
    df, report = read_meta(write_lines(tmp_path / "meta.jsonl", lines, compress), "amazon2023")
    assert report.counts == {"missing parent_asin": 1}
    row = df.iloc[0]
    assert (row["asin"], row["title"], row["brand"]) == ("P1", "Stroller", "BabyCo")
    assert list(row["categories"]) == ["Baby Products", "Strollers"]
    assert row["description"] == "Light Foldable" and row["features"] == "4 wheels"
    assert row["image_url"] == "http://a/main.jpg"
    assert df.iloc[1]["image_url"] == "" and df.iloc[1]["description"] == ""


# ------------------------------------------------------------------- hostile sizes and values


def test_over_long_line_is_a_counted_skip(tmp_path):
    huge = json.dumps({"reviewerID": "U2", "asin": "B2", "overall": 5.0, "unixReviewTime": 1,
                       "reviewText": "x" * 300_000})
    lines = [review_2014("U1", "B1"), huge, review_2014("U3", "B3")]
    path = write_lines(tmp_path / "r.json.gz", lines, compress=True)
    df, report = read_reviews(path, "amazon2014", max_line_bytes=100_000)
    assert df["user_id"].tolist() == ["U1", "U3"]
    assert report.counts == {"line too long": 1} and report.lines_read == 3
    assert report.examples[0].startswith(f"{path}:2: line too long")
    # A line of exactly the limit (newline not counted) is read.
    df, report = read_reviews(path, "amazon2014", max_line_bytes=len(huge))
    assert len(df) == 3 and report.total == 0


def test_over_long_lines_past_the_budget_end_in_one_line_error(tmp_path):
    lines = [review_2014("U1", "B1")] + ["[" + "1," * 5_000 + "1]"] * 3
    path = write_lines(tmp_path / "r.json", lines, compress=False)
    with pytest.raises(DataError) as err:
        read_reviews(path, "amazon2014", max_bad_lines=2, max_line_bytes=1_000)
    assert str(err.value) == f"{path}:4: line too long (over 1000 bytes) (more than 2 bad lines)"


@pytest.mark.parametrize(
    "rating, reason",
    [(0, "overall out of range 1..5"), (6.0, "overall out of range 1..5"), (-1, "overall out of range 1..5"),
     (5.5, "overall out of range 1..5"), ("NaN", "non-numeric overall"), (None, "missing overall"),
     ("4", None), (1, None)],
)
def test_ratings_outside_one_to_five_are_dirty(tmp_path, rating, reason):
    lines = [review_2014("U1", "B1"), review_2014("U2", "B2", rating=rating)]
    df, report = read_reviews(write_lines(tmp_path / "r.json", lines, compress=False), "amazon2014")
    if reason is None:
        assert len(df) == 2 and report.total == 0
    else:
        assert df["user_id"].tolist() == ["U1"] and report.counts == {reason: 1}


def test_2023_ratings_out_of_range_are_dirty(tmp_path):
    line = {"user_id": "A", "parent_asin": "P", "rating": 10, "timestamp": 1588687728923}
    ok = {**line, "user_id": "B", "rating": 4}
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(line), json.dumps(ok)], compress=False)
    df, report = read_reviews(path, "amazon2023")
    assert df["user_id"].tolist() == ["B"] and report.counts == {"rating out of range 1..5": 1}


def test_literal_guard_skips_pathological_meta_without_evaluating(tmp_path, monkeypatch):
    """The dense lines are counted skips decided before ``literal_eval`` ever sees them."""
    good = repr({"asin": "B1", "title": "ok", "related": {"also_bought": [f"B{i:09d}" for i in range(300)]}})
    flat = "[" + "0," * 200_000 + "]"  # 400 KB that literal_eval would turn into ~200 MB of AST
    unary = "{'asin': " + "-" * 300_000 + "1}"
    path = write_lines(tmp_path / "meta.json", [good, flat, unary], compress=False)
    evaluated: list[str] = []
    real_literal_eval = ast.literal_eval

    def spy(text: str):
        evaluated.append(text)
        return real_literal_eval(text)

    monkeypatch.setattr(ast, "literal_eval", spy)
    df, report = read_meta(path, "amazon2014")
    assert df["asin"].tolist() == ["B1"]
    assert report.counts == {"Python literal too complex": 2}
    assert evaluated == [good]  # only the real record reached literal_eval


def _peak_rss_growth_mb(code: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; (growth of peak RSS over the import baseline in MB, its stdout)."""
    import subprocess
    import sys

    script = (
        "import resource, sys\n"
        "from sand.pipeline.dataset.readers import read_meta, read_reviews\n"
        "from sand.pipeline.base.errors import DataError\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"{code}\n"
        "print('GROWTH', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    growth = float(out.stdout.strip().splitlines()[-1].split()[1])
    return growth, out.stdout


def _gzip_bomb(path: Path, head: bytes, filler: bytes, n_bytes: int, tail: bytes = b"") -> Path:
    """A small .gz inflating to ``n_bytes`` of ``filler``, streamed in chunks (never held whole)."""
    chunk = filler * ((1 << 20) // len(filler))
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(head)
        for _ in range(n_bytes // len(chunk)):
            fh.write(chunk)
        fh.write(tail)
    return path


def test_gzip_bomb_in_one_line_is_contained_with_bounded_memory(tmp_path):
    good = (review_2014("U1", "B1") + "\n").encode()
    # 256 MiB of 'a' in a single line, then one more good record.
    path = _gzip_bomb(tmp_path / "bomb.json.gz", good + b'{"x": "', b"a", 256 << 20, b'"}\n' + good)
    assert path.stat().st_size < 2 << 20
    code = (
        f"try:\n"
        f"    df, rep = read_reviews({str(path)!r}, 'amazon2014')\n"
        f"    print('SKIPPED', rep.counts)\n"
        f"except DataError as err:\n"
        f"    print('ERROR', err)\n"
    )
    growth, stdout = _peak_rss_growth_mb(code)
    assert growth < 200, f"peak RSS grew by {growth:.0f} MB"
    outcome = stdout.splitlines()[0]
    # Either the over-long line is skipped and counted, or the file is refused as a bomb: never a MemoryError.
    assert outcome.startswith(("SKIPPED {'line too long': 1}", f"ERROR {path}:")), outcome
    assert "\n" not in outcome


@pytest.mark.slow
def test_gzip_bomb_of_blank_lines_is_refused_in_one_line(tmp_path):
    good = (review_2014("U1", "B1") + "\n").encode()
    path = _gzip_bomb(tmp_path / "blank.json.gz", good, b"\n", 40 << 20)
    with pytest.raises(DataError) as err:
        read_reviews(path, "amazon2014")
    msg = str(err.value)
    assert msg.startswith(f"{path}:") and "gzip bomb" in msg and "\n" not in msg


def test_gzip_bomb_of_many_junk_lines_ends_at_the_budget(tmp_path):
    path = _gzip_bomb(tmp_path / "junk.json.gz", b"", b"junk\n", 64 << 20)
    with pytest.raises(DataError, match=r":101: malformed JSON \(more than 100 bad lines\)$"):
        read_reviews(path, "amazon2014", max_bad_lines=100)


# ---------------------------------------------------------------------------- the format table
# Adding a format is its reader (a metadata record converter) plus one row of
# pipeline/base/formats.py: this toy release is added that way only, and the config, the CLI
# help, the sniffer, the readers and the interactions stage all take it.
TOY = "toy2030"


def toy_meta_record(obj: dict) -> tuple:
    """The toy release's metadata record -> ``META_COLUMNS`` (the one reader function it needs)."""
    return (str(obj["what"]), str(obj.get("name", "")), "", [], "", "", str(obj.get("pic", "")))


def _sniff_toy(keys, strict_json):
    if "what" not in keys:
        return None
    return "reviews" if "who" in keys else "meta"


@pytest.fixture
def toy_format(monkeypatch):
    from sand.pipeline.base import formats

    row = formats.DatasetFormat(
        formats.ReviewFields("who", "what", "stars", "when_ms", 1000),
        meta_record=f"{__name__}:toy_meta_record",
        sniff=_sniff_toy,
    )
    monkeypatch.setitem(formats.FORMATS, TOY, row)
    return TOY


def _toy_files(folder: Path, n_users: int = 12, n_items: int = 8) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    reviews = [
        json.dumps({"who": f"u{u}", "what": f"i{(u + k) % n_items}", "stars": 4, "when_ms": (1000 + u * 10 + k) * 1000})
        for u in range(n_users) for k in range(6)
    ]
    meta = [json.dumps({"what": f"i{i}", "name": f"item {i}", "pic": ""}) for i in range(n_items)]
    return (write_lines(folder / "reviews_Toy.jsonl.gz", reviews, True),
            write_lines(folder / "meta_Toy.jsonl.gz", meta, True))


def test_new_format_row_is_accepted_by_config_and_listed_in_errors_and_help(toy_format):
    import typer.main

    from sand.pipeline.base.config import build_config
    from sand.pipeline.base.formats import format_help

    assert build_config({"acquire": {"format": toy_format}}).acquire.format == toy_format
    with pytest.raises(ConfigError, match=rf"acquire.format='nope': unknown format 'nope': choose one of .*{TOY}"):
        build_config({"acquire": {"format": "nope"}})
    assert TOY in format_help() and "sample" not in format_help()  # the sample is generated, not named

    import importlib

    from sand.flows import cli

    try:
        importlib.reload(cli)  # the help text is built when the CLI module is imported
        run = typer.main.get_command(cli.app).commands["run"]
        assert TOY in next(p for p in run.params if p.name == "format").help
    finally:
        importlib.reload(cli)


def test_new_format_row_is_sniffed_and_read(toy_format, tmp_path):
    from sand.pipeline.acquire.sources import detect_format
    from sand.pipeline.dataset.columnar import read_review_columns

    reviews, meta = _toy_files(tmp_path / "toy")
    assert detect_format(reviews) == detect_format(meta) == detect_format(tmp_path / "toy") == toy_format
    df, report = read_reviews(reviews, toy_format)
    assert report.total == 0 and len(df) == 72
    assert df.loc[0].tolist() == ["u0", "i0", 4.0, 1000]  # milliseconds -> seconds by the row's divisor
    columns = read_review_columns(reviews, toy_format)  # the chunked reader of the interactions stage
    assert len(columns) == 72 and columns.report.total == 0
    assert sorted(columns.timestamp.tolist()) == sorted(df["timestamp"].tolist())
    items, _ = read_meta(meta, toy_format)
    assert items["title"].tolist() == [f"item {i}" for i in range(8)]


def test_new_format_row_runs_through_the_interactions_stage(toy_format, tmp_path):
    from sand.pipeline.base.config import load_config
    from sand.pipeline.runner import run_pipeline
    from sand.pipeline.stages import Context

    _toy_files(tmp_path / "toy")
    cfg = load_config(None, {"data_root": str(tmp_path / "data"), "acquire.dataset": str(tmp_path / "toy")},
                      ["interactions.k_core=2"])
    result = run_pipeline(Context.create(cfg, progress=False), until="interactions")
    assert result.artifact("acquire").manifest["format"] == toy_format
    stats = result.summary()["dataset"]
    assert stats["users"] == 12 and stats["items"] == 8


def test_rows_claim_only_their_own_records():
    """Every sniffer is order-independent: exactly one format claims each release's records."""
    from sand.pipeline.base.formats import FORMATS

    samples = {
        ("amazon2014", "reviews"): ({"reviewerID", "asin", "overall", "unixReviewTime", "helpful"}, True),
        ("amazon2014", "meta"): ({"asin", "title", "categories", "imUrl"}, False),
        ("amazon2018", "reviews"): ({"reviewerID", "asin", "overall", "unixReviewTime", "verified"}, True),
        ("amazon2018", "meta"): ({"asin", "title", "category", "imageURL", "main_cat"}, True),
        ("amazon2023", "reviews"): ({"user_id", "asin", "parent_asin", "rating", "timestamp"}, True),
        ("amazon2023", "meta"): ({"parent_asin", "title", "categories", "images"}, True),
    }
    for (fmt, kind), (keys, strict) in samples.items():
        claims = {name: row.sniff(keys, strict) for name, row in FORMATS.items() if row.sniff is not None}
        assert {name: k for name, k in claims.items() if k is not None} == {fmt: kind}
