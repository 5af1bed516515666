"""An independent, deliberately naive SAND: the losses written straight from docs/model.md.

Why it exists: the production model (``models/sand.py``, ``models/separation.py``,
``models/club_fit.py``) computes SAND through folded weight products, a streamed
log-sum-exp, a closed-form CLUB fit and sparse CSR products, and its own ``fast=False``
mode still shares pieces with that path. This module shares none of it: plain dense
tensors, autograd, a hand-written Adam, no import from ``sand``. Tests compare the
production model against it (in float64) value by value and gradient by gradient.

Parameters are passed as a dict keyed like ``SAND.named_parameters()``, so a test can
hand in leaf copies of a production model's parameters and differentiate through them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

MODALITIES = ("image", "text")
BN_EPS = 1e-5


def linear(p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]


def normalised_adjacency(n_users: int, n_items: int, edges: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dense D^-1/2 A D^-1/2 of the bipartite user-item graph (no self loops, duplicates merged)."""
    r = torch.zeros(n_users, n_items, dtype=dtype)
    r[edges[:, 0], edges[:, 1]] = 1.0
    a = torch.zeros(n_users + n_items, n_users + n_items, dtype=dtype)
    a[:n_users, n_users:] = r
    a[n_users:, :n_users] = r.T
    deg = a.sum(1)
    inv = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
    return inv[:, None] * a * inv[None, :]


def split(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic part = first half of the columns, unique part = the rest."""
    g = z.shape[1] // 2
    return z[:, :g], z[:, g:]


def batch_norm(p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """Training-mode batch normalisation: batch mean, biased batch variance."""
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)
    return (x - mean) / torch.sqrt(var + BN_EPS) * p[f"{name}.weight"] + p[f"{name}.bias"]


def head(p: Mapping[str, torch.Tensor], m: str, g: torch.Tensor) -> torch.Tensor:
    """Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear, then L2-normalised rows."""
    base = f"separation.heads.{m}"
    h = torch.relu(batch_norm(p, f"{base}.1", linear(p, f"{base}.0", g)))
    h = torch.relu(batch_norm(p, f"{base}.4", linear(p, f"{base}.3", h)))
    h = linear(p, f"{base}.6", h)
    return h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)


def log_q(est: Mapping[str, torch.Tensor], m: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row Gaussian log-density of y given x under the estimator (constant -log(2 pi)/2 dropped)."""
    base = f"separation.club.{m}"
    mu = linear(est, f"{base}.mu.2", torch.relu(linear(est, f"{base}.mu.0", x)))
    logvar = torch.tanh(linear(est, f"{base}.logvar.2", torch.relu(linear(est, f"{base}.logvar.0", x))))
    return (-0.5 * (mu - y) ** 2 / torch.exp(logvar) - 0.5 * logvar).sum(1)


def distance_pairs(p: Mapping[str, torch.Tensor], z: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    """(E1_m, E2_m) per modality: the generic and unique parts projected to 32-d."""
    out = {}
    for m in MODALITIES:
        g, q = split(z[m])
        out[m] = (linear(p, f"separation.e1.{m}", g), linear(p, f"separation.e2.{m}", q))
    return out


def modal_inputs(p: Mapping[str, torch.Tensor], features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Z_m = L_m(X_m), at full width."""
    return {m: linear(p, f"transforms.{m}", features[m]) for m in MODALITIES}


def sand_terms(
    p: Mapping[str, torch.Tensor],
    *,
    features: Mapping[str, torch.Tensor],
    edges: torch.Tensor,
    item_graphs: Mapping[str, torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    perms: Mapping[str, torch.Tensor],
    alpha: float,
    beta: float,
    tau: float,
    mm_image_weight: float = 0.1,
    n_layers: int = 2,
) -> dict[str, torch.Tensor]:
    """SAND_a's weighted loss terms {bpr, align, distance} over all items (scope "all").

    ``perms[m]``: the permutation pairing E1_m rows with other items' E2_m rows in the
    CLUB bound. Estimator parameters enter detached: the bound trains the encoders only.
    """
    n_users = p["modal_weight"].shape[0]
    n_items = features["image"].shape[0]
    dtype = features["image"].dtype
    adj = normalised_adjacency(n_users, n_items, edges, dtype)
    z = modal_inputs(p, features)
    users, items = [], []
    for k, m in enumerate(MODALITIES):
        gcn = f"gcns.{m}"
        item_in = linear(p, f"{gcn}.mlp1", F.leaky_relu(linear(p, f"{gcn}.mlp", z[m])))
        x = torch.cat([p[f"{gcn}.preference"], item_in])
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out, h = x, x
        for _ in range(n_layers):
            h = adj @ h
            out = out + h
        users.append(p["modal_weight"][:, k : k + 1] * out[:n_users])
        items.append(out[n_users:])
    user, item = torch.cat(users, 1), torch.cat(items, 1)
    s = mm_image_weight * item_graphs["image"] + (1 - mm_image_weight) * item_graphs["text"]
    item = item + s @ item
    u, pos, neg = batch
    bpr = -F.logsigmoid((user[u] * item[pos]).sum(1) - (user[u] * item[neg]).sum(1)).mean()

    h_text, h_image = (head(p, m, split(z[m])[0]) for m in ("text", "image"))
    solosim = -torch.diagonal(torch.log_softmax(h_text @ h_image.T / tau, dim=1)).mean()

    est = {k: v.detach() for k, v in p.items() if k.startswith("separation.club.")}
    bounds = []
    for m, (e1, e2) in distance_pairs(p, z).items():
        ratio = log_q(est, m, e1, e2) - log_q(est, m, e1, e2[perms[m]])
        bounds.append(torch.clamp(ratio.mean() / 2, min=0.0))
    return {"bpr": bpr, "align": alpha * solosim, "distance": beta * torch.stack(bounds).mean(), "bounds": bounds}


def fit_estimator(
    est: dict[str, torch.Tensor], m: str, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float
) -> list[float]:
    """Maximum-likelihood fit of estimator ``m`` on (x, y) pairs with a hand-written Adam (in place).

    ``est`` holds the estimator's parameters (keys ``separation.club.{m}.*``), updated in
    place; Adam starts from zero moments (betas 0.9 / 0.999, eps 1e-8). Returns the mean
    log-likelihood at each step, before its update.
    """
    names = [k for k in est if k.startswith(f"separation.club.{m}.")]
    moments = {k: (torch.zeros_like(est[k]), torch.zeros_like(est[k])) for k in names}
    lls = []
    for step in range(1, steps + 1):
        leaves = {k: est[k].detach().requires_grad_() for k in names}
        ll = log_q(leaves, m, x.detach(), y.detach()).mean()
        grads = torch.autograd.grad(-ll, [leaves[k] for k in names])
        lls.append(float(ll.detach()))
        for k, g in zip(names, grads, strict=True):
            m1, m2 = moments[k]
            m1.mul_(0.9).add_(0.1 * g)
            m2.mul_(0.999).add_(0.001 * g * g)
            m_hat, v_hat = m1 / (1 - 0.9**step), m2 / (1 - 0.999**step)
            est[k] = est[k].detach() - lr * m_hat / (v_hat.sqrt() + 1e-8)
    return lls
