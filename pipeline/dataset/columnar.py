"""Chunked, columnar reading of review dumps: tens of millions of reviews in bounded memory.

Why: :func:`sand.pipeline.dataset.readers.read_reviews` keeps two Python ``str`` per review, too many for a large 2023
category. Here each chunk of lines is parsed into Arrow columns and its ids dictionary-encoded at once, so only integer
codes, ratings and timestamps are kept; the distinct ids are sorted once at the end, so the codes number the raw ids
exactly as ``pd.factorize(sort=True)`` does. pyarrow, not polars or duckdb: it is already a dependency, and its JSON
reader and compute kernels are all this needs. A chunk the fast path cannot vouch for goes line by line through
:func:`sand.pipeline.dataset.readers.parse_lines`, so dirty lines are skipped, counted and reported exactly as before.
Metadata (2014's is Python literals) stays per line, but each chunk keeps only the items that survived the k-core."""

from __future__ import annotations

import itertools
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

#: Lines per chunk: enough for Arrow's parser to amortise its setup, few enough that a 2023 chunk stays ~100 MB.
CHUNK_LINES = 100_000
_MAX_BRACKETS = 1000  # below orjson's nesting limit (1024) whatever the layout
# RapidJSON (Arrow) treats a lone \r as a line break and accepts NaN/Inf tokens; orjson does neither.
_BARE_CR = re.compile(rb"\r(?!\n)")
_VALUE_START = b":,["  # a bare token right after one of these (and whitespace, a minus) is a JSON value
_JSON_SPACE = b" \t\r\n"
_PRINTABLE_FIRST = r"^[!-~]"  # an id starting like this cannot be blank after str.strip()
_Chunk = tuple[pa.Array, pa.Array, np.ndarray, np.ndarray]  # users, items, rating, timestamp of one chunk


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
    lines = iter(numbered_lines)
    while batch := list(itertools.islice(lines, size)):
        yield batch


def _plain_json(buf: bytes, lines: list[bytes]) -> bool:
    """True if Arrow's parser and orjson are certain to agree on every line of ``buf``."""
    try:
        pa.array([buf], pa.binary()).cast(pa.string()).validate(full=True)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return False
    if (b"\r" in buf and _BARE_CR.search(buf)) or _has_nan_or_inf_token(buf):
        return False
    # Nesting deeper than orjson's limit needs more brackets than a short line can hold.
    return all(line.count(b"[") + line.count(b"{") <= _MAX_BRACKETS for line in lines if len(line) > _MAX_BRACKETS)


def _has_nan_or_inf_token(buf: bytes) -> bool:
    """True if NaN/Inf[inity] may stand as a JSON value (``bytes.find``: a regex is much slower). Conservative: such
    letters in a string after ``:``/``,``/``[`` also count, which only sends the chunk down the per-line path."""
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


def _fast_chunk(lines: list[bytes | None], keys: tuple[str, str, str, str], divisor: int) -> _Chunk | None:
    """Parse a chunk with Arrow's JSON reader, or None unless it is certainly clean: valid UTF-8, one JSON object per
    non-blank line, no NaN/Infinity token or bare carriage return (RapidJSON tolerates them, orjson does not), no
    nesting near orjson's limit, every kept value present and plain. The per-line rules decide on anything else."""
    if any(line is None for line in lines):  # an over-long line: counted by the per-line rules
        return None
    buf = b"".join(lines)
    if not _plain_json(buf, lines):
        return None
    schema = pa.schema(list(zip(keys, (pa.string(), pa.string(), pa.float64(), pa.int64()), strict=True)))
    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        table = pajson.read_json(pa.BufferReader(buf), parse_options=options)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None
    # One row per non-blank line, or some line held two objects (orjson rejects such a line).
    if table.num_rows != sum(1 for line in lines if line.strip()):
        return None
    users, items, ratings, stamps = (table.column(key) for key in keys)
    if ratings.null_count or stamps.null_count or not (_plain_ids(users) and _plain_ids(items)):
        return None
    rating, stamp = ratings.to_numpy(), stamps.to_numpy()
    in_range = np.all((rating >= readers.MIN_RATING) & (rating <= readers.MAX_RATING))  # also False for NaN
    if not (in_range and np.all((stamp >= 0) & (stamp <= readers._MAX_STAMP))):
        return None
    return users.combine_chunks(), items.combine_chunks(), rating.astype(np.float32), stamp // divisor


def _slow_chunk(
    batch: list[tuple[int, bytes]], convert: Callable[[dict], tuple], report: SkipReport, max_bad_lines: int,
    max_line_bytes: int,
) -> _Chunk:
    """The per-line rules of ``read_reviews`` on one chunk (dirty lines counted in ``report``)."""
    columns: list[list] = [[], [], [], []]
    parse_lines(batch, readers._parse_json, convert, columns, report, max_bad_lines, max_line_bytes)
    users, items = (pa.array(ids, pa.string()) for ids in columns[:2])
    return users, items, np.asarray(columns[2], dtype=np.float32), np.asarray(columns[3], dtype=np.int64)


