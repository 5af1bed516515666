"""Loss functions of SAND and its baselines, as pure functions of tensors (shared by SAND, its plug-in component and
the tests, which check each term on hand-computable inputs); only the CLUB estimator has parameters."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.autograd.profiler import record_function

#: ``log2(e)``: ``exp(t) = exp2(LOG2E * t)``, and ``exp2`` is several times cheaper on CPU.
LOG2E = 1.0 / math.log(2.0)
#: Profiler label of the SoloSim log-sum-exp pass (benchmarks/bench_sand_speed.py reads it).
SOLOSIM = "sand::solosim"
#: Forms of the negative-l2 distancing loss (docs/model.md, Eq. 14), see :func:`l2_distance_loss`.
L2_FORMS = ("neg-mse", "neg-log", "margin")


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """``-mean(ln sigmoid(pos - neg))``, finite when ``neg >> pos``. The SAND reference's ``log2`` (this value over
    ``ln 2``) has the same optimum but weighs BPR 1.44x more against the other terms."""
    return -F.logsigmoid(pos_scores - neg_scores).mean()


class _MeanRowLogSumExp(torch.autograd.Function):
    """``mean_i log sum_j exp(a_i . b_j)`` in blocks of rows, never holding the n x m logits: the output is a mean, so
    ``forward`` accumulates the gradients from each block's softmax and ``backward`` only rescales them."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, block: int) -> torch.Tensor:
        with record_function(SOLOSIM):
            n = a.shape[0]
            want_a, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_a = torch.empty_like(a) if want_a else None
            grad_b = torch.zeros_like(b) if want_b else None
            total = a.new_zeros(())
            # Shift by the Cauchy-Schwarz bound |a_i| max_j |b_j| >= max_j a_i . b_j: exp never overflows and no
            # pass finds each row's maximum (for SoloSim's inputs the logits lie within 2/tau of it; rows whose sum
            # underflows are redone with the exact max). The shift rides in the product as an extra column
            # (a_i, -bound_i) . (b_j, 1); the logits are in base 2 because exp2 is cheaper than exp on CPU.
            a2 = a * LOG2E
            bound2 = a2.norm(dim=1, keepdim=True) * b.norm(dim=1).max()
            a2_shifted = torch.cat([a2, -bound2], dim=1)
            # Used transposed: with the odd inner size (d + 1) MKL is faster on this layout than on a (d + 1, m) copy.
            b_shifted = torch.cat([b, b.new_ones(b.shape[0], 1)], dim=1)
            # One buffer for all blocks: a fresh multi-MB tensor per block is fresh OS pages, faulted in and zeroed.
            buf = a.new_empty(min(block, n), b.shape[0])
            for r in range(0, n, block):
                a_r = a[r : r + block]
                e = torch.mm(a2_shifted[r : r + block], b_shifted.T, out=buf[: a_r.shape[0]]).exp2_()
                top2 = bound2[r : r + block]
                sums = e.sum(dim=1, keepdim=True)
                low = sums < 1e-20
                if bool(low.any()):
                    torch.mm(a2[r : r + block], b.T, out=e)
                    top2 = torch.where(low, e.amax(dim=1, keepdim=True), top2)
                    e.sub_(top2).exp2_()
                    sums = e.sum(dim=1, keepdim=True)
                total += (sums.log() + top2 / LOG2E).sum()
                # d(mean lse) / d(logits) = softmax rows / n, scaled on the small (block x d) factors, not the softmax.
                scale = (sums * n).reciprocal_()
                if grad_a is not None:
                    torch.mm(e, b, out=grad_a[r : r + block]).mul_(scale)
                if grad_b is not None:
                    grad_b.addmm_(e.T, a_r * scale)
            ctx.save_for_backward(grad_a, grad_b)
            return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        grad_a, grad_b = ctx.saved_tensors
        return (None if grad_a is None else grad_a * grad, None if grad_b is None else grad_b * grad, None)


