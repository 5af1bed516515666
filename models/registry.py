"""Model names -> classes, default learning rates and the modalities each needs.

Why one table: the CLI, the config validation, the train stage and the grid
runner all ask "what does model X need and how is it built"; answering it here
keeps ``--model`` names, feature requirements and published defaults in one place.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

from sand.models.base import Recommender


@dataclass(frozen=True)
class ModelSpec:
    module: str
    cls: str
    modalities: tuple[str, ...]
    lr: float
    #: config field name -> constructor keyword where they differ
    renames: dict[str, str] = field(default_factory=dict)
    #: fixed constructor keywords (e.g. the SAND plug-ins' backbone choice)
    fixed: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    # MMRec's published settings: lr 1e-3 for the ID-only baselines, VBPR and FREEDOM; the SAND
    # authors' config uses lr 1e-4.
    "bpr": ModelSpec("sand.models.bpr", "MFBPR", (), 1e-3),
    "lightgcn": ModelSpec("sand.models.lightgcn", "LightGCN", (), 1e-3),
    "vbpr": ModelSpec("sand.models.vbpr", "VBPR", ("image", "text"), 1e-3),
    "freedom": ModelSpec("sand.models.freedom", "FREEDOM", ("image", "text"), 1e-3, {"n_layers": "n_ui_layers"}),
    "sand": ModelSpec("sand.models.sand", "SAND", ("image", "text"), 1e-4, {"n_layers": "n_ui_layers"}),
    "vbpr-sand": ModelSpec("sand.models.plugins", "VBPRSand", ("image", "text"), 1e-3),
    "freedom-sand": ModelSpec("sand.models.plugins", "FREEDOMSand", ("image", "text"), 1e-3,
                              {"n_layers": "n_ui_layers"}),
}
VARIANT_MODELS = ("sand", "vbpr-sand", "freedom-sand")
PLUGIN_MODELS = ("vbpr-sand", "freedom-sand")

#: Hyper-parameter profiles besides each model's own defaults. "authors": the SAND authors'
#: plug-in settings, read from their VBPR+SAND and FREEDOM+SAND training logs (projection
#: heads 32 -> 33 -> 33 -> 63 on FREEDOM's 32 generic columns). Explicit settings win.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "authors": {
        "vbpr-sand": {"alpha": 0.1, "tau": 0.1, "reg_weight": 2.0},
        "freedom-sand": {"head_dims": [33, 33, 63], "reg_weight": 0.0, "dropout": 0.8},
    },
}


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name]


def required_modalities(name: str) -> tuple[str, ...]:
    return spec(name).modalities


def default_lr(name: str) -> float:
    return spec(name).lr


def profile_hyperparameters(name: str, profile: str) -> dict[str, Any]:
    """Constructor keywords that ``profile`` sets for model ``name`` ({} for "default" or none)."""
    if profile != "default" and profile not in PROFILES:
        raise ValueError(f"unknown hyper-parameter profile {profile!r}: choose default or {', '.join(PROFILES)}")
    return dict(PROFILES.get(profile, {}).get(name, {}))


def model_class(name: str) -> type[Recommender]:
    s = spec(name)
    return getattr(importlib.import_module(s.module), s.cls)


#: Constructor arguments that are the model's inputs (or catch-alls), not hyper-parameters.
_INPUT_ARGUMENTS = {"self", "n_users", "n_items", "train_edges", "features", "item_graphs", "args", "kwargs",
                    "backbone_kwargs"}


def constructor_kwargs(name: str) -> set[str]:
    """Hyper-parameter keywords of ``name``'s constructor, a plug-in's backbone's included."""
    cls = model_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    backbone = getattr(cls, "backbone_class", None)
    if backbone is not None:
        accepted |= set(inspect.signature(backbone.__init__).parameters)
        if not getattr(cls, "fusion_matters", True):  # VBPR+SAND: both fusions are one model
            accepted.discard("plugin_fusion")
    return accepted - _INPUT_ARGUMENTS


def accepted_hyperparameters(name: str) -> set[str]:
    """Config-side names of the hyper-parameters ``name`` takes (after renames)."""
    inverse = {v: k for k, v in spec(name).renames.items()}
    return {inverse.get(a, a) for a in constructor_kwargs(name)}


def build_model(name: str, *, variant: str = "a", **kwargs: Any) -> Recommender:
    """Build ``name`` with its constructor's own defaults for everything not given.

    Unknown hyper-parameters raise ValueError naming them, so a typo in a config or a
    grid never silently trains the default model.
    """
    s = spec(name)
    cls = model_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    backbone = getattr(cls, "backbone_class", None)  # plug-ins pass the rest to their backbone
    if backbone is not None:
        accepted |= set(inspect.signature(backbone.__init__).parameters)
    positional = {"n_users", "n_items", "train_edges", "features", "item_graphs"}
    hparams = {s.renames.get(k, k): v for k, v in kwargs.items() if k not in positional}
    hparams.update(s.fixed)
    if name in VARIANT_MODELS:
        hparams["variant"] = variant
    unknown = sorted(k for k in hparams if k not in accepted)
    if unknown:
        raise ValueError(f"model {name!r} has no hyper-parameter {unknown[0]!r}")
    missing = [m for m in s.modalities if m not in kwargs.get("features", {})]
    if missing:
        raise ValueError(f"model {name!r} needs {missing[0]} features ({missing[0]}_feat.npy)")
    return cls(**{k: kwargs[k] for k in positional if k in kwargs}, **hparams)
