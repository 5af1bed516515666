"""SAND (arXiv 2406.08270; v2 "SEA"): separate generic and unique modal awareness, as ``docs/model.md`` defines it: the
authors' code (on MMRec's DRAGON) with its defects fixed (departures 1, 3 and 10). Speed (departure 11):
``Z_m = L_m(X_m)`` is never formed; its linear consumers read ``X_m`` through folded weights
(:class:`models.separation.LinearView`), all in one product (:func:`models.separation.prefetch_reads`). The naive
reference, ``benchmarks/naive_sand.py``, overrides the hooks ``modal_inputs``, ``_prefetch``, ``_product`` and
``separation_class`` to check every shortcut."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sand.models.base import Recommender, take_rows
from sand.models.bpr import check_modalities
from sand.models.graph import mix_item_graphs, normalised_bipartite_adjacency, sparse_matmul, to_csr
from sand.models.losses import bpr_loss
from sand.models.precision import LowPrecisionCopies, compute_dtype
from sand.models.registry import VARIANT_TERMS
from sand.models.separation import LinearView, ModalInput, ModalSeparation, prefetch_reads, read_through


class ModalGCN(nn.Module):
    """One modality's user-item GCN: free user preferences, MLP'd item features, sum of layers."""

    def __init__(self, n_users: int, in_dim: int, dim: int = 64) -> None:
        super().__init__()
        self.preference = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_users, dim)))
        self.mlp = nn.Linear(in_dim, 4 * dim)
        self.mlp1 = nn.Linear(4 * dim, dim)

    def forward(
        self, adj: torch.Tensor, z: ModalInput, n_layers: int, product: Callable[..., torch.Tensor] = sparse_matmul
    ) -> torch.Tensor:
        """(U + N, dim): ``x + A x + A^2 x + ...``, ``x`` the row-normalised inputs, ``product(adj, h)`` = ``A h``."""
        (hidden,) = read_through(z, [self.mlp])
        items = self.mlp1(F.leaky_relu(hidden))
        x = F.normalize(torch.cat([self.preference, items], dim=0), dim=1)
        out, h = x, x
        for _ in range(n_layers):
            h = product(adj, h)
            out = out + h
        return out


class SAND(Recommender):
    """SAND and its variants (:data:`models.registry.VARIANT_TERMS`): per modality ``Z_m`` feeds a :class:`ModalGCN`;
    the frozen graph ``S = w S_image + (1 - w) S_text`` (``w = mm_image_weight``) propagates the items once. ``lr`` is
    the CLUB optimisers' (not the trainer's). ``reg_weight`` > 0 adds ``reg_weight * batch mean of (|u|^2 + |i+|^2 +
    |i-|^2) / 2`` (the reference defines but never uses one)."""

    required_modalities: tuple[str, ...] = ("image", "text")
    precision: str = "fp32"  #: or "bf16": the dtype of the products with the raw features (:mod:`models.precision`)
    separation_class: type[ModalSeparation] = ModalSeparation  #: a subclass may swap in another form of the losses

    def __init__(
        self, n_users: int, n_items: int, train_edges: torch.Tensor, features: Mapping[str, torch.Tensor],
        item_graphs: Mapping[str, torch.Tensor], *, variant: str = "a", embedding_dim: int = 64,
        mm_image_weight: float = 0.1, n_mm_layers: int = 1, n_ui_layers: int = 2, alpha: float = 0.012,
        beta: float = 0.006, tau: float = 0.2, club_steps: int = 50, lr: float = 1e-4, solosim_scope: str = "auto",
        distance_scope: str = "auto", l2_form: str = "neg-log", split_ratio: float = 0.5, reg_weight: float = 0.0,
        club_fit_order: str = "before",
    ) -> None:
        super().__init__()
        if variant not in VARIANT_TERMS:
            raise ValueError(f"SAND: unknown variant {variant!r}; choose one of {', '.join(VARIANT_TERMS)}")
        check_modalities("SAND", self.required_modalities, features, item_graphs, n_items, need_graphs=True)
        if not 0.0 <= mm_image_weight <= 1.0:
            raise ValueError(f"SAND: mm_image_weight must be in [0, 1]; got {mm_image_weight}")
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.variant, self.reg_weight = variant, float(reg_weight)
        self.n_mm_layers, self.n_ui_layers = int(n_mm_layers), int(n_ui_layers)
        self.modalities = self.required_modalities
        self._low_copies = LowPrecisionCopies()
        edges = torch.as_tensor(train_edges).detach().cpu().numpy().astype(np.int64).reshape(-1, 2)
        # Graphs and raw features are inputs rebuilt at construction, not state: not saved.
        adj = normalised_bipartite_adjacency(self.n_users, self.n_items, edges)
        self.register_buffer("adj", to_csr(adj), persistent=False)
        s = mix_item_graphs({m: item_graphs[m].detach().float() for m in ("image", "text")}, mm_image_weight)
        self.register_buffer("item_graph", to_csr(s), persistent=False)
        self.register_buffer("item_graph_t", to_csr(s.t()), persistent=False)
        dims = {m: int(features[m].shape[1]) for m in self.modalities}
        for m in self.modalities:
            self.register_buffer(f"feat_{m}", features[m].detach().float(), persistent=False)
        self.transforms = nn.ModuleDict({m: nn.Linear(d, d) for m, d in dims.items()})
        self.gcns = nn.ModuleDict({m: ModalGCN(self.n_users, d, embedding_dim) for m, d in dims.items()})
        # Per-user modality weights: xavier-normal (as on a (U, 2, 1) tensor), softmaxed once at init, then free
        # parameters (the reference's weight_u).
        std = math.sqrt(2.0 / (self.n_users + len(self.modalities)))
        self.modal_weight = nn.Parameter(torch.softmax(torch.randn(self.n_users, len(self.modalities)) * std, 1))
        align, distance = VARIANT_TERMS[variant]
        self.separation = self.separation_class(
            dims, align=align, distance=distance, alpha=alpha, beta=beta, tau=tau, split_ratio=split_ratio,
            club_steps=club_steps, club_lr=lr, l2_form=l2_form, solosim_scope=solosim_scope,
            distance_scope=distance_scope, club_fit_order=club_fit_order,
        )

    def _transform_view(self, modality: str) -> LinearView:
        """``Z_m = L_m(X_m)`` unevaluated; under bf16 with bfloat16 copies of ``X_m`` (made once per run) and of
        ``L_m``'s weight (cast on every call: the optimiser changes it every batch)."""
        lin = self.transforms[modality]
        x = getattr(self, f"feat_{modality}")
        if self.precision == "fp32":
            return LinearView(x, lin.weight, lin.bias)
        dtype = compute_dtype(self.precision)
        x_low = self._low_copies.get(f"x_{modality}", x, dtype)
        return LinearView(x, lin.weight, lin.bias, x_low=x_low, weight_low=lin.weight.detach().to(dtype))

    def modal_inputs(self) -> dict[str, ModalInput]:
        """modality -> ``Z_m`` as a LinearView: ``L_m(X_m)`` never evaluated at full width."""
        return {m: self._transform_view(m) for m in self.modalities}

    @staticmethod
    def _product(a: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor | None = None) -> torch.Tensor:
        """``a @ x`` for a frozen graph ``a`` (CSR; ``a_t`` its transpose, default ``a``)."""
        return sparse_matmul(a, x, a_t)

    def _prefetch(self, z: dict[str, ModalInput]) -> dict[str, ModalInput]:
        """Every linear reader of ``Z_m`` over all items (GCN input MLP, head, E1, E2) in one product with ``X_m``."""
        for m in self.modalities:
            parts = [(0, z[m].shape[1], self.gcns[m].mlp), *self.separation.full_row_consumers(m, self.n_items)]
            z[m] = prefetch_reads(z[m], parts)
        return z

    def propagate(self, z: Mapping[str, ModalInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """(user (U, 2d), item (N, 2d)) final embeddings from the modal inputs."""
        users, items = [], []
        for k, m in enumerate(self.modalities):
            out = self.gcns[m](self.adj, z[m], self.n_ui_layers, self._product)
            users.append(self.modal_weight[:, k : k + 1] * out[: self.n_users])
            items.append(out[self.n_users :])
        item = torch.cat(items, dim=1)
        h = item
        for _ in range(self.n_mm_layers):
            h = self._product(self.item_graph, h, self.item_graph_t)
        return torch.cat(users, dim=1), item + h

    def loss_terms(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"bpr", "reg"?, "align"?, "distance"?}: weighted terms; disabled ones are absent."""
        z = self._prefetch(self.modal_inputs())
        user, item = self.propagate(z)
        u, p, n = take_rows(user, users), take_rows(item, pos), take_rows(item, neg)
        terms = {"bpr": bpr_loss((u * p).sum(1), (u * n).sum(1))}
        if self.reg_weight > 0:
            terms["reg"] = self.reg_weight * (u.pow(2) + p.pow(2) + n.pow(2)).sum(1).mean() / 2.0
        terms.update(self.separation.loss_terms(z, torch.cat([pos, neg])))
        return terms

    def auxiliary_step(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, float]:
        """Fit the CLUB estimators on this batch's detached projections (MI variants only), read through the folded
        linear maps also in the naive reference: no gradient flows here and the values are the same."""
        if self.separation.distance != "club":
            return {}
        z = {m: self._transform_view(m).detach() for m in self.modalities}
        return self.separation.auxiliary_step(z, torch.cat([pos, neg]))

    def auxiliary_state_dict(self) -> dict[str, Any]:
        return self.separation.auxiliary_state_dict()

    def load_auxiliary_state_dict(self, state: dict[str, Any]) -> None:
        self.separation.load_auxiliary_state_dict(state)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.propagate(self.modal_inputs())
