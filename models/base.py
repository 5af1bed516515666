"""The one interface every recommender in ``models/`` implements.

Why a small interface: the trainer, the evaluator, the grid runner and the plug-in component must treat MF-BPR,
LightGCN, VBPR, FREEDOM and SAND alike. Models get tensors (never files) and score users against items by a dot product
of the embeddings they return, which lets the evaluator rank in user batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class Recommender(nn.Module, ABC):
    """Base class: BPR-trained, dot-product-scored recommender.

    Construction (by ``models.registry.build_model``) receives:
      n_users, n_items: ints;
      train_edges: LongTensor (E, 2) of (user, item) training interactions;
      features: dict modality -> FloatTensor (n_items, d_m) ("image", "text"), may be empty;
      item_graphs: dict modality -> torch sparse COO (n_items, n_items), normalised kNN graphs;
      hyper-parameters as keyword arguments."""

    #: modalities the model needs; the pipeline reports a missing feature file by name.
    required_modalities: tuple[str, ...] = ()

    @abstractmethod
    def loss_terms(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted scalar loss terms for one batch; the trainer minimises their sum.

        Keys name the terms ("bpr", "reg", "align", "distance", ...) so the per-epoch log shows each one and a NaN can
        be traced to its term."""

    def auxiliary_step(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, float]:
        """Work done before ``loss_terms`` on each batch with the model's own optimisers.

        SAND fits its CLUB estimators here. Default: nothing."""
        return {}

    def auxiliary_state_dict(self) -> dict[str, Any]:
        """State of optimisers the model owns (saved in checkpoints so resume is exact)."""
        return {}

    def load_auxiliary_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`auxiliary_state_dict` returned."""

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        """Per-epoch resampling hook (FREEDOM's edge pruning). Default: nothing."""

    @abstractmethod
    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(user_emb (U, d), item_emb (N, d)) for scoring; called under eval mode + no_grad.

        score(u, i) = <user_emb[u], item_emb[i]>."""
