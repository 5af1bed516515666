"""FREEDOM (Zhou & Shen 2023, "A Tale of Two Graphs"), following MMRec's ``freedom.py`` / ``FREEDOM.yaml``: a frozen
item-item graph (from ``item_graphs``, never recomputed) and degree-sensitive pruning of the training graph each epoch.

Not in MMRec: ``modal_in_scores=True`` adds the projected features to the item ID embeddings before both propagations,
so the SAND plug-in's ``scoring`` fusion (``docs/model.md``) can change scores. Each is scaled by ``fused_scale``, the
ID embeddings' mean row norm over the projected rows': unscaled, they dominate every score and saturate the BPR sigmoid
from the first batch (docs/convergence.md)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from sand.models.base import Recommender, take_rows
from sand.models.bpr import bpr_loss, check_modalities, dot_scores
from sand.models.graph import mix_item_graphs, normalised_bipartite_adjacency, sparse_matmul, to_csr
from sand.models.lightgcn import edges_numpy, layer_mean
from sand.models.precision import LowPrecisionCopies, compute_dtype, linear


def degree_edge_weights(n_users: int, n_items: int, edges: np.ndarray) -> torch.Tensor:
    """1 / sqrt(d_u d_i) for each (deduplicated) edge: FREEDOM's sampling weights."""
    du = np.bincount(edges[:, 0], minlength=n_users).astype(np.float64)
    di = np.bincount(edges[:, 1], minlength=n_items).astype(np.float64)
    return torch.from_numpy(1.0 / np.sqrt(du[edges[:, 0]] * di[edges[:, 1]])).float()


