"""SAND as a plug-in (Table 3): the split/align/distance component on another backbone's ``modal_representations()``.
``plugin_fusion`` (``docs/model.md``, "Plug-ins"): ``"auxiliary"``, the faithful plug-in, leaves the backbone untouched
(with ``reg_weight = 0`` FREEDOM's scores are then FREEDOM's, whatever ``alpha`` and ``beta``); ``"scoring"`` builds
``FREEDOM(modal_in_scores=True)`` so the SAND terms shape what is scored. VBPR scores its projected features anyway."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from sand.models.base import Recommender
from sand.models.freedom import FREEDOM
from sand.models.registry import FUSIONS, VARIANT_TERMS
from sand.models.separation import ModalSeparation
from sand.models.vbpr import VBPR


class SeparationPlugin(Recommender):
    """``backbone`` + :class:`ModalSeparation` over its modal representations."""

    backbone_class: type[Recommender]
    required_modalities = ("image", "text")
    #: Whether ``plugin_fusion`` changes the model (False: the backbone scores its modal representations anyway).
    fusion_matters: bool = True

    def __init__(
        self, n_users: int, n_items: int, train_edges: Tensor, features: Mapping[str, Tensor],
        item_graphs: Mapping[str, Tensor], *, variant: str = "a", alpha: float = 0.012, beta: float = 0.006,
        tau: float = 0.2, split_ratio: float = 0.5, club_steps: int = 50, club_lr: float = 1e-4,
        l2_form: str = "neg-log", solosim_scope: str = "auto", distance_scope: str = "auto", share_club: bool = False,
        head_dims: Sequence[int] = (64, 64, 32), club_fit_order: str = "before", plugin_fusion: str = "auxiliary",
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        if variant not in VARIANT_TERMS:
            raise ValueError(f"unknown SAND variant {variant!r}: choose one of {', '.join(VARIANT_TERMS)}")
        if plugin_fusion not in FUSIONS:
            raise ValueError(f"plugin_fusion must be one of {', '.join(FUSIONS)}; got {plugin_fusion!r}")
        self.plugin_fusion = plugin_fusion
        backbone_kwargs.update(self._fusion_kwargs(plugin_fusion, backbone_kwargs))
        self.backbone = self.backbone_class(n_users, n_items, train_edges, features, item_graphs, **backbone_kwargs)
        align, distance = VARIANT_TERMS[variant]
        with torch.no_grad():
            dims = {m: int(z.shape[1]) for m, z in self.backbone.modal_representations().items()}
        self.separation = ModalSeparation(
            dims, align=align, distance=distance, alpha=alpha, beta=beta, tau=tau, split_ratio=split_ratio,
            club_steps=club_steps, club_lr=club_lr, l2_form=l2_form, solosim_scope=solosim_scope,
            distance_scope=distance_scope, share_club=share_club, head_dims=tuple(int(w) for w in head_dims),
            club_fit_order=club_fit_order,
        )

    def _fusion_kwargs(self, fusion: str, backbone_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Backbone keywords that realise ``fusion`` (none: the backbone as it is)."""
        return {}

    @staticmethod
    def _batch_items(pos: Tensor, neg: Tensor) -> Tensor:
        return torch.unique(torch.cat([pos, neg]))

    def loss_terms(self, users: Tensor, pos: Tensor, neg: Tensor) -> dict[str, Tensor]:
        terms = dict(self.backbone.loss_terms(users, pos, neg))
        terms.update(self.separation.loss_terms(self.backbone.modal_representations(), self._batch_items(pos, neg)))
        return terms

    def auxiliary_step(self, users: Tensor, pos: Tensor, neg: Tensor) -> dict[str, float]:
        out = dict(self.backbone.auxiliary_step(users, pos, neg))
        if self.separation.distance == "club" and self.separation.club_steps > 0:
            with torch.no_grad():
                reps = {m: z.detach() for m, z in self.backbone.modal_representations().items()}
            out.update(self.separation.auxiliary_step(reps, self._batch_items(pos, neg)))
        return out

    def auxiliary_state_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone.auxiliary_state_dict(), "separation": self.separation.auxiliary_state_dict()}

    def load_auxiliary_state_dict(self, state: dict[str, Any]) -> None:
        self.backbone.load_auxiliary_state_dict(state.get("backbone", {}))
        self.separation.load_auxiliary_state_dict(state.get("separation", {}))

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        self.backbone.on_epoch_start(epoch, generator)

    def embeddings(self) -> tuple[Tensor, Tensor]:
        return self.backbone.embeddings()

    def modal_parts(self) -> dict[str, tuple[Tensor, Tensor]]:
        """modality -> (generic, unique) item representations (for the report's figures)."""
        reps = self.backbone.modal_representations()
        return {m: self.separation.split(m, z) for m, z in reps.items()}


class VBPRSand(SeparationPlugin):
    """VBPR + SAND: the component on VBPR's projected image/text features (always scored)."""

    backbone_class = VBPR
    fusion_matters = False


class FREEDOMSand(SeparationPlugin):
    """FREEDOM + SAND: the component on FREEDOM's projected image/text features."""

    backbone_class = FREEDOM

    def _fusion_kwargs(self, fusion: str, backbone_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        wanted = fusion == "scoring"
        given = backbone_kwargs.get("modal_in_scores", wanted)
        if bool(given) != wanted:
            raise ValueError(f"plugin_fusion={fusion!r} contradicts modal_in_scores={given!r}")
        return {"modal_in_scores": wanted}
