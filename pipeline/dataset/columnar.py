"""Chunked, columnar reading of review dumps: tens of millions of reviews in bounded memory.

Why: :func:`sand.pipeline.dataset.readers.read_reviews` keeps two Python ``str`` objects per review (about 130 bytes
each with their list slots); at the 66M reviews of a 2023 category that is well over 10 GB before pandas copies
anything. Here a review never becomes a Python object for longer than one chunk: each chunk of lines is parsed into
Arrow columns, its user and item ids are dictionary-encoded at once, and only int32 codes, the float32 rating and the
int64 timestamp (20 bytes a review) are kept. The distinct ids are sorted once at the end, so the codes follow the
sorted raw ids exactly as ``pd.factorize(sort=True)`` numbers them in the per-line path.

Why pyarrow (not polars or duckdb): it is already a dependency (parquet), its JSON reader parses only the columns named
in an explicit schema with RapidJSON on all cores, and its compute kernels (dictionary_encode, unique, sort, index_in)
are all this needs; a second dataframe engine would add weight, not capability.

Dirty lines keep the per-line contract exactly. The fast path only accepts a chunk it can vouch for: valid UTF-8, one
JSON object per non-blank line, no NaN/Infinity tokens or bare carriage returns (RapidJSON tolerates them, orjson does
not), no line deep enough to hit orjson's nesting limit, every kept value present and plain (ids starting with a
printable ASCII character, ratings within 1..5, timestamps in range). Any other chunk is re-read line by line through
:func:`sand.pipeline.dataset.readers.parse_lines` with the same converter as ``read_reviews``, so every dirty line is
skipped, counted and reported as before, under the same ``max_bad_lines`` budget, and lines are read through the same
bounded line reader.

Metadata (item-level, 2014's is Python literals) stays per line, but in chunks that keep only the items that survived
the k-core: its memory follows the final catalogue, not the raw dump."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from sand.pipeline.dataset import readers
from sand.pipeline.dataset.interactions import InteractionsResult, index_reviews, with_meta
from sand.pipeline.dataset.readers import SkipReport, parse_lines, review_converter

log = logging.getLogger(__name__)

#: Lines per chunk: large enough that Arrow's parser amortises its setup, small enough
#: that one chunk of 2023 reviews with their text stays around 100 MB.
CHUNK_LINES = 100_000
#: Fast-path bounds; anything outside goes to the per-line rules, which decide.
_RATING_RANGE = (float(readers.MIN_RATING), float(readers.MAX_RATING))
_MAX_BRACKETS = 1000  # below orjson's nesting limit (1024) whatever the layout
# RapidJSON (Arrow) treats a lone \r as a line break and accepts NaN/Inf tokens; orjson does neither.
_BARE_CR = re.compile(rb"\r(?!\n)")
_VALUE_START = b":,["  # a bare token right after one of these (and whitespace, a minus) is a JSON value
_JSON_SPACE = b" \t\r\n"
_PRINTABLE_FIRST = r"^[!-~]"  # an id starting like this cannot be blank after str.strip()


@dataclass
class ReviewColumns:
    """Reviews as integer codes plus the sorted distinct raw ids (no Python object per review)."""

    user_codes: np.ndarray  # int64 index into ``users``
    item_codes: np.ndarray  # int64 index into ``items``
    users: pa.Array  # sorted distinct raw user ids (string)
    items: pa.Array  # sorted distinct raw item ids (string)
    rating: np.ndarray  # float32
    timestamp: np.ndarray  # int64 seconds
    report: SkipReport
    chunks: dict[str, int] = field(default_factory=dict)  # how many chunks took each path

    def __len__(self) -> int:
        return len(self.rating)


def _batched(numbered_lines: Iterable[tuple[int, bytes]], size: int) -> Iterator[list[tuple[int, bytes]]]:
    batch: list[tuple[int, bytes]] = []
    for item in numbered_lines:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _plain_json(buf: bytes, lines: list[bytes]) -> bool:
    """True if Arrow's parser and orjson are certain to agree on every line of ``buf``."""
    try:
        pa.array([buf], pa.binary()).cast(pa.string()).validate(full=True)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return False
    if b"\r" in buf and _BARE_CR.search(buf):
        return False
    if _has_nan_or_inf_token(buf):
        return False
    # Nesting deeper than orjson's limit needs more brackets than a short line can hold.
    long_lines = [line for line in lines if len(line) > _MAX_BRACKETS]
    return all(line.count(b"[") + line.count(b"{") <= _MAX_BRACKETS for line in long_lines)


