"""SAND as its formulas read: the naive reference the production model's shortcuts are checked against.

Why it is here and not in ``models/``: it exists to check the fast path (tests compare
the two to 1e-4) and to measure it (``bench_sand_speed.py``: ours vs the naive
formulation), not to be shipped. It subclasses the production classes and replaces
only the shortcuts, so what is compared is exactly those:

- ``Z_m = L_m(X_m)`` evaluated at full width over all items every batch (no folded
  products, no shared read of ``X_m``);
- SoloSim / InfoNCE as the N x N ``log_softmax`` (no streamed log-sum-exp);
- the CLUB fit by autograd and ``torch.optim.Adam`` (no closed-form gradients);
- graph products with ``torch.sparse.mm`` on COO matrices (no CSR, no cached transpose).

Tests import it with ``benchmarks/`` on ``sys.path`` (as ``tests/benchmarks/test_bench_realsize.py``
does); ``tests/sand_reference.py`` is a second, fully independent reference that shares
no code with the package at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sand.models.sand import SAND
from sand.models.separation import ModalInput, ModalSeparation


def solosim_literal(text_h: torch.Tensor, image_h: torch.Tensor, tau: float) -> torch.Tensor:
    """SoloSim (Eq. 10) as written: ``-mean(diag(log_softmax(T I^T / tau, dim=1)))``."""
    return -torch.diagonal(F.log_softmax(text_h @ image_h.T / tau, dim=1)).mean()


def infonce_literal(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE: both SoloSim directions averaged, each as written."""
    return 0.5 * (solosim_literal(a, b, tau) + solosim_literal(b, a, tau))


class NaiveModalSeparation(ModalSeparation):
    """:class:`ModalSeparation` with the N x N alignment logits and an autograd CLUB fit."""

    def _align_loss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        align_loss = solosim_literal if self.align == "solosim" else infonce_literal
        return align_loss(a, b, self.tau)

    def _fit_club(self, pairs) -> dict[str, float]:
        """``club_steps`` steps of autograd + ``torch.optim.Adam`` on the summed log-likelihoods."""
        lls: dict[str, torch.Tensor] = {}
        with torch.enable_grad():
            for _ in range(self.club_steps):
                for opt in self._club_optimisers.values():
                    opt.zero_grad(set_to_none=True)
                # One backward of the sum gives each estimator its own gradient (a shared
                # estimator: the sum over modalities, as fit_clubs computes it).
                lls = {m: self._estimator(m).log_likelihood(*pairs[m]) for m in self.modalities}
                (-torch.stack(list(lls.values())).sum()).backward()
                for opt in self._club_optimisers.values():
                    opt.step()
        for opt in self._club_optimisers.values():
            opt.zero_grad(set_to_none=True)
        return {f"club_ll_{m}": float(v.detach()) for m, v in lls.items()}


class NaiveSAND(SAND):
    """:class:`SAND` with every formula evaluated literally (same parameters, same function).

    Weights load both ways with ``load_state_dict``: the graphs are non-persistent buffers.
    """

    separation_class = NaiveModalSeparation

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.adj = self.adj.to_sparse_coo().coalesce()
        self.item_graph = self.item_graph.to_sparse_coo().coalesce()
        self.item_graph_t = None

    def modal_inputs(self) -> dict[str, ModalInput]:
        """``Z_m`` as full-width (N, d_m) tensors, recomputed every call."""
        return {m: view.dense() for m, view in super().modal_inputs().items()}

    @staticmethod
    def _product(a: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sparse.mm(a, x)

    def _prefetch(self, z: dict[str, ModalInput]) -> dict[str, ModalInput]:
        return z  # every reader multiplies the full-width Z_m itself
