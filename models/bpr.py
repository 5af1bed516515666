"""MF-BPR (Rendle et al. 2009) and the BPR/regularisation terms every baseline imports from here, so all of them
compute the same BPR loss and the same regulariser (MMRec's ``BPRLoss`` / ``EmbLoss``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from sand.models.base import Recommender
from sand.models.losses import bpr_loss


def emb_loss(*embeddings: torch.Tensor) -> torch.Tensor:
    """MMRec's ``EmbLoss``: the sum of Frobenius norms (NOT squared) over the last tensor's row count, so, unlike a
    weight decay, its useful ``reg_weight`` range is MMRec's {1e-5 ... 2.0}."""
    total = embeddings[-1].new_zeros(())
    for e in embeddings:
        total = total + torch.linalg.vector_norm(e)
    return total / embeddings[-1].shape[0]


def dot_scores(u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (u * pos).sum(dim=1), (u * neg).sum(dim=1)


def check_modalities(
    model_name: str, required: tuple[str, ...], features: Mapping[str, torch.Tensor] | None,
    item_graphs: Mapping[str, torch.Tensor] | None = None, n_items: int | None = None, *, need_graphs: bool = False,
) -> None:
    """Raise ``ValueError`` naming the first missing (or mis-shaped) modality input; ``models/`` may not import
    ``pipeline.base.errors``, so the pipeline (which knows the missing file) turns it into its user-facing error."""
    features = features or {}
    item_graphs = item_graphs or {}
    for m in required:
        if m not in features:
            raise ValueError(f"{model_name} needs the '{m}' modality in features; got {sorted(features)}")
        f = features[m]
        if f.dim() != 2 or (n_items is not None and f.shape[0] != n_items):
            raise ValueError(f"{model_name}: '{m}' features must be ({n_items}, d); got {tuple(f.shape)}")
        if not need_graphs:
            continue
        if m not in item_graphs:
            raise ValueError(f"{model_name} needs the '{m}' item-item graph in item_graphs; got {sorted(item_graphs)}")
        g = item_graphs[m]
        if n_items is not None and tuple(g.shape) != (n_items, n_items):
            raise ValueError(f"{model_name}: '{m}' item graph must be ({n_items}, {n_items}); got {tuple(g.shape)}")


class MFBPR(Recommender):
    """Matrix factorisation trained with BPR + ``reg_weight`` * EmbLoss, as MMRec's ``BPR`` model. MMRec tunes
    reg_weight over {2.0, 1.0, 1e-1, ..., 1e-5}; the default 1e-1 was best on Baby (docs/benchmarks.md)."""

    required_modalities: tuple[str, ...] = ()

    def __init__(
        self, n_users: int, n_items: int, train_edges: torch.Tensor | None = None,
        features: Mapping[str, torch.Tensor] | None = None, item_graphs: Mapping[str, torch.Tensor] | None = None, *,
        embedding_dim: int = 64, reg_weight: float = 1e-1,
    ) -> None:
        super().__init__()
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.reg_weight = float(reg_weight)
        self.user_embedding = nn.Embedding(self.n_users, embedding_dim)
        self.item_embedding = nn.Embedding(self.n_items, embedding_dim)
        nn.init.xavier_normal_(self.user_embedding.weight)
        nn.init.xavier_normal_(self.item_embedding.weight)

    def loss_terms(self, users: Tensor, pos: Tensor, neg: Tensor) -> dict[str, Tensor]:
        u = self.user_embedding(users)
        p = self.item_embedding(pos)
        n = self.item_embedding(neg)
        return {"bpr": bpr_loss(*dot_scores(u, p, n)), "reg": self.reg_weight * emb_loss(u, p, n)}

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_embedding.weight, self.item_embedding.weight
