"""The Amazon 2014 release's own image features, streamed out of its per-category ``.b`` file.

Why: the SAND paper (through MMRec's preprocessing) does not run a CNN over the item images; it takes the 4,096-d CNN
features that the 2014 release ships per category (``image_features_<Category>.b``). Reproducing its Table 2 needs
exactly those rows. The file is one record after another, each a 10-byte ASCII ASIN followed by 4,096 little-endian
float32 (16,394 bytes), with no header; Baby's is about 1 GB and Clothing's tens of GB, while a 5-core dataset keeps a
few thousand of its items. So the file is read in large chunks of whole records and only the dataset's rows are kept:
memory is bounded by the chunk and the output matrix, never by the file.

What can go wrong, and what happens:

* a truncated final record (an interrupted copy): its bytes are counted and
  ignored (``truncated_tail_bytes``), the whole records before it are used;
* a record whose ASIN bytes are not printable ASCII in the middle of the file:
  counted (``unreadable_records``) and skipped;
* a file of another layout (records of another width, or not a feature file): the first records already fail the ASIN
  check, and that is one :class:`DataError` naming the file and the expected record size;
* an ASIN listed twice: the first record is kept, the repeats counted;
* a dataset item with no record (or only non-finite values): filled (mean of
  the found rows, MMRec's convention, or zeros) and listed with its reason."""

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


def _valid_asins(raw: np.ndarray) -> np.ndarray:
    """Whether each row of a ``(n, RECORD_BYTES)`` uint8 view starts with 10 printable, non-space ASCII bytes."""
    head = raw[:, :ASIN_BYTES]
    return ((head >= 0x21) & (head <= 0x7E)).all(axis=1)


def _layout_error(path: Path, size: int, index: int, head: bytes) -> DataError:
    shown = head[:ASIN_BYTES]
    width = "" if size % RECORD_BYTES == 0 else f"; its size {size} is not a multiple of {RECORD_BYTES}"
    return DataError(
        f"{path}: not an Amazon 2014 image feature file: expected records of {RECORD_BYTES} bytes "
        f"(a 10-byte ASIN + {FEATURE_DIM} float32), but record {index + 1} at byte {index * RECORD_BYTES} "
        f"starts with {shown!r}, not an ASIN{width}"
    )


def _readinto_full(fh: Any, view: memoryview) -> int:
    """Fill ``view`` from ``fh`` unless the file ends first; returns the bytes read."""
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _wanted_asins(asins: Sequence[str]) -> tuple[dict[bytes, int], np.ndarray]:
    """Each well-formed ASIN's first item, and the sorted keys ``np.isin`` matches a chunk's records against."""
    wanted: dict[bytes, int] = {}
    for item, asin in enumerate(asins):
        key = str(asin).encode("ascii", "replace")
        if _ASIN.match(key):  # anything else cannot be in the file and stays absent
            wanted.setdefault(key, item)
    return wanted, np.array(sorted(wanted), dtype=f"S{ASIN_BYTES}")


def _file_stats(path: Path) -> tuple[FeatureFileStats, int]:
    """Size the file into whole records and a truncated tail, refusing one too short to hold a single record."""
    stats = FeatureFileStats()
    try:
        stats.file_bytes = size = path.stat().st_size
    except OSError as err:
        raise DataError(f"cannot read image feature file {path}: {err.strerror}") from None
    n_records, stats.truncated_tail_bytes = divmod(size, RECORD_BYTES)
    if n_records == 0:
        raise DataError(
            f"{path}: not an Amazon 2014 image feature file: {size} bytes, less than one record of "
            f"{RECORD_BYTES} bytes (a 10-byte ASIN + {FEATURE_DIM} float32)"
        )
    return stats, n_records


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
            if self.found[item] or self.nonfinite[item]:
                stats.duplicate_records += 1
                continue
            vec = records["feat"][row]
            if not np.isfinite(vec).all():
                self.nonfinite[item] = True
                stats.nonfinite_records += 1
                continue
            self.features[item] = vec
            self.found[item] = True
            self.total += vec


