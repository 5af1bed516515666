"""The fast CLUB fit equals autograd + torch.optim.Adam, shares its state and restores threads."""

from __future__ import annotations

import pytest
import torch

from sand.models.club_fit import fit_club, fit_clubs, single_intra_op_thread
from sand.models.losses import ClubEstimator


def reference_fit(est: ClubEstimator, opt: torch.optim.Adam, pairs, steps: int) -> list[float]:
    """The literal fit: autograd on the summed negative log-likelihoods, torch's Adam."""
    values: list[float] = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        lls = [est.log_likelihood(x, y) for x, y in pairs]
        (-sum(lls)).backward()
        if step == steps - 1:
            values = [float(v.detach()) for v in lls]
        opt.step()
    return values


def twins(fused: bool, seed: int = 3) -> tuple[ClubEstimator, torch.optim.Adam, ClubEstimator, torch.optim.Adam]:
    torch.manual_seed(seed)
    a = ClubEstimator(32, 32, 8)
    b = ClubEstimator(32, 32, 8)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2, fused=fused)
    return a, opt_a, b, torch.optim.Adam(b.parameters(), lr=1e-2, fused=fused)


def correlated_pairs(n: int, count: int = 1, seed: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(n, 32, generator=g) * 2
        y = x @ torch.randn(32, 32, generator=g) * 0.2 + 0.5 * torch.randn(n, 32, generator=g)
        out.append((x, y))
    return out


def assert_same_estimators(a: ClubEstimator, opt_a: torch.optim.Adam, b: ClubEstimator, opt_b: torch.optim.Adam):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-4, atol=2e-6), name
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert float(sa["step"]) == float(sb["step"]), name
        assert sa["step"].dtype == sb["step"].dtype and sa["step"].device == sb["step"].device, name
        assert torch.allclose(sa["exp_avg"], sb["exp_avg"], rtol=1e-3, atol=1e-7), name
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-3, atol=1e-10), name


@pytest.mark.parametrize("fused", [True, False])
def test_fast_fit_equals_autograd_and_torch_adam(fused: bool) -> None:
    fast, opt_fast, ref, opt_ref = twins(fused)
    pairs = correlated_pairs(300)
    values = fit_club(fast, opt_fast, pairs, 40)
    expected = reference_fit(ref, opt_ref, pairs, 40)
    assert values == pytest.approx(expected, rel=1e-5)
    assert_same_estimators(fast, opt_fast, ref, opt_ref)
    # The fit really moved the estimator (a no-op would pass the comparison only if both did nothing).
    torch.manual_seed(3)
    assert not torch.allclose(ClubEstimator(32, 32, 8).mu[0].weight, fast.mu[0].weight)


def test_fit_continues_from_the_optimiser_state_and_mixes_with_the_reference() -> None:
    fast, opt_fast, ref, opt_ref = twins(True)
    pairs = correlated_pairs(200)
    fit_club(fast, opt_fast, pairs, 15)
    reference_fit(fast, opt_fast, pairs, 10)  # the autograd path resumes from the fast path's state
    fit_club(fast, opt_fast, pairs, 15)
    reference_fit(ref, opt_ref, pairs, 40)
    assert_same_estimators(fast, opt_fast, ref, opt_ref)


def test_shared_estimator_sums_the_modalities_likelihoods() -> None:
    fast, opt_fast, ref, opt_ref = twins(True, seed=7)
    pairs = correlated_pairs(150, count=2)
    values = fit_club(fast, opt_fast, pairs, 25)
    expected = reference_fit(ref, opt_ref, pairs, 25)
    assert values == pytest.approx(expected, rel=1e-5) and len(values) == 2
    assert_same_estimators(fast, opt_fast, ref, opt_ref)


def test_fit_rejects_what_it_does_not_compute() -> None:
    est = ClubEstimator()
    pairs = correlated_pairs(20)
    with pytest.raises(ValueError, match="weight_decay"):
        fit_club(est, torch.optim.Adam(est.parameters(), weight_decay=1e-3), pairs, 2)
    with pytest.raises(ValueError, match="same number of rows"):
        fit_club(est, torch.optim.Adam(est.parameters()), [*pairs, (torch.zeros(5, 32), torch.zeros(5, 32))], 2)
    assert fit_club(est, torch.optim.Adam(est.parameters()), pairs, 0) == []


def test_single_thread_block_restores_the_thread_count() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_intra_op_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), single_intra_op_thread(torch.device("cpu")):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_side_by_side_fits_equal_one_after_another() -> None:
    pairs = correlated_pairs(120, count=2, seed=9)
    torch.manual_seed(11)
    ests = [ClubEstimator() for _ in range(4)]
    for src, dst in ((0, 2), (1, 3)):
        ests[dst].load_state_dict(ests[src].state_dict())
    opts = [torch.optim.Adam(e.parameters(), lr=1e-2, fused=True) for e in ests]
    before = torch.get_num_threads()
    together = fit_clubs([(ests[i], opts[i], [pairs[i]]) for i in (0, 1)], 20)
    assert torch.get_num_threads() == before
    alone = [fit_club(ests[i], opts[i], [pairs[i - 2]], 20) for i in (2, 3)]
    for i, (a, b) in enumerate(zip(together, alone, strict=True)):
        assert a == pytest.approx(b, rel=1e-6)
        for p, q in zip(ests[i].parameters(), ests[i + 2].parameters(), strict=True):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
