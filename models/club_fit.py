"""Maximum-likelihood fit of a :class:`~models.losses.ClubEstimator`, fast on a CPU. Why: SAND_a fits each estimator
with ``club_steps`` Adam steps per batch, each a few dozen operations on N x 32 tensors, and through autograd and a
generic Adam this loop was most of what made SAND_a slower than SAND_b. Here gradients are closed-form in a transposed
layout MKL runs fast, on flat buffers, the estimators side by side (:func:`fit_clubs`); the arithmetic and the moments'
format are ``torch.optim.Adam``'s (tests compare both)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import nn
from torch.autograd.profiler import record_function

from sand.models.losses import LOG2E, ClubEstimator

#: Profiler label of the CLUB fit (benchmarks/bench_sand_speed.py reads it).
CLUB_FIT = "sand::club_fit"


@contextmanager
def single_intra_op_thread(device: torch.device) -> Iterator[None]:
    """Run torch CPU operations on one thread inside the block (restored even if it raises). Why: waking a sleeping
    OpenMP worker (``OMP_WAIT_POLICY=PASSIVE``) costs as much as one of the fit's tiny operations, which release the GIL
    anyway; each fit is single-threaded either way, so results do not depend on how many run at once."""
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _layout(est: ClubEstimator) -> list[nn.Parameter]:
    """Flat-buffer order: ``[mu1.weight; logvar1.weight]`` adjacent, so both heads' first layers are one product."""
    mu1, mu2, lv1, lv2 = est.mu[0], est.mu[2], est.logvar[0], est.logvar[2]
    return [mu1.weight, lv1.weight, mu1.bias, lv1.bias, mu2.weight, mu2.bias, lv2.weight, lv2.bias]


def _adam_settings(optimiser: torch.optim.Adam) -> tuple[float, float, float, float]:
    if len(optimiser.param_groups) != 1:
        raise ValueError("fit_club: the CLUB optimiser must have one parameter group")
    group = optimiser.param_groups[0]
    unsupported = {k: group.get(k) for k in ("weight_decay", "amsgrad", "maximize") if group.get(k)}
    if unsupported:
        raise ValueError(f"fit_club: plain Adam only; the CLUB optimiser has {unsupported}")
    beta1, beta2 = group["betas"]
    return float(group["lr"]), float(beta1), float(beta2), float(group["eps"])


