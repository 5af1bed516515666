"""Baselines (MF-BPR, LightGCN, VBPR, FREEDOM) on a tiny random dataset: they train,
compute what MMRec computes, and FREEDOM prunes/propagates over the right graphs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support import knn_graph

from sand.models.bpr import MFBPR, bpr_loss, emb_loss
from sand.models.freedom import FREEDOM
from sand.models.graph import bipartite_adjacency, symmetric_normalise
from sand.models.lightgcn import LightGCN, sparse_matmul, to_csr
from sand.models.vbpr import VBPR

N_USERS, N_ITEMS = 30, 20


@pytest.fixture(scope="module")
def data() -> dict:
    g = torch.Generator().manual_seed(0)
    edges = []
    for u in range(N_USERS):
        n = int(torch.randint(3, 7, (1,), generator=g))
        for i in torch.randperm(N_ITEMS, generator=g)[:n].tolist():
            edges.append((u, i))
    features = {"image": torch.randn(N_ITEMS, 8, generator=g), "text": torch.randn(N_ITEMS, 6, generator=g)}
    graphs = {m: knn_graph(f, 3) for m, f in features.items()}
    return {"edges": torch.tensor(edges), "features": features, "graphs": graphs}


def build(cls, data: dict, **hp):
    torch.manual_seed(1)
    return cls(N_USERS, N_ITEMS, data["edges"], data["features"], data["graphs"], **hp)


def batches(data: dict, n: int, size: int = 32):
    """Fixed (user, pos, neg) batches; negatives drawn outside the user's training items."""
    g = torch.Generator().manual_seed(2)
    seen = {(int(u), int(i)) for u, i in data["edges"]}
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(data["edges"]), (size,), generator=g)
        users, pos = data["edges"][idx, 0], data["edges"][idx, 1]
        neg = []
        for u in users.tolist():
            while True:
                j = int(torch.randint(0, N_ITEMS, (1,), generator=g))
                if (u, j) not in seen:
                    neg.append(j)
                    break
        out.append((users, pos, torch.tensor(neg)))
    return out


@pytest.mark.parametrize(
    "cls,hp",
    [
        (MFBPR, {"reg_weight": 1e-3}),
        (LightGCN, {"n_layers": 2, "reg_weight": 1e-3}),
        (VBPR, {"reg_weight": 1e-3}),
        (VBPR, {"reg_weight": 1e-3, "modal_fusion": "concat"}),
        (FREEDOM, {"reg_weight": 1e-3, "dropout": 0.5}),
    ],
)
def test_trains_with_finite_decreasing_loss_and_shapes(data, cls, hp):
    model = build(cls, data, **hp)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(3)
    steps = batches(data, 8)
    losses = []
    for epoch in range(8):
        model.train()
        model.on_epoch_start(epoch, gen)
        total = 0.0
        for users, pos, neg in steps:
            terms = model.loss_terms(users, pos, neg)
            assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values()), terms
            loss = sum(terms.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total / len(steps))
    assert losses[-1] < 0.8 * losses[0], losses
    model.eval()
    with torch.no_grad():
        u, i = model.embeddings()
    assert u.shape[0] == N_USERS and i.shape[0] == N_ITEMS and u.shape[1] == i.shape[1]
    assert torch.isfinite(u).all() and torch.isfinite(i).all()


def test_bpr_and_emb_loss_follow_mmrec():
    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])
    expected = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(1 / (1 + math.exp(3.0)))) / 2
    assert bpr_loss(pos, neg).item() == pytest.approx(expected, rel=1e-6)
    a, b = torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # EmbLoss: Frobenius norms, not squared, over the batch size (2).
    assert emb_loss(a, b).item() == pytest.approx((5.0 + 1.0) / 2)


