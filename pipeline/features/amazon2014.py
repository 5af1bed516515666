"""The Amazon 2014 release's own image features, streamed out of its per-category ``.b`` file.

Why: the SAND paper (through MMRec's preprocessing) takes the 4,096-d CNN features the 2014 release ships per category
(``image_features_<Category>.b``) instead of running a CNN, and reproducing its Table 2 needs exactly those rows. The
file is headerless records of a 10-byte ASCII ASIN and 4,096 little-endian float32, about 1 GB for Baby and tens of GB
for Clothing, of which a 5-core dataset keeps a few thousand rows: it is read in chunks of whole records keeping only
the dataset's rows, so memory is bounded by the chunk and the output, never by the file. Damage is counted, not fatal
(a truncated final record, mid-file records without a printable ASIN, repeated ASINs), but a file of another layout
fails the ASIN check on its first records; a dataset item with no finite record is filled (mean of the found rows,
MMRec's convention, or zeros) and listed with its reason."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from sand.pipeline.base.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ASIN_BYTES = 10
FEATURE_DIM = 4096
RECORD_BYTES = ASIN_BYTES + 4 * FEATURE_DIM  # 16,394
RECORD_DTYPE = np.dtype([("asin", f"S{ASIN_BYTES}"), ("feat", "<f4", (FEATURE_DIM,))])

#: Records checked for a plausible layout before anything is kept (a wrong width fails here).
LAYOUT_CHECK_RECORDS = 16
#: Records per read: ~16 MB, large enough that numpy, not Python, does the work per byte.
CHUNK_RECORDS = 1024

ABSENT = "absent_from_feature_file"
NONFINITE = "nonfinite_features"

_ASIN = re.compile(rb"^[\x21-\x7e]{10}$")


@dataclass
class FeatureFileStats:
    """What the pass over the file saw (goes into the stage manifest as it is)."""

    file_bytes: int = 0
    records: int = 0
    records_kept: int = 0
    duplicate_records: int = 0
    unreadable_records: int = 0
    nonfinite_records: int = 0
    truncated_tail_bytes: int = 0
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ItemFeatures:
    """One row per dataset item (item-index order) and which rows came from the file."""

    features: np.ndarray  # (n_items, 4096) float32; absent rows filled
    found: np.ndarray  # (n_items,) bool
    missing: pd.DataFrame  # columns item, asin, reason
    stats: FeatureFileStats = field(default_factory=FeatureFileStats)

    @property
    def items_found(self) -> int:
        return int(self.found.sum())

    @property
    def items_filled(self) -> int:
        return int(len(self.found) - self.found.sum())


def _layout_error(path: Path, size: int, index: int, head: bytes) -> DataError:
    width = "" if size % RECORD_BYTES == 0 else f"; its size {size} is not a multiple of {RECORD_BYTES}"
    return DataError(f"{path}: not an Amazon 2014 image feature file: expected records of {RECORD_BYTES} bytes "
                     f"(a 10-byte ASIN + {FEATURE_DIM} float32), but record {index + 1} at byte "
                     f"{index * RECORD_BYTES} starts with {head!r}, not an ASIN{width}")


def _wanted_asins(asins: Sequence[str]) -> dict[bytes, int]:
    wanted: dict[bytes, int] = {}
    for item, asin in enumerate(asins):
        key = str(asin).encode("ascii", "replace")
        if _ASIN.match(key):  # anything else cannot be in the file and stays absent
            wanted.setdefault(key, item)
    return wanted


@dataclass
class _KeptRows:
    """The dataset's rows found so far, filled in place chunk by chunk so memory stays bounded by the output."""

    features: np.ndarray  # (n_items, FEATURE_DIM) float32
    found: np.ndarray  # (n_items,) bool
    nonfinite: np.ndarray  # (n_items,) bool: only non-finite records seen
    total: np.ndarray  # (FEATURE_DIM,) float64 sum of the found rows, for the mean fill

    @classmethod
    def empty(cls, n_items: int) -> _KeptRows:
        return cls(np.zeros((n_items, FEATURE_DIM), dtype=np.float32), np.zeros(n_items, dtype=bool),
                   np.zeros(n_items, dtype=bool), np.zeros(FEATURE_DIM, dtype=np.float64))

    def keep(self, records: np.ndarray, hits: np.ndarray, wanted: dict[bytes, int], stats: FeatureFileStats) -> None:
        """Keep each hit's first finite record; count repeats and non-finite records as skips."""
        for row in hits:
            item = wanted[bytes(records["asin"][row])]
            vec = records["feat"][row]
            if self.found[item] or self.nonfinite[item]:
                stats.duplicate_records += 1
            elif not np.isfinite(vec).all():
                self.nonfinite[item] = True
                stats.nonfinite_records += 1
            else:
                self.features[item] = vec
                self.found[item] = True
                self.total += vec