def _has_nan_or_inf_token(buf: bytes) -> bool:
    """True if NaN/Inf[inity] may stand as a JSON value (plain ``bytes.find``: a regex is 5x slower).

    Conservative: the same letters inside a string after ``:``/``,``/``[`` also count, which only sends that chunk down
    the per-line path."""
    for token in (b"NaN", b"Inf"):
        at = buf.find(token)
        while at >= 0:
            j = at - 1
            if j >= 0 and buf[j] == 45:  # "-"
                j -= 1
            while j >= 0 and buf[j] in _JSON_SPACE:
                j -= 1
            if j >= 0 and buf[j] in _VALUE_START:
                return True
            at = buf.find(token, at + 3)
    return False


def _plain_ids(column: pa.ChunkedArray) -> bool:
    return column.null_count == 0 and bool(pc.all(pc.match_substring_regex(column, _PRINTABLE_FIRST)).as_py())


def _fast_chunk(
    lines: list[bytes | None], keys: tuple[str, str, str, str], divisor: int
) -> tuple[pa.Array, pa.Array, np.ndarray, np.ndarray] | None:
    """Parse a chunk with Arrow's JSON reader, or None if any line needs the per-line rules."""
    if any(line is None for line in lines):  # an over-long line: counted by the per-line rules
        return None
    buf = b"".join(lines)
    if not _plain_json(buf, lines):
        return None
    ukey, ikey, rkey, tkey = keys
    schema = pa.schema([(ukey, pa.string()), (ikey, pa.string()), (rkey, pa.float64()), (tkey, pa.int64())])
    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        table = pajson.read_json(pa.BufferReader(buf), parse_options=options)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None
    # One row per non-blank line, or some line held two objects (orjson rejects such a line).
    if table.num_rows != sum(1 for line in lines if line.strip()):
        return None
    users, items = table.column(ukey), table.column(ikey)
    ratings, stamps = table.column(rkey), table.column(tkey)
    if ratings.null_count or stamps.null_count or not (_plain_ids(users) and _plain_ids(items)):
        return None
    rating = ratings.to_numpy()
    stamp = stamps.to_numpy()
    low, high = _RATING_RANGE
    if not (np.all(rating >= low) and np.all(rating <= high)):  # also False for NaN
        return None
    if not (np.all(stamp >= 0) and np.all(stamp <= readers._MAX_STAMP)):
        return None
    return users.combine_chunks(), items.combine_chunks(), rating.astype(np.float32), stamp // divisor


def _slow_chunk(
    batch: list[tuple[int, bytes]], convert: Callable[[dict], tuple], report: SkipReport, max_bad_lines: int,
    max_line_bytes: int,
) -> tuple[pa.Array, pa.Array, np.ndarray, np.ndarray]:
    """The per-line rules of ``read_reviews`` on one chunk (dirty lines counted in ``report``)."""
    columns: list[list] = [[], [], [], []]
    parse_lines(batch, readers._parse_json, convert, columns, report, max_bad_lines, max_line_bytes)
    users, items, ratings, stamps = columns
    return (
        pa.array(users, pa.string()), pa.array(items, pa.string()), np.asarray(ratings, dtype=np.float32),
        np.asarray(stamps, dtype=np.int64),
    )


def _sorted_codes(chunks: list[pa.DictionaryArray]) -> tuple[np.ndarray, pa.Array]:
    """One code array over all chunks, numbered by the sorted distinct values."""
    if not chunks:
        return np.zeros(0, np.int64), pa.array([], pa.string())
    distinct = pc.unique(pa.chunked_array([c.dictionary for c in chunks], pa.string()))
    distinct = distinct.take(pc.sort_indices(distinct))
    codes = np.empty(sum(len(c) for c in chunks), dtype=np.int64)
    start = 0
    for chunk in chunks:
        remap = pc.index_in(chunk.dictionary, value_set=distinct).to_numpy(zero_copy_only=False)
        n = len(chunk)
        codes[start : start + n] = remap[chunk.indices.to_numpy(zero_copy_only=False)]
        start += n
    return codes, distinct