def test_mf_loss_terms_match_hand_computation(data):
    model = build(MFBPR, data, reg_weight=0.5)
    users, pos, neg = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])
    items = model.item_embedding.weight
    u, p, n = model.user_embedding.weight[users], items[pos], items[neg]
    terms = model.loss_terms(users, pos, neg)
    bpr = -torch.log(torch.sigmoid((u * p).sum(1) - (u * n).sum(1))).mean()
    reg = (u.norm() + p.norm() + n.norm()) / 2
    assert terms["bpr"].item() == pytest.approx(bpr.item(), rel=1e-5)
    assert terms["reg"].item() == pytest.approx(0.5 * reg.item(), rel=1e-5)


def dense_norm_adj(data: dict) -> torch.Tensor:
    a = symmetric_normalise(bipartite_adjacency(N_USERS, N_ITEMS, data["edges"].numpy()))
    return torch.from_numpy(a.toarray())


def test_lightgcn_zero_layers_is_mf_on_ego_embeddings(data):
    lgcn = build(LightGCN, data, n_layers=0)
    mf = build(MFBPR, data)
    with torch.no_grad():
        mf.user_embedding.weight.copy_(lgcn.user_embedding)
        mf.item_embedding.weight.copy_(lgcn.item_embedding)
        lu, li = lgcn.embeddings()
        mu, mi = mf.embeddings()
    torch.testing.assert_close(lu @ li.T, mu @ mi.T)
    torch.testing.assert_close(lu, lgcn.user_embedding.detach())


def test_lightgcn_is_layer_mean_over_normalised_training_graph(data):
    model = build(LightGCN, data, n_layers=2)
    a = dense_norm_adj(data)
    ego = torch.cat([model.user_embedding, model.item_embedding]).detach()
    expected = (ego + a @ ego + a @ (a @ ego)) / 3
    with torch.no_grad():
        u, i = model.embeddings()
    torch.testing.assert_close(torch.cat([u, i]), expected, rtol=1e-5, atol=1e-6)
    # The regulariser reads the ego rows of the batch, not the propagated ones.
    users, pos, neg = torch.tensor([0]), torch.tensor([1]), torch.tensor([2])
    reg = model.user_embedding[0].norm() + model.item_embedding[1].norm() + model.item_embedding[2].norm()
    assert model.loss_terms(users, pos, neg)["reg"].item() == pytest.approx(1e-2 * reg.item(), rel=1e-5)


def test_vbpr_sum_fusion_is_mmrec_linear_over_concatenated_features(data):
    model = build(VBPR, data)
    modal = model.modal_representations()
    assert set(modal) == {"image", "text"} and all(t.shape == (N_ITEMS, 64) for t in modal.values())
    linear = torch.nn.Linear(14, 64)
    with torch.no_grad():
        linear.weight.copy_(torch.cat([model.projections["image"], model.projections["text"]], 1))
        linear.bias.copy_(model.projection_bias[0])
        raw = torch.cat([data["features"]["image"], data["features"]["text"]], 1)
        expected = torch.cat([model.item_embedding, linear(raw)], 1)
        torch.testing.assert_close(model.item_representation(), expected, rtol=1e-5, atol=1e-6)
        u, i = model.embeddings()
    assert u.shape == (N_USERS, 128) and i.shape == (N_ITEMS, 128)
    # The plug-in point carries gradient to the projections.
    model.modal_representations()["text"].sum().backward()
    assert model.projections["text"].grad is not None and model.projections["text"].grad.abs().sum() > 0


def test_missing_modality_is_named(data):
    with pytest.raises(ValueError, match="'text'"):
        VBPR(N_USERS, N_ITEMS, data["edges"], {"image": data["features"]["image"]}, {})
    with pytest.raises(ValueError, match="'image'"):
        FREEDOM(N_USERS, N_ITEMS, data["edges"], {"text": data["features"]["text"]}, data["graphs"])
    with pytest.raises(ValueError, match="'image' item-item graph"):
        FREEDOM(N_USERS, N_ITEMS, data["edges"], data["features"], {"text": data["graphs"]["text"]})
    assert MFBPR.required_modalities == () and LightGCN.required_modalities == ()
    assert VBPR.required_modalities == FREEDOM.required_modalities == ("image", "text")
    LightGCN(N_USERS, N_ITEMS, data["edges"], {}, {})  # ID-only models ignore features


