"""SAND's definition, pinned against an independent naive reference (tests/sand_reference.py).

Each test here fails under one of the deliberate breakages SAND is prone to: fitting CLUB
on cross-modal (text E1 -> image E2) pairs, dropping the 1/2 of the CLUB bound, reversing
SoloSim's text -> image direction. The main check runs in float64 with a fitted estimator
whose bound is clearly non-zero, and compares every parameter's gradient.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import sand_reference as ref
import torch
import torch.nn.functional as F

from sand.models.losses import ClubEstimator
from sand.models.sand import SAND
from sand.models.separation import ModalSeparation

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from naive_sand import NaiveSAND  # noqa: E402  (the naive reference: not shipped, see that module)

ALPHA, BETA, TAU = 0.3, 0.2, 0.2  # larger than the defaults so every term moves the gradients visibly
IMAGE_WEIGHT = 0.25  # with 4 neighbours every graph value is a power of two: exact in float32 too
CLUB_STEPS, CLUB_LR, FIT_CALLS = 40, 2e-2, 6


def knn_dense(x: torch.Tensor, k: int) -> torch.Tensor:
    xn = F.normalize(x, dim=1)
    top = (xn @ xn.T).topk(k, dim=1).indices
    out = torch.zeros(x.shape[0], x.shape[0], dtype=x.dtype)
    out.scatter_(1, top, 1.0 / k)
    return out


@pytest.fixture(scope="module")
def setting() -> dict:
    # 300 items and 256-d image features: the fast path folds the image weights.
    g = torch.Generator().manual_seed(11)
    n_users, n_items = 40, 300
    keys = torch.randperm(n_users * n_items, generator=g)[:900]
    edges = torch.stack([keys // n_items, keys % n_items], dim=1)
    features = {
        "image": torch.rand(n_items, 256, generator=g, dtype=torch.float64),
        "text": torch.randn(n_items, 24, generator=g, dtype=torch.float64),
    }
    graphs = {m: knn_dense(x, 4) for m, x in features.items()}
    idx = torch.randperm(len(edges), generator=g)[:128]
    batch = (edges[idx, 0], edges[idx, 1], torch.randint(0, n_items, (128,), generator=g))
    return {"n_users": n_users, "n_items": n_items, "edges": edges, "features": features, "graphs": graphs,
            "batch": batch}


def build(s: dict, fast: bool) -> SAND:
    torch.manual_seed(0)
    model = (SAND if fast else NaiveSAND)(
        s["n_users"], s["n_items"], s["edges"], {m: x.float() for m, x in s["features"].items()},
        {m: g.to_sparse() for m, g in s["graphs"].items()}, variant="a", alpha=ALPHA, beta=BETA, tau=TAU,
        club_steps=CLUB_STEPS, lr=CLUB_LR, mm_image_weight=IMAGE_WEIGHT,
    ).double()
    for m in ref.MODALITIES:  # the features themselves in float64, not float32 rounded up
        setattr(model, f"feat_{m}", s["features"][m])
    # The graphs are built in float32 (1/sqrt(degree) rounded); give the model the exact ones so
    # the comparison can be tight, after checking they are what it built.
    adj = ref.normalised_adjacency(s["n_users"], s["n_items"], s["edges"], torch.float64)
    assert torch.allclose(model.adj.to_dense(), adj, rtol=1e-6, atol=0)
    model.adj = adj.to_sparse_csr() if fast else adj.to_sparse()
    return model


def reference_terms(s: dict, params: dict, seed: int) -> dict:
    torch.manual_seed(seed)  # the production model draws the bound's permutations so: image, then text
    perms = {m: torch.randperm(s["n_items"]) for m in ref.MODALITIES}
    return ref.sand_terms(
        params, features=s["features"], edges=s["edges"], item_graphs=s["graphs"], batch=s["batch"],
        perms=perms, alpha=ALPHA, beta=BETA, tau=TAU, mm_image_weight=IMAGE_WEIGHT,
    )


@pytest.fixture(scope="module")
def fitted(setting: dict) -> dict:
    """The fast model after one CLUB fit, and what the reference fit gives from the same start."""
    model = build(setting, fast=True)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    aux = model.auxiliary_step(*setting["batch"])
    with torch.no_grad():
        z = ref.modal_inputs(start, setting["features"])
        pairs = ref.distance_pairs(start, z)
    est = {k: v for k, v in start.items() if k.startswith("separation.club.")}
    lls = {m: ref.fit_estimator(est, m, *pairs[m], CLUB_STEPS, CLUB_LR) for m in ref.MODALITIES}
    after_one = {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith("separation.club.")}
    for _ in range(FIT_CALLS - 1):  # fit on: a well-fitted estimator gives a clearly positive bound
        model.auxiliary_step(*setting["batch"])
    return {"model": model, "aux": aux, "after_one": after_one, "reference_estimator": est, "reference_lls": lls}


def test_club_fit_equals_the_reference_fit_on_same_modality_pairs(fitted: dict) -> None:
    """The estimator of modality m is fitted on (E1_m, E2_m); a cross-modal fit lands elsewhere."""
    for name, p in fitted["after_one"].items():
        assert torch.allclose(p, fitted["reference_estimator"][name], rtol=1e-9, atol=1e-12), name
    for m in ref.MODALITIES:
        assert fitted["aux"][f"club_ll_{m}"] == pytest.approx(fitted["reference_lls"][m][-1], rel=1e-9)
        assert fitted["reference_lls"][m][-1] > fitted["reference_lls"][m][0] + 1.0  # it really fitted


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "naive"])
def test_losses_and_every_gradient_equal_the_reference_with_a_nonzero_club_bound(
    setting: dict, fitted: dict, fast: bool
) -> None:
    model = build(setting, fast=fast)
    model.load_state_dict(fitted["model"].state_dict())
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    expected = reference_terms(setting, params, seed=5)
    bounds = [b.item() for b in expected["bounds"]]
    assert min(bounds) > 0.01, bounds  # the CLUB term is live, not clamped at 0
    torch.manual_seed(5)
    got = model.loss_terms(*setting["batch"])
    assert set(got) == {"bpr", "align", "distance"}
    for k in got:
        assert got[k].item() == pytest.approx(expected[k].item(), rel=1e-10, abs=1e-13), k
    sum(got.values()).backward()
    total = expected["bpr"] + expected["align"] + expected["distance"]
    names = list(params)
    grads = dict(zip(names, torch.autograd.grad(total, [params[n] for n in names], allow_unused=True), strict=True))
    checked = []
    for name, p in model.named_parameters():
        if name.startswith("separation.club."):  # the main loss never trains the estimator
            assert p.grad is None and grads[name] is None, name
            continue
        assert p.grad is not None and grads[name] is not None, name
        # atol: biases right before a BatchNorm have a gradient of exactly 0 up to rounding (~1e-17)
        assert torch.allclose(p.grad, grads[name], rtol=1e-8, atol=1e-13), name
        if grads[name].abs().max() > 1e-6:
            checked.append(name)
    # every consumer of Z_m in both modalities has a real gradient: transform, GCN input MLP, head, E1, E2
    for m in ref.MODALITIES:
        for name in (f"transforms.{m}.weight", f"gcns.{m}.mlp.weight", f"separation.heads.{m}.0.weight",
                     f"separation.e1.{m}.weight", f"separation.e2.{m}.weight"):
            assert name in checked, name
    assert "modal_weight" in checked


def test_club_bound_is_half_the_mean_log_ratio() -> None:
    torch.manual_seed(1)
    est = ClubEstimator(4, 4, 3).double()
    x = 5 * torch.randn(50, 4, dtype=torch.float64)
    with torch.no_grad():
        est.mu[2].weight.mul_(10.0)
        y = est.mu(x) + 0.01 * torch.randn(50, 4, dtype=torch.float64)  # strongly dependent on x
    perm = torch.roll(torch.arange(50), 1)
    params = {f"separation.club.m.{k}": v for k, v in est.state_dict().items()}
    ratio = ref.log_q(params, "m", x, y) - ref.log_q(params, "m", x, y[perm])
    expected = ratio.mean() / 2
    assert expected.item() > 0.5
    assert est.mi_upper_bound(x, y, perm).item() == pytest.approx(expected.item(), rel=1e-12)


def test_solosim_runs_from_text_to_image_in_the_component() -> None:
    """The alignment term is -mean diag log_softmax(H_text H_image^T / tau, dim=1), not image -> text."""
    torch.manual_seed(2)
    sep = ModalSeparation({"image": 10, "text": 8}, distance="none", alpha=1.0, tau=0.5).double()
    z = {"image": torch.randn(30, 10, dtype=torch.float64), "text": torch.randn(30, 8, dtype=torch.float64)}
    params = {f"separation.{k}": v for k, v in sep.state_dict().items()}
    h_text, h_image = (ref.head(params, m, ref.split(z[m])[0]) for m in ("text", "image"))
    text_to_image = -torch.diagonal(torch.log_softmax(h_text @ h_image.T / 0.5, dim=1)).mean()
    image_to_text = -torch.diagonal(torch.log_softmax(h_image @ h_text.T / 0.5, dim=1)).mean()
    assert abs(text_to_image.item() - image_to_text.item()) > 1e-3
    assert sep.loss_terms(z, torch.arange(30))["align"].item() == pytest.approx(text_to_image.item(), rel=1e-10)
