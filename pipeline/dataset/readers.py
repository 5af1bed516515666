"""Readers for the raw Amazon review and metadata dumps (2014, 2018, 2023 releases).

The releases differ in field names, encodings (2014 metadata is Python literals), timestamp units (2023: milliseconds)
and image fields; normalising here keeps the rest of the pipeline format-agnostic. Up to a budget, broken records are
skipped and counted in a :class:`SkipReport` (logged, and stored in the manifest); past it, or for a broken file
(truncated gzip, empty), a one-line :class:`DataError` names the file and line. 2014 literals go through
:func:`ast.literal_eval`: ``__import__('os').system(...)`` is a counted skip, never run. Memory is bounded whatever the
input: :func:`pipeline.base.lines.iter_lines` drops over-long lines and refuses gzip bombs,
:func:`pipeline.base.lines.parse_literal_line` bounds tokens before ``literal_eval``."""

from __future__ import annotations

import itertools
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

META_COLUMNS = ["asin", "title", "brand", "categories", "description", "features", "image_url"]
_MAX_EXAMPLES = 5
MIN_RATING, MAX_RATING = 1, 5  # star ratings in every release; anything else is a dirty line
_MAX_STAMP = 2**62  # far beyond any real date; keeps int64 arithmetic safe downstream


@dataclass
class SkipReport:
    """Dirty records skipped while reading one file: counts per reason and a few examples. Returned (not just logged) so
    the stage can write it into its manifest, where a user can see how much of the raw data was dropped and why."""

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
    """Append each line's converted values to ``columns``, counting dirty lines in ``report`` (a :class:`DataError` past
    ``max_bad_lines``): the one place that decides what a dirty line is, for the whole-file and the columnar reader
    alike. A ``None`` line is one :func:`iter_lines` dropped as over ``max_line_bytes``."""
    appenders = [c.append for c in columns]

    def skip(lineno: int, reason: str, detail: str) -> None:
        report.add(lineno, reason, detail)
        if report.total > max_bad_lines:
            shown = f" {detail}" if detail else ""
            raise DataError(f"{report.file}:{lineno}: {reason}{shown} (more than {max_bad_lines} bad lines)")

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
    """Parse every line into column lists (not row tuples, which take far more memory)."""
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
    try:
        rating = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        rating = math.nan
    if not math.isfinite(rating):
        raise DirtyLine(f"non-numeric {key}", repr(value)[:60])
    if not MIN_RATING <= rating <= MAX_RATING:
        raise DirtyLine(f"{key} out of range {MIN_RATING}..{MAX_RATING}", repr(value)[:60])
    return rating


def _timestamp(obj: dict, key: str, divisor: int) -> int:
    value = obj.get(key)
    if value is None:
        raise DirtyLine(f"missing {key}")
    try:
        if isinstance(value, str):
            value = float(value) if any(c in value for c in ".eE") else int(value)
        if isinstance(value, float) and value.is_integer():  # False for NaN and infinities
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value // divisor > _MAX_STAMP:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise DirtyLine(f"bad {key}", repr(value)[:60]) from None
    return value // divisor


def review_fields(fmt: str) -> tuple[str, str, str, str, int]:
    """(user key, item key, rating key, time key, time divisor to seconds) of raw format ``fmt``."""
    return _check_format(fmt).reviews.as_tuple()  # type: ignore[union-attr]


def review_converter(fmt: str) -> Callable[[dict], tuple]:
    """The check and conversion of one review record to ``(user, item, rating, seconds)``; a factory so the chunked
    columnar reader can hand the lines its fast path rejects to exactly the same rules."""
    ukey, ikey, rkey, tkey, divisor = review_fields(fmt)

    def convert(obj: dict) -> tuple:
        user, item, rating, stamp = obj.get(ukey), obj.get(ikey), obj.get(rkey), obj.get(tkey)
        # Fast path for the clean common case; anything unusual goes through the checked path.
        if (
            type(user) is str and type(item) is str and type(stamp) is int and type(rating) in (float, int)
            and user.strip() and item.strip() and 0 <= stamp <= _MAX_STAMP and MIN_RATING <= rating <= MAX_RATING
        ):
            return user, item, float(rating), stamp // divisor
        return (_ident(obj, ukey), _ident(obj, ikey), _rating(obj, rkey), _timestamp(obj, tkey, divisor))

    return convert


