"""VBPR (He & McAuley 2016) in MMRec's "recommended version".

MMRec: item = concat(ID embedding (64), Linear(concat(text, image)) (64)), user = one free 128-d embedding, BPR +
reg_weight * EmbLoss(user, pos, neg) on those full rows. Why the projection is written per modality here: a Linear layer
on a concatenation IS a sum of per-modality Linear layers, ``W [x_t; x_v] + b = W_t x_t + W_v x_v + b``, so
``modal_fusion="sum"`` (default) is MMRec's model exactly, and the per-modality terms ``W_m x_m`` are available by name
to a plug-in (SAND's separation component) without touching this backbone. The weight is initialised as one
xavier-normal matrix over the concatenated width and then sliced, so the initial distribution is MMRec's too.
``modal_fusion="concat"`` is the "per-modality projections" variant: item = concat(ID, W_v x_v, W_t x_t), user width
grows accordingly."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from sand.models.base import Recommender
from sand.models.bpr import bpr_loss, check_modalities, dot_scores, emb_loss
from sand.models.precision import LowPrecisionCopies, compute_dtype, low_linear

MODALITIES: tuple[str, ...] = ("image", "text")


class VBPR(Recommender):
    """VBPR with named per-modality projections.

    Hyper-parameters: ``embedding_dim`` (64), ``reg_weight`` (MMRec tunes {2.0, 1.0, 1e-1, ..., 1e-5}; default 1e-2),
    ``modal_fusion`` ("sum" = MMRec, or "concat")."""

    required_modalities: tuple[str, ...] = MODALITIES
    #: "fp32" or "bf16": the dtype of the products with the raw features (:mod:`models.precision`).
    precision: str = "fp32"

    def __init__(
        self, n_users: int, n_items: int, train_edges: torch.Tensor | None = None,
        features: Mapping[str, torch.Tensor] | None = None, item_graphs: Mapping[str, torch.Tensor] | None = None, *,
        embedding_dim: int = 64, reg_weight: float = 1e-2, modal_fusion: str = "sum",
    ) -> None:
        super().__init__()
        check_modalities("VBPR", self.required_modalities, features, n_items=n_items)
        if modal_fusion not in ("sum", "concat"):
            raise ValueError(f"VBPR: modal_fusion must be 'sum' or 'concat'; got {modal_fusion!r}")
        assert features is not None
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.reg_weight = float(reg_weight)
        self.modal_fusion = modal_fusion
        self.modalities = self.required_modalities
        self._low_copies = LowPrecisionCopies()
        n_modal_blocks = 1 if modal_fusion == "sum" else len(self.modalities)
        user_dim = embedding_dim * (1 + n_modal_blocks)
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, user_dim)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, embedding_dim)))

        widths = [int(features[m].shape[1]) for m in self.modalities]
        full = nn.init.xavier_normal_(torch.empty(embedding_dim, sum(widths)))
        self.projections = nn.ParameterDict()
        start = 0
        for m, w in zip(self.modalities, widths, strict=True):
            self.projections[m] = nn.Parameter(full[:, start : start + w].clone())
            start += w
            # Raw features are inputs, not state: not saved in checkpoints.
            self.register_buffer(f"feat_{m}", features[m].detach().float(), persistent=False)
        self.projection_bias = nn.Parameter(torch.zeros(n_modal_blocks, embedding_dim))

    def modal_representations(self) -> dict[str, torch.Tensor]:
        """modality -> (N, embedding_dim) projected features ``W_m x_m``, with gradient.

        These are exactly the tensors :meth:`item_representation` is built from (summed, or concatenated, plus a bias),
        so a plug-in may add losses on them."""
        if self.precision == "fp32":
            return {m: getattr(self, f"feat_{m}") @ self.projections[m].T for m in self.modalities}
        dtype = compute_dtype(self.precision)  # the fixed features' copy is made once per run
        return {
            m: low_linear(self._low_copies.get(m, getattr(self, f"feat_{m}"), dtype), self.projections[m], None)
            for m in self.modalities
        }

    def item_representation(self, modal: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(N, d) item rows: concat(ID embedding, fused projected features)."""
        modal = self.modal_representations() if modal is None else modal
        if self.modal_fusion == "sum":
            fused = sum(modal[m] for m in self.modalities) + self.projection_bias[0]
        else:
            fused = torch.cat([modal[m] + self.projection_bias[k] for k, m in enumerate(self.modalities)], 1)
        return torch.cat([self.item_embedding, fused], dim=1)

    def loss_terms(self, users: Tensor, pos: Tensor, neg: Tensor) -> dict[str, Tensor]:
        items = self.item_representation()
        u, p, n = self.user_embedding[users], items[pos], items[neg]
        return {"bpr": bpr_loss(*dot_scores(u, p, n)), "reg": self.reg_weight * emb_loss(u, p, n)}

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_embedding, self.item_representation()