def _stream_records(path: Path, n_records: int, chunk_records: int, wanted: dict[bytes, int], kept: _KeptRows,
                    stats: FeatureFileStats, *, hash_file: bool, progress: bool) -> None:
    """Read the file once in chunks of whole records, keeping the wanted rows and hashing it on the way if asked."""
    size = stats.file_bytes
    wanted_keys = np.array(sorted(wanted), dtype=f"S{ASIN_BYTES}")  # what ``np.isin`` matches each chunk against
    digest = hashlib.sha256() if hash_file else None
    buf = bytearray(min(chunk_records, n_records) * RECORD_BYTES)
    view = memoryview(buf)
    with open(path, "rb") as fh, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                      desc=path.name, disable=not progress, leave=False) as bar:
        while stats.records < n_records:  # records read so far: the index of this chunk's first record
            want = min(len(buf), (n_records - stats.records) * RECORD_BYTES)
            got = fh.readinto(view[:want])  # a buffered file fills the view unless the file ends first
            if digest is not None:
                digest.update(view[:got])
            bar.update(got)
            count = got // RECORD_BYTES
            if count == 0:
                break  # the file shrank while we read it; what we have is what there is
            raw = np.frombuffer(buf, dtype=np.uint8, count=count * RECORD_BYTES).reshape(count, RECORD_BYTES)
            head = raw[:, :ASIN_BYTES]
            ok = ((head >= 0x21) & (head <= 0x7E)).all(axis=1)  # 10 printable, non-space ASCII bytes
            if stats.records == 0 and not ok[:LAYOUT_CHECK_RECORDS].all():
                bad = int(np.flatnonzero(~ok[:LAYOUT_CHECK_RECORDS])[0])
                raise _layout_error(path, size, bad, raw[bad, :ASIN_BYTES].tobytes())
            stats.unreadable_records += int((~ok).sum())
            records = np.frombuffer(buf, dtype=RECORD_DTYPE, count=count)
            kept.keep(records, np.flatnonzero(ok & np.isin(records["asin"], wanted_keys)), wanted, stats)
            stats.records += count
            if got < want:
                break
        if digest is not None:  # the truncated tail is part of the file the user gave
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
            stats.sha256 = digest.hexdigest()


def _finish(path: Path, asins: Sequence[str], kept: _KeptRows, stats: FeatureFileStats, fill: str) -> ItemFeatures:
    """Log the skips, refuse a file that matched no item, fill the absent rows and list them with their reason."""
    n_items, found = len(asins), kept.found
    stats.records_kept = int(found.sum())
    if stats.truncated_tail_bytes:
        log.warning("%s: ignored a truncated final record (%d bytes; records are %d bytes)",
                    path, stats.truncated_tail_bytes, RECORD_BYTES)
    if stats.unreadable_records or stats.duplicate_records or stats.nonfinite_records:
        log.warning("%s: skipped %d unreadable records, %d repeated ASINs, %d records with non-finite values",
                    path, stats.unreadable_records, stats.duplicate_records, stats.nonfinite_records)
    if n_items and not found.any():
        raise DataError(f"{path}: none of the dataset's {n_items} items has a usable record among its "
                        f"{stats.records} records; is it the feature file of this dataset's category?")
    if fill == "mean" and (~found).any():
        kept.features[~found] = (kept.total / max(int(found.sum()), 1)).astype(np.float32)
    absent = np.flatnonzero(~found)
    missing = pd.DataFrame({"item": absent.astype(np.int64), "asin": [str(asins[i]) for i in absent],
                            "reason": [NONFINITE if kept.nonfinite[i] else ABSENT for i in absent]})
    return ItemFeatures(features=kept.features, found=found, missing=missing, stats=stats)


def read_item_features(path: Path | str, asins: Sequence[str], *, fill: str = "mean",
                       chunk_records: int = CHUNK_RECORDS, hash_file: bool = False,
                       progress: bool = False) -> ItemFeatures:
    """The rows of ``asins`` (``asins[i]`` is item ``i``), streaming ``path`` once. ``hash_file``: its sha256 on the
    way, for a file that did not come through the download machinery (which records it)."""
    if fill not in ("mean", "zeros"):
        raise ConfigError(f"invalid config value image_features.fill={fill!r}: expected 'mean' or 'zeros'")
    if chunk_records < 1:
        raise ConfigError(f"chunk_records must be >= 1, got {chunk_records}")
    path = Path(path)
    stats = FeatureFileStats()
    try:
        stats.file_bytes = size = path.stat().st_size
    except OSError as err:
        raise DataError(f"cannot read image feature file {path}: {err.strerror}") from None
    n_records, stats.truncated_tail_bytes = divmod(size, RECORD_BYTES)
    if n_records == 0:
        raise DataError(f"{path}: not an Amazon 2014 image feature file: {size} bytes, less than one record of "
                        f"{RECORD_BYTES} bytes (a 10-byte ASIN + {FEATURE_DIM} float32)")
    kept = _KeptRows.empty(len(asins))
    _stream_records(path, n_records, chunk_records, _wanted_asins(asins), kept, stats, hash_file=hash_file,
                    progress=progress)
    return _finish(path, asins, kept, stats, fill)

