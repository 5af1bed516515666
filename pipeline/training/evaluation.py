"""Full-ranking top-K evaluation with MMRec's protocol (docs/model.md).

Why this shape: scores are dot products of user and item embeddings, so users are ranked in blocks (memory ~ users per
block x n_items floats, capped at ``MAX_SCORE_ELEMENTS``; only the top K of each block is kept) on whatever device the
embeddings live on. Only each user's *training* items are masked: validation items stay rankable when the test split is
evaluated, as MMRec does, so numbers compare with published ones.

Tie rule (documented because ``torch.topk`` is not stable): equal scores rank the lower item index first. ``torch.topk``
only supplies the K-th largest score; every item scoring above it is in the top K, and the remaining slots go to the
lowest-indexed items scoring exactly that value. The K chosen items are then ordered by (score descending, item index
ascending) with a stable sort. Rows without ties (the usual case for float scores) skip that extra work.

Slots that cannot hold a rankable item (K above the number of items the user has not trained on, or K above the
catalogue, which caps K) hold item id ``-1`` and never count as hits."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sand.pipeline.base.errors import ConfigError, DataError, SandError
from sand.pipeline.dataset.split_data import SplitData

if TYPE_CHECKING:
    import torch

SPLITS = ("valid", "test")
#: Scores held at once (users per block x items): 64M float32 = 256 MB, whatever the catalogue.
#: At 1M items a block is 67 users; ``batch_users`` is the upper bound for small catalogues.
MAX_SCORE_ELEMENTS = 1 << 26


def users_per_block(batch_users: int, n_items: int) -> int:
    """Users scored together: ``batch_users``, capped so a block holds <= MAX_SCORE_ELEMENTS scores."""
    return int(max(1, min(batch_users, MAX_SCORE_ELEMENTS // max(n_items, 1))))


def _as_tensor(x) -> torch.Tensor:
    import torch  # lazy: torch takes seconds to import

    t = (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).detach()
    # half precision would rank with fewer distinct scores (more ties) than the model's float32 scores
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _check_embeddings(user_emb: torch.Tensor, item_emb: torch.Tensor, n_users: int, n_items: int) -> None:
    if user_emb.ndim != 2 or item_emb.ndim != 2 or user_emb.shape[1] != item_emb.shape[1]:
        raise SandError(
            f"embeddings: user {tuple(user_emb.shape)} and item {tuple(item_emb.shape)} "
            "must be 2-D with the same width"
        )
    if user_emb.shape[0] != n_users or item_emb.shape[0] != n_items:
        raise SandError(
            f"embeddings: got {user_emb.shape[0]} users x {item_emb.shape[0]} items, "
            f"data has {n_users} x {n_items}"
        )


def _topk_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (indices, scores) per row with ties broken by lower index; -inf slots kept.

    Fast path: ``topk(k + 1)``; where the (k+1)-th score is below the k-th, the top-k *set* is unambiguous and only its
    order needs the tie rule (a sort of k entries). Rows with a tie across the boundary (rare for float scores, always
    for users with fewer than k rankable items, whose boundary is -inf) take the exact full-row path."""
    import torch  # lazy: torch takes seconds to import

    n_cols = scores.shape[1]
    kk = min(k + 1, n_cols)
    vals, idx = torch.topk(scores, kk, dim=1, sorted=True)
    top, idx = vals[:, :k].clone(), idx[:, :k].clone()
    redo = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    if kk > k:
        tied = torch.nonzero(vals[:, k] == vals[:, k - 1]).squeeze(1)
        if len(tied):
            s_t = scores[tied]
            kth = vals[tied, k - 1 : k]
            gt = s_t > kth
            need = k - gt.sum(dim=1, keepdim=True)
            eq_rank = torch.cumsum(s_t == kth, dim=1, dtype=torch.int32)
            sel = gt | ((s_t == kth) & (eq_rank <= need))
            idx[tied] = torch.nonzero(sel)[:, 1].view(len(tied), k)
            redo[tied] = True
    if k > 1:
        redo |= (top[:, 1:] == top[:, :-1]).any(dim=1)
    rows = torch.nonzero(redo).squeeze(1)
    if len(rows):
        # order the chosen set by item index, then a stable descending sort by score: lower index first
        idx_r = torch.sort(idx[rows], dim=1).values
        s_r, order = torch.sort(scores[rows].gather(1, idx_r), dim=1, descending=True, stable=True)
        idx[rows] = idx_r.gather(1, order)
        top[rows] = s_r
    return idx, top