def mean_row_logsumexp(a: torch.Tensor, b: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``torch.logsumexp(a @ b.T, dim=1).mean()`` in O(block * m) memory: SoloSim over all N items needs N x N logits,
    which materialised stream through memory several times per step (200 MB each on Baby)."""
    return _MeanRowLogSumExp.apply(a, b, block)


def solosim_loss(text_h: torch.Tensor, image_h: torch.Tensor, tau: float) -> torch.Tensor:
    """SoloSim (Eq. 10), text -> image only as the reference: ``-mean(diag(log_softmax(T I^T / tau, dim=1)))``, computed
    as ``mean_i(logsumexp_j S_ij - S_ii)`` without holding the n x n logits (:func:`mean_row_logsumexp`)."""
    scaled = text_h / tau
    return mean_row_logsumexp(scaled, image_h) - (scaled * image_h).sum(dim=1).mean()


def infonce_loss(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE (docs/model.md, Table 4): both SoloSim directions averaged, as the alternative the paper
    compares against treats both modalities alike."""
    return 0.5 * (solosim_loss(a, b, tau) + solosim_loss(b, a, tau))


def l2_distance_loss(
    e1: torch.Tensor, e2: torch.Tensor, form: str = "neg-log", *, eps: float = 1e-4, margin: float = 1.0
) -> torch.Tensor:
    """Distancing by l2 (Eq. 14) between generic ``e1`` and unique ``e2``, ``mse = mean((e1 - e2)^2)``: ``"neg-mse"``,
    the paper's ``-mse``, is unbounded below (the reference survives only because its weight is tiny); ``"neg-log"``,
    ``-log(eps + mse)``, pushes like ``1 / mse``, so it stays finite and never dominates BPR; ``"margin"``,
    ``relu(margin - mse)``, stops once the parts are ``margin`` apart."""
    mse = (e1 - e2).pow(2).mean()
    if form == "neg-mse":
        return -mse
    if form == "neg-log":
        return -torch.log(eps + mse)
    if form == "margin":
        return F.relu(margin - mse)
    raise ValueError(f"l2_form must be one of {L2_FORMS}, got {form!r}")


class ClubEstimator(nn.Module):
    """Variational net ``q(y | x) = N(mu(x), exp(logvar(x)))`` for the CLUB bound (Eq. 11-13), as the reference's
    ``CLUBSample`` (log-variance through ``tanh``); the constant ``-0.5 log 2 pi`` cancels in the bound and the fit."""

    def __init__(self, x_dim: int = 32, y_dim: int = 32, hidden: int = 8) -> None:
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim))
        self.logvar = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim), nn.Tanh())

    def _log_q(self, mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-row ``log q(y | x)`` up to the constant, in few elementwise passes (fitted 50 times per batch)."""
        return -0.5 * ((mu - y).square() * torch.exp(-logvar) + logvar).sum(dim=1)

    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean ``log q(y_i | x_i)`` over pairs: what the estimator's own optimiser maximises."""
        return self._log_q(self.mu(x), self.logvar(x), y).mean()

    def forward(self, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """The bound (so ``torch.func.functional_call`` can evaluate it with detached weights)."""
        return self.mi_upper_bound(x, y, perm)

    def mi_upper_bound(self, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """CLUB-sample bound ``max(0, mean_i[log q(y_i|x_i) - log q(y_perm(i)|x_i)] / 2)``. The halving and the clamp
        follow the reference (a poorly fitted estimator can give a negative estimate, which would reward *increasing*
        dependence). The caller draws the row permutation ``perm``, so runs are seeded."""
        mu, logvar = self.mu(x), self.logvar(x)
        positive = self._log_q(mu, logvar, y)
        negative = self._log_q(mu, logvar, y[perm])
        return torch.clamp((positive - negative).mean() / 2.0, min=0.0)