def _stream_records(path: Path, n_records: int, chunk_records: int, wanted: dict[bytes, int],
                    wanted_keys: np.ndarray, kept: _KeptRows, stats: FeatureFileStats, *, hash_file: bool,
                    progress: bool) -> None:
    """Read the file once in chunks of whole records, keeping the wanted rows and hashing it on the way if asked."""
    size = stats.file_bytes
    digest = hashlib.sha256() if hash_file else None
    buf = bytearray(min(chunk_records, n_records) * RECORD_BYTES)
    view = memoryview(buf)
    first = 0  # index of the chunk's first record
    with open(path, "rb") as fh, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                      desc=path.name, disable=not progress, leave=False) as bar:
        while first < n_records:
            want = min(len(buf), (n_records - first) * RECORD_BYTES)
            got = _readinto_full(fh, view[:want])
            if digest is not None:
                digest.update(view[:got])
            bar.update(got)
            count = got // RECORD_BYTES
            if count == 0:
                break  # the file shrank while we read it; what we have is what there is
            raw = np.frombuffer(buf, dtype=np.uint8, count=count * RECORD_BYTES).reshape(count, RECORD_BYTES)
            ok = _valid_asins(raw)
            if first == 0:
                checked = min(count, LAYOUT_CHECK_RECORDS)
                if not ok[:checked].all():
                    bad = int(np.flatnonzero(~ok[:checked])[0])
                    raise _layout_error(path, size, bad, raw[bad, :ASIN_BYTES].tobytes())
            stats.unreadable_records += int((~ok).sum())
            records = np.frombuffer(buf, dtype=RECORD_DTYPE, count=count)
            kept.keep(records, np.flatnonzero(ok & np.isin(records["asin"], wanted_keys)), wanted, stats)
            stats.records += count
            first += count
            if got < want:
                break
        if digest is not None:  # the truncated tail is part of the file the user gave
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    if digest is not None:
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
        raise DataError(
            f"{path}: none of the dataset's {n_items} items has a usable record among its {stats.records} "
            "records; is it the feature file of this dataset's category?"
        )
    if fill == "mean" and (~found).any():
        kept.features[~found] = (kept.total / max(int(found.sum()), 1)).astype(np.float32)
    absent = np.flatnonzero(~found)
    missing = pd.DataFrame({
        "item": absent.astype(np.int64),
        "asin": [str(asins[i]) for i in absent],
        "reason": [NONFINITE if kept.nonfinite[i] else ABSENT for i in absent],
    })
    return ItemFeatures(features=kept.features, found=found, missing=missing, stats=stats)


def read_item_features(
    path: Path | str, asins: Sequence[str], *, fill: str = "mean", chunk_records: int = CHUNK_RECORDS,
    hash_file: bool = False, progress: bool = False,
) -> ItemFeatures:
    """Stream ``path`` once and return the rows of ``asins`` (``asins[i]`` is item ``i``).

    ``hash_file`` computes the file's sha256 on the way (no second read), for files that did not come through the
    download machinery, which already recorded theirs. Raises :class:`DataError` for a file that is not a feature file,
    or when none of the dataset's items is in it (the wrong category)."""
    if fill not in ("mean", "zeros"):
        raise ConfigError(f"invalid config value image_features.fill={fill!r}: expected 'mean' or 'zeros'")
    if chunk_records < 1:
        raise ConfigError(f"chunk_records must be >= 1, got {chunk_records}")
    path = Path(path)
    wanted, wanted_keys = _wanted_asins(asins)
    stats, n_records = _file_stats(path)
    kept = _KeptRows.empty(len(asins))
    _stream_records(path, n_records, chunk_records, wanted, wanted_keys, kept, stats, hash_file=hash_file,
                    progress=progress)
    return _finish(path, asins, kept, stats, fill)

