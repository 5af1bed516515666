"""Deduplication, the iterative k-core and the split rules (against simple reference loops)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sand.pipeline.base.errors import ConfigError
from sand.pipeline.dataset.kcore import dedup_mask, kcore
from sand.pipeline.dataset.splits import SPLIT_RULES, split_counts, split_interactions

# ------------------------------------------------------------------------------------------ dedup


def test_deduplicate_latest_wins_ties_last():
    df = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "b", "b", "b", "c"],
            "asin": ["x", "x", "y", "x", "x", "x", "x"],
            "rating": [1.0, 2.0, 3.0, 4.0, 5.0, 1.5, 2.5],
            "timestamp": [10, 20, 5, 7, 7, 3, 1],
        }
    )
    keep = dedup_mask(pd.factorize(df["user_id"])[0], pd.factorize(df["asin"])[0], df["timestamp"].to_numpy())
    out = df[keep]
    assert len(df) - keep.sum() == 3
    # (a, x): t=20 wins; (b, x): tie at t=7 -> last occurrence (rating 5.0); order preserved.
    assert out["rating"].tolist() == [2.0, 3.0, 5.0, 2.5]
    assert not out.duplicated(["user_id", "asin"]).any()


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3), st.integers(0, 3)), max_size=40))
def test_dedup_mask_matches_reference(rows):
    users = np.array([r[0] for r in rows], dtype=np.int64)
    items = np.array([r[1] for r in rows], dtype=np.int64)
    ts = np.array([r[2] for r in rows], dtype=np.int64)
    best: dict[tuple[int, int], int] = {}
    for pos, (u, i, t) in enumerate(rows):
        if (u, i) not in best or t >= rows[best[(u, i)]][2]:
            best[(u, i)] = pos
    expected = np.zeros(len(rows), dtype=bool)
    expected[list(best.values())] = True
    np.testing.assert_array_equal(dedup_mask(users, items, ts), expected)


# ----------------------------------------------------------------------------------------- k-core


def reference_kcore(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Remove one violating row group at a time until stable (slow and obviously right)."""
    alive = np.ones(len(users), dtype=bool)
    changed = True
    while changed:
        changed = False
        ucount = Counter(users[alive].tolist())
        icount = Counter(items[alive].tolist())
        for r in range(len(users)):
            if alive[r] and (ucount[users[r]] < k or icount[items[r]] < k):
                alive[r] = False
                changed = True
                break
    return alive


def test_kcore_cascades_until_stable():
    # A chain u2-i2-u1-i1-u0-i0 that unravels one link per round at k=2,
    # next to a complete 2x2 block (u3, u4) x (i3, i4) that is a 2-core.
    users = np.array([0, 0, 1, 1, 2, 3, 3, 4, 4])
    items = np.array([0, 1, 1, 2, 2, 3, 4, 3, 4])
    result = kcore(users, items, 2)
    assert result.mask.tolist() == [False] * 5 + [True] * 4
    assert result.rounds == 3
    np.testing.assert_array_equal(kcore(users, items, 2).mask, result.mask)
    np.testing.assert_array_equal(result.mask, reference_kcore(users, items, 2))


def test_kcore_k_le_1_is_noop_and_stable_input_takes_zero_rounds():
    users = np.array([0, 1, 2])
    items = np.array([5, 5, 6])
    assert kcore(users, items, 1).mask.all()
    assert kcore(users, items, 0).mask.all()
    block_u = np.repeat(np.arange(3), 3)
    block_i = np.tile(np.arange(3), 3)
    result = kcore(block_u, block_i, 3)
    assert result.mask.all() and result.rounds == 0
    assert not kcore(block_u, block_i, 4).mask.any()


@settings(max_examples=60, deadline=None)
@given(
    edges=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 9)), min_size=0, max_size=80, unique=True),
    k=st.integers(0, 4),
)
def test_kcore_matches_reference(edges, k):
    users = np.array([e[0] for e in edges], dtype=np.int64)
    items = np.array([e[1] for e in edges], dtype=np.int64)
    mask = kcore(users, items, k).mask
    np.testing.assert_array_equal(mask, reference_kcore(users, items, k))
    if mask.any():
        assert np.bincount(users[mask]).max() >= k
        assert (np.bincount(users[mask])[np.unique(users[mask])] >= k).all()
        assert (np.bincount(items[mask])[np.unique(items[mask])] >= k).all()


