"""The paper-layout report on stored runs: tables, figures, skips and errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from support import fake_interactions, fake_run

from sand.pipeline.base.config import build_config
from sand.pipeline.base.errors import StageError
from sand.pipeline.base.store import Artifact, ArtifactStore
from sand.pipeline.experiments.grid import run_grid
from sand.pipeline.experiments.report import collect_runs, select_runs, write_report

METRIC_KEYS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


# ------------------------------------------------------------------------------------- fixtures


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        arr = np.asarray(img.convert("L"), dtype=float)
    return arr


def _assert_not_blank(path: Path) -> None:
    arr = _read_png(path)
    assert arr.shape[0] > 200 and arr.shape[1] > 200
    assert arr.std() > 5.0
    assert (arr < 200).mean() > 0.005  # some real ink, not an empty canvas


def _paper_fixture(root: Path) -> ArtifactStore:
    store = ArtifactStore(root)
    baby, sports = fake_interactions(store, "baby"), fake_interactions(store, "sports", seed=1)
    for inter, offset in ((baby, 0.0), (sports, 0.1)):
        fake_run(store, inter, "bpr", valid=0.05 + offset, test=0.055 + offset, seconds=1.0, memory=100)
        fake_run(store, inter, "lightgcn", valid=0.07 + offset, test=0.075 + offset, seconds=1.5, memory=150)
        fake_run(store, inter, "vbpr", valid=0.06 + offset, test=0.066 + offset)
        fake_run(store, inter, "freedom", valid=0.09 + offset, test=0.099 + offset)
        # two SAND_a runs: the second has the better validation but the worse test metric
        fake_run(store, inter, "sand", valid=0.10 + offset, test=0.12 + offset, tag=0.001)
        fake_run(store, inter, "sand", valid=0.11 + offset, test=0.103 + offset, tag=0.012, seconds=16.0)
    for variant, v in (
        ("b", 0.105),
        ("c", 0.095),
        ("d", 0.09),
        ("no-align", 0.08),
        ("no-distance", 0.085),
        ("no-align-no-distance", 0.07),
    ):
        fake_run(store, baby, "sand", variant=variant, valid=v, test=v - 0.001, seconds=3.0)
    fake_run(store, baby, "vbpr-sand", valid=0.07, test=0.0726)
    return store


# ------------------------------------------------------------------------------------- tests
def test_collect_and_select_by_validation(tmp_path):
    store = _paper_fixture(tmp_path)
    runs = collect_runs(store)
    assert len(runs) == 2 * 6 + 6 + 1
    selected = select_runs(runs)
    sand = selected[("baby", "sand", "a")]
    assert sand.valid["recall@20"] == pytest.approx(0.11) and sand.test["recall@20"] == pytest.approx(0.103)
    assert selected[("baby", "bpr", None)].label == "MF-BPR"
    assert selected[("baby", "sand", "no-align")].label == "SAND w/o Alignment"
    assert selected[("baby", "vbpr-sand", "a")].label == "VBPR+SAND"


def test_report_tables_put_numbers_in_the_right_cells(tmp_path):
    _paper_fixture(tmp_path / "data")
    out = tmp_path / "report"
    written = write_report(tmp_path / "data", out, tsne_items=20)
    for name in ("runs", "table2", "table3", "table4", "table5", "curves", "ablation", "index"):
        assert name in written, name

    t2 = pd.read_csv(out / "table2_main.csv")
    assert list(t2["Model"]) == ["MF-BPR", "LightGCN", "VBPR", "FREEDOM", "SAND"]
    assert list(t2.columns[1:5]) == ["baby R@10", "baby R@20", "baby N@10", "baby N@20"]
    assert list(t2.columns[5:]) == ["sports R@10", "sports R@20", "sports N@10", "sports N@20"]
    by = t2.set_index("Model")
    assert by.loc["SAND", "baby R@20"] == pytest.approx(0.103)  # validation-selected, not the 0.12 run
    assert by.loc["SAND", "baby R@10"] == pytest.approx(0.093)
    assert by.loc["SAND", "sports N@20"] == pytest.approx(0.183)
    assert by.loc["FREEDOM", "baby R@20"] == pytest.approx(0.099)
    assert by.loc["MF-BPR", "sports R@20"] == pytest.approx(0.155)
    md = (out / "table2_main.md").read_text()
    assert "| SAND | **0.0930** | **0.1030** | **0.0730** | **0.0830** |" in md
    assert "| FREEDOM | 0.0890 | 0.0990 |" in md

    t3 = pd.read_csv(out / "table3_generalisation.csv")
    assert list(t3["Dataset"]) == ["baby"] * 4 and list(t3["Metric"]) == ["R@10", "R@20", "N@10", "N@20"]
    assert "FREEDOM" not in t3.columns  # FREEDOM+SAND was never run
    row = t3.set_index("Metric").loc["R@20"]
    assert row["VBPR"] == pytest.approx(0.066) and row["VBPR+SAND"] == pytest.approx(0.0726)
    assert row["VBPR Improv."] == pytest.approx(10.0)
    assert "+10.00%" in (out / "table3_generalisation.md").read_text()

    t4 = pd.read_csv(out / "table4_variants.csv").set_index("Variant")
    assert list(t4.index) == ["SAND_a", "SAND_b", "SAND_c", "SAND_d"]
    assert t4.loc["SAND_b", "Alignment"] == "SoloSim" and t4.loc["SAND_c", "Distancing"] == "MI (CLUB)"
    assert t4.loc["SAND_d", "baby R@20"] == pytest.approx(0.089)
    assert "sports R@20" not in t4.columns  # only SAND_a on sports: nothing to compare there
    assert "| SAND_b | SoloSim | negative l2 | **0.0940** | **0.1040** |" in (out / "table4_variants.md").read_text()

    t5 = pd.read_csv(out / "table5_efficiency.csv").set_index("Model")
    assert t5.loc["SAND_a", "baby s/epoch"] == pytest.approx(16.0)  # the selected run's timing
    assert t5.loc["MF-BPR", "sports peak MB"] == pytest.approx(100.0)
    assert "SAND w/o All" in t5.index

    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 19 and runs["selected"].sum() == 2 * 5 + 6 + 1

    index = (out / "report.md").read_text()
    for target in ("table2_main.md", "table3_generalisation.csv", "curves_baby.png", "ablation.png"):
        assert f"({target})" in index
    assert "Sensitivity figure skipped" in index
    assert "Figures 5-6 for baby skipped" in index  # fake runs carry no checkpoint

    for path in written["curves"] + written["ablation"]:
        _assert_not_blank(path)
    assert {p.name for p in written["curves"]} == {"curves_baby.png", "curves_sports.png"}


def test_table3_is_written_per_plugin_fusion_and_names_it(tmp_path):
    store = ArtifactStore(tmp_path / "data")
    baby = fake_interactions(store, "baby")
    fake_run(store, baby, "vbpr", valid=0.06, test=0.066)
    fake_run(store, baby, "vbpr-sand", valid=0.07, test=0.0726)
    fake_run(store, baby, "freedom", valid=0.09, test=0.10)
    fake_run(store, baby, "freedom-sand", valid=0.09, test=0.10, fusion="auxiliary")
    # better validation in the scoring fusion: selected separately, never instead of the auxiliary run
    fake_run(store, baby, "freedom-sand", valid=0.095, test=0.11, fusion="scoring")
    # trained before the scoring fusion's fix (revision 0): never quoted, however good its validation
    fake_run(store, baby, "freedom-sand", valid=0.2, test=0.3, fusion="scoring", revision=0)
    out = tmp_path / "out"
    written = write_report(tmp_path / "data", out)
    assert "table3" in written and "table3-scoring" in written
    aux = pd.read_csv(out / "table3_generalisation.csv").set_index("Metric").loc["R@20"]
    scoring = pd.read_csv(out / "table3_generalisation_scoring.csv").set_index("Metric").loc["R@20"]
    assert aux["FREEDOM+SAND"] == pytest.approx(0.10) and aux["FREEDOM Improv."] == pytest.approx(0.0)
    assert scoring["FREEDOM+SAND"] == pytest.approx(0.11) and scoring["FREEDOM Improv."] == pytest.approx(10.0)
    assert aux["VBPR+SAND"] == scoring["VBPR+SAND"] == pytest.approx(0.0726)  # one model in both fusions
    index = (out / "report.md").read_text()
    assert "plug-in fusion: auxiliary" in index and "plug-in fusion: scoring" in index
    assert "bit-identical to FREEDOM's" in index
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs.loc[runs["model"] == "freedom-sand", "label"]) == ["FREEDOM+SAND", "FREEDOM+SAND (scoring)"]
    assert runs["selected"].sum() == 5


def test_report_for_one_dataset_and_skipped_tables(tmp_path):
    store = ArtifactStore(tmp_path / "data")
    inter = fake_interactions(store, "clothing")
    fake_run(store, inter, "bpr", valid=0.05, test=0.06)
    fake_run(store, inter, "sand", valid=0.08, test=0.09)
    other = fake_interactions(store, "baby", seed=3)
    fake_run(store, other, "bpr", valid=0.5, test=0.5)
    written = write_report(tmp_path / "data", tmp_path / "out", datasets=["clothing"])
    assert "table3" not in written and "table4" not in written and "ablation" not in written
    t2 = pd.read_csv(tmp_path / "out" / "table2_main.csv")
    assert list(t2.columns) == ["Model", "clothing R@10", "clothing R@20", "clothing N@10", "clothing N@20"]
    assert list(t2["clothing R@20"]) == pytest.approx([0.06, 0.09])
    index = (tmp_path / "out" / "report.md").read_text()
    assert "Table3 skipped" in index and "Table4 skipped" in index
    assert not (tmp_path / "out" / "table3_generalisation.csv").exists()


def test_report_errors_name_what_is_missing(tmp_path):
    with pytest.raises(StageError, match="no evaluated runs in .*evaluate"):
        write_report(tmp_path / "empty", tmp_path / "out")
    store = ArtifactStore(tmp_path / "data")
    fake_run(store, fake_interactions(store, "baby"), "bpr", valid=0.1, test=0.1)
    with pytest.raises(StageError) as err:
        write_report(tmp_path / "data", tmp_path / "out", datasets=["sports"])
    assert "'sports'" in str(err.value) and "found: baby" in str(err.value) and "\n" not in str(err.value)


def test_sensitivity_figure_from_grid_tables(tmp_path):
    store = ArtifactStore(tmp_path / "data")
    fake_run(store, fake_interactions(store, "baby"), "sand", valid=0.1, test=0.1)
    base = build_config({"data_root": str(tmp_path / "data"), "acquire": {"dataset": "baby"}})

    def run_one(cfg):
        a = cfg.train.alpha
        return {
            "metrics": {
                "valid": {"recall@20": 0.1 - abs(a - 0.012), "ndcg@20": 0.05},
                "test": {"recall@20": 0.1 - abs(a - 0.01), "ndcg@20": 0.04 + a},
            }
        }

    run_grid(base, {"train.alpha": [0.001, 0.012, 0.1]}, name="sensitivity-alpha", run_one=run_one)
    run_grid(base, {"train.variant": ["a", "b"]}, name="variants", run_one=run_one)  # not a sensitivity grid
    written = write_report(tmp_path / "data", tmp_path / "out")
    (path,) = written["sensitivity"]
    _assert_not_blank(path)
    assert "![sensitivity](sensitivity.png)" in (tmp_path / "out" / "report.md").read_text()


def _feature_artifacts(store: ArtifactStore, inter: Artifact) -> dict[str, Artifact]:
    from sand.pipeline.features.knn import knn_graph, save_graph

    rng = np.random.default_rng(7)
    feats = {
        "image": rng.normal(size=(40, 24)).astype(np.float32),
        "text": rng.normal(size=(40, 16)).astype(np.float32),
    }
    arts = {}
    for modality, stage in (("image", "image_features"), ("text", "text_features")):

        def build(out: Path, m: str = modality) -> dict[str, Any]:
            np.save(out / f"{m}_feat.npy", feats[m])
            return {"shape": list(feats[m].shape)}

        arts[stage] = store.run(stage, "1", {"fixture": modality}, {"interactions": inter}, build).artifact

    def build_graphs(out: Path) -> dict[str, Any]:
        for m in ("image", "text"):
            save_graph(out / f"{m}_graph.npz", knn_graph(feats[m], k=5))
        return {}

    arts["graphs"] = store.run(
        "graphs",
        "1",
        {"k": 5},
        {"text_features": arts["text_features"], "image_features": arts["image_features"]},
        build_graphs,
    ).artifact
    return arts


@pytest.mark.slow
def test_tsne_figures_from_a_trained_sand_checkpoint(tmp_path):
    """Real train + evaluate stages on a tiny random dataset, then Figures 5-6 from best.pt."""
    pytest.importorskip("sand.models.sand")
    from sand.pipeline.stages import Context
    from sand.pipeline.training.stage import run_evaluate, run_train

    root = tmp_path / "data"
    store = ArtifactStore(root)
    inter = fake_interactions(store, "tiny")
    features = _feature_artifacts(store, inter)
    for model in ("sand", "bpr"):
        cfg = build_config(
            {
                "data_root": str(root),
                "train": {
                    "model": model,
                    "epochs": 1,
                    "batch_size": 64,
                    "device": "cpu",
                    **({"club_steps": 1} if model == "sand" else {}),
                },
                "evaluate": {"ks": [10, 20]},
            }
        )
        ctx = Context.create(cfg, progress=False)
        feats = features if model == "sand" else {}
        trained = run_train(ctx, inter, feats).artifact
        run_evaluate(ctx, inter, trained, feats)

    written = write_report(root, tmp_path / "out", tsne_items=30, seed=3)
    names = [p.name for p in written["tsne"]]
    assert names == ["fig5_tsne_tiny.png", "fig6_circle_tiny.png"]
    for path in written["tsne"] + written["curves"]:
        _assert_not_blank(path)
    evaluated = {a.manifest["model"]: a.manifest["metrics"]["test"] for a in store.list("evaluate")}
    t2 = pd.read_csv(tmp_path / "out" / "table2_main.csv").set_index("Model")
    assert t2.loc["SAND", "tiny R@20"] == pytest.approx(evaluated["sand"]["recall@20"])
    assert t2.loc["MF-BPR", "tiny N@10"] == pytest.approx(evaluated["bpr"]["ndcg@10"])
    assert "table5" in written


def test_tsne_is_seeded():
    from sand.pipeline.experiments.figures import circle_points, tsne_2d

    x = np.random.default_rng(1).normal(size=(25, 6))
    a, b = tsne_2d(x, seed=4), tsne_2d(x, seed=4)
    assert a.shape == (25, 2) and np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(circle_points(a), axis=1), 1.0)


def test_modal_representations_match_the_models_split(tmp_path):
    torch = pytest.importorskip("torch")
    from sand.models.sand import SAND
    from sand.pipeline.experiments.figures import modal_representations

    rng = np.random.default_rng(0)
    feats = {
        "image": torch.from_numpy(rng.normal(size=(12, 8)).astype(np.float32)),
        "text": torch.from_numpy(rng.normal(size=(12, 6)).astype(np.float32)),
    }
    eye = torch.eye(12).to_sparse()
    edges = torch.tensor([[u, (u * 5 + j) % 12] for u in range(6) for j in range(3)])
    torch.manual_seed(0)
    model = SAND(6, 12, edges, feats, {"image": eye, "text": eye}, club_steps=1)
    items = np.array([1, 4, 7])
    reps = modal_representations(model, items)
    with torch.no_grad():
        z = model.transforms["image"](feats["image"])[items]
    assert reps[("image", "generic")].shape == (3, 4) and reps[("image", "unique")].shape == (3, 4)
    assert np.allclose(reps[("image", "generic")], z[:, :4].numpy(), atol=1e-5)
    assert np.allclose(reps[("image", "unique")], z[:, 4:].numpy(), atol=1e-5)
    assert reps[("text", "generic")].shape == (3, 3)
