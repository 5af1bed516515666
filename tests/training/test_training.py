"""The trainer: learning, exact resume, NaN detection, early stopping, checkpoints, logs."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from sand.models.base import Recommender
from sand.pipeline.base.config import load_config
from sand.pipeline.base.errors import ConfigError, SandError, StageError
from sand.pipeline.dataset.split_data import SplitData
from sand.pipeline.training.checkpoints import load_weights, read_checkpoint
from sand.pipeline.training.evaluation import evaluate_split
from sand.pipeline.training.trainer import train_model


class TinyMF(Recommender):
    """Matrix factorisation with BPR, an L2 term, dropout and a model-owned optimiser.

    Dropout (global RNG), on_epoch_start's generator and the auxiliary optimiser are
    here so that the resume test covers every piece of state a real model has.
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 8, seed: int = 0, nan_at: int | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.user = nn.Parameter(torch.randn(n_users, dim, generator=g) * 0.1)
        self.item = nn.Parameter(torch.randn(n_items, dim, generator=g) * 0.1)
        self.drop = nn.Dropout(0.1)
        self.scale = nn.Parameter(torch.ones(1))
        self.aux_opt = torch.optim.SGD([self.scale], lr=1e-3, momentum=0.9)
        self.noise = torch.zeros(())
        self.nan_at = nan_at
        self.calls = 0

    def on_epoch_start(self, epoch, generator):
        self.noise = torch.rand((), generator=generator) * 1e-3

    def auxiliary_step(self, users, pos, neg):
        self.aux_opt.zero_grad()
        loss = (self.scale - 1.5) ** 2
        loss.backward()
        self.aux_opt.step()
        return {"scale_fit": float(loss.detach())}

    def auxiliary_state_dict(self):
        return {"opt": self.aux_opt.state_dict()}

    def load_auxiliary_state_dict(self, state):
        self.aux_opt.load_state_dict(state["opt"])

    def loss_terms(self, users, pos, neg):
        self.calls += 1
        u = self.drop(self.user[users])
        diff = (u * self.item[pos]).sum(1) - (u * self.item[neg]).sum(1)
        bpr = -torch.nn.functional.logsigmoid(diff).mean()
        reg = 1e-4 * (self.user[users].pow(2).sum() + self.item[pos].pow(2).sum()) / len(users)
        reg = reg + self.noise * 0 + self.scale.detach().sum() * 0
        terms = {"bpr": bpr, "reg": reg}
        if self.nan_at is not None and self.calls == self.nan_at:
            terms["reg"] = reg * float("nan")
        return terms

    def embeddings(self):
        return self.user * self.scale, self.item