class _FlatState:
    """Parameters, gradient and Adam moments of one estimator as flat buffers."""

    def __init__(self, est: ClubEstimator, optimiser: torch.optim.Adam) -> None:
        self.params = _layout(est)
        self.numels = [p.numel() for p in self.params]
        self.optimiser = optimiser
        with torch.no_grad():
            self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        self.grad = torch.empty_like(self.flat)
        states = [optimiser.state.get(p, {}) for p in self.params]
        if all(states):
            self.exp_avg = torch.cat([s["exp_avg"].reshape(-1) for s in states])
            self.exp_avg_sq = torch.cat([s["exp_avg_sq"].reshape(-1) for s in states])
            self.step = int(states[0]["step"])
        elif not any(states):
            self.exp_avg, self.exp_avg_sq, self.step = torch.zeros_like(self.flat), torch.zeros_like(self.flat), 0
        else:
            raise ValueError("fit_club: the CLUB optimiser holds state for only some parameters")

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        return [piece.view_as(p) for piece, p in zip(buffer.split(self.numels), self.params, strict=True)]

    def write_back(self) -> None:
        group = self.optimiser.param_groups[0]
        with torch.no_grad():
            for p, value, m, v in zip(
                self.params, self.views(self.flat), self.views(self.exp_avg), self.views(self.exp_avg_sq), strict=True
            ):
                p.copy_(value)
                state = self.optimiser.state[p]
                if "step" in state:
                    state["step"].fill_(float(self.step))
                    state["exp_avg"].copy_(m)
                    state["exp_avg_sq"].copy_(v)
                else:  # what torch.optim.Adam itself creates on its first step
                    on_device = group.get("fused") or group.get("capturable")
                    step_device = p.device if on_device else torch.device("cpu")
                    state["step"] = torch.tensor(float(self.step), dtype=torch.float32, device=step_device)
                    state["exp_avg"] = m.clone(memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = v.clone(memory_format=torch.preserve_format)


def fit_club(
    est: ClubEstimator, optimiser: torch.optim.Adam, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], steps: int,
) -> list[float]:
    """``steps`` Adam steps on ``-sum_k mean_i log q(y_ki | x_ki)`` over the (x, y) ``pairs`` (a shared estimator's
    gradients add up as through autograd); ``optimiser``: a plain ``torch.optim.Adam`` over ``est``, its state read and
    written back. Returns each pair's mean log-likelihood at the last step, before its update (as the reference
    path)."""
    if steps <= 0:
        return []
    n = int(pairs[0][0].shape[0])
    if any(int(x.shape[0]) != n or int(y.shape[0]) != n for x, y in pairs):
        raise ValueError("fit_club: all (x, y) pairs must have the same number of rows")
    lr, beta1, beta2, eps = _adam_settings(optimiser)
    state = _FlatState(est, optimiser)
    hidden = est.mu[0].out_features
    w1_mu, w1_lv, b1_mu, b1_lv, w2_mu, b2_mu, w2_lv, b2_lv = state.views(state.flat)
    g1_mu, g1_lv, gb1_mu, gb1_lv, g2_mu, gb2_mu, g2_lv, gb2_lv = state.views(state.grad)
    # Fused first layer (adjacent in the flat buffer): (2h x in) weights, (2h) bias.
    n_w1 = 2 * w1_mu.numel()
    w1, g1 = state.flat[:n_w1].view(2 * hidden, -1), state.grad[:n_w1].view(2 * hidden, -1)
    b1, gb1 = state.flat[n_w1 : n_w1 + 2 * hidden], state.grad[n_w1 : n_w1 + 2 * hidden]
    # The loop leaves 1/n off the mean head's gradient and -2/n off the log-variance head's; one scale restores both.
    mu_params = {id(p) for p in est.mu.parameters()}
    scale = torch.cat([torch.full((p.numel(),), 1.0 / n if id(p) in mu_params else -2.0 / n) for p in state.params])
    scale = scale.to(state.flat)
    values: list[float] = []
    with torch.no_grad():
        x_t = torch.cat([x.detach().T for x, _ in pairs], dim=1).contiguous()
        y_t = torch.cat([y.detach().T for _, y in pairs], dim=1).contiguous()
        h_t = x_t.new_empty(2 * hidden, x_t.shape[1])
        g_h = torch.empty_like(h_t)
        for step in range(steps):
            torch.addmm(b1[:, None], w1, x_t, out=h_t).clamp_(min=0.0)
            diff = torch.addmm(b2_mu[:, None], w2_mu, h_t[:hidden]).sub_(y_t)  # mu - y
            # s = sigmoid(2p): logvar = tanh(p) = 2s - 1, e^-logvar = 2^(log2(e) (1 - 2s)), d logvar / dp = 4 s (1 - s)
            s = torch.addmm(b2_lv[:, None], w2_lv, h_t[hidden:], beta=2.0, alpha=2.0).sigmoid_()
            g_mu = torch.mul(s, -2.0 * LOG2E).add_(LOG2E).exp2_().mul_(diff)  # (mu - y) / var
            s_one_minus_s = torch.addcmul(s, s, s, value=-1.0)
            d2e = diff.mul_(g_mu)  # (mu - y)^2 / var
            if step == steps - 1:
                for k in range(len(pairs)):
                    cols = slice(k * n, (k + 1) * n)
                    log_var_sum = 2.0 * float(s[:, cols].sum()) - s[:, cols].numel()
                    values.append(-0.5 * (float(d2e[:, cols].sum()) + log_var_sum) / n)
            g_p = d2e.sub_(1.0).mul_(s_one_minus_s)  # dNLL/dp = -2/n of this
            torch.mm(h_t[:hidden], g_mu.T, out=g2_mu.T)
            torch.mm(h_t[hidden:], g_p.T, out=g2_lv.T)
            torch.sum(g_mu, dim=1, out=gb2_mu)
            torch.sum(g_p, dim=1, out=gb2_lv)
            torch.mm(w2_mu.T, g_mu, out=g_h[:hidden])
            torch.mm(w2_lv.T, g_p, out=g_h[hidden:])
            g_h.mul_(torch.sign(h_t))  # ReLU: h >= 0, so sign(h) is its derivative's mask
            torch.mm(g_h, x_t.T, out=g1)
            torch.sum(g_h, dim=1, out=gb1)
            state.grad.mul_(scale)
            _adam_update(state, lr, beta1, beta2, eps)
    state.write_back()
    return values


def fit_clubs(
    jobs: Sequence[tuple[ClubEstimator, torch.optim.Adam, Sequence[tuple[torch.Tensor, torch.Tensor]]]], steps: int,
) -> list[list[float]]:
    """:func:`fit_club` per ``(estimator, optimiser, pairs)`` job, in job order: side by side in a thread pool on a
    CPU (one intra-op thread each), one after another elsewhere."""
    if not jobs:
        return []
    device = next(jobs[0][0].parameters()).device
    with record_function(CLUB_FIT), single_intra_op_thread(device):
        if device.type != "cpu" or len(jobs) == 1:
            return [fit_club(*job, steps) for job in jobs]
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="club-fit") as pool:
            return list(pool.map(lambda job: fit_club(*job, steps), jobs))


def _adam_update(state: _FlatState, lr: float, beta1: float, beta2: float, eps: float) -> None:
    """One ``torch.optim.Adam`` step (no weight decay, no amsgrad) on the flat buffers."""
    state.step += 1
    bias1 = 1.0 - beta1**state.step
    bias2 = 1.0 - beta2**state.step
    state.exp_avg.lerp_(state.grad, 1.0 - beta1)
    state.exp_avg_sq.mul_(beta2).addcmul_(state.grad, state.grad, value=1.0 - beta2)
    denom = state.exp_avg_sq.sqrt().div_(math.sqrt(bias2)).add_(eps)
    state.flat.addcdiv_(state.exp_avg, denom, value=-lr / bias1)
