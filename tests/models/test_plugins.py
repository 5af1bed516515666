"""SAND as a plug-in on VBPR and FREEDOM (Table 3) and the model registry."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sand.models.graph import scipy_to_torch_sparse
from sand.models.registry import MODELS, build_model, required_modalities


def tiny_inputs(seed: int = 0, n_users: int = 30, n_items: int = 20):
    rng = np.random.default_rng(seed)
    edges = np.array([(u, i) for u in range(n_users) for i in rng.choice(n_items, 4, replace=False)])
    features = {"image": torch.randn(n_items, 8, generator=torch.Generator().manual_seed(seed)),
                "text": torch.randn(n_items, 6, generator=torch.Generator().manual_seed(seed + 1))}
    graphs = {}
    for m, x in features.items():
        sim = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
        top = sim.topk(3, dim=1).indices.numpy()
        rows = np.repeat(np.arange(n_items), 3)
        graphs[m] = scipy_to_torch_sparse(sp.csr_matrix((np.full(rows.size, 1 / 3), (rows, top.ravel())),
                                                        shape=(n_items, n_items)))
    return dict(n_users=n_users, n_items=n_items, train_edges=torch.from_numpy(edges), features=features,
                item_graphs=graphs)


def train_steps(model, inputs, steps=5):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    model.on_epoch_start(0, gen)
    edges = inputs["train_edges"]
    history = []
    for _ in range(steps):
        users, pos = edges[:, 0], edges[:, 1]
        neg = torch.randint(0, inputs["n_items"], (len(users),), generator=gen)
        model.auxiliary_step(users, pos, neg)
        terms = model.loss_terms(users, pos, neg)
        loss = sum(terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
    return history


@pytest.mark.parametrize("name", ["vbpr-sand", "freedom-sand"])
@pytest.mark.parametrize("variant, present", [("a", {"align", "distance"}), ("b", {"align", "distance"}),
                                              ("no-align", {"distance"}), ("no-align-no-distance", set())])
def test_plugins_train_with_finite_losses_and_only_enabled_terms(name, variant, present):
    inputs = tiny_inputs()
    torch.manual_seed(0)
    model = build_model(name, variant=variant, club_steps=2, **inputs)
    history = train_steps(model, inputs)
    sand_terms = {k for k in history[-1] if k in ("align", "distance")}
    assert sand_terms == present
    assert all(np.isfinite(v) for h in history for v in h.values())
    model.eval()
    with torch.no_grad():
        users, items = model.embeddings()
    assert users.shape[0] == 30 and items.shape[0] == 20


def test_plugin_matches_its_backbone_when_switched_off():
    """With both SAND terms disabled, VBPR+SAND trains exactly like VBPR (the backbone is untouched)."""
    inputs = tiny_inputs()
    torch.manual_seed(0)
    plain = build_model("vbpr", **inputs)
    torch.manual_seed(0)
    plugged = build_model("vbpr-sand", variant="no-align-no-distance", **inputs)
    plugged.backbone.load_state_dict(plain.state_dict())
    a, b = train_steps(plain, inputs), train_steps(plugged, inputs)
    assert a == b


def test_registry_rejects_unknown_names_and_reports_missing_features():
    inputs = tiny_inputs()
    with pytest.raises(ValueError, match="no hyper-parameter 'bogus'"):
        build_model("sand", bogus=1, **inputs)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope", **inputs)
    without_text = {**inputs, "features": {"image": inputs["features"]["image"]}}
    with pytest.raises(ValueError, match="text features"):
        build_model("freedom", **without_text)
    assert required_modalities("bpr") == () and required_modalities("sand") == ("image", "text")
    assert set(MODELS) == {"bpr", "lightgcn", "vbpr", "freedom", "sand", "vbpr-sand", "freedom-sand"}


def _trained_scores(inputs, **kwargs) -> torch.Tensor:
    """FREEDOM+SAND from one seed, a few training steps, then its eval-mode score matrix."""
    torch.manual_seed(0)
    model = build_model("freedom-sand", club_steps=3, **kwargs, **inputs)
    train_steps(model, inputs, steps=4)
    model.eval()
    with torch.no_grad():
        users, items = model.embeddings()
    return users @ items.T


@pytest.mark.parametrize("fusion", ["auxiliary", "scoring"])
def test_freedom_sand_scores_move_with_alpha_beta_only_in_scoring_fusion(fusion):
    """Auxiliary fusion with reg_weight=0: the SAND terms cannot reach FREEDOM's scores (bit-identical
    to plain FREEDOM whatever alpha/beta); scoring fusion: they change the scores."""
    inputs = tiny_inputs()
    settings = [dict(alpha=0.012, beta=0.006), dict(alpha=0.5, beta=0.3)]
    scores = [_trained_scores(inputs, plugin_fusion=fusion, reg_weight=0.0, **s) for s in settings]
    if fusion == "auxiliary":
        assert torch.equal(scores[0], scores[1])
        torch.manual_seed(0)
        plain = build_model("freedom", reg_weight=0.0, **inputs)
        train_steps(plain, inputs, steps=4)
        plain.eval()
        with torch.no_grad():
            users, items = plain.embeddings()
        assert torch.equal(users @ items.T, scores[0])
    else:
        assert (scores[0] - scores[1]).abs().max() > 1e-4


def test_scoring_fusion_adds_projected_features_to_the_items():
    inputs = tiny_inputs()
    torch.manual_seed(0)
    model = build_model("freedom-sand", plugin_fusion="scoring", **inputs)
    assert model.backbone.modal_in_scores and model.plugin_fusion == "scoring"
    backbone = model.backbone
    backbone.eval()
    with torch.no_grad():
        _, with_modal = backbone.embeddings()
        reps = backbone.modal_representations()
        backbone.item_embedding.add_(sum(reps[m] * backbone.fused_scale[i] for i, m in enumerate(backbone.modalities)))
        backbone.modal_in_scores = False
        _, folded = backbone.embeddings()
    assert torch.allclose(with_modal, folded, atol=1e-6)
    with pytest.raises(ValueError, match="plugin_fusion"):
        build_model("freedom-sand", plugin_fusion="fused", **inputs)
    with pytest.raises(ValueError, match="contradicts"):
        build_model("freedom-sand", plugin_fusion="auxiliary", modal_in_scores=True, **inputs)


def test_scoring_fusion_starts_at_the_id_embeddings_scale_whatever_the_feature_norms():
    """Raw features of real norms (tens) must not swamp the ID embeddings in the fused items: unscaled, the scores
    saturate the BPR sigmoid from the first batch and training stalls (docs/convergence.md). At construction each
    fused modality has the ID embeddings' mean row norm, so the first BPR loss does not depend on the features' norm
    and is under a random model's, ln 2 (unscaled, features 50 times longer gave a first BPR loss near 1,900)."""
    first_bpr = {}
    for norm in (1.0, 50.0):
        inputs = tiny_inputs()
        inputs["features"] = {m: norm * x for m, x in inputs["features"].items()}
        torch.manual_seed(0)
        model = build_model("freedom-sand", plugin_fusion="scoring", **inputs)
        first_bpr[norm] = train_steps(model, inputs, steps=1)[0]["bpr"]
    assert first_bpr[50.0] == pytest.approx(first_bpr[1.0], abs=0.01)
    assert first_bpr[50.0] < np.log(2)
    torch.manual_seed(0)
    model = build_model("freedom-sand", plugin_fusion="scoring", **inputs)
    backbone = model.backbone
    with torch.no_grad():
        reps = backbone.modal_representations()
        id_norm = backbone.item_embedding.norm(dim=1).mean()
        for i, m in enumerate(backbone.modalities):
            fused_norm = (reps[m] * backbone.fused_scale[i]).norm(dim=1).mean()
            assert fused_norm == pytest.approx(float(id_norm), rel=1e-5)
    # The scale is part of the saved state: a resumed run scores as the run it continues.
    assert "backbone.fused_scale" in model.state_dict()


def test_authors_profiles_and_fusion_reach_the_model():
    from sand.models.registry import accepted_hyperparameters, profile_hyperparameters

    inputs = tiny_inputs()
    vbpr = build_model("vbpr-sand", **profile_hyperparameters("vbpr-sand", "authors"), **inputs)
    assert (vbpr.separation.alpha, vbpr.separation.tau, vbpr.backbone.reg_weight) == (0.1, 0.1, 2.0)
    freedom = build_model("freedom-sand", **profile_hyperparameters("freedom-sand", "authors"), **inputs)
    widths = [layer.out_features for layer in freedom.separation.heads["image"] if isinstance(layer, torch.nn.Linear)]
    assert freedom.separation.heads["image"][0].in_features == 32 and widths == [33, 33, 63]
    assert (freedom.backbone.reg_weight, freedom.backbone.dropout) == (0.0, 0.8)
    assert profile_hyperparameters("freedom", "authors") == {} == profile_hyperparameters("vbpr-sand", "default")
    # VBPR scores its projected features either way: the fusion is not a VBPR+SAND hyper-parameter.
    assert "plugin_fusion" in accepted_hyperparameters("freedom-sand")
    assert "plugin_fusion" not in accepted_hyperparameters("vbpr-sand")