def kept_set(model: FREEDOM) -> set[tuple[int, int]]:
    return {tuple(e) for e in model.kept_edges.tolist()}


def test_freedom_pruning_share_seeding_and_inference_graph(data):
    model = build(FREEDOM, data, dropout=0.8)
    n_edges = len(model.train_edges)
    all_edges = {tuple(e) for e in model.train_edges.tolist()}
    gen = torch.Generator().manual_seed(7)
    model.on_epoch_start(0, gen)
    first = kept_set(model)
    assert len(model.kept_edges) == len(first) == int(n_edges * 0.2)  # no duplicates, MMRec's share
    assert first <= all_edges
    # The pruned graph is the kept edges, both directions, symmetric-normalised.
    a = model.train_adj.to_dense()
    assert int((a > 0).sum()) == 2 * len(first)
    kept = bipartite_adjacency(N_USERS, N_ITEMS, model.kept_edges.numpy())
    kept_dense = symmetric_normalise(kept).toarray()
    torch.testing.assert_close(a, torch.from_numpy(kept_dense))
    model.on_epoch_start(1, gen)
    assert kept_set(model) != first  # the generator moved on: another sample
    again = build(FREEDOM, data, dropout=0.8)
    again.on_epoch_start(0, torch.Generator().manual_seed(7))
    assert kept_set(again) == first  # same seed, same sample

    model.eval()
    full = dense_norm_adj(data).float()
    torch.testing.assert_close(model.full_adj.to_dense(), full)
    with torch.no_grad():
        u, i = model.embeddings()
        fu, fi = model.propagate(model.full_adj)
        pu, pi = model.propagate(model.train_adj)
    torch.testing.assert_close(u, fu)
    torch.testing.assert_close(i, fi)
    assert not torch.allclose(u, pu)
    # item output = layer mean over the full graph + S @ item IDs, S = 0.1 S_image + 0.9 S_text
    ego = torch.cat([model.user_embedding, model.item_embedding]).detach()
    mean = (ego + full @ ego + full @ (full @ ego)) / 3
    s = 0.1 * data["graphs"]["image"].to_dense() + 0.9 * data["graphs"]["text"].to_dense()
    torch.testing.assert_close(i, mean[N_USERS:] + s @ model.item_embedding.detach(), rtol=1e-5, atol=1e-6)


def test_freedom_prefers_low_degree_edges(data):
    model = build(FREEDOM, data, dropout=0.5)
    gen = torch.Generator().manual_seed(11)
    counts = np.zeros(len(model.train_edges))
    index = {tuple(e): k for k, e in enumerate(model.train_edges.tolist())}
    for epoch in range(100):
        model.on_epoch_start(epoch, gen)
        for e in model.kept_edges.tolist():
            counts[index[tuple(e)]] += 1
    weights = model._edge_weights.numpy()
    assert np.corrcoef(weights, counts)[0, 1] > 0.5


def test_freedom_requires_pruning_before_training_and_reloads(data):
    model = build(FREEDOM, data)
    with pytest.raises(RuntimeError, match="on_epoch_start"):
        model.loss_terms(torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    torch.manual_seed(5)
    copy = FREEDOM(N_USERS, N_ITEMS, data["edges"], data["features"], data["graphs"])
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(copy.embeddings()[1], model.embeddings()[1])
    assert "full_adj" not in model.state_dict() and "feat_image" in model.state_dict()


def test_sparse_matmul_gradient_matches_dense():
    g = torch.Generator().manual_seed(4)
    dense = torch.rand(6, 6, generator=g) * (torch.rand(6, 6, generator=g) > 0.5)  # not symmetric
    x = torch.randn(6, 3, generator=g, requires_grad=True)
    w = torch.randn(6, 3, generator=g)
    (sparse_matmul(to_csr(dense.to_sparse()), x, to_csr(dense.T.to_sparse())) * w).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    ((dense @ x) * w).sum().backward()
    torch.testing.assert_close(grad, x.grad)
