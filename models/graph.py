"""Sparse graph helpers shared by the graph-based models (LightGCN, FREEDOM, SAND).

Why here: every graph model needs the same symmetric-normalised user-item
adjacency over the *training* interactions; one implementation keeps them
consistent (no self loops, D^-1/2 A D^-1/2, zero-degree rows left at zero).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


def scipy_to_torch_sparse(m: sp.spmatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A scipy sparse matrix as a coalesced torch sparse COO tensor."""
    coo = m.tocoo()
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    val = torch.from_numpy(coo.data.astype(np.float32)).to(dtype)
    return torch.sparse_coo_tensor(idx, val, coo.shape, check_invariants=False).coalesce()


def bipartite_adjacency(n_users: int, n_items: int, edges: np.ndarray) -> sp.csr_matrix:
    """(U+N) x (U+N) binary symmetric adjacency of the user-item graph (duplicates merged)."""
    u = np.asarray(edges[:, 0], dtype=np.int64)
    i = np.asarray(edges[:, 1], dtype=np.int64) + n_users
    rows = np.concatenate([u, i])
    cols = np.concatenate([i, u])
    n = n_users + n_items
    a = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n, n))
    a.sum_duplicates()
    a.data[:] = 1.0
    return a


def symmetric_normalise(a: sp.spmatrix) -> sp.csr_matrix:
    """D^-1/2 A D^-1/2 with degrees from row sums; isolated nodes get zero rows."""
    a = sp.csr_matrix(a, dtype=np.float32)
    deg = np.asarray(a.sum(axis=1)).ravel()
    with np.errstate(divide="ignore"):
        inv_sqrt = np.where(deg > 0, deg**-0.5, 0.0).astype(np.float32)
    d = sp.diags(inv_sqrt)
    return (d @ a @ d).tocsr()


def normalised_bipartite_adjacency(n_users: int, n_items: int, edges: np.ndarray) -> torch.Tensor:
    """The normalised training graph as a torch sparse tensor, ready for ``torch.sparse.mm``."""
    return scipy_to_torch_sparse(symmetric_normalise(bipartite_adjacency(n_users, n_items, edges)))
