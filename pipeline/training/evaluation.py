"""Full-ranking top-K evaluation with MMRec's protocol (docs/model.md).

Scores are dot products of user and item embeddings, ranked in blocks of users (at most ``MAX_SCORE_ELEMENTS`` scores
at once, only each block's top K kept) on whatever device the embeddings live on. Only each user's *training* items are
masked: validation items stay rankable when the test split is evaluated, as in MMRec, so numbers compare with published
ones. Ties (``torch.topk`` is not stable) rank the lower item index first (:func:`_topk_rows`). Slots that cannot hold a
rankable item (K above the items the user has not trained on; K above the catalogue caps K) hold item ``-1`` and never
count as hits."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sand.pipeline.base.errors import ConfigError, DataError, SandError
from sand.pipeline.dataset.split_data import SplitData
from sand.pipeline.training.negative_sampling import is_member

if TYPE_CHECKING:
    import torch

SPLITS = ("valid", "test")
#: Scores held at once (users per block x items): 64M float32 = 256 MB whatever the catalogue (67 users at 1M items).
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
        raise SandError(f"embeddings: user {tuple(user_emb.shape)} and item {tuple(item_emb.shape)} "
                        "must be 2-D with the same width")
    if user_emb.shape[0] != n_users or item_emb.shape[0] != n_items:
        raise SandError(f"embeddings: got {user_emb.shape[0]} users x {item_emb.shape[0]} items, "
                        f"data has {n_users} x {n_items}")


def _topk_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (indices, scores) per row, equal scores ranking the lower index first; -inf slots kept. Fast path:
    ``topk(k + 1)``: where the (k+1)-th score is below the k-th, the top-k *set* is unambiguous. A row with a tie across
    that boundary (rare for float scores, always for users with fewer than k rankable items, whose boundary is -inf)
    takes every item above the k-th score plus the lowest-indexed ones equal to it. Rows with any tie are then ordered
    by (score descending, index ascending) with a stable sort."""
    import torch  # lazy: torch takes seconds to import

    kk = min(k + 1, scores.shape[1])
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


def _iter_topk(user_emb, item_emb, users: np.ndarray, train_csr: sp.csr_matrix, k: int, batch_users: int
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
    users, n_rows = np.asarray(users, dtype=np.int64), min(ue.shape[0], m.shape[0])
    outside = (users < 0) | (users >= n_rows)
    if outside.any():
        raise SandError(f"ranking: user index {int(users[outside][0])} outside 0..{n_rows - 1}")
    block = users_per_block(batch_users, n_items)  # bounded memory at any catalogue size
    for start in range(0, len(users), block):
        bu = users[start : start + block]
        scores = ue[torch.as_tensor(bu, device=ue.device)] @ ie.T
        sub = m[bu]
        rows = np.repeat(np.arange(len(bu), dtype=np.int64), np.diff(sub.indptr))
        cols = sub.indices.astype(np.int64)
        if len(cols):
            scores[torch.as_tensor(rows, device=ue.device), torch.as_tensor(cols, device=ue.device)] = float("-inf")
        idx, top = _topk_rows(scores, k_eff)
        # NaN and +inf sort to the top, so checking the winners catches overflowing scores
        bad_rows = torch.nonzero(torch.isnan(top[:, 0]) | torch.isposinf(top[:, 0]))
        if len(bad_rows):
            bad = int(bu[int(bad_rows[0, 0])])
            raise SandError(f"evaluation: non-finite score for user {bad} (the model produced NaN/inf)")
        idx, top = idx.cpu().numpy(), top.float().cpu().numpy()
        idx[np.isneginf(top)] = -1
        yield bu, idx, top


def rank_topk(user_emb, item_emb, users, train_csr: sp.spmatrix, k: int, batch_users: int = 4096) -> np.ndarray:
    """Top-``k`` item ids (len(users) x min(k, n_items)), training items masked; ties, -1 slots: see the module doc."""
    users = np.asarray(users, dtype=np.int64)
    n_items = int(_as_tensor(item_emb).shape[0])
    out = np.full((len(users), min(k, n_items)), -1, dtype=np.int64)
    pos = 0
    for bu, idx, _ in _iter_topk(user_emb, item_emb, users, train_csr, k, batch_users):
        out[pos : pos + len(bu)] = idx
        pos += len(bu)
    return out


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
        self.keys = np.unique(edges[:, 0] * data.n_items + edges[:, 1])  # sorted keys user * n_items + item
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
            hits = is_member(self.keys, bu[:, None] * n + np.maximum(idx, 0)) & (idx >= 0)
            width = hits.shape[1]
            for k in self.ks:
                kk = min(k, width)
                h = hits[:, :kk]
                sums[f"recall@{k}"] += float((h.sum(axis=1) / n_pos).sum())
                dcg = (h * discount[:kk]).sum(axis=1)
                idcg = idcg_table[np.minimum(n_pos.astype(np.int64), k)]
                sums[f"ndcg@{k}"] += float((dcg / idcg).sum())
        return {name: total / len(self.users) for name, total in sums.items()}


def evaluate_split(user_emb, item_emb, data: SplitData, split: str, ks: Sequence[int] = (10, 20),
                   batch_users: int = 4096) -> dict[str, float]:
    """Recall@K and NDCG@K (MMRec protocol) averaged over users with >= 1 item in ``split``: Recall@K = hits in the top
    K / the user's items in the split; NDCG@K uses binary gains and IDCG over min(|items|, K) positions."""
    return SplitEvaluator(data, split, ks, batch_users)(user_emb, item_emb)


def recommendations_table(user_emb, item_emb, data: SplitData, k: int, users=None) -> pd.DataFrame:
    """Top-``k`` recommendations (training items excluded) as columns user, rank (1-based), item, score."""
    ue, ie = _as_tensor(user_emb), _as_tensor(item_emb)
    _check_embeddings(ue, ie, data.n_users, data.n_items)
    users = np.arange(data.n_users, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
    outside = (users < 0) | (users >= data.n_users)
    if outside.any():
        raise DataError(f"recommendations: user index {int(users[outside][0])} outside 0..{data.n_users - 1}")
    frames = []
    for bu, idx, top in _iter_topk(ue, ie, users, data.csr("train"), k, 4096):
        r, c = np.nonzero(idx >= 0)
        frames.append(_recs_frame(bu[r], c + 1, idx[r, c], top[r, c]))
    empty = np.empty(0)
    return pd.concat(frames, ignore_index=True) if frames else _recs_frame(empty, empty, empty, empty)


def _recs_frame(user: np.ndarray, rank: np.ndarray, item: np.ndarray, score: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"user": user.astype(np.int64), "rank": rank.astype(np.int64), "item": item.astype(np.int64),
                         "score": score.astype(np.float32)})