def test_kcore_random_power_law_matches_reference():
    rng = np.random.default_rng(3)
    users = (rng.pareto(1.2, 600) * 5).astype(np.int64) % 150
    items = (rng.pareto(1.2, 600) * 5).astype(np.int64) % 80
    keep = pd.DataFrame({"u": users, "i": items}).drop_duplicates().index.to_numpy()
    users, items = users[keep], items[keep]
    result = kcore(users, items, 3)
    np.testing.assert_array_equal(result.mask, reference_kcore(users, items, 3))
    assert 0 < result.mask.sum() < len(users)
    assert result.rounds >= 2


# ----------------------------------------------------------------------------------------- splits


def expected_counts(n: int, rule: str) -> tuple[int, int, int]:
    """The rules written out per user, independently of the vectorised code."""
    if rule in ("mmrec", "chronological"):
        valid = test = max(1, n // 10)
    else:
        vt = int(0.2 * n)
        valid, test = (1, 1) if n < 10 else (vt // 2, vt - vt // 2)
    test = min(test, n)
    valid = min(valid, n - test)
    return n - valid - test, valid, test


def make_users(sizes: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    users = np.repeat(np.arange(len(sizes)), sizes)
    items = np.concatenate([np.arange(s) * 7 + u for u, s in enumerate(sizes)]) if sizes else np.array([])
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(users))
    timestamps = rng.integers(0, 50, len(users))
    return users[perm], items.astype(np.int64)[perm], timestamps


@pytest.mark.parametrize("rule", SPLIT_RULES)
@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=25), seed=st.integers(0, 2**31))
def test_split_counts_follow_rule(rule, sizes, seed):
    users, items, ts = make_users(sizes)
    codes = split_interactions(users, items, ts, rule=rule, seed=seed)
    assert codes.dtype == np.int8 and len(codes) == len(users)
    assert set(np.unique(codes)) <= {0, 1, 2}
    for u, n in enumerate(sizes):
        got = np.bincount(codes[users == u], minlength=3)
        assert tuple(got) == expected_counts(n, rule), (u, n)


def test_split_counts_examples():
    tr, va, te = split_counts(np.array([5, 9, 10, 19, 20, 25, 2, 1]), "mmrec")
    assert va.tolist() == [1, 1, 1, 1, 2, 2, 1, 0]
    assert te.tolist() == [1, 1, 1, 1, 2, 2, 1, 1]
    tr, va, te = split_counts(np.array([5, 10, 14, 15, 25]), "mmrec-notebook")
    assert va.tolist() == [1, 1, 1, 1, 2]
    assert te.tolist() == [1, 1, 1, 2, 3]


@pytest.mark.parametrize("rule", ["mmrec", "mmrec-notebook"])
def test_split_seed_determinism_and_row_order_invariance(rule):
    users, items, ts = make_users([30] * 40)
    a = split_interactions(users, items, ts, rule=rule, seed=7)
    b = split_interactions(users, items, ts, rule=rule, seed=7)
    c = split_interactions(users, items, ts, rule=rule, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    perm = np.random.default_rng(1).permutation(len(users))
    d = split_interactions(users[perm], items[perm], ts[perm], rule=rule, seed=7)
    np.testing.assert_array_equal(d, a[perm])


def test_chronological_holds_out_latest():
    users = np.array([0] * 12 + [1] * 5)
    ts = np.array(list(range(100, 112)) + [5, 1, 4, 2, 3])
    items = np.arange(17)
    codes = split_interactions(users, items, ts, rule="chronological", seed=0)
    u0 = codes[:12]
    assert u0.tolist() == [0] * 10 + [1, 2]
    # user 1: times 5,1,4,2,3 -> latest (5) is test, next (4) valid.
    assert codes[12:].tolist() == [2, 0, 1, 0, 0]
    with pytest.raises(ConfigError, match="timestamps"):
        split_interactions(users, items, None, rule="chronological")


def test_unknown_rule_lists_valid_rules():
    with pytest.raises(ConfigError) as err:
        split_interactions(np.array([0]), np.array([0]), np.array([0]), rule="random")
    for rule in SPLIT_RULES:
        assert rule in str(err.value)
