"""Readers for the raw Amazon review and metadata dumps (2014, 2018, 2023 releases).

Why one module: the three releases differ in field names, encodings (2014 metadata is Python literals, not JSON),
timestamp units (2023 is in milliseconds) and image fields, but every later stage wants the same two tables. Normalising
here keeps the rest of the pipeline format-agnostic.

Real dumps contain a few broken records. A bounded number of them is skipped and counted in a :class:`SkipReport` that
the caller logs and stores in the manifest; past the budget, or when the file itself is broken (truncated gzip, empty),
a one-line :class:`DataError` names the file and line. Metadata in 2014 is parsed with :func:`ast.literal_eval`, which
only accepts literals: a line such as ``__import__('os').system(...)`` is a counted skip, never executed.

Memory is bounded whatever the input: lines come from :func:`pipeline.base.lines.iter_lines` (over-long lines dropped in
chunks, gzip bombs refused) and 2014 literals from :func:`pipeline.base.lines.parse_literal_line` (token count bounded
before ``literal_eval``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from sand.pipeline.base import formats
from sand.pipeline.base.errors import ConfigError, DataError
from sand.pipeline.base.lines import DEFAULT_MAX_LINE_BYTES, DirtyLine, iter_lines, parse_literal_line

log = logging.getLogger(__name__)

REVIEW_COLUMNS = ["user_id", "asin", "rating", "timestamp"]
META_COLUMNS = ["asin", "title", "brand", "categories", "description", "features", "image_url"]

_MAX_EXAMPLES = 5
MIN_RATING, MAX_RATING = 1, 5  # star ratings in every release; anything else is a dirty line
_MAX_STAMP = 2**62  # far beyond any real date; keeps int64 arithmetic safe downstream


@dataclass
class SkipReport:
    """Dirty records skipped while reading one file: counts per reason and a few examples.

    Returned (not just logged) so the stage can write it into its manifest, where a user can see how much of the raw
    data was dropped and why."""

    file: str
    lines_read: int = 0
    records: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, lineno: int, reason: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{self.file}:{lineno}: {reason}{(' ' + detail) if detail else ''}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the stage manifest."""
        return {
            "file": self.file, "lines_read": self.lines_read, "records": self.records, "total": self.total,
            "counts": dict(self.counts), "examples": list(self.examples),
        }

    def summary(self) -> str:
        if not self.counts:
            return f"{self.file}: {self.records} records, nothing skipped"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"{self.file}: {self.records} records, skipped {self.total} ({parts})"


