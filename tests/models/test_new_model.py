"""Adding a model is its class plus one registry entry: config, grids, training and the report follow.

:class:`ToyMF` below exists nowhere else, and its hyper-parameter ``gamma`` is no other model's.
A fresh interpreter registers it first, as an entry in ``models/registry.py`` would be there
when the config is imported; then ``--set train.gamma=...`` is a config field, a grid over it
trains each value, and the report shows the model by its label. No other file is touched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from sand.models import registry
from sand.models.base import Recommender
from sand.models.losses import bpr_loss

TOY = "toy-mf"
#: gamma of every ToyMF built in this process
BUILT: list[float] = []


class ToyMF(Recommender):
    """Matrix factorisation whose item embeddings are scaled by ``gamma``."""

    def __init__(self, n_users: int, n_items: int, train_edges: Any = None, features: Any = None,
                 item_graphs: Any = None, *, embedding_dim: int = 8, gamma: float = 1.0) -> None:
        super().__init__()
        self.gamma = float(gamma)
        self.users = nn.Parameter(0.1 * torch.randn(n_users, embedding_dim))
        self.items = nn.Parameter(0.1 * torch.randn(n_items, embedding_dim))
        BUILT.append(self.gamma)

    def loss_terms(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
        u, items = self.users[users], self.gamma * self.items
        return {"bpr": bpr_loss((u * items[pos]).sum(1), (u * items[neg]).sum(1))}

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.users, self.gamma * self.items


def _register() -> None:
    """The model's one registry entry, with its own hyper-parameter."""
    registry.MODELS[TOY] = registry.ModelSpec(
        "Toy-MF", f"{__name__}:ToyMF", (), 1e-2, tables=("table2",),
        hyperparameters={"gamma": (float | None, Field(None, gt=0, description="item-embedding scale"))},
    )


def _ids_folder(root: Path) -> Path:
    """An MMRec folder of interactions only (ID-only models train on it): 30 users, 25 items."""
    folder = root / "ids"
    folder.mkdir()
    split = [0] * 6 + [1, 2]  # 6 train, 1 valid, 1 test per user
    rows = [f"{u}\t{(3 * u + k) % 25}\t{split[k]}" for u in range(30) for k in range(8)]
    (folder / "ids.inter").write_text("userID\titemID\tx_label\n" + "\n".join(rows) + "\n")
    return folder


def exercise(root: Path) -> dict[str, Any]:
    """Register the toy model, then use it as a user would; what each step saw, as JSON."""
    _register()
    from sand.pipeline.base.config import load_config
    from sand.pipeline.base.errors import ConfigError
    from sand.pipeline.experiments.grid import run_grid
    from sand.pipeline.experiments.report import write_report
    from sand.pipeline.runner import run_pipeline
    from sand.pipeline.stages import Context

    options = {"data_root": str(root / "data"), "acquire.dataset": str(_ids_folder(root))}
    cfg = load_config(None, options, [f"train.model={TOY}", "train.gamma=0.5", "train.epochs=2"])
    seen: dict[str, Any] = {"configured": cfg.train.gamma}
    try:
        load_config(None, options, [f"train.model={TOY}", "train.gamma=-1"])
    except ConfigError as err:
        seen["refused"] = str(err)

    def run_one(one: Any) -> dict[str, Any]:
        return run_pipeline(Context.create(one, progress=False), until="evaluate").summary()

    grid = run_grid(cfg, {"train.gamma": [0.5, 2.0]}, name="toy-gamma", run_one=run_one)
    seen["grid"] = [(run.values, run.status, run.error) for run in grid.runs]
    seen["built"] = BUILT
    write_report(root / "data", root / "report", tsne_items=20)
    seen["table2"] = (root / "report" / "table2_main.csv").read_text()
    return seen


def test_a_registered_model_with_its_own_hyperparameter_runs_end_to_end(tmp_path):
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import {Path(__file__).stem} as t;"
            f"print(json.dumps(t.exercise(__import__('pathlib').Path({str(tmp_path)!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["configured"] == 0.5
    assert "train.gamma=-1" in seen["refused"] and "\n" not in seen["refused"]
    assert seen["grid"] == [[{"train.gamma": 0.5}, "ok", None], [{"train.gamma": 2.0}, "ok", None]]
    assert 0.5 in seen["built"] and 2.0 in seen["built"]  # each grid cell trained its own value
    assert "Toy-MF" in seen["table2"]

