"""Loss functions of SAND and its baselines, as pure functions of tensors.

Why pure functions: the same terms serve SAND, its plug-in component on VBPR and
FREEDOM, and the tests, which check each term on hand-computable inputs. Only the
CLUB estimator carries parameters (it is a small network fitted by maximum
likelihood), so it is an ``nn.Module``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Forms of the negative-l2 distancing loss (spec §3, Eq. 14), see :func:`l2_distance_loss`.
L2_FORMS = ("neg-mse", "neg-log", "margin")


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """Bayesian personalised ranking loss ``-mean(ln sigmoid(pos - neg))``.

    Natural log. The SAND reference code uses ``log2``, which equals this value times
    ``1 / ln 2`` (about 1.4427): the same optimum, a 1.44x larger effective weight of
    BPR against the alignment/distancing terms. ``logsigmoid`` keeps it finite when
    ``neg >> pos`` (``log(sigmoid(x))`` underflows to ``-inf`` there).
    """
    return -F.logsigmoid(pos_scores - neg_scores).mean()


def solosim_loss(text_h: torch.Tensor, image_h: torch.Tensor, tau: float) -> torch.Tensor:
    """SoloSim (Eq. 10), text -> image direction only, as the reference computes it.

    ``S = T I^T / tau``; loss ``= -mean(diag(log_softmax(S, dim=1)))``: item i's text view
    must pick item i's image view among all image views in the set. Inputs are rows of
    already L2-normalised projections (n x d), row i of both belonging to the same item.

    Computed as ``mean_i(logsumexp_j S_ij - S_ii)`` (the same value) with ``1/tau``
    applied to the n x d input rather than the n x n matrix: over all items (n = N) this
    avoids three n x n passes (the division, the log-softmax output and the dense
    gradient of the diagonal), which dominate the term's cost.
    """
    scaled = text_h / tau
    logits = scaled @ image_h.T
    return (torch.logsumexp(logits, dim=1) - (scaled * image_h).sum(dim=1)).mean()


def infonce_loss(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE (spec §2, Table 4): the a -> b and b -> a SoloSim terms averaged.

    Why symmetric: the alternative the paper compares against treats both modalities
    alike, unlike SoloSim which only asks text to find image.
    """
    scaled = a / tau
    logits = scaled @ b.T
    pos = (scaled * b).sum(dim=1)
    return 0.5 * (torch.logsumexp(logits, dim=1) + torch.logsumexp(logits, dim=0)).mean() - pos.mean()


def l2_distance_loss(
    e1: torch.Tensor, e2: torch.Tensor, form: str = "neg-log", *, eps: float = 1e-4, margin: float = 1.0
) -> torch.Tensor:
    """Distancing by l2 (Eq. 14) between generic (``e1``) and unique (``e2``) projections.

    Forms (``mse = mean((e1 - e2) ** 2)``):
      - ``"neg-mse"``: ``-mse``, the paper's Eq. 14. Unbounded below: minimising it lets
        the projections grow without limit (the reference survives only because its
        weight is tiny). Kept for fidelity.
      - ``"neg-log"`` (default for SAND_b/d): ``-log(eps + mse)``. Still decreasing in the
        distance, but its gradient shrinks like ``1 / mse``, so the push weakens as the
        parts separate and the term grows only logarithmically: it stays finite over any
        realistic training and never dominates BPR. Bounded above by ``-log(eps)``.
      - ``"margin"``: ``relu(margin - mse)``, strictly bounded in ``[0, margin]``; stops
        pushing once the parts are ``margin`` apart (a hyper-parameter to choose).
    """
    mse = (e1 - e2).pow(2).mean()
    if form == "neg-mse":
        return -mse
    if form == "neg-log":
        return -torch.log(eps + mse)
    if form == "margin":
        return F.relu(margin - mse)
    raise ValueError(f"l2_form must be one of {L2_FORMS}, got {form!r}")


class ClubEstimator(nn.Module):
    """Variational net ``q(y | x) = N(mu(x), exp(logvar(x)))`` for the CLUB bound (Eq. 11-13).

    Mean and log-variance heads are ``Linear(x_dim -> hidden) -> ReLU -> Linear(hidden ->
    y_dim)``; the log-variance head ends in ``tanh`` (variance within [1/e, e]), as the
    reference's ``CLUBSample`` with ``hidden_size=16``. The constant ``-0.5 log 2 pi`` is
    dropped: it cancels in the bound and does not change the ML fit.
    """

    def __init__(self, x_dim: int = 32, y_dim: int = 32, hidden: int = 8) -> None:
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim))
        self.logvar = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim), nn.Tanh())

    def _log_q(self, mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-row ``log q(y | x)`` (up to the constant), summed over dimensions.

        ``-((mu - y)^2 / exp(logvar) + logvar) / 2`` written with few elementwise passes:
        the estimator is fitted 50 times per batch, so each pass counts.
        """
        return -0.5 * ((mu - y).square() * torch.exp(-logvar) + logvar).sum(dim=1)

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean ``log q(y_i | x_i)`` over pairs: what the estimator's own optimiser maximises."""
        return self._log_q(self.mu(x), self.logvar(x), y).mean()

    def forward(self, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """The bound (so ``torch.func.functional_call`` can evaluate it with detached weights)."""
        return self.mi_upper_bound(x, y, perm)

    def mi_upper_bound(self, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """CLUB-sample bound ``max(0, mean_i[log q(y_i|x_i) - log q(y_perm(i)|x_i)] / 2)``.

        The halving and the clamp at 0 follow the reference (a poorly fitted estimator can
        give a negative estimate, which would reward *increasing* dependence).
        ``perm`` is a permutation of the rows (the caller draws it, so runs are seeded).
        """
        mu, logvar = self.mu(x), self.logvar(x)
        positive = self._log_q(mu, logvar, y)
        negative = self._log_q(mu, logvar, y[perm])
        return torch.clamp((positive - negative).mean() / 2.0, min=0.0)


#: ``1 / ln 2``: multiply :func:`bpr_loss` by this to get the reference's log2 value.
BPR_LOG2_FACTOR = 1.0 / math.log(2.0)