def _check_format(fmt: str) -> formats.DatasetFormat:
    """The format table's row of raw format ``fmt``, or a ConfigError naming the valid ones."""
    try:
        return formats.raw_format(fmt)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _parse_json(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        raise DirtyLine("malformed JSON") from None


def parse_lines(
    numbered_lines: Iterable[tuple[int, bytes | None]], parse: Callable[[bytes], Any], convert: Callable[[dict], tuple],
    columns: list[list], report: SkipReport, max_bad_lines: int, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> None:
    """Append each line's converted values to ``columns``; count dirty lines in ``report``.

    The one place that decides what a dirty line is: the whole-file reader below and the chunked columnar reader
    (:mod:`sand.pipeline.dataset.columnar`, for chunks its fast path cannot vouch for) both go through it, so both skip
    and count the same lines. A ``None`` line is one :func:`iter_lines` dropped for exceeding ``max_line_bytes``. Raises
    :class:`DataError` once more than ``max_bad_lines`` lines were skipped."""
    appenders = [c.append for c in columns]
    path = report.file

    def skip(lineno: int, reason: str, detail: str) -> None:
        report.add(lineno, reason, detail)
        if report.total > max_bad_lines:
            shown = f" {detail}" if detail else ""
            raise DataError(f"{path}:{lineno}: {reason}{shown} (more than {max_bad_lines} bad lines)")

    for lineno, line in numbered_lines:
        report.lines_read = lineno
        if line is None:
            skip(lineno, "line too long", f"(over {max_line_bytes} bytes)")
            continue
        if not line.strip():
            continue
        try:
            obj = parse(line)
            if not isinstance(obj, dict):
                raise DirtyLine("not a record", type(obj).__name__)
            values = convert(obj)
        except DirtyLine as err:
            skip(lineno, err.reason, err.detail)
            continue
        for append, value in zip(appenders, values, strict=True):
            append(value)


def _read_records(
    path: Path, parse: Callable[[bytes], Any], convert: Callable[[dict], tuple], n_columns: int, max_bad_lines: int,
    max_line_bytes: int,
) -> tuple[list[list], SkipReport]:
    """Parse every line into column lists (not row tuples: about half the memory for 5M rows)."""
    report = SkipReport(file=str(path))
    columns: list[list] = [[] for _ in range(n_columns)]
    parse_lines(iter_lines(path, max_line_bytes), parse, convert, columns, report, max_bad_lines, max_line_bytes)
    report.records = len(columns[0])
    finish_report(path, report)
    return columns, report


def finish_report(path: Path, report: SkipReport) -> None:
    """After a whole file: fail if nothing was usable, else log what was skipped."""
    if not report.records:
        raise DataError(f"{path}: no usable records ({report.total} bad lines, {report.lines_read} lines)")
    if report.total:
        log.warning("%s", report.summary())
        for example in report.examples:
            log.info("skipped %s", example)


# ----------------------------------------------------------------------------------------- reviews


def _ident(obj: dict, key: str) -> str:
    value = obj.get(key)
    if isinstance(value, bool) or value is None:
        raise DirtyLine(f"missing {key}")
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DirtyLine(f"missing {key}", repr(value)[:60])
    return value


def _rating(obj: dict, key: str) -> float:
    value = obj.get(key)
    if value is None:
        raise DirtyLine(f"missing {key}")
    if isinstance(value, bool):
        raise DirtyLine(f"non-numeric {key}", repr(value))
    try:
        rating = float(value)
    except (TypeError, ValueError):
        raise DirtyLine(f"non-numeric {key}", repr(value)[:60]) from None
    if not math.isfinite(rating):
        raise DirtyLine(f"non-numeric {key}", repr(value)[:60])
    if not MIN_RATING <= rating <= MAX_RATING:
        raise DirtyLine(f"{key} out of range {MIN_RATING}..{MAX_RATING}", repr(value)[:60])
    return rating


def _timestamp(obj: dict, key: str, divisor: int) -> int:
    value = obj.get(key)
    if value is None:
        raise DirtyLine(f"missing {key}")
    if isinstance(value, bool):
        raise DirtyLine(f"bad {key}", repr(value))
    try:
        if isinstance(value, str):
            value = float(value) if any(c in value for c in ".eE") else int(value)
        if isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                raise ValueError
            value = int(value)
        if not isinstance(value, int) or value < 0:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise DirtyLine(f"bad {key}", repr(value)[:60]) from None
    seconds = value // divisor
    if seconds > _MAX_STAMP:
        raise DirtyLine(f"bad {key}", repr(value)[:60])
    return seconds


def review_fields(fmt: str) -> tuple[str, str, str, str, int]:
    """(user key, item key, rating key, time key, time divisor to seconds) of raw format ``fmt``."""
    return _check_format(fmt).reviews.as_tuple()  # type: ignore[union-attr]


def review_converter(fmt: str) -> Callable[[dict], tuple]:
    """The per-record check and conversion of one review: ``(user, item, rating, seconds)``.

    A factory (not inlined in :func:`read_reviews`) so the chunked columnar reader can hand the lines its fast path
    rejects to exactly the same rules."""
    ukey, ikey, rkey, tkey, divisor = review_fields(fmt)

    def convert(obj: dict) -> tuple:
        user, item, rating, stamp = obj.get(ukey), obj.get(ikey), obj.get(rkey), obj.get(tkey)
        # Fast path for the clean common case; anything unusual goes through the checked path.
        if (
            type(user) is str
            and type(item) is str
            and type(stamp) is int
            and type(rating) in (float, int)
            and user.strip()
            and item.strip()
            and 0 <= stamp <= _MAX_STAMP
            and MIN_RATING <= rating <= MAX_RATING
        ):
            return user, item, float(rating), stamp // divisor
        return (_ident(obj, ukey), _ident(obj, ikey), _rating(obj, rkey), _timestamp(obj, tkey, divisor))

    return convert


def read_reviews(
    path: str | Path, fmt: str, max_bad_lines: int = 100, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> tuple[pd.DataFrame, SkipReport]:
    """Read a review dump into ``user_id, asin, rating (float32), timestamp (int64 seconds)``.

    2023 reviews are keyed by ``parent_asin`` (the metadata's key) and timestamped in milliseconds; both are normalised
    so the three releases look alike downstream."""
    path = Path(path)
    convert = review_converter(fmt)
    (users, items, ratings, times), report = _read_records(path, _parse_json, convert, 4, max_bad_lines, max_line_bytes)
    df = pd.DataFrame(
        {
            "user_id": pd.array(users, dtype="str"), "asin": pd.array(items, dtype="str"),
            "rating": np.asarray(ratings, dtype=np.float32), "timestamp": np.asarray(times, dtype=np.int64),
        }
    )
    return df, report


# -------------------------------------------------------------------------------------------- meta


def _text(value: Any) -> str:
    """A free-text field that may be a string, a list of strings, or missing."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list | tuple):
        return " ".join(s.strip() for s in (_text(v) for v in value) if s)
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else ""


def _str_list(value: Any) -> list[str]:
    return [] if not isinstance(value, list | tuple) else [v.strip() for v in value if isinstance(v, str) and v.strip()]


def _first_url(value: Any) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list | tuple):
        for v in value:
            if isinstance(v, str) and v.strip():
                return v.strip()
    return ""


def _image_2023(images: Any) -> str:
    """The MAIN image's large (else hi_res, else thumb) URL; else the first image that has one.

    The raw 2023 files hold a list of {thumb, large, hi_res, variant} dicts; the Hugging Face copies hold a dict of
    parallel lists. Both are accepted."""
    if isinstance(images, dict):
        keys = [k for k in ("thumb", "large", "hi_res", "variant") if isinstance(images.get(k), list)]
        n = max((len(images[k]) for k in keys), default=0)
        images = [{k: images[k][j] if j < len(images[k]) else None for k in keys} for j in range(n)]
    if not isinstance(images, list):
        return ""
    dicts = [im for im in images if isinstance(im, dict)]
    ordered = [im for im in dicts if im.get("variant") == "MAIN"] + [im for im in dicts if im.get("variant") != "MAIN"]
    for im in ordered:
        for key in ("large", "hi_res", "thumb"):
            url = im.get(key)
            if isinstance(url, str) and url.strip():
                return url.strip()
    return ""


def meta_record_2014(obj: dict) -> tuple:
    """One 2014 metadata record -> ``META_COLUMNS`` (named by the format table)."""
    cats = obj.get("categories")
    first = cats[0] if isinstance(cats, list | tuple) and cats and isinstance(cats[0], list | tuple) else []
    return (
        _ident(obj, "asin"), _text(obj.get("title")), _text(obj.get("brand")), _str_list(first),
        _text(obj.get("description")), "", _first_url(obj.get("imUrl")),
    )


def meta_record_2018(obj: dict) -> tuple:
    """One 2018 metadata record -> ``META_COLUMNS`` (named by the format table)."""
    image = _first_url(obj.get("imageURLHighRes")) or _first_url(obj.get("imageURL"))
    return (
        _ident(obj, "asin"), _text(obj.get("title")), _text(obj.get("brand")), _str_list(obj.get("category")),
        _text(obj.get("description")), _text(obj.get("feature")), image,
    )


def meta_record_2023(obj: dict) -> tuple:
    """One 2023 metadata record -> ``META_COLUMNS`` (named by the format table)."""
    return (
        _ident(obj, "parent_asin"), _text(obj.get("title")), _text(obj.get("store")), _str_list(obj.get("categories")),
        _text(obj.get("description")), _text(obj.get("features")), _image_2023(obj.get("images")),
    )


def read_meta(
    path: str | Path, fmt: str, max_bad_lines: int = 100, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> tuple[pd.DataFrame, SkipReport]:
    """Read a metadata dump into ``asin, title, brand, categories, description, features, image_url``.

    ``categories`` is one category path as a list of str (2014: the first of its paths); ``features`` is the 2018/2023
    bullet list joined into one string ("" for 2014, which has none); ``image_url`` is "" when the item has no image.
    Duplicate asins are kept here; the interactions stage keeps the first."""
    path = Path(path)
    parse, convert = meta_parser(fmt)
    columns, report = _read_records(path, parse, convert, len(META_COLUMNS), max_bad_lines, max_line_bytes)
    return meta_frame(columns), report


def meta_parser(fmt: str) -> tuple[Callable[[bytes], Any], Callable[[dict], tuple]]:
    """(line parser, record converter) for one release's metadata lines, as its format row names them."""
    row = _check_format(fmt)
    parse = parse_literal_line if row.meta_lines == "literal" else _parse_json
    return parse, formats.resolve(row.meta_record)


def meta_frame(columns: list[list]) -> pd.DataFrame:
    """Converted metadata columns (in ``META_COLUMNS`` order) as the ``read_meta`` table."""
    return pd.DataFrame(
        {
            col: values if col == "categories" else pd.array(values, dtype="str")
            for col, values in zip(META_COLUMNS, columns, strict=True)
        }
    )