def read_review_columns(
    path: str | Path, fmt: str, max_bad_lines: int = 100, chunk_lines: int = CHUNK_LINES,
    progress: Callable[[int], None] | None = None, max_line_bytes: int = readers.DEFAULT_MAX_LINE_BYTES,
) -> ReviewColumns:
    """Read a review dump chunk by chunk into :class:`ReviewColumns`.

    Same records, same skips and same errors as :func:`sand.pipeline.dataset.readers.read_reviews` (which stays as the
    reference implementation); ``progress`` is called with the number of lines of each finished chunk."""
    path = Path(path)
    convert = review_converter(fmt)
    ukey, ikey, rkey, tkey, divisor = readers.review_fields(fmt)
    report = SkipReport(file=str(path))
    user_chunks: list[pa.DictionaryArray] = []
    item_chunks: list[pa.DictionaryArray] = []
    ratings: list[np.ndarray] = []
    stamps: list[np.ndarray] = []
    paths = {"fast": 0, "per-line": 0}
    for batch in _batched(readers.iter_lines(path, max_line_bytes), chunk_lines):
        parsed = _fast_chunk([line for _, line in batch], (ukey, ikey, rkey, tkey), divisor)
        if parsed is None:
            parsed = _slow_chunk(batch, convert, report, max_bad_lines, max_line_bytes)
            paths["per-line"] += 1
        else:
            paths["fast"] += 1
        report.lines_read = batch[-1][0]
        users, items, rating, stamp = parsed
        user_chunks.append(users.dictionary_encode())
        item_chunks.append(items.dictionary_encode())
        ratings.append(rating)
        stamps.append(stamp)
        if progress is not None:
            progress(len(batch))
    user_codes, distinct_users = _sorted_codes(user_chunks)
    del user_chunks
    item_codes, distinct_items = _sorted_codes(item_chunks)
    del item_chunks
    rating_all = np.concatenate(ratings) if ratings else np.zeros(0, np.float32)
    stamp_all = np.concatenate(stamps) if stamps else np.zeros(0, np.int64)
    report.records = len(rating_all)
    readers.finish_report(path, report)
    log.debug("%s: %d chunks parsed columnar, %d line by line", path, paths["fast"], paths["per-line"])
    return ReviewColumns(user_codes, item_codes, distinct_users, distinct_items, rating_all, stamp_all, report, paths)


def read_meta_for_items(
    path: str | Path, fmt: str, asins: pa.Array | pd.Series | np.ndarray, max_bad_lines: int = 100,
    chunk_lines: int = CHUNK_LINES // 4, max_line_bytes: int = readers.DEFAULT_MAX_LINE_BYTES,
) -> tuple[pd.DataFrame, SkipReport]:
    """:func:`sand.pipeline.dataset.readers.read_meta`, keeping only records whose asin is in ``asins``.

    Every line is still parsed and checked (the skip counts and errors are those of ``read_meta``), but a chunk's other
    records are dropped before the next chunk is read, so memory follows the catalogue that survived the k-core. Record
    order (and so "first record of a duplicated asin wins") is unchanged."""
    path = Path(path)
    parse, convert = readers.meta_parser(fmt)
    wanted = asins if isinstance(asins, pa.Array) else pa.array(np.asarray(asins, dtype=object), pa.string())
    report = SkipReport(file=str(path))
    kept: list[pd.DataFrame] = []
    parsed = 0
    for batch in _batched(readers.iter_lines(path, max_line_bytes), chunk_lines):
        columns: list[list] = [[] for _ in readers.META_COLUMNS]
        parse_lines(batch, parse, convert, columns, report, max_bad_lines, max_line_bytes)
        parsed += len(columns[0])
        if not columns[0]:
            continue
        mask = pc.is_in(pa.array(columns[0], pa.string()), value_set=wanted).to_numpy(zero_copy_only=False)
        if mask.any():
            frame = readers.meta_frame(columns)
            kept.append(frame[mask])
    report.records = parsed
    readers.finish_report(path, report)
    meta = pd.concat(kept, ignore_index=True) if kept else readers.meta_frame([[] for _ in readers.META_COLUMNS])
    return meta, report


def interactions_from_dumps(
    reviews: str | Path, meta: str | Path | None, fmt: str, *, k_core: int = 5, split_rule: str = "mmrec",
    seed: int = 0, max_bad_lines: int = 100, chunk_lines: int = CHUNK_LINES,
    progress: Callable[[int], None] | None = None, max_line_bytes: int = readers.DEFAULT_MAX_LINE_BYTES,
) -> tuple[InteractionsResult, dict[str, SkipReport]]:
    """Raw dump files -> the interactions tables, equal to ``build_interactions(read_reviews(reviews),
    read_meta(meta))`` but in bounded memory.

    Returns the result and the skip report of each file read (``"reviews"``, ``"meta"``)."""
    cols = read_review_columns(reviews, fmt, max_bad_lines, chunk_lines, progress, max_line_bytes)
    reports = {"reviews": cols.report}
    result = index_reviews(
        cols.user_codes, cols.item_codes, cols.users, cols.items, cols.rating, cols.timestamp, k_core=k_core,
        split_rule=split_rule, seed=seed,
    )
    del cols
    table = None
    if meta is not None:
        table, reports["meta"] = read_meta_for_items(
            meta, fmt, result.item_map["asin"], max_bad_lines, max(1, chunk_lines // 4), max_line_bytes
        )
    return with_meta(result, table), reports
