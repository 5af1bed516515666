"""The one interface every recommender in ``models/`` implements, so the trainer, evaluator, grid runner and plug-in
treat them alike: tensors in (never files), dot-product scores of the returned embeddings, ranked in user batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` with a backward that is the same on every run. Why: advanced indexing's backward adds the gradients
    of repeated rows (a user twice in a batch) in whatever order its CPU threads get there, so two runs with one seed
    differed in the last bits from the first batch on, and in their metrics after some epochs; ``index_select``'s
    backward adds them in index order."""
    return x.index_select(0, index)


class Recommender(nn.Module, ABC):
    """BPR-trained, dot-product-scored recommender, built by ``models.registry.build_model`` from its inputs: the
    (E, 2) training edges, ``features`` (modality -> (N, d_m)), ``item_graphs`` (modality -> sparse kNN graph)."""

    #: modalities the model needs; the pipeline reports a missing feature file by name.
    required_modalities: tuple[str, ...] = ()

    @abstractmethod
    def loss_terms(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named weighted loss terms of a batch, summed by the trainer and logged apart, so a NaN traces to its term."""

    def auxiliary_step(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, float]:
        """Work done before ``loss_terms`` on each batch with the model's own optimisers (SAND's CLUB fit)."""
        return {}

    def auxiliary_state_dict(self) -> dict[str, Any]:
        """State of optimisers the model owns (saved in checkpoints so resume is exact)."""
        return {}

    def load_auxiliary_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`auxiliary_state_dict` returned."""

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        """Per-epoch resampling hook (FREEDOM's edge pruning)."""

    @abstractmethod
    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(user_emb (U, d), item_emb (N, d)): score(u, i) = <user_emb[u], item_emb[i]>; run in eval mode, no_grad."""