def weighted_sample_without_replacement(weights: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k distinct indices (on the CPU) drawn one after another with probability proportional to ``weights``.
    ``torch.multinomial`` (MMRec's call) takes at most 2**24 categories; beyond, the same distribution comes from the
    top-k of ``log(u) / w`` keys (Efraimidis & Spirakis)."""
    w = weights.to(generator.device)
    if len(w) <= 2**24:
        return torch.multinomial(w, k, replacement=False, generator=generator).cpu()
    u = torch.rand(len(w), generator=generator, device=w.device).clamp_min(1e-38)
    return (u.log() / w).topk(k).indices.cpu()


class FREEDOM(Recommender):
    """FREEDOM with named projected modal features (for the SAND plug-in); raw features are trainable, as MMRec's
    ``Embedding.from_pretrained(freeze=False)``. MMRec's grid: ``dropout`` in {0.8, 0.9}, ``reg_weight`` in {0, 1e-5,
    1e-4, 1e-3}; its ``lambda_coeff``, unused by its FREEDOM, is not offered. Tests inspect ``full_adj``, ``train_adj``,
    ``kept_edges`` and ``train_edges``."""

    required_modalities: tuple[str, ...] = ("image", "text")
    precision: str = "fp32"  #: or "bf16": the dtype of the products with the raw features (:mod:`models.precision`)

    def __init__(
        self, n_users: int, n_items: int, train_edges: torch.Tensor | None = None,
        features: Mapping[str, torch.Tensor] | None = None, item_graphs: Mapping[str, torch.Tensor] | None = None, *,
        embedding_dim: int = 64, feat_embed_dim: int = 64, n_ui_layers: int = 2, n_mm_layers: int = 1,
        mm_image_weight: float = 0.1, dropout: float = 0.8, reg_weight: float = 1e-3, train_features: bool = True,
        modal_in_scores: bool = False,
    ) -> None:
        super().__init__()
        check_modalities("FREEDOM", self.required_modalities, features, item_graphs, n_items, need_graphs=True)
        if feat_embed_dim != embedding_dim:
            raise ValueError(f"FREEDOM: feat_embed_dim ({feat_embed_dim}) must equal embedding_dim ({embedding_dim}): "
                             "users are scored against projected features")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"FREEDOM: dropout must be in [0, 1); got {dropout}")
        assert features is not None and item_graphs is not None
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.n_ui_layers, self.n_mm_layers = int(n_ui_layers), int(n_mm_layers)
        self.dropout, self.reg_weight = float(dropout), float(reg_weight)
        self.modal_in_scores = bool(modal_in_scores)
        self.modalities = self.required_modalities
        self._low_copies = LowPrecisionCopies()
        self.user_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_users, embedding_dim)))
        self.item_embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n_items, embedding_dim)))
        self.projections = nn.ModuleDict({m: nn.Linear(features[m].shape[1], feat_embed_dim) for m in self.modalities})
        for m in self.modalities:
            feat = features[m].detach().float().clone()
            if train_features:
                self.register_parameter(f"feat_{m}", nn.Parameter(feat))
            else:
                self.register_buffer(f"feat_{m}", feat, persistent=False)
        edges = np.unique(edges_numpy(train_edges, "FREEDOM"), axis=0)
        self.train_edges = torch.from_numpy(edges)
        self._edge_weights = degree_edge_weights(self.n_users, self.n_items, edges)
        full = normalised_bipartite_adjacency(self.n_users, self.n_items, edges)
        self.register_buffer("full_adj", to_csr(full), persistent=False)
        mm_adj = mix_item_graphs(item_graphs, mm_image_weight)  # kNN rows: not symmetric in general
        self.register_buffer("mm_adj", to_csr(mm_adj), persistent=False)
        self.register_buffer("mm_adj_t", to_csr(mm_adj.t().coalesce()), persistent=False)
        # The epoch's pruned graph: a buffer so it moves with the model, not saved (resampled).
        self.register_buffer("train_adj", None, persistent=False)
        self.kept_edges: torch.Tensor | None = None
        if self.modal_in_scores:
            # A buffer, saved with the weights: a resumed run scales as it started, whatever its weights are by then.
            self.register_buffer("fused_scale", self._initial_fused_scale())

    def _initial_fused_scale(self) -> Tensor:
        """Per modality: the ID embeddings' mean row norm over the projected features' (see the module's docstring)."""
        with torch.no_grad():
            reps = self.modal_representations()
            id_norm = self.item_embedding.norm(dim=1).mean()
            return torch.stack([id_norm / reps[m].norm(dim=1).mean().clamp_min(1e-12) for m in self.modalities])

    @property
    def n_kept_edges(self) -> int:
        """How many edges one epoch keeps: ``int(E * (1 - dropout))``, as MMRec."""
        return int(len(self.train_edges) * (1.0 - self.dropout))

    def on_epoch_start(self, epoch: int, generator: torch.Generator) -> None:
        """Degree-sensitive pruning: resample this epoch's training graph from ``generator``."""
        if self.dropout <= 0.0:
            self.kept_edges, self.train_adj = self.train_edges, self.full_adj
            return
        idx = weighted_sample_without_replacement(self._edge_weights, self.n_kept_edges, generator)
        self.kept_edges = self.train_edges[idx]
        adj = normalised_bipartite_adjacency(self.n_users, self.n_items, self.kept_edges.numpy())
        self.train_adj = to_csr(adj).to(self.full_adj.device)

    def modal_representations(self) -> dict[str, torch.Tensor]:
        """modality -> (N, feat_embed_dim) projected features, with gradient (FREEDOM's ``*_trs``)."""
        out = {}
        for m in self.modalities:
            x, lin = getattr(self, f"feat_{m}"), self.projections[m]
            # Trainable features are cast on every call (their gradient flows through the cast).
            x_low = None if self.precision == "fp32" or x.requires_grad else self._low_copies.get(
                m, x, compute_dtype(self.precision))
            out[m] = linear(x, lin.weight, lin.bias, self.precision, x_low)
        return out

    def propagate(self, adj: Tensor, modal: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(users, items) over user-item graph ``adj``, plus the item-item propagation of the items: the ID embeddings,
        plus (``modal_in_scores``) the projected features ``modal`` scaled by ``fused_scale``."""
        items = self.item_embedding
        if self.modal_in_scores:
            modal = self.modal_representations() if modal is None else modal
            items = items + sum(modal[m] * self.fused_scale[i] for i, m in enumerate(self.modalities))
        h = items
        for _ in range(self.n_mm_layers):
            h = sparse_matmul(self.mm_adj, h, self.mm_adj_t)
        out = layer_mean(adj, torch.cat([self.user_embedding, items], dim=0), self.n_ui_layers)
        return out[: self.n_users], out[self.n_users :] + h

    def loss_terms(self, users: Tensor, pos: Tensor, neg: Tensor) -> dict[str, Tensor]:
        if self.train_adj is None:
            raise RuntimeError("FREEDOM: on_epoch_start(epoch, generator) must run before training batches")
        modal = self.modal_representations()
        u_all, i_all = self.propagate(self.train_adj, modal)
        u = take_rows(u_all, users)
        bpr = bpr_loss(*dot_scores(u, take_rows(i_all, pos), take_rows(i_all, neg)))
        modal_bpr = sum(bpr_loss(*dot_scores(u, take_rows(modal[m], pos), take_rows(modal[m], neg)))
                        for m in self.modalities)
        return {"bpr": bpr, "modal_bpr": self.reg_weight * modal_bpr}

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scoring embeddings over the FULL training graph (never the pruned one)."""
        return self.propagate(self.full_adj)