def planted_data(seed: int = 0, n_users: int = 60, n_items: int = 40) -> SplitData:
    """Two communities: users mostly consume items of their own half, so MF can learn it."""
    rng = np.random.default_rng(seed)
    rows = {"train": [], "valid": [], "test": []}
    for u in range(n_users):
        own = np.arange(n_items // 2) + (n_items // 2) * (u % 2)
        items = rng.choice(own, size=8, replace=False)
        rows["valid"].append((u, items[0]))
        rows["test"].append((u, items[1]))
        rows["train"] += [(u, i) for i in items[2:]]
    arr = {k: np.asarray(v, dtype=np.int64) for k, v in rows.items()}
    return SplitData(n_users, n_items, arr["train"], arr["valid"], arr["test"])


COMMON = dict(batch_size=64, lr=0.05, progress=False, device="cpu", seed=3)


def test_training_improves_metrics_and_writes_logs(tmp_path):
    data = planted_data()
    model = TinyMF(data.n_users, data.n_items)
    with torch.no_grad():
        before = evaluate_split(*model.embeddings(), data, "test")
    res = train_model(model, data, out_dir=tmp_path, epochs=15, patience=50, **COMMON)
    assert res.epochs_run == 15 and not res.stopped_early
    assert res.test_at_best["recall@20"] > before["recall@20"] + 0.2
    assert res.best_valid["recall@20"] > 0.8
    hist = pd.read_csv(res.history_path)
    assert list(hist["epoch"]) == list(range(1, 16))
    for col in [
        "loss",
        "loss_bpr",
        "loss_reg",
        "aux_scale_fit",
        "valid_recall@10",
        "valid_recall@20",
        "valid_ndcg@10",
        "valid_ndcg@20",
        "test_recall@20",
        "test_ndcg@10",
        "seconds",
        "eval_seconds",
        "peak_memory_mb",
    ]:
        assert col in hist.columns, col
    assert hist["loss_bpr"].iloc[-1] < hist["loss_bpr"].iloc[0]
    assert np.allclose(hist["loss"], hist["loss_bpr"] + hist["loss_reg"])
    assert hist["test_recall@20"].notna().sum() >= 1  # only where valid improved
    best_row = hist.loc[hist["epoch"] == res.best_epoch].iloc[0]
    assert best_row["test_recall@20"] == pytest.approx(res.test_at_best["recall@20"])
    assert res.seconds_per_epoch > 0 and res.peak_memory_mb > 0

    # checkpoints are plain: weights_only loads them
    best = torch.load(res.best_checkpoint, weights_only=True)
    last = torch.load(res.last_checkpoint, weights_only=True)
    assert best["epoch"] == res.best_epoch and last["epoch"] == 15
    fresh = TinyMF(data.n_users, data.n_items, seed=99)
    meta = load_weights(fresh, res.best_checkpoint)
    assert meta["epoch"] == res.best_epoch and meta["test"] == res.test_at_best
    with torch.no_grad():
        again = evaluate_split(*fresh.embeddings(), data, "test")
    assert again == pytest.approx(res.test_at_best, abs=1e-6)
    assert not list(tmp_path.glob(".*tmp"))


class Kill(Exception):
    pass


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    data = planted_data(1)
    full_model = TinyMF(data.n_users, data.n_items, seed=5)
    full = train_model(full_model, data, out_dir=tmp_path / "full", epochs=7, patience=50, **COMMON)

    def die_after_3(epoch, row):
        if epoch == 3:
            raise Kill

    first = TinyMF(data.n_users, data.n_items, seed=5)
    with pytest.raises(Kill):
        train_model(
            first, data, out_dir=tmp_path / "cut", epochs=7, patience=50, on_epoch_end=die_after_3, **COMMON
        )
    assert len(pd.read_csv(tmp_path / "cut" / "epochs.csv")) == 3
    resumed_model = TinyMF(data.n_users, data.n_items, seed=42)  # state must come from last.pt
    resumed = train_model(resumed_model, data, out_dir=tmp_path / "cut", epochs=7, patience=50, **COMMON)

    for (name, a), (_, b) in zip(
        full_model.state_dict().items(), resumed_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert full.best_epoch == resumed.best_epoch
    assert full.best_valid == resumed.best_valid and full.test_at_best == resumed.test_at_best
    timing = {"seconds", "eval_seconds", "peak_memory_mb"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in full.history]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in resumed.history]
    assert full_model.aux_opt.state_dict()["state"][0]["momentum_buffer"].equal(
        resumed_model.aux_opt.state_dict()["state"][0]["momentum_buffer"]
    )

    # a finished run resumes to its stored result without training
    again_model = TinyMF(data.n_users, data.n_items, seed=5)
    again_model.calls = 0
    again = train_model(again_model, data, out_dir=tmp_path / "cut", epochs=7, patience=50, **COMMON)
    assert again_model.calls == 0
    assert again.best_valid == resumed.best_valid and again.epochs_run == 7

    with pytest.raises(ConfigError, match="seed"):
        train_model(
            again_model, data, out_dir=tmp_path / "cut", epochs=9, patience=50, **{**COMMON, "seed": 4}
        )


def test_nan_loss_names_term_epoch_and_batch(tmp_path):
    data = planted_data()  # 360 train edges, batch 64 -> 6 batches per epoch
    model = TinyMF(data.n_users, data.n_items, nan_at=6 * 2 + 5)
    with pytest.raises(SandError, match=r"non-finite loss term 'reg' at epoch 3, batch 5: nan"):
        train_model(model, data, out_dir=tmp_path, epochs=5, **COMMON)


@pytest.mark.parametrize(("rule", "evaluations"), [("mmrec", 5), ("strict", 4)])
def test_early_stopping_with_patience(tmp_path, rule, evaluations):
    data = planted_data()
    model = TinyMF(data.n_users, data.n_items)
    # lr 0 freezes the embeddings: only the first evaluation improves. MMRec stops when MORE
    # than `patience` evaluations passed without improvement, the strict rule at `patience`.
    res = train_model(
        model, data, out_dir=tmp_path, epochs=50, patience=3, eval_every=2, early_stop=rule,
        **{**COMMON, "lr": 0.0},
    )
    assert res.stopped_early
    assert res.best_epoch == 2
    assert res.epochs_run == 2 * evaluations
    hist = pd.read_csv(res.history_path)
    assert hist["valid_recall@20"].notna().sum() == evaluations
    assert hist["test_recall@20"].notna().sum() == 1


@pytest.mark.parametrize(("rule", "best_epoch", "epochs_run"), [("mmrec", 1, 4), ("strict", 2, 4)])
def test_mmrec_rule_compares_metrics_rounded_to_four_decimals(tmp_path, monkeypatch, rule, best_epoch, epochs_run):
    """A gain below 5e-5 is no gain for MMRec (its evaluator rounds to 4 decimals); strict counts it."""
    import sand.pipeline.training.trainer as training

    scripted = iter([0.1, 0.10004, 0.10003, 0.10004, 0.10004, 0.10004])

    class ScriptedValid(training.SplitEvaluator):
        def __call__(self, user_emb, item_emb):
            out = super().__call__(user_emb, item_emb)
            if self.split == "valid":
                out["recall@20"] = next(scripted)
            return out

    monkeypatch.setattr(training, "SplitEvaluator", ScriptedValid)
    data = planted_data()
    res = train_model(
        TinyMF(data.n_users, data.n_items), data, out_dir=tmp_path, epochs=50, patience=2, early_stop=rule, **COMMON
    )
    assert (res.best_epoch, res.epochs_run, res.stopped_early) == (best_epoch, epochs_run, True)
    with pytest.raises(ConfigError, match="early_stop"):
        train_model(TinyMF(data.n_users, data.n_items), data, out_dir=tmp_path / "x", epochs=1, early_stop="late",
                    **COMMON)


def test_bad_settings_and_missing_checkpoint(tmp_path):
    data = planted_data()
    model = TinyMF(data.n_users, data.n_items)
    with pytest.raises(ConfigError, match="valid_metric"):
        train_model(model, data, out_dir=tmp_path, epochs=1, valid_metric="recall@50", **COMMON)
    with pytest.raises(ConfigError, match="train.batch_size=0"):  # the config's to refuse: training never sees it
        load_config(None, None, ["train.batch_size=0"])
    with pytest.raises(StageError, match="missing"):
        load_weights(model, tmp_path / "nothing" / "best.pt")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(StageError, match="cannot be read"):
        train_model(model, data, out_dir=tmp_path / "bad", epochs=1, **COMMON)


def test_checkpoint_loader_reads_trainer_and_bare_checkpoints_and_refuses_pickled_objects(tmp_path):
    data = planted_data()
    model = TinyMF(data.n_users, data.n_items, seed=1)
    res = train_model(model, data, out_dir=tmp_path / "run", epochs=2, **COMMON)
    fresh = TinyMF(data.n_users, data.n_items, seed=2)
    meta = load_weights(fresh, res.best_checkpoint)
    assert meta["epoch"] == res.best_epoch and "model" not in meta
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))

    torch.save(model.state_dict(), tmp_path / "bare.pt")  # e.g. a state_dict exported by hand
    other = TinyMF(data.n_users, data.n_items, seed=3)
    assert load_weights(other, tmp_path / "bare.pt") == {}
    assert torch.equal(other.state_dict()["user"], model.state_dict()["user"])

    with pytest.raises(StageError, match="does not fit this model"):
        load_weights(TinyMF(data.n_users + 1, data.n_items), res.best_checkpoint)

    # anything but tensors and plain containers must never be unpickled
    torch.save({"model": argparse.Namespace(run="code")}, tmp_path / "evil.pt")
    with pytest.raises(StageError, match=r"evil.pt: cannot be read \(.*Error: .*"):
        read_checkpoint(tmp_path / "evil.pt")
