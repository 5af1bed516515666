"""VBPR (He & McAuley 2016) in MMRec's "recommended version", the feature projection written per modality: a Linear
layer on a concatenation IS a sum of per-modality ones (``W [x_t; x_v] = W_t x_t + W_v x_v``; the weight is initialised
over the whole width, then sliced), so ``modal_fusion="sum"`` is MMRec's model exactly while a plug-in gets each
``W_m x_m`` by name."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from sand.models.base import Recommender, take_rows
from sand.models.bpr import bpr_loss, check_modalities, dot_scores, emb_loss
from sand.models.precision import LowPrecisionCopies, compute_dtype, low_linear


class VBPR(Recommender):
    """VBPR with named per-modality projections: item = concat(ID embedding, sum of the ``W_m x_m`` as MMRec, or their
    concat with ``modal_fusion="concat"``, widening the user); MMRec tunes ``reg_weight`` over {2.0, 1.0, ..., 1e-5}."""

    required_modalities: tuple[str, ...] = ("image", "text")
    precision: str = "fp32"  #: or "bf16": the dtype of the products with the raw features (:mod:`models.precision`)

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
        self.reg_weight, self.modal_fusion = float(reg_weight), modal_fusion
        self.modalities = self.required_modalities
        self._low_copies = LowPrecisionCopies()
        n_modal_blocks = 1 if modal_fusion == "sum" else len(self.modalities)
        user_dim = embedding_dim * (1 + n_modal_blocks)
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, user_dim)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, embedding_dim)))
        widths = [int(features[m].shape[1]) for m in self.modalities]
        full = nn.init.xavier_normal_(torch.empty(embedding_dim, sum(widths)))
        blocks = zip(self.modalities, full.split(widths, dim=1), strict=True)
        self.projections = nn.ParameterDict({m: nn.Parameter(block.clone()) for m, block in blocks})
        for m in self.modalities:  # raw features are inputs, not state: not saved in checkpoints
            self.register_buffer(f"feat_{m}", features[m].detach().float(), persistent=False)
        self.projection_bias = nn.Parameter(torch.zeros(n_modal_blocks, embedding_dim))

    def modal_representations(self) -> dict[str, torch.Tensor]:
        """modality -> (N, embedding_dim) projected features ``W_m x_m``, with gradient: exactly what
        :meth:`item_representation` is built from, so a plug-in may add losses on them."""
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
        u, p, n = take_rows(self.user_embedding, users), take_rows(items, pos), take_rows(items, neg)
        return {"bpr": bpr_loss(*dot_scores(u, p, n)), "reg": self.reg_weight * emb_loss(u, p, n)}

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_embedding, self.item_representation()
