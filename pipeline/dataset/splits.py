"""Per-user train/valid/test split rules (codes 0/1/2 as in :mod:`sand.pipeline.dataset.split_data`).

Several rules because published numbers depend on the split: ``"mmrec"`` reproduces the split found in MMRec's released
Baby data (valid = test = max(1, floor(n/10)) per user, items shuffled), ``"mmrec-notebook"`` is the rule of MMRec's
splitting notebook, ``"chronological"`` holds out each user's latest items. The shuffle key is drawn in (user, item)
order, so the split depends on the seed and the set of interactions, not on the order of the input rows."""

from __future__ import annotations

import numpy as np

from sand.pipeline.base.errors import ConfigError
from sand.pipeline.dataset.split_data import TEST, TRAIN, VALID

SPLIT_RULES = ("mmrec", "mmrec-notebook", "chronological")


def split_counts(n: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, valid, test) counts for users with ``n`` interactions under ``rule``. Users too small for the rule lose
    valid before test (n = 1: one test item; a 5-core never has such users, a k-core of 1 can)."""
    n = np.asarray(n, dtype=np.int64)
    if rule not in SPLIT_RULES:
        raise ConfigError(f"unknown split rule {rule!r}; valid rules: {', '.join(SPLIT_RULES)}")
    if rule == "mmrec-notebook":
        vt = (n * 2) // 10  # int(0.2 * n) without float rounding surprises
        small = n < 10
        valid, test = np.where(small, 1, vt // 2), np.where(small, 1, vt - vt // 2)
    else:
        valid = test = np.maximum(1, n // 10)
    test = np.minimum(test, n)
    valid = np.minimum(valid, n - test)
    return n - valid - test, valid, test


def _shuffled_order(users: np.ndarray, items: np.ndarray, seed: int) -> np.ndarray:
    """Rows by user, randomly (``seed``) within a user, drawn in (user, item) order so the input row order does not
    matter. User and random bits share one int64 key: one stable argsort beats a two-key lexsort, and rare equal keys
    keep (user, item) order, so it stays deterministic."""
    n = len(users)
    pair = users * (int(items.max()) + 1) + items
    # Rows coming from build_interactions are already in (user, item) order: skip that sort.
    canonical = np.arange(n) if bool((pair[1:] >= pair[:-1]).all()) else np.argsort(pair, kind="stable")
    rng = np.random.default_rng(seed)
    rand_bits = 62 - max(int(users.max()).bit_length(), 1)
    if rand_bits >= 24:
        combined = (users[canonical] << rand_bits) | rng.integers(0, 1 << rand_bits, n, dtype=np.int64)
        return canonical[np.argsort(combined, kind="stable")]
    # Astronomically many users: fall back to a two-key sort on float draws.
    return canonical[np.lexsort((rng.random(n), users[canonical]))]


def split_interactions(
    users: np.ndarray, items: np.ndarray, timestamps: np.ndarray | None = None, rule: str = "mmrec", seed: int = 0,
) -> np.ndarray:
    """Split code (int8: 0 train, 1 valid, 2 test) per row: within a user, rows ordered randomly (``seed``, mmrec rules)
    or by timestamp then item (chronological) are train, then valid, then test (:func:`split_counts`)."""
    if rule not in SPLIT_RULES:
        raise ConfigError(f"unknown split rule {rule!r}; valid rules: {', '.join(SPLIT_RULES)}")
    users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
    n = len(users)
    codes = np.full(n, TRAIN, dtype=np.int8)
    if n == 0:
        return codes
    if rule == "chronological":
        if timestamps is None:
            raise ConfigError("split rule 'chronological' needs timestamps")
        order = np.lexsort((items, np.asarray(timestamps, dtype=np.int64), users))
    else:
        order = _shuffled_order(users, items, seed)
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    sizes = np.diff(np.r_[starts, n])
    group = np.repeat(np.arange(len(starts)), sizes)
    rank = np.arange(n) - starts[group]
    train, valid, _ = split_counts(sizes, rule)
    n_train, n_valid = train[group], valid[group]
    codes[order] = np.where(rank < n_train, TRAIN, np.where(rank < n_train + n_valid, VALID, TEST))
    return codes
