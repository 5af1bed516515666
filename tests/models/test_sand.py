"""SAND model and its split/align/distance component on tiny random data."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support import knn_graph

from sand.models.graph import SparseMatmul
from sand.models.losses import bpr_loss
from sand.models.registry import VARIANT_TERMS
from sand.models.sand import SAND
from sand.models.separation import LinearView, ModalSeparation, prefetch_reads, read_through

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from naive_sand import NaiveModalSeparation, NaiveSAND  # noqa: E402  (the naive reference: not shipped, see that module)

EXPECTED_TERMS = {
    "a": {"bpr", "align", "distance"},
    "b": {"bpr", "align", "distance"},
    "c": {"bpr", "align", "distance"},
    "d": {"bpr", "align", "distance"},
    "no-align": {"bpr", "distance"},
    "no-distance": {"bpr", "align"},
    "no-align-no-distance": {"bpr"},
}


def make_data(n_users: int, n_items: int, d_image: int, d_text: int, n_edges: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randperm(n_users * n_items, generator=g)[:n_edges]
    edges = torch.stack([keys // n_items, keys % n_items], dim=1)
    features = {"image": torch.rand(n_items, d_image, generator=g), "text": torch.randn(n_items, d_text, generator=g)}
    graphs = {m: knn_graph(f, 3) for m, f in features.items()}
    return {"n_users": n_users, "n_items": n_items, "edges": edges, "features": features, "graphs": graphs, "g": g}


@pytest.fixture(scope="module")
def tiny() -> dict:
    return make_data(30, 20, 8, 6, 120, seed=0)


def batch(data: dict, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx = torch.randperm(len(data["edges"]), generator=data["g"])[:size]
    users, pos = data["edges"][idx, 0], data["edges"][idx, 1]
    neg = torch.randint(0, data["n_items"], (size,), generator=data["g"])
    return users, pos, neg


def build(data: dict, cls: type[SAND] = SAND, **kw) -> SAND:
    return cls(data["n_users"], data["n_items"], data["edges"], data["features"], data["graphs"], **kw)


@pytest.mark.parametrize("variant", sorted(VARIANT_TERMS))
def test_every_variant_trains_with_exactly_its_terms(tiny: dict, variant: str) -> None:
    torch.manual_seed(0)
    model = build(tiny, variant=variant, club_steps=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(4):
        b = batch(tiny)
        aux = model.auxiliary_step(*b)
        assert set(aux) == ({"club_ll_image", "club_ll_text"} if VARIANT_TERMS[variant][1] == "club" else set())
        opt.zero_grad(set_to_none=True)
        terms = model.loss_terms(*b)
        assert set(terms) == EXPECTED_TERMS[variant]
        assert all(torch.isfinite(v) and v.dim() == 0 for v in terms.values())
        total = sum(terms.values())
        first = first if first is not None else [p.detach().clone() for p in model.transforms.parameters()]
        total.backward()
        opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(first, model.transforms.parameters(), strict=True))


def test_variant_components(tiny: dict) -> None:
    assert (build(tiny, variant="c").separation.align, build(tiny, variant="c").separation.distance) == (
        "infonce",
        "club",
    )
    sep = build(tiny, variant="b").separation
    assert (sep.align, sep.distance, sep.l2_form) == ("solosim", "l2", "neg-log")
    with pytest.raises(ValueError, match="unknown variant"):
        build(tiny, variant="e")


@pytest.mark.parametrize("missing", ["image", "text"])
def test_missing_modality_is_named(tiny: dict, missing: str) -> None:
    features = {m: f for m, f in tiny["features"].items() if m != missing}
    with pytest.raises(ValueError, match=f"'{missing}'"):
        SAND(tiny["n_users"], tiny["n_items"], tiny["edges"], features, tiny["graphs"])
    graphs = {m: g for m, g in tiny["graphs"].items() if m != missing}
    with pytest.raises(ValueError, match=f"'{missing}' item-item graph"):
        SAND(tiny["n_users"], tiny["n_items"], tiny["edges"], tiny["features"], graphs)


@pytest.mark.parametrize("variant", ["a", "b", "c", "d"])
def test_fast_equals_naive(variant: str) -> None:
    # 400 items and 256-d image features: large enough that the fast path really folds
    # the image weights (checked below), still tiny.
    data = make_data(40, 400, 256, 24, 1200, seed=1)
    torch.manual_seed(0)
    fast = build(data, variant=variant, club_steps=2)
    naive = build(data, variant=variant, club_steps=2, cls=NaiveSAND)
    naive.load_state_dict(fast.state_dict())
    # the naive model really takes the literal path: full-width Z_m, COO graph products
    assert isinstance(naive.modal_inputs()["image"], torch.Tensor) and naive.adj.layout == torch.sparse_coo
    assert naive.item_graph.layout == torch.sparse_coo and fast.item_graph.layout == torch.sparse_csr
    view = fast.modal_inputs()["image"]
    assert isinstance(view, LinearView) and view.folds(256) and view.columns(0, 128).folds(96)
    # ... and reads it once for the GCN input MLP, the head, E1 and E2 together (prefetch_reads).
    parts = [(0, 256, fast.gcns["image"].mlp), *fast.separation.full_row_consumers("image", 400)]
    assert len(parts) == (4 if variant in ("a", "b") else 3)  # InfoNCE: the head reads batch rows
    assert view.folds(sum(c.out_features for _, _, c in parts))
    b = batch(data, 64)
    aux_fast, aux_naive = (model.auxiliary_step(*b) for model in (fast, naive))
    assert aux_fast.keys() == aux_naive.keys()
    assert all(aux_fast[k] == pytest.approx(aux_naive[k], rel=1e-5) for k in aux_fast)
    for p, q in zip(fast.separation.club.parameters(), naive.separation.club.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-7)
    results = []
    for model in (fast, naive):
        torch.manual_seed(7)
        terms = model.loss_terms(*b)
        sum(terms.values()).backward()
        results.append((terms, model.transforms["image"].weight.grad.clone()))
    (tf, gf), (tn, gn) = results
    assert set(tf) == set(tn)
    for k in tf:
        assert abs(tf[k].item() - tn[k].item()) < 1e-4, k
    assert torch.allclose(gf, gn, rtol=1e-3, atol=1e-6)
    for model in (fast, naive):
        model.eval()
    with torch.no_grad():
        uf, if_ = fast.embeddings()
        un, in_ = naive.embeddings()
    assert torch.allclose(uf @ if_.T, un @ in_.T, atol=1e-4)


def test_embeddings_score_what_bpr_trains(tiny: dict) -> None:
    torch.manual_seed(0)
    model = build(tiny, variant="no-align-no-distance")
    users, pos, neg = batch(tiny)
    model.eval()
    with torch.no_grad():
        user, item = model.embeddings()
        bpr = model.loss_terms(users, pos, neg)["bpr"]
    assert user.shape == (30, 128) and item.shape == (20, 128)
    expected = bpr_loss((user[users] * item[pos]).sum(1), (user[users] * item[neg]).sum(1))
    assert bpr.item() == pytest.approx(expected.item(), rel=1e-6)


def test_auxiliary_state_round_trip(tiny: dict) -> None:
    torch.manual_seed(0)
    model = build(tiny, variant="a", club_steps=5, lr=1e-2)
    b = batch(tiny)
    model.auxiliary_step(*b)
    # Through bytes, as a checkpoint does (optimiser state_dicts hold live tensors).
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "aux": model.auxiliary_state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    state, aux_state = saved["model"], saved["aux"]
    assert set(aux_state["club_optimisers"]) == {"image", "text"}
    torch.manual_seed(1)
    other = build(tiny, variant="a", club_steps=5, lr=1e-2)
    other.load_state_dict(state)
    other.load_auxiliary_state_dict(aux_state)
    model.auxiliary_step(*b)
    other.auxiliary_step(*b)
    for (name, p), q in zip(model.separation.club.named_parameters(), other.separation.club.parameters(), strict=True):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="CLUB optimisers"):
        build(tiny, variant="b").load_auxiliary_state_dict(aux_state)


def test_club_fit_raises_likelihood_and_main_loss_leaves_estimator_alone(tiny: dict) -> None:
    torch.manual_seed(0)
    model = build(tiny, variant="a", club_steps=20, lr=1e-2)
    b = batch(tiny)
    lls = [model.auxiliary_step(*b) for _ in range(4)]
    for m in ("image", "text"):
        assert lls[-1][f"club_ll_{m}"] > lls[0][f"club_ll_{m}"]
    club_before = [p.detach().clone() for p in model.separation.club.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.zero_grad(set_to_none=True)
    sum(model.loss_terms(*b).values()).backward()
    assert all(p.grad is None for p in model.separation.club.parameters())
    assert model.separation.e1["image"].weight.grad is not None  # the bound does train the encoders
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(club_before, model.separation.club.parameters(), strict=True))


def test_read_through_folded_equals_dense() -> None:
    torch.manual_seed(0)
    x, w, bias = torch.randn(10, 6), torch.randn(5, 6), torch.randn(5)
    consumers = [torch.nn.Linear(5, 3), torch.nn.Linear(5, 2, bias=False)]
    dense = [c(F.linear(x, w, bias)) for c in consumers]
    for fold in (True, False, None):
        got = read_through(LinearView(x, w, bias, fold), consumers)
        for a, b in zip(dense, got, strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    view = LinearView(x, w, None, True).rows(torch.tensor([1, 3])).columns(2, 5)
    assert view.shape == (2, 3)
    assert torch.allclose(view.dense(), (x @ w.T)[[1, 3]][:, 2:5])


@pytest.mark.parametrize(("full_width", "with_bias"), [(True, True), (True, False), (False, True)])
def test_prefetch_reads_equal_separate_reads_in_value_and_gradient(full_width: bool, with_bias: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(9, 7)
    lin = torch.nn.Linear(7, 6, bias=with_bias)
    parts = [(0, 2, torch.nn.Linear(2, 3)), (2, 6, torch.nn.Linear(4, 2, bias=False)), (0, 2, torch.nn.Linear(2, 1))]
    if full_width:
        parts.insert(1, (0, 6, torch.nn.Linear(6, 4)))
    params = list(lin.parameters()) + [p for _, _, c in parts for p in c.parameters()]
    z = lin(x)
    dense = [c(z[:, s:e]) for s, e, c in parts]
    view = prefetch_reads(LinearView(x, lin.weight, lin.bias, fold=True), parts)
    assert isinstance(view, LinearView) and view.reads is not None and view.rows(torch.tensor([0])).reads is None
    got = [read_through(view.columns(s, e), [c])[0] for s, e, c in parts]
    probes = [torch.randn_like(d) for d in dense]
    grads = [
        torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, probes, strict=True)), params)
        for outs in (dense, got)
    ]
    for a, b in zip(dense, got, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert prefetch_reads(z, parts) is z  # plain tensors pass through


@pytest.mark.parametrize(
    ("align", "distance"), [("solosim", "club"), ("infonce", "l2"), ("none", "club"), ("solosim", "none")]
)
def test_separation_on_linear_view_equals_plain_tensor(align: str, distance: str) -> None:
    torch.manual_seed(0)
    x = {"image": torch.randn(12, 10), "text": torch.randn(12, 7)}
    lin = {"image": torch.nn.Linear(10, 8), "text": torch.nn.Linear(7, 6)}
    sep = ModalSeparation({"image": 8, "text": 6}, align=align, distance=distance, club_steps=2)
    items = torch.tensor([0, 3, 3, 5, 7, 11])
    out = []
    for as_view in (True, False):
        z = {m: LinearView(x[m], lin[m].weight, lin[m].bias, fold=True) if as_view else lin[m](x[m]) for m in x}
        torch.manual_seed(3)
        out.append(sep.loss_terms(z, items))
    assert (
        set(out[0])
        == set(out[1])
        == ({"align"} if align != "none" else set()) | ({"distance"} if distance != "none" else set())
    )
    for k in out[0]:
        assert out[0][k].item() == pytest.approx(out[1][k].item(), abs=1e-5)


def test_split_and_batch_scope() -> None:
    torch.manual_seed(0)
    sep = ModalSeparation({"image": 8, "text": 6}, distance="l2", solosim_scope="batch", distance_scope="batch")
    z = {"image": torch.randn(20, 8), "text": torch.randn(20, 6)}
    g, q = sep.split("text", z["text"])
    assert torch.equal(g, z["text"][:, :3]) and torch.equal(q, z["text"][:, 3:])
    items = torch.tensor([4, 2, 9, 2, 15])
    rows = torch.unique(items)
    batch_terms = sep.loss_terms(z, items)
    # "batch" over all 20 items equals "all" over the batch's unique rows only.
    sep_all = ModalSeparation({"image": 8, "text": 6}, distance="l2", solosim_scope="all", distance_scope="all")
    sep_all.load_state_dict(sep.state_dict())
    all_terms = sep_all.loss_terms({m: v[rows] for m, v in z.items()}, torch.arange(len(rows)))
    for k in batch_terms:
        assert batch_terms[k].item() == pytest.approx(all_terms[k].item(), rel=1e-5)


def test_auto_scope_threshold() -> None:
    sep = ModalSeparation({"image": 4, "text": 4})
    assert sep._resolve("auto", 20_000) == "all" and sep._resolve("auto", 20_001) == "batch"


def test_auto_distance_scope_keeps_all_items_at_clothing_size() -> None:
    """Clothing (23,033 items): SoloSim goes to the batch, the CLUB bound and fit stay on all items."""
    sep = ModalSeparation({"image": 8, "text": 6}, club_steps=1)
    n = 23_033
    assert [(s, e) for s, e, _ in sep.full_row_consumers("image", n)] == [(0, 4), (4, 8)]  # E1, E2 only
    z = {"image": torch.randn(n, 8), "text": torch.randn(n, 6)}
    seen = []
    sep.club["image"].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    sep.loss_terms(z, torch.tensor([1, 5, 7]))
    assert seen == [n]


def test_separation_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="align"):
        ModalSeparation({"image": 4, "text": 4}, align="cosine")
    with pytest.raises(ValueError, match="two modalities"):
        ModalSeparation({"image": 4})
    with pytest.raises(ValueError, match="cannot be split"):
        ModalSeparation({"image": 1, "text": 4}, align="none")
    with pytest.raises(ValueError, match="missing modal representation 'text'"):
        ModalSeparation({"image": 4, "text": 4}).loss_terms({"image": torch.randn(3, 4)}, torch.arange(3))


def test_share_club_uses_one_estimator() -> None:
    torch.manual_seed(0)
    sep = ModalSeparation({"image": 8, "text": 6}, share_club=True, club_steps=3, club_lr=1e-2)
    ref = NaiveModalSeparation({"image": 8, "text": 6}, share_club=True, club_steps=3, club_lr=1e-2)
    ref.load_state_dict(sep.state_dict())
    assert list(sep.club) == ["shared"]
    z = {"image": torch.randn(16, 8), "text": torch.randn(16, 6)}
    out = sep.auxiliary_step(z, torch.arange(16))
    assert set(out) == {"club_ll_image", "club_ll_text"} and all(math.isfinite(v) for v in out.values())
    # The fast fit of a shared estimator equals autograd on the summed likelihoods.
    expected = ref.auxiliary_step(z, torch.arange(16))
    assert all(out[k] == pytest.approx(expected[k], rel=1e-5) for k in out)
    for p, q in zip(sep.club.parameters(), ref.club.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-7)


def test_item_graph_mix_and_sparse_product_gradient(tiny: dict) -> None:
    model = build(tiny, mm_image_weight=0.3)
    expected = 0.3 * tiny["graphs"]["image"].to_dense() + 0.7 * tiny["graphs"]["text"].to_dense()
    assert torch.allclose(model.item_graph.to_dense(), expected)
    assert torch.allclose(model.item_graph_t.to_dense(), expected.T)
    assert not torch.allclose(expected, expected.T)  # kNN graphs are not symmetric: backward needs S^T
    x = torch.randn(20, 5, dtype=torch.float32, requires_grad=True)
    weights = torch.randn(20, 5)
    (SparseMatmul.apply(model.item_graph, model.item_graph_t, x) * weights).sum().backward()
    assert torch.allclose(x.grad, expected.T @ weights, atol=1e-6)


def test_club_fit_order_after_fits_the_pairs_of_the_previous_bound(tiny: dict) -> None:
    """The authors' order: a batch's bound uses the estimator fitted so far; its pairs are fitted next."""
    torch.manual_seed(0)
    before = build(tiny, variant="a", club_steps=5, lr=1e-2)
    after = build(tiny, variant="a", club_steps=5, lr=1e-2, club_fit_order="after")
    after.load_state_dict(before.state_dict())
    b = batch(tiny)
    start = [p.detach().clone() for p in after.separation.club.parameters()]
    assert after.auxiliary_step(*b) == {}  # nothing evaluated yet, nothing to fit
    assert all(torch.equal(a, p) for a, p in zip(start, after.separation.club.parameters(), strict=True))
    torch.manual_seed(3)
    unfitted_bound = after.loss_terms(*b)["distance"]
    before.auxiliary_step(*b)
    torch.manual_seed(3)
    fitted_bound = before.loss_terms(*b)["distance"]
    assert unfitted_bound.item() != pytest.approx(fitted_bound.item(), rel=1e-3)
    # Round trip through a checkpoint, then the pending pairs (all items: the same as `before` fitted) are fitted.
    buffer = io.BytesIO()
    torch.save(after.auxiliary_state_dict(), buffer)
    buffer.seek(0)
    after.separation._pending_pairs = {}
    after.load_auxiliary_state_dict(torch.load(buffer, weights_only=True))
    assert set(after.auxiliary_step(*batch(tiny))) == {"club_ll_image", "club_ll_text"}
    for p, q in zip(after.separation.club.parameters(), before.separation.club.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    with pytest.raises(ValueError, match="club_fit_order"):
        build(tiny, club_fit_order="during")
