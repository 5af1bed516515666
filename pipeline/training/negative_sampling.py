"""BPR negative sampling: one uniformly drawn non-interacted item per training edge.

Vectorised rejection: membership is one ``np.searchsorted`` against the sorted keys ``user * n_items + item`` (a Python
loop over the edges would cost seconds per epoch), and only rejected draws are redrawn. After a few rounds the leftovers
(users with nearly every item in training) go to an exact complement sampler; a user with *every* item in training has
no negative at all and is a :class:`DataError`, not an endless loop."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from sand.pipeline.base.errors import DataError

#: rejection rounds before the exact complement sampler takes the leftovers
_REJECTION_ROUNDS = 8


def _sorted_csr(train_csr: sp.spmatrix) -> sp.csr_matrix:
    m = sp.csr_matrix(train_csr)
    if not m.has_canonical_format:
        m = m.copy()
        m.sum_duplicates()  # also sorts indices
    return m


def train_keys(train_csr: sp.spmatrix) -> np.ndarray:
    """Sorted int64 keys ``user * n_items + item`` of the training interactions."""
    m = _sorted_csr(train_csr)
    rows = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
    return rows * m.shape[1] + m.indices.astype(np.int64)


def is_member(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    if len(keys) == 0:
        return np.zeros(len(query), dtype=bool)
    return keys[np.minimum(np.searchsorted(keys, query), len(keys) - 1)] == query


def _complement_draw(users: np.ndarray, m: sp.csr_matrix, n_items: int, rng: np.random.Generator) -> np.ndarray:
    """Exact uniform draw among each user's non-training items (no rejection): with the user's sorted training items s_0
    < s_1 < ..., t_j = s_j - j counts the non-items below s_j, so the r-th non-item (0-based) is r + #{j : t_j <= r}."""
    deg = np.diff(m.indptr)
    free = n_items - deg[users]
    r = np.minimum(np.floor(rng.random(len(users)) * free).astype(np.int64), free - 1)
    rank_in_row = np.arange(len(m.indices), dtype=np.int64) - np.repeat(m.indptr[:-1].astype(np.int64), deg)
    t_keys = train_keys(m) - rank_in_row  # user * n_items + t_j
    return r + np.searchsorted(t_keys, users * n_items + r, side="right") - m.indptr[users]


def sample_bpr_epoch(train_edges: np.ndarray, train_csr: sp.spmatrix, n_items: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch of BPR triples ``(users, pos, neg)`` (int64, length E): every training edge once, shuffled by ``rng``,
    its negative uniform over the items the user has no training interaction with. Same ``rng`` state, same triples."""
    edges = np.asarray(train_edges, dtype=np.int64)
    if edges.ndim != 2 or edges.shape[1] != 2:
        raise DataError(f"training edges: expected shape (E, 2), got {edges.shape}")
    m = _sorted_csr(train_csr)
    if m.shape[1] != n_items:
        raise DataError(f"training matrix: {m.shape[1]} item columns but n_items={n_items}")
    order = rng.permutation(len(edges))
    users, pos = edges[order, 0].copy(), edges[order, 1].copy()
    if len(edges) == 0:
        return users, pos, np.empty(0, dtype=np.int64)

    deg = np.diff(m.indptr)
    full = np.unique(users[deg[users] >= n_items])
    if len(full):
        raise DataError(f"training data: user {int(full[0])} interacted with all {n_items} items, "
                        "so no negative item can be sampled (filter such users out)")

    keys = train_keys(m)
    neg = rng.integers(0, n_items, size=len(users), dtype=np.int64)
    todo = np.flatnonzero(is_member(keys, users * n_items + neg))
    for _ in range(_REJECTION_ROUNDS):
        if len(todo) == 0:
            break
        draw = rng.integers(0, n_items, size=len(todo), dtype=np.int64)
        neg[todo] = draw
        todo = todo[is_member(keys, users[todo] * n_items + draw)]
    if len(todo):
        neg[todo] = _complement_draw(users[todo], m, n_items, rng)
    return users, pos, neg