def read_reviews(
    path: str | Path, fmt: str, max_bad_lines: int = 100, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> tuple[pd.DataFrame, SkipReport]:
    """Read a review dump into ``user_id, asin, rating (float32), timestamp (int64 seconds)``; 2023 reviews, keyed by
    ``parent_asin`` (the metadata's key) and stamped in milliseconds, are normalised to look alike."""
    path, convert = Path(path), review_converter(fmt)
    (users, items, ratings, times), report = _read_records(path, _parse_json, convert, 4, max_bad_lines, max_line_bytes)
    df = pd.DataFrame({
        "user_id": pd.array(users, dtype="str"), "asin": pd.array(items, dtype="str"),
        "rating": np.asarray(ratings, dtype=np.float32), "timestamp": np.asarray(times, dtype=np.int64),
    })
    return df, report


def _text(value: Any) -> str:
    """A free-text field that may be a string, a list of strings, or missing."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list | tuple):
        return " ".join(s.strip() for s in (_text(v) for v in value) if s)
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else ""


def _str_list(value: Any) -> list[str]:
    return [] if not isinstance(value, list | tuple) else [v.strip() for v in value if isinstance(v, str) and v.strip()]


def _first_url(value: Any) -> str:
    return value.strip() if isinstance(value, str) else next(iter(_str_list(value)), "")


def _image_2023(images: Any) -> str:
    """The MAIN image's large (else hi_res, else thumb) URL; else the first image that has one. The raw 2023 files hold
    a list of {thumb, large, hi_res, variant} dicts, the Hugging Face copies a dict of parallel lists: both are read."""
    if isinstance(images, dict):
        keys = [k for k in ("thumb", "large", "hi_res", "variant") if isinstance(images.get(k), list)]
        images = [dict(zip(keys, values, strict=True)) for values in itertools.zip_longest(*(images[k] for k in keys))]
    if not isinstance(images, list):
        return ""
    ordered = sorted((im for im in images if isinstance(im, dict)), key=lambda im: im.get("variant") != "MAIN")
    return _first_url([im.get(key) for im in ordered for key in ("large", "hi_res", "thumb")])


# One metadata record -> a ``META_COLUMNS`` tuple, per release; the format table names these converters.
def meta_record_2014(obj: dict) -> tuple:
    cats = obj.get("categories")
    first = cats[0] if isinstance(cats, list | tuple) and cats and isinstance(cats[0], list | tuple) else []
    return (
        _ident(obj, "asin"), _text(obj.get("title")), _text(obj.get("brand")), _str_list(first),
        _text(obj.get("description")), "", _first_url(obj.get("imUrl")),
    )


def meta_record_2018(obj: dict) -> tuple:
    image = _first_url(obj.get("imageURLHighRes")) or _first_url(obj.get("imageURL"))
    return (
        _ident(obj, "asin"), _text(obj.get("title")), _text(obj.get("brand")), _str_list(obj.get("category")),
        _text(obj.get("description")), _text(obj.get("feature")), image,
    )


def meta_record_2023(obj: dict) -> tuple:
    return (
        _ident(obj, "parent_asin"), _text(obj.get("title")), _text(obj.get("store")), _str_list(obj.get("categories")),
        _text(obj.get("description")), _text(obj.get("features")), _image_2023(obj.get("images")),
    )


def read_meta(
    path: str | Path, fmt: str, max_bad_lines: int = 100, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> tuple[pd.DataFrame, SkipReport]:
    """Read a metadata dump into ``asin, title, brand, categories, description, features, image_url``: ``categories`` is
    one category path (2014: the first of its paths), ``features`` the bullet list as one string ("" for 2014, which has
    none), ``image_url`` "" without an image. Duplicate asins are kept; the interactions stage keeps the first."""
    parse, convert = meta_parser(fmt)
    columns, report = _read_records(Path(path), parse, convert, len(META_COLUMNS), max_bad_lines, max_line_bytes)
    return meta_frame(columns), report


def meta_parser(fmt: str) -> tuple[Callable[[bytes], Any], Callable[[dict], tuple]]:
    """(line parser, record converter) for one release's metadata lines, as its format row names them."""
    row = _check_format(fmt)
    parse = parse_literal_line if row.meta_lines == "literal" else _parse_json
    return parse, formats.resolve(row.meta_record)


def meta_frame(columns: list[list]) -> pd.DataFrame:
    """Converted metadata columns (in ``META_COLUMNS`` order) as the ``read_meta`` table."""
    named = zip(META_COLUMNS, columns, strict=True)
    return pd.DataFrame({col: vals if col == "categories" else pd.array(vals, dtype="str") for col, vals in named})
