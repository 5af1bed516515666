"""LightGCN (He et al. 2020) as MMRec: the SAND paper's ID-only graph baseline. The regulariser acts on the batch's ego
embeddings (MMRec's convention), not the propagated ones."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from sand.models.base import Recommender, take_rows
from sand.models.bpr import bpr_loss, dot_scores, emb_loss
from sand.models.graph import normalised_bipartite_adjacency, sparse_matmul, to_csr


def edges_numpy(train_edges: torch.Tensor | None, model_name: str):
    if train_edges is None:
        raise ValueError(f"{model_name} needs train_edges (E, 2) to build its user-item graph")
    e = torch.as_tensor(train_edges).detach().cpu().long()
    if e.dim() != 2 or e.shape[1] != 2:
        raise ValueError(f"{model_name}: train_edges must have shape (E, 2); got {tuple(e.shape)}")
    return e.numpy()


def layer_mean(adj: Tensor, ego: Tensor, n_layers: int) -> Tensor:
    """mean(ego, A ego, A^2 ego, ..., A^L ego): LightGCN's layer combination (A symmetric)."""
    out = h = ego
    for _ in range(n_layers):
        h = sparse_matmul(adj, h)
        out = out + h
    return out / (n_layers + 1)


class LightGCN(Recommender):
    """LightGCN over the normalised training graph (``n_layers = 0``: MF-BPR on its ego embeddings). MMRec tunes
    ``n_layers`` over {1, 2, 3, 4} (1 was best on Baby, docs/benchmarks.md), ``reg_weight`` over {1e-2 ... 1e-6}."""

    required_modalities: tuple[str, ...] = ()

    def __init__(
        self, n_users: int, n_items: int, train_edges: torch.Tensor | None = None,
        features: Mapping[str, torch.Tensor] | None = None, item_graphs: Mapping[str, torch.Tensor] | None = None, *,
        embedding_dim: int = 64, n_layers: int = 2, reg_weight: float = 1e-2,
    ) -> None:
        super().__init__()
        if n_layers < 0:
            raise ValueError(f"LightGCN: n_layers must be >= 0; got {n_layers}")
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.n_layers, self.reg_weight = int(n_layers), float(reg_weight)
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, embedding_dim)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, embedding_dim)))
        adj = normalised_bipartite_adjacency(self.n_users, self.n_items, edges_numpy(train_edges, "LightGCN"))
        # Not persistent: the graph is an input (rebuilt from the data), not a learned state.
        self.register_buffer("adj", to_csr(adj), persistent=False)

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        ego = torch.cat([self.user_embedding, self.item_embedding], dim=0)
        out = layer_mean(self.adj, ego, self.n_layers)
        return out[: self.n_users], out[self.n_users :]

    def loss_terms(self, users: Tensor, pos: Tensor, neg: Tensor) -> dict[str, Tensor]:
        u_all, i_all = self.propagate()
        bpr = bpr_loss(*dot_scores(take_rows(u_all, users), take_rows(i_all, pos), take_rows(i_all, neg)))
        reg = emb_loss(take_rows(self.user_embedding, users), take_rows(self.item_embedding, pos),
                       take_rows(self.item_embedding, neg))
        return {"bpr": bpr, "reg": self.reg_weight * reg}

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.propagate()
