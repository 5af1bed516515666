"""Loss terms of SAND on tiny, hand-checkable tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sand.models.club_fit import fit_club
from sand.models.losses import (
    ClubEstimator,
    bpr_loss,
    infonce_loss,
    l2_distance_loss,
    mean_row_logsumexp,
    solosim_loss,
)


def test_bpr_two_element_example() -> None:
    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(2.0)) / 2
    assert bpr_loss(pos, neg).item() == pytest.approx(expected, rel=1e-6)
    # The reference's log2 value is the ln value times 1/ln 2.
    log2_value = -torch.log2(torch.sigmoid(pos - neg)).mean().item()
    assert log2_value == pytest.approx(expected / math.log(2.0), rel=1e-6)


def test_bpr_stays_finite_for_huge_margins() -> None:
    loss = bpr_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert loss.item() == pytest.approx(400.0)


def test_solosim_of_identical_well_separated_views() -> None:
    # Orthonormal rows: logits are 1/tau on the diagonal, 0 elsewhere.
    views = torch.eye(4)
    tau = 0.2
    expected = math.log(math.exp(1 / tau) + 3) - 1 / tau  # = log(1 + 3 e^-5)
    assert solosim_loss(views, views, tau).item() == pytest.approx(expected, rel=1e-5)
    assert expected < 0.021


def test_solosim_matches_literal_formula_and_gradients() -> None:
    torch.manual_seed(0)
    t = F.normalize(torch.randn(300, 16, dtype=torch.float64), dim=1).requires_grad_()
    i = F.normalize(torch.randn(300, 16, dtype=torch.float64), dim=1).requires_grad_()
    literal = -torch.diagonal(F.log_softmax(t @ i.T / 0.2, dim=1)).mean()
    ours = solosim_loss(t, i, 0.2)
    assert ours.item() == pytest.approx(literal.item(), abs=1e-12)
    g_lit = torch.autograd.grad(literal, (t, i))
    g_ours = torch.autograd.grad(ours, (t, i))
    for a, b in zip(g_lit, g_ours, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_solosim_is_one_directional() -> None:
    torch.manual_seed(1)
    a, b = F.normalize(torch.randn(6, 4), dim=1), F.normalize(torch.randn(6, 4), dim=1)
    assert abs(solosim_loss(a, b, 0.2).item() - solosim_loss(b, a, 0.2).item()) > 1e-4


def test_infonce_is_symmetric_average_of_both_directions() -> None:
    torch.manual_seed(2)
    a, b = F.normalize(torch.randn(7, 5), dim=1), F.normalize(torch.randn(7, 5), dim=1)
    target = torch.arange(7)
    logits = a @ b.T / 0.3
    expected = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    assert infonce_loss(a, b, 0.3).item() == pytest.approx(expected.item(), rel=1e-5)
    assert infonce_loss(a, b, 0.3).item() == pytest.approx(infonce_loss(b, a, 0.3).item(), rel=1e-6)


def test_mean_row_logsumexp_blocks_and_gradcheck() -> None:
    torch.manual_seed(3)
    a = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    for block in (1, 4, 100):
        expected = torch.logsumexp(a @ b.T, dim=1).mean()
        assert torch.allclose(mean_row_logsumexp(a, b, block), expected)
    assert torch.autograd.gradcheck(lambda x, y: mean_row_logsumexp(x, y, 4), (a, b))
    assert torch.autograd.gradcheck(lambda x: mean_row_logsumexp(x, b.detach(), 4), (a,))
    big = torch.full((2, 1), 100.0, dtype=torch.float64)  # exp(10,000) overflows without the shift
    assert torch.isfinite(mean_row_logsumexp(big, big))
    # Logits far below the Cauchy-Schwarz shift (orthogonal long vectors): the exact-max fallback.
    x = torch.tensor([[100.0, 0.0], [0.0, 1.0]], requires_grad=True)
    y = torch.tensor([[0.0, 100.0], [1.0, 0.0]])
    got = mean_row_logsumexp(x, y, 1)
    expected = torch.logsumexp(x @ y.T, dim=1).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    (g_got,) = torch.autograd.grad(got, x)
    (g_exp,) = torch.autograd.grad(torch.logsumexp(x @ y.T, dim=1).mean(), x)
    assert torch.allclose(g_got, g_exp, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(mean_row_logsumexp(a, b, 4), torch.logsumexp(a @ b.T, dim=1).mean())


@pytest.mark.parametrize("form", ["neg-mse", "neg-log", "margin"])
def test_l2_forms(form: str) -> None:
    a = torch.zeros(4, 3)
    b = torch.full((4, 3), 2.0)  # mse = 4
    value = l2_distance_loss(a, b, form, eps=1e-4, margin=1.0).item()
    expected = {"neg-mse": -4.0, "neg-log": -math.log(1e-4 + 4.0), "margin": 0.0}[form]
    assert value == pytest.approx(expected, rel=1e-6)
    same = l2_distance_loss(a, a, form, eps=1e-4, margin=1.0).item()
    # Bounds as documented: neg-log <= -log(eps), margin in [0, margin]; both are hit at zero distance.
    assert same == pytest.approx({"neg-mse": 0.0, "neg-log": -math.log(1e-4), "margin": 1.0}[form])
    far = l2_distance_loss(a, torch.full((4, 3), 1e3), form, eps=1e-4, margin=1.0).item()
    assert far <= same


def test_l2_neg_log_gradient_decays_with_distance() -> None:
    def grad_norm(scale: float) -> float:
        e2 = torch.full((4, 3), scale, requires_grad=True)
        l2_distance_loss(torch.zeros(4, 3), e2, "neg-log").backward()
        assert e2.grad is not None
        return e2.grad.norm().item()

    assert grad_norm(10.0) < grad_norm(1.0) / 5


def test_l2_rejects_unknown_form() -> None:
    with pytest.raises(ValueError, match="l2_form"):
        l2_distance_loss(torch.zeros(1, 1), torch.zeros(1, 1), "cosine")


def test_club_bound_is_non_negative_and_zero_for_identity_perm() -> None:
    torch.manual_seed(4)
    est = ClubEstimator()
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    for _ in range(5):
        assert est.mi_upper_bound(x, y, torch.randperm(64)).item() >= 0.0
    assert est.mi_upper_bound(x, y, torch.arange(64)).item() == 0.0


def test_club_fit_increases_likelihood_and_bound_on_correlated_pairs() -> None:
    torch.manual_seed(6)
    x = torch.randn(512, 32)
    y = x @ torch.randn(32, 32) * 0.3 + 0.1 * torch.randn(512, 32)
    est = ClubEstimator()
    opt = torch.optim.Adam(est.parameters(), lr=1e-2)
    before = est.log_likelihood(x, y).item()
    fit_club(est, opt, [(x, y)], 200)
    after = est.log_likelihood(x, y).item()
    assert after > before + 1.0
    perm = torch.randperm(512)
    correlated = est.mi_upper_bound(x, y, perm).item()
    independent = est.mi_upper_bound(x, torch.randn(512, 32), perm).item()
    assert correlated > independent + 1.0
