"""Models built from stage artifacts (interactions split, feature matrices, item graphs). Training, evaluation,
``sand recommend`` and the report's figures all rebuild the configured model here: one home keeps them identical and
keeps the report from importing the stage table (no cycle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sand.models import registry
from sand.pipeline.base.config import TrainConfig
from sand.pipeline.base.errors import ConfigError
from sand.pipeline.base.store import Artifact
from sand.pipeline.dataset.split_data import SplitData
from sand.pipeline.features.knn import load_graph
from sand.pipeline.stage_context import dataset_counts
from sand.pipeline.training.checkpoints import load_weights


def load_feature_tensor(path: Path):
    """A feature matrix as a float32 tensor over a copy-on-write memory map of the ``.npy`` file: a million 4,096-d
    items are 16 GB, so pages come from the page cache on demand and the models that keep raw features as a frozen
    buffer (SAND, VBPR) hold no second copy on CPU, while a model that writes into its features changes private pages,
    never the artifact. Other dtypes (float16) become one float32 copy."""
    import torch  # lazy: torch takes seconds to import

    arr = np.load(path, mmap_mode="c", allow_pickle=False)
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return torch.from_numpy(arr)


def load_model_inputs(inter: Artifact, feature_arts: dict[str, Artifact]):
    from sand.models.graph import scipy_to_torch_sparse  # lazy: imports torch

    n_users, n_items = dataset_counts(inter)
    data = SplitData.from_parquet(inter.file("interactions.parquet"), n_users, n_items)
    features, graphs = {}, {}
    for modality in ("image", "text"):
        if f"{modality}_features" in feature_arts:
            features[modality] = load_feature_tensor(feature_arts[f"{modality}_features"].file(f"{modality}_feat.npy"))
    if "graphs" in feature_arts:
        for modality in ("image", "text"):
            graphs[modality] = scipy_to_torch_sparse(load_graph(feature_arts["graphs"].file(f"{modality}_graph.npz")))
    return data, features, graphs


def check_extra_hyperparameters(tcfg: TrainConfig) -> None:
    """Refuse a ``train.extra`` key the model does not take, before any stage runs. Not in the config: which keywords a
    model takes is read from its constructor, which imports torch; a config load must stay light."""
    if not tcfg.extra:
        return
    accepted = registry.accepted_hyperparameters(tcfg.model)
    unknown = sorted(k for k in tcfg.extra if k not in accepted)
    if unknown:
        raise ConfigError(f"invalid config value train.extra.{unknown[0]}={tcfg.extra[unknown[0]]!r}: "
                          f"model {tcfg.model!r} has no hyper-parameter {unknown[0]!r}")


def effective_model_kwargs(tcfg: Any) -> tuple[set[str], dict[str, Any]]:
    """(accepted hyper-parameter names, keywords for the model): the profile, then explicit settings."""
    accepted = registry.accepted_hyperparameters(tcfg.model)
    return accepted, {**registry.profile_hyperparameters(tcfg.model, tcfg.profile), **tcfg.model_kwargs(accepted)}


def build_model_for(tcfg: TrainConfig, inter: Artifact, feature_arts: dict[str, Artifact]):
    """Construct the model ``tcfg`` names (seeded) and the data it trains on."""
    import torch  # lazy: torch takes seconds to import

    tcfg = tcfg.with_profile()  # the CLUB estimators' lr follows the profile's training lr
    data, features, graphs = load_model_inputs(inter, feature_arts)
    _, kwargs = effective_model_kwargs(tcfg)
    for name in registry.spec(tcfg.model).follows_lr:  # e.g. SAND's CLUB estimators (docs/model.md, CLUB fit)
        kwargs.setdefault(name, tcfg.lr if tcfg.lr is not None else registry.default_lr(tcfg.model))
    torch.manual_seed(tcfg.seed)
    try:
        model = registry.build_model(tcfg.model, variant=tcfg.variant, n_users=data.n_users, n_items=data.n_items,
                                     train_edges=torch.from_numpy(data.train), features=features, item_graphs=graphs,
                                     **kwargs)
    except ValueError as err:  # models/ raises ValueError; here it becomes the user's one-line error
        raise ConfigError(f"train.model={tcfg.model}: {err}") from None
    return model, data


def trained_embeddings(tcfg: TrainConfig, inter: Artifact, trained: Artifact, feature_arts: dict[str, Artifact]):
    """(data, user_emb, item_emb) of a trained run from its best checkpoint, by a fresh eval-mode forward pass (the
    reference scores with embeddings cached during the last training batch)."""
    import torch  # lazy: torch takes seconds to import

    model, data = build_model_for(tcfg, inter, feature_arts)
    load_weights(model, trained.file("best.pt"), "cpu")
    model.eval()
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
    return data, user_emb, item_emb