def _iter_topk(
    user_emb, item_emb, users: np.ndarray, train_csr: sp.csr_matrix, k: int, batch_users: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (users, item ids, scores) per batch; masked / missing slots have item -1."""
    import torch  # lazy: torch takes seconds to import

    if batch_users < 1:
        raise ConfigError(f"batch_users must be >= 1, got {batch_users}")
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    ue, ie = _as_tensor(user_emb), _as_tensor(item_emb)
    ie = ie.to(device=ue.device, dtype=ue.dtype)
    for name, emb in (("user", ue), ("item", ie)):
        finite = torch.isfinite(emb).all(dim=1)
        if not bool(finite.all()):
            row = int(torch.nonzero(~finite)[0, 0])
            raise SandError(f"evaluation: non-finite {name} embedding for {name} {row} (the model produced NaN/inf)")
    n_items = ie.shape[0]
    k_eff = min(k, n_items)
    m = sp.csr_matrix(train_csr)
    if m.shape[1] != n_items:
        raise SandError(f"training matrix has {m.shape[1]} item columns but the item embeddings {n_items} rows")
    users = np.asarray(users, dtype=np.int64)
    if len(users) and (users.min() < 0 or users.max() >= min(ue.shape[0], m.shape[0])):
        bad = int(users[(users < 0) | (users >= min(ue.shape[0], m.shape[0]))][0])
        raise SandError(f"ranking: user index {bad} outside 0..{min(ue.shape[0], m.shape[0]) - 1}")
    block = users_per_block(batch_users, n_items)  # bounded memory at any catalogue size
    for start in range(0, len(users), block):
        bu = users[start : start + block]
        scores = ue[torch.as_tensor(bu, device=ue.device)] @ ie.T
        sub = m[bu]
        rows = np.repeat(np.arange(len(bu), dtype=np.int64), np.diff(sub.indptr))
        cols = sub.indices.astype(np.int64)
        if len(cols):
            scores[
                torch.as_tensor(rows, device=scores.device), torch.as_tensor(cols, device=scores.device)
            ] = float("-inf")
        idx, top = _topk_rows(scores, k_eff)
        # NaN and +inf sort to the top, so checking the winners catches overflowing scores
        bad_rows = torch.nonzero(torch.isnan(top[:, 0]) | torch.isposinf(top[:, 0]))
        if len(bad_rows):
            bad = int(bu[int(bad_rows[0, 0])])
            raise SandError(f"evaluation: non-finite score for user {bad} (the model produced NaN/inf)")
        idx = idx.cpu().numpy()
        top = top.float().cpu().numpy()
        idx[np.isneginf(top)] = -1
        yield bu, idx, top


def rank_topk(user_emb, item_emb, users, train_csr: sp.spmatrix, k: int, batch_users: int = 4096) -> np.ndarray:
    """Top-``k`` item ids (len(users) x min(k, n_items)) with training items masked.

    Ties: lower item index first. Slots with no rankable item left hold -1."""
    users = np.asarray(users, dtype=np.int64)
    n_items = int(_as_tensor(item_emb).shape[0])
    out = np.full((len(users), min(k, n_items)), -1, dtype=np.int64)
    pos = 0
    for bu, idx, _ in _iter_topk(user_emb, item_emb, users, train_csr, k, batch_users):
        out[pos : pos + len(bu)] = idx
        pos += len(bu)
    return out


def _split_keys(edges: np.ndarray, n_items: int) -> np.ndarray:
    return np.unique(edges[:, 0].astype(np.int64) * n_items + edges[:, 1].astype(np.int64))


def metric_names(ks: Sequence[int]) -> list[str]:
    """Metric keys in the order evaluate_split returns them: recall@K for all K, then ndcg@K."""
    return [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]


class SplitEvaluator:
    """Evaluates one split repeatedly (the trainer calls it every epoch) without re-deriving masks."""

    def __init__(self, data: SplitData, split: str, ks: Sequence[int] = (10, 20), batch_users: int = 4096):
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        ks = tuple(int(k) for k in ks)
        if not ks or min(ks) < 1:
            raise ConfigError(f"ks must be positive integers, got {ks}")
        self.data, self.split, self.ks, self.batch_users = data, split, ks, batch_users
        self.train_csr = data.csr("train")
        edges = np.asarray(data.edges(split), dtype=np.int64)
        self.keys = _split_keys(edges, data.n_items)
        self.users, self.n_pos = np.unique(self.keys // data.n_items, return_counts=True)
        if len(self.users) == 0:
            raise DataError(f"split {split!r} has no interactions, so it cannot be evaluated")

    def __call__(self, user_emb, item_emb) -> dict[str, float]:
        ue, ie = _as_tensor(user_emb), _as_tensor(item_emb)
        _check_embeddings(ue, ie, self.data.n_users, self.data.n_items)
        kmax = max(self.ks)
        n = self.data.n_items
        discount = 1.0 / np.log2(np.arange(2, kmax + 2, dtype=np.float64))
        idcg_table = np.concatenate([[0.0], np.cumsum(discount)])
        sums = {name: 0.0 for name in metric_names(self.ks)}
        pos = 0
        for bu, idx, _ in _iter_topk(ue, ie, self.users, self.train_csr, kmax, self.batch_users):
            n_pos = self.n_pos[pos : pos + len(bu)].astype(np.float64)
            pos += len(bu)
            query = bu[:, None] * n + np.maximum(idx, 0)
            found = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
            hits = (self.keys[found] == query) & (idx >= 0)
            width = hits.shape[1]
            for k in self.ks:
                kk = min(k, width)
                h = hits[:, :kk]
                sums[f"recall@{k}"] += float((h.sum(axis=1) / n_pos).sum())
                dcg = (h * discount[:kk]).sum(axis=1)
                idcg = idcg_table[np.minimum(n_pos.astype(np.int64), k)]
                sums[f"ndcg@{k}"] += float((dcg / idcg).sum())
        return {name: total / len(self.users) for name, total in sums.items()}


def evaluate_split(
    user_emb, item_emb, data: SplitData, split: str, ks: Sequence[int] = (10, 20), batch_users: int = 4096,
) -> dict[str, float]:
    """Recall@K and NDCG@K (MMRec protocol) averaged over users with >= 1 item in ``split``.

    Recall@K = hits in the top K / the user's items in the split; NDCG@K uses binary gains and IDCG over min(|items|, K)
    positions. Keys: ``recall@K`` then ``ndcg@K``."""
    return SplitEvaluator(data, split, ks, batch_users)(user_emb, item_emb)


def recommendations_table(user_emb, item_emb, data: SplitData, k: int, users=None) -> pd.DataFrame:
    """Top-``k`` recommendations (training items excluded) as columns user, rank (1-based), item, score."""
    ue, ie = _as_tensor(user_emb), _as_tensor(item_emb)
    _check_embeddings(ue, ie, data.n_users, data.n_items)
    users = np.arange(data.n_users, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
    if len(users) and (users.min() < 0 or users.max() >= data.n_users):
        bad = users[(users < 0) | (users >= data.n_users)][0]
        raise DataError(f"recommendations: user index {int(bad)} outside 0..{data.n_users - 1}")
    frames = []
    for bu, idx, top in _iter_topk(ue, ie, users, data.csr("train"), k, 4096):
        r, c = np.nonzero(idx >= 0)
        frames.append(
            pd.DataFrame(
                {
                    "user": bu[r], "rank": (c + 1).astype(np.int64), "item": idx[r, c],
                    "score": top[r, c].astype(np.float32),
                }
            )
        )
    if not frames:
        return pd.DataFrame(
            {
                "user": np.empty(0, np.int64), "rank": np.empty(0, np.int64), "item": np.empty(0, np.int64),
                "score": np.empty(0, np.float32),
            }
        )
    return pd.concat(frames, ignore_index=True)
