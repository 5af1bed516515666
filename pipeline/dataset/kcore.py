"""Duplicate removal and the iterative k-core filter on integer-coded interactions.

Vectorised for millions of reviews: each round is two ``np.bincount`` calls over the surviving rows, compacted as they
drop. Iterative because removing a user below k can push an item below k, and so on; the fixpoint is the k-core (the
largest sub-graph where every user and item has at least k interactions), unique, so removal order does not matter."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


def dedup_mask(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Mask keeping one row per (user, item) (non-negative codes): the latest timestamp, ties to the last row. A stable
    argsort of a pair key finds the repeated pairs and only those (usually a few percent) are sorted by timestamp: much
    faster than a three-key lexsort of everything."""
    n = len(users)
    if n == 0:
        return np.zeros(0, dtype=bool)
    users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
    key = users * (int(items.max()) + 1) + items
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    same_as_next = sorted_key[1:] == sorted_key[:-1]
    keep = np.ones(n, dtype=bool)
    if not same_as_next.any():
        return keep
    in_group = np.r_[same_as_next, False] | np.r_[False, same_as_next]  # same pair as the next or the previous row
    rows = np.sort(order[in_group])  # rows of repeated pairs, in input order
    keep[rows] = False
    # Stable lexsort: within a pair, by timestamp, then input order; the last row wins.
    sub = rows[np.lexsort((np.asarray(timestamps)[rows], key[rows]))]
    sub_key = key[sub]
    last = np.append(sub_key[1:] != sub_key[:-1], True)  # the last row of each pair
    keep[sub[last]] = True
    return keep


@dataclass(frozen=True)
class KCoreResult:
    mask: np.ndarray
    rounds: int


def kcore(users: np.ndarray, items: np.ndarray, k: int) -> KCoreResult:
    """Iterative k-core on integer codes, each round dropping every user and item below k at once; ``rounds`` counts the
    rounds that removed something. ``k <= 1`` keeps everything (every present user and item has a row)."""
    users, items = np.asarray(users), np.asarray(items)
    n = len(users)
    if len(items) != n:
        raise ValueError(f"users ({n}) and items ({len(items)}) differ in length")
    if k <= 1 or n == 0:
        return KCoreResult(np.ones(n, dtype=bool), 0)
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    idx = np.arange(n, dtype=np.int64)
    u, i = users.astype(np.int64, copy=False), items.astype(np.int64, copy=False)
    rounds = 0
    while len(idx):
        ok = (np.bincount(u, minlength=n_users)[u] >= k) & (np.bincount(i, minlength=n_items)[i] >= k)
        if ok.all():
            break
        rounds += 1
        idx, u, i = idx[ok], u[ok], i[ok]
        log.debug("k-core round %d: %d rows left", rounds, len(idx))
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return KCoreResult(mask, rounds)
