"""Every dataset format the pipeline reads, one row each: the table the rest is derived from.

The config's ``acquire.format`` values, the ``--format`` help, the published URLs, the content sniffer and the raw-dump
readers all ask "what is format X", so a new raw-dump format is its metadata record converter plus one :data:`FORMATS`
row. ``mmrec`` (a folder) and ``sample`` (generated) are rows too, valid names everywhere, though the acquire and
interactions stages dispatch on them. Cheap to import (config validation, ``sand --help``): readers are
``"module:function"`` strings, imported only when a file is read."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

#: One record's kind, as the sniffer reports it.
Kind = Literal["reviews", "meta"]
#: ``sniff(keys, strict_json)``: the kind of a record of this format, or None when it is not one.
Sniffer = Callable[[Collection[str], bool], "Kind | None"]


@dataclass(frozen=True)
class ReviewFields:
    """Where one release keeps a review's user, item, rating and time (and the time's unit)."""

    user: str
    item: str
    rating: str
    time: str
    #: divides the stored timestamp into seconds (2023 stores milliseconds)
    time_divisor: int = 1

    def as_tuple(self) -> tuple[str, str, str, str, int]:
        return (self.user, self.item, self.rating, self.time, self.time_divisor)


@dataclass(frozen=True)
class DatasetFormat:
    """One format: how users name it, how files of it are recognised and read."""

    #: review fields of a raw line-per-record dump (None: not read by the dump readers)
    reviews: ReviewFields | None = None
    #: how a metadata line is parsed: strict JSON, or Python literals (never eval'd)
    meta_lines: Literal["json", "literal"] = "json"
    #: one parsed metadata record -> ``readers.META_COLUMNS`` tuple, as ``"module:function"``
    meta_record: str | None = None
    #: published per-category (reviews, meta) URL templates with ``{cat}``
    urls: tuple[str, str] | None = None
    #: the content sniffer (None: recognised otherwise, e.g. an MMRec folder by its ``.inter`` file)
    sniff: Sniffer | None = None
    #: whether a user may name it on ``--format`` (the bundled sample is generated, not read)
    user_facing: bool = True

    def __post_init__(self) -> None:
        if self.reviews is not None and self.meta_record is None:
            raise ValueError(f"format with review fields {self.reviews}: a raw-dump format needs its meta_record")

    @property
    def raw(self) -> bool:
        return self.reviews is not None


# Sniffers: each sees one record's keys and whether its line was strict JSON (2014 metadata lines are Python literals),
# and claims only its own release's records, so the table's order does not matter.
_REVIEW_KEYS_2014_2018 = {"reviewerID", "unixReviewTime"}


def _keyed_by_asin(keys: Collection[str]) -> bool:
    """2014/2018 records: keyed by ``asin`` (2023 ones carry ``parent_asin``, reviews both)."""
    return "asin" in keys and "parent_asin" not in keys


def _sniff_2023(keys: Collection[str], strict_json: bool) -> Kind | None:
    if "parent_asin" not in keys:
        return None
    return "reviews" if "user_id" in keys else "meta"


def _sniff_2014(keys: Collection[str], strict_json: bool) -> Kind | None:
    if not _keyed_by_asin(keys):
        return None
    if not strict_json:
        return "reviews" if "reviewerID" in keys else "meta"
    keys = set(keys)
    if _REVIEW_KEYS_2014_2018 <= keys:
        # 2014 reviews carry "helpful" [up, total]; 2018 ones "verified"/"vote"/"style" instead
        return "reviews" if "helpful" in keys and not keys & {"verified", "vote", "style"} else None
    if keys & {"imUrl", "salesRank", "categories"} and not keys & {"imageURL", "imageURLHighRes", "main_cat"}:
        return "meta"  # 2014 meta someone converted to strict JSON
    return None


def _sniff_2018(keys: Collection[str], strict_json: bool) -> Kind | None:
    if not _keyed_by_asin(keys) or _sniff_2014(keys, strict_json) is not None:
        return None
    return "reviews" if _REVIEW_KEYS_2014_2018 <= set(keys) else "meta"


_READERS = "sand.pipeline.dataset.readers"

FORMATS: dict[str, DatasetFormat] = {
    "amazon2014": DatasetFormat(
        ReviewFields("reviewerID", "asin", "overall", "unixReviewTime"),
        meta_lines="literal", meta_record=f"{_READERS}:meta_record_2014", sniff=_sniff_2014,
        urls=("http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_{cat}_5.json.gz",
              "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_{cat}.json.gz"),
    ),
    "amazon2018": DatasetFormat(
        ReviewFields("reviewerID", "asin", "overall", "unixReviewTime"),
        meta_record=f"{_READERS}:meta_record_2018", sniff=_sniff_2018,
        urls=("https://jmcauley.ucsd.edu/data/amazon_v2/categoryFilesSmall/{cat}_5.json.gz",
              "https://jmcauley.ucsd.edu/data/amazon_v2/metaFiles2/meta_{cat}.json.gz"),
    ),
    "amazon2023": DatasetFormat(
        ReviewFields("user_id", "parent_asin", "rating", "timestamp", 1000),
        meta_record=f"{_READERS}:meta_record_2023", sniff=_sniff_2023,
        urls=("https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw/review_categories/{cat}.jsonl.gz",
              "https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw/meta_categories/meta_{cat}.jsonl.gz"),
    ),
    # an MMRec dataset folder (<name>.inter, image_feat.npy, text_feat.npy): pipeline/dataset/mmrec.py
    "mmrec": DatasetFormat(),
    # the bundled synthetic sample, generated offline (pipeline/acquire/bundled_sample.py)
    "sample": DatasetFormat(user_facing=False),
}


def format_names() -> tuple[str, ...]:
    return tuple(FORMATS)


def raw_formats() -> tuple[str, ...]:
    """Formats read from line-per-record review/metadata dumps."""
    return tuple(n for n, f in FORMATS.items() if f.raw)


def check_format_name(name: str) -> str:
    """``name`` if it is a format, else a ValueError naming it and the formats (config validation)."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}: choose one of {', '.join(FORMATS)}")
    return name


def format_help() -> str:
    """``--format``'s help: the formats a user may name (``"amazon2014 | amazon2018 | ..."``)."""
    choices = " | ".join(n for n, f in FORMATS.items() if f.user_facing)
    return f"{choices} (default: sniffed from the files, or the preset's)"


def raw_format(name: str) -> DatasetFormat:
    """The row of raw-dump format ``name``; ValueError naming the raw formats otherwise."""
    row = FORMATS.get(name)
    if row is None or not row.raw:
        raise ValueError(f"unknown raw format {name!r}; valid formats: {', '.join(raw_formats())}")
    return row


def classify_keys(keys: Collection[str], strict_json: bool) -> tuple[str, Kind] | None:
    """(format, kind) of one record from its keys: the format whose sniffer claims it (None: no format)."""
    for name, row in FORMATS.items():
        if row.sniff is not None and (kind := row.sniff(keys, strict_json)) is not None:
            return name, kind
    return None


@cache
def resolve(ref: str) -> Any:
    """The object a ``"module:attribute"`` reference names (imported on first use)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
