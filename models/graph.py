"""Sparse graph helpers shared by LightGCN, FREEDOM and SAND, so all use the same symmetric-normalised user-item
adjacency over the *training* interactions (no self loops, D^-1/2 A D^-1/2, zero-degree rows left at zero)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.autograd.profiler import record_function


def scipy_to_torch_sparse(m: sp.spmatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    coo = m.tocoo()
    idx = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    val = torch.from_numpy(coo.data.astype(np.float32)).to(dtype)
    return torch.sparse_coo_tensor(idx, val, coo.shape, check_invariants=False).coalesce()


def bipartite_adjacency(n_users: int, n_items: int, edges: np.ndarray) -> sp.csr_matrix:
    """(U+N) x (U+N) binary symmetric adjacency of the user-item graph (duplicates merged)."""
    u = np.asarray(edges[:, 0], dtype=np.int64)
    i = np.asarray(edges[:, 1], dtype=np.int64) + n_users
    rows, cols = np.concatenate([u, i]), np.concatenate([i, u])
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
    return scipy_to_torch_sparse(symmetric_normalise(bipartite_adjacency(n_users, n_items, edges)))


def to_csr(a: torch.Tensor) -> torch.Tensor:
    """A sparse (COO or CSR) matrix as float32 CSR, the fast layout for ``csr @ dense`` on CPU."""
    if a.layout == torch.sparse_coo:
        a = a.coalesce()
    with warnings.catch_warnings():  # "CSR support is in beta": products are all we use
        warnings.simplefilter("ignore", UserWarning)
        return a.float().to_sparse_csr()


#: Profiler label of the sparse graph products (benchmarks/bench_sand_speed.py reads it).
GRAPH_PRODUCTS = "sand::graph_products"


class SparseMatmul(torch.autograd.Function):
    """``a @ x`` for a constant CSR ``a`` with (CSR) transpose ``a_t``. Not ``torch.sparse.mm``, whose backward
    transposes and re-sorts the matrix on every call: the frozen graphs' transposes are built once (``a`` itself if
    symmetric)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, a_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.a_t = a_t
        with record_function(GRAPH_PRODUCTS):
            return a @ x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:
        with record_function(GRAPH_PRODUCTS):
            return None, None, ctx.a_t @ grad


def sparse_matmul(a: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ x`` differentiable in ``x``; ``a_t`` defaults to ``a`` (symmetric graph)."""
    return SparseMatmul.apply(a, a if a_t is None else a_t, x)


def mix_item_graphs(item_graphs: Mapping[str, torch.Tensor], image_weight: float) -> torch.Tensor:
    """S = w * S_image + (1 - w) * S_text as one coalesced float32 COO tensor, mixed here because the weight is a
    model hyper-parameter (``mm_image_weight``) while the kNN graphs come from the graphs stage."""
    image, text = (item_graphs[m].to_sparse_coo().coalesce().float() for m in ("image", "text"))
    return (image_weight * image + (1.0 - image_weight) * text).coalesce()
