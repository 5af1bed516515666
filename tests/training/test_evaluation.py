"""The full-ranking evaluator and the BPR sampler against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sand.pipeline.base.errors import DataError, SandError
from sand.pipeline.dataset.split_data import SplitData
from sand.pipeline.training.evaluation import evaluate_split, rank_topk, recommendations_table
from sand.pipeline.training.negative_sampling import sample_bpr_epoch

# ---------------------------------------------------------------- reference


def reference_topk(scores: np.ndarray, train_items: set[int], k: int) -> list[int]:
    """Training items removed, order by (score desc, item asc), first k."""
    cand = [i for i in range(len(scores)) if i not in train_items]
    cand.sort(key=lambda i: (-scores[i], i))
    return cand[:k]


def reference_metrics(scores: np.ndarray, data: SplitData, split: str, ks) -> dict[str, float]:
    train: dict[int, set[int]] = {}
    for u, i in data.train.tolist():
        train.setdefault(u, set()).add(i)
    target: dict[int, set[int]] = {}
    for u, i in data.edges(split).tolist():
        target.setdefault(u, set()).add(i)
    out = {f"recall@{k}": 0.0 for k in ks} | {f"ndcg@{k}": 0.0 for k in ks}
    for u, items in target.items():
        ranked = reference_topk(scores[u], train.get(u, set()), max(ks))
        for k in ks:
            hits = [1 if i in items else 0 for i in ranked[:k]]
            out[f"recall@{k}"] += sum(hits) / len(items)
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / math.log2(r + 2) for r in range(min(len(items), k)))
            out[f"ndcg@{k}"] += dcg / idcg
    return {name: v / len(target) for name, v in out.items()}


def random_split_data(rng: np.random.Generator, n_users: int, n_items: int, density: float) -> SplitData:
    """Random interactions split 8:1:1 per user; user 0 has only training items."""
    train, valid, test = [], [], []
    for u in range(n_users):
        n = max(3, rng.binomial(n_items, density))
        items = rng.choice(n_items, size=min(n, n_items - 1), replace=False)
        if u == 0:
            train += [(u, i) for i in items]
            continue
        nv = max(1, len(items) // 10)
        valid += [(u, i) for i in items[:nv]]
        test += [(u, i) for i in items[nv : 2 * nv]]
        train += [(u, i) for i in items[2 * nv :]]
    arr = [np.asarray(x, dtype=np.int64).reshape(-1, 2) for x in (train, valid, test)]
    return SplitData(n_users, n_items, *arr)


def integer_embeddings(rng: np.random.Generator, n_users: int, n_items: int, d: int = 2):
    """Small integer embeddings: dot products are exact and tie very often."""
    ue = torch.from_numpy(rng.integers(-2, 3, size=(n_users, d)).astype(np.float32))
    ie = torch.from_numpy(rng.integers(-2, 3, size=(n_items, d)).astype(np.float32))
    return ue, ie


# ---------------------------------------------------------------- evaluator


@pytest.mark.parametrize("seed,n_items", [(0, 60), (1, 60), (2, 30), (3, 45)])
def test_metrics_match_brute_force_with_ties(seed, n_items):
    # with 30 and 45 items K=50 exceeds the catalogue
    rng = np.random.default_rng(seed)
    data = random_split_data(rng, n_users=40, n_items=n_items, density=0.2)
    ue, ie = integer_embeddings(rng, data.n_users, data.n_items)
    scores = (ue @ ie.T).numpy().astype(np.float64)
    assert len(np.unique(scores[1])) < data.n_items / 2  # ties are really exercised
    ks = (5, 10, 20, 50)
    for split in ("valid", "test"):
        got = evaluate_split(ue, ie, data, split, ks=ks)
        want = reference_metrics(scores, data, split, ks)
        assert list(got) == [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
        for name in want:
            assert got[name] == pytest.approx(want[name], abs=1e-6), (split, name)
        batched = evaluate_split(ue, ie, data, split, ks=ks, batch_users=7)
        for name in want:
            assert batched[name] == pytest.approx(got[name], abs=1e-12)


def test_continuous_scores_match_reference():
    rng = np.random.default_rng(5)
    data = random_split_data(rng, n_users=30, n_items=80, density=0.1)
    ue = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    ie = torch.randn(80, 8, generator=torch.Generator().manual_seed(1))
    scores = (ue @ ie.T).numpy().astype(np.float64)
    got = evaluate_split(ue, ie, data, "test", ks=(10, 20))
    want = reference_metrics(scores, data, "test", (10, 20))
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-6)
    assert 0 < got["recall@20"] <= 1


def test_user_with_no_items_in_split_is_not_evaluated():
    # user 0: train only; user 1: one valid item ranked first; user 2: one valid item ranked last
    data = SplitData(
        3,
        4,
        train=np.array([[0, 0], [0, 1], [1, 3], [2, 3]]),
        valid=np.array([[1, 0], [2, 2]]),
        test=np.array([[1, 1], [2, 1]]),
    )
    ue = torch.tensor([[1.0], [1.0], [1.0]])
    ie = torch.tensor([[3.0], [2.0], [1.0], [0.0]])
    got = evaluate_split(ue, ie, data, "valid", ks=(1, 2))
    # user 1 ranks 0,1,2 -> hit at rank 1; user 2 ranks 0,1,2 -> item 2 at rank 3
    assert got["recall@1"] == pytest.approx(0.5)
    assert got["recall@2"] == pytest.approx(0.5)
    assert got["ndcg@1"] == pytest.approx(0.5)


def test_validation_items_stay_rankable_at_test_time():
    data = SplitData(1, 3, train=np.array([[0, 2]]), valid=np.array([[0, 0]]), test=np.array([[0, 1]]))
    ue = torch.tensor([[1.0]])
    ie = torch.tensor([[5.0], [4.0], [9.0]])  # the valid item 0 outranks the test item 1
    got = evaluate_split(ue, ie, data, "test", ks=(1, 2))
    assert got["recall@1"] == 0.0
    assert got["recall@2"] == 1.0
    assert got["ndcg@2"] == pytest.approx(1 / math.log2(3))
    assert rank_topk(ue, ie, [0], data.csr("train"), 2).tolist() == [[0, 1]]


def test_rank_topk_tie_rule_and_k_beyond_catalogue():
    train_csr = sp.csr_matrix((np.ones(2), ([0, 1], [1, 0])), shape=(2, 5))
    ue = torch.tensor([[1.0], [1.0]])
    ie = torch.tensor([[1.0], [2.0], [1.0], [2.0], [1.0]])
    # user 0: item 1 masked; 3 (score 2) then 0, 2, 4 (score 1, index order); slot 5 unrankable
    got = rank_topk(ue, ie, [0, 1], train_csr, k=50)
    assert got.shape == (2, 5)
    assert got.tolist() == [[3, 0, 2, 4, -1], [1, 3, 2, 4, -1]]
    assert rank_topk(ue, ie, [1], train_csr, k=2).tolist() == [[1, 3]]
    assert rank_topk(ue, ie, [0, 1], train_csr, k=2, batch_users=1).tolist() == [[3, 0], [1, 3]]


def test_rank_topk_matches_reference_on_random_ties():
    rng = np.random.default_rng(11)
    data = random_split_data(rng, n_users=25, n_items=30, density=0.3)
    ue, ie = integer_embeddings(rng, data.n_users, data.n_items, d=1)
    scores = (ue @ ie.T).numpy()
    train_csr = data.csr("train")
    users = np.arange(data.n_users)
    for k in (5, 10, 29, 50):
        got = rank_topk(ue, ie, users, train_csr, k, batch_users=4)
        for u in users:
            want = reference_topk(scores[u], set(train_csr[u].indices.tolist()), k)
            row = got[u].tolist()
            assert row[: len(want)] == want
            assert all(x == -1 for x in row[len(want) :])


def test_evaluation_accepts_numpy_and_rejects_bad_input():
    rng = np.random.default_rng(3)
    data = random_split_data(rng, n_users=10, n_items=20, density=0.3)
    ue, ie = integer_embeddings(rng, 10, 20)
    a = evaluate_split(ue.numpy(), ie.numpy(), data, "valid")
    b = evaluate_split(ue, ie, data, "valid")
    assert a == b
    with pytest.raises(SandError, match="non-finite item embedding"):
        evaluate_split(ue, ie * float("nan"), data, "valid")
    with pytest.raises(SandError, match="non-finite score"):
        evaluate_split(ue * 1e30, ie * 1e30 + 1e30, data, "valid")  # overflows to inf
    with pytest.raises(SandError, match="embeddings"):
        evaluate_split(ue[:5], ie, data, "valid")
    empty = SplitData(10, 20, data.train, data.valid[:0], data.test)
    with pytest.raises(DataError, match="valid"):
        evaluate_split(ue, ie, empty, "valid")


def test_recommendations_table():
    data = SplitData(
        2,
        4,
        train=np.array([[0, 0], [1, 1]]),
        valid=np.zeros((0, 2), np.int64),
        test=np.zeros((0, 2), np.int64),
    )
    ue = torch.tensor([[1.0], [2.0]])
    ie = torch.tensor([[4.0], [3.0], [2.0], [1.0]])
    df = recommendations_table(ue, ie, data, k=2)
    assert list(df.columns) == ["user", "rank", "item", "score"]
    assert df.values.tolist() == [[0, 1, 1, 3.0], [0, 2, 2, 2.0], [1, 1, 0, 8.0], [1, 2, 2, 4.0]]
    assert recommendations_table(ue, ie, data, k=10, users=[1])["item"].tolist() == [0, 2, 3]


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize("seed", range(5))
def test_negatives_never_in_training_set(seed):
    rng = np.random.default_rng(100 + seed)
    n_users, n_items = 30, 25
    data = random_split_data(rng, n_users, n_items, density=rng.uniform(0.1, 0.9))
    # a user with all items but one: rejection sampling alone would struggle
    dense = np.array([[1, i] for i in range(n_items - 1)], dtype=np.int64)
    train = np.unique(np.concatenate([data.train[data.train[:, 0] != 1], dense]), axis=0)
    csr = SplitData(n_users, n_items, train, data.valid, data.test).csr("train")
    users, pos, neg = sample_bpr_epoch(train, csr, n_items, np.random.default_rng(seed))
    assert users.shape == pos.shape == neg.shape == (len(train),)
    assert users.dtype == pos.dtype == neg.dtype == np.int64
    # every edge exactly once
    got = sorted(zip(users.tolist(), pos.tolist(), strict=True))
    assert got == sorted(map(tuple, train.tolist()))
    train_set = set(map(tuple, train.tolist()))
    assert not any((u, n) in train_set for u, n in zip(users.tolist(), neg.tolist(), strict=True))
    assert neg.min() >= 0 and neg.max() < n_items
    assert set(neg[users == 1].tolist()) == {n_items - 1}


def test_sampler_is_deterministic_and_roughly_uniform():
    n_items = 10
    train = np.array([[0, 0], [0, 1]] * 1 + [[1, 5]], dtype=np.int64)
    csr = sp.csr_matrix((np.ones(3), (train[:, 0], train[:, 1])), shape=(2, n_items))
    a = sample_bpr_epoch(train, csr, n_items, np.random.default_rng(7))
    b = sample_bpr_epoch(train, csr, n_items, np.random.default_rng(7))
    c = sample_bpr_epoch(train, csr, n_items, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    big = np.repeat(train[:1], 8000, axis=0)
    _, _, neg = sample_bpr_epoch(big, csr, n_items, np.random.default_rng(1))
    counts = np.bincount(neg, minlength=n_items)
    assert counts[0] == counts[1] == 0
    assert counts[2:].min() > 800 and counts[2:].max() < 1200  # uniform over 8 items: 1000 each
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_sampler_rejects_user_with_every_item():
    train = np.array([[0, 0], [0, 1], [1, 0]], dtype=np.int64)
    csr = sp.csr_matrix((np.ones(3), (train[:, 0], train[:, 1])), shape=(2, 2))
    with pytest.raises(DataError, match="user 0 interacted with all 2 items"):
        sample_bpr_epoch(train, csr, 2, np.random.default_rng(0))


def test_complement_sampler_exact_and_uniform():
    from sand.pipeline.training.negative_sampling import _complement_draw

    rng = np.random.default_rng(4)
    n_users, n_items = 6, 12
    dense = (rng.random((n_users, n_items)) < 0.6).astype(np.float32)
    dense[:, 0] = 0  # every user has a free item
    csr = sp.csr_matrix(dense)
    users = np.repeat(np.arange(n_users), 3000)
    got = _complement_draw(users, csr, n_items, np.random.default_rng(0))
    for u in range(n_users):
        free = set(np.flatnonzero(dense[u] == 0).tolist())
        draws = got[users == u]
        assert set(draws.tolist()) == free
        counts = np.bincount(draws, minlength=n_items)[sorted(free)]
        assert counts.min() > 0.7 * 3000 / len(free)
