"""The in-memory form of a split dataset that training and evaluation share.

Why: the interactions artifact and an MMRec folder must end up as the same object, so trainers and evaluators never care
where the data came from. Split codes follow MMRec's ``x_label``: 0 train, 1 valid, 2 test."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", VALID: "valid", TEST: "test"}


@dataclass(frozen=True)
class SplitData:
    """Users and items indexed from 0; each split an (E, 2) int64 array of (user, item)."""

    n_users: int
    n_items: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    def edges(self, split: int | str) -> np.ndarray:
        key = SPLIT_NAMES.get(split, split) if isinstance(split, int) else split
        return {"train": self.train, "valid": self.valid, "test": self.test}[key]

    def csr(self, split: int | str) -> sp.csr_matrix:
        """User x item binary matrix of one split."""
        e = self.edges(split)
        m = sp.csr_matrix((np.ones(len(e), dtype=np.float32), (e[:, 0], e[:, 1])), shape=(self.n_users, self.n_items))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    @classmethod
    def from_frame(cls, df, n_users: int | None = None, n_items: int | None = None) -> SplitData:
        """From a table with integer columns user, item, split (0/1/2)."""
        users, items, split = (df[col].to_numpy(np.int64) for col in ("user", "item", "split"))
        pairs = np.stack([users, items], axis=1)
        return cls(
            n_users=int(n_users if n_users is not None else users.max() + 1),
            n_items=int(n_items if n_items is not None else items.max() + 1), train=pairs[split == TRAIN],
            valid=pairs[split == VALID], test=pairs[split == TEST],
        )

    @classmethod
    def from_parquet(cls, path: Path, n_users: int | None = None, n_items: int | None = None) -> SplitData:
        return cls.from_frame(pd.read_parquet(path, columns=["user", "item", "split"]), n_users, n_items)