def _sorted_codes(chunks: list[pa.DictionaryArray]) -> tuple[np.ndarray, pa.Array]:
    """One code array over all chunks, numbered by the sorted distinct values."""
    distinct = pc.unique(pa.chunked_array([c.dictionary for c in chunks], pa.string()))
    distinct = distinct.take(pc.sort_indices(distinct))
    codes = np.empty(sum(len(c) for c in chunks), dtype=np.int64)
    start = 0
    for chunk in chunks:
        remap = pc.index_in(chunk.dictionary, value_set=distinct).to_numpy(zero_copy_only=False)
        codes[start : start + len(chunk)] = remap[chunk.indices.to_numpy(zero_copy_only=False)]
        start += len(chunk)
    return codes, distinct


def read_review_columns(
    path: str | Path, fmt: str, max_bad_lines: int = 100, chunk_lines: int = CHUNK_LINES,
    progress: Callable[[int], None] | None = None, max_line_bytes: int = readers.DEFAULT_MAX_LINE_BYTES,
) -> ReviewColumns:
    """Same records, skips and errors as :func:`sand.pipeline.dataset.readers.read_reviews` (kept as the reference);
    ``progress`` gets the number of lines of each finished chunk."""
    path = Path(path)
    convert = review_converter(fmt)
    ukey, ikey, rkey, tkey, divisor = readers.review_fields(fmt)
    report = SkipReport(file=str(path))
    encoded: list[tuple] = []  # per chunk: users and items dictionary-encoded at once, rating, timestamp
    paths = {"fast": 0, "per-line": 0}
    for batch in _batched(readers.iter_lines(path, max_line_bytes), chunk_lines):
        parsed = _fast_chunk([line for _, line in batch], (ukey, ikey, rkey, tkey), divisor)
        paths["fast" if parsed is not None else "per-line"] += 1
        if parsed is None:
            parsed = _slow_chunk(batch, convert, report, max_bad_lines, max_line_bytes)
        report.lines_read = batch[-1][0]
        users, items, rating, stamp = parsed
        encoded.append((users.dictionary_encode(), items.dictionary_encode(), rating, stamp))
        if progress is not None:
            progress(len(batch))
    report.records = sum(len(chunk[2]) for chunk in encoded)
    readers.finish_report(path, report)  # raises when no record was usable
    user_chunks, item_chunks, ratings, stamps = map(list, zip(*encoded, strict=True))
    del encoded
    user_codes, distinct_users = _sorted_codes(user_chunks)
    del user_chunks
    item_codes, distinct_items = _sorted_codes(item_chunks)
    del item_chunks
    log.debug("%s: %d chunks parsed columnar, %d line by line", path, paths["fast"], paths["per-line"])
    return ReviewColumns(
        user_codes, item_codes, distinct_users, distinct_items, np.concatenate(ratings), np.concatenate(stamps), report,
        paths,
    )


def read_meta_for_items(
    path: str | Path, fmt: str, asins: pa.Array | pd.Series | np.ndarray, max_bad_lines: int = 100,
    chunk_lines: int = CHUNK_LINES // 4, max_line_bytes: int = readers.DEFAULT_MAX_LINE_BYTES,
) -> tuple[pd.DataFrame, SkipReport]:
    """:func:`sand.pipeline.dataset.readers.read_meta` (same checks, skip counts, errors and record order, so the first
    record of a duplicated asin still wins), keeping only records whose asin is in ``asins``: a chunk's other records
    are dropped before the next is read, so memory follows the catalogue that survived the k-core."""
    path = Path(path)
    parse, convert = readers.meta_parser(fmt)
    wanted = asins if isinstance(asins, pa.Array) else pa.array(np.asarray(asins, dtype=object), pa.string())
    report = SkipReport(file=str(path))
    kept: list[pd.DataFrame] = []
    for batch in _batched(readers.iter_lines(path, max_line_bytes), chunk_lines):
        columns: list[list] = [[] for _ in readers.META_COLUMNS]
        parse_lines(batch, parse, convert, columns, report, max_bad_lines, max_line_bytes)
        report.records += len(columns[0])
        mask = pc.is_in(pa.array(columns[0], pa.string()), value_set=wanted).to_numpy(zero_copy_only=False)
        if mask.any():
            kept.append(readers.meta_frame(columns)[mask])
    readers.finish_report(path, report)
    meta = pd.concat(kept, ignore_index=True) if kept else readers.meta_frame([[] for _ in readers.META_COLUMNS])
    return meta, report


def interactions_from_dumps(
    reviews: str | Path, meta: str | Path | None, fmt: str, *, k_core: int = 5, split_rule: str = "mmrec",
    seed: int = 0, max_bad_lines: int = 100, chunk_lines: int = CHUNK_LINES,
    progress: Callable[[int], None] | None = None, max_line_bytes: int = readers.DEFAULT_MAX_LINE_BYTES,
) -> tuple[InteractionsResult, dict[str, SkipReport]]:
    """``build_interactions(read_reviews(reviews), read_meta(meta))`` in bounded memory, with the skip report of each
    file read (``"reviews"``, ``"meta"``)."""
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
