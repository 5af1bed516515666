"""Every model of the package, one entry each: the single table the config, CLI help, train stage, grid presets and
report derive from, so adding a model is its file plus one :data:`MODELS` entry. Cheap to import (``sand --help`` uses
it): model classes are ``"module:Class"`` strings, imported only when needed."""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

if TYPE_CHECKING:
    from sand.models.base import Recommender

#: Report tables and figures a model can appear in (its entry's ``tables``).
TABLES = ("table2", "table3", "table4", "figure3", "figures5-6")

#: SAND's variants (``train.variant``) -> (alignment, distancing) term, "none" if off; a-d: Table 4, others: Figure 3.
VARIANT_TERMS: dict[str, tuple[str, str]] = {
    "a": ("solosim", "club"),
    "b": ("solosim", "l2"),
    "c": ("infonce", "club"),
    "d": ("infonce", "l2"),
    "no-align": ("none", "club"),
    "no-distance": ("solosim", "none"),
    "no-align-no-distance": ("none", "none"),
}
#: The variant names, in the paper's order; the first is the default.
VARIANTS: tuple[str, ...] = tuple(VARIANT_TERMS)
#: How a plug-in uses the SAND-processed representation (``train.plugin_fusion``); the first (faithful) is the default.
FUSIONS: tuple[str, ...] = ("auxiliary", "scoring")


def table4_variants() -> tuple[str, ...]:
    """Variants with both terms on (Table 4: SAND_a-d)."""
    return tuple(v for v, terms in VARIANT_TERMS.items() if "none" not in terms)


def ablations() -> tuple[str, ...]:
    """The default variant, then those that switch a term of it off (Figure 3)."""
    return (VARIANTS[0], *(v for v, terms in VARIANT_TERMS.items() if "none" in terms))


#: A ``train.<name>`` config field as pydantic's ``create_model`` takes it: (type, ``Field(...)``).
HyperParameter = tuple[Any, Any]


def _optional(type_: Any, **field_args: Any) -> HyperParameter:
    """A field unset by default: the model's constructor default applies."""
    return type_ | None, Field(None, **field_args)


_Scope = Literal["auto", "all", "batch"]
#: Hyper-parameters several model families take: embedding size, L2 weight, graph depth.
COMMON_HYPERPARAMETERS: dict[str, HyperParameter] = {
    "embedding_dim": (int, Field(64, ge=1)),
    "reg_weight": _optional(float, ge=0),
    "n_layers": _optional(int, ge=0, le=8),
}


#: ``train.profile=fast``: the batch this many times larger (``ModelSpec.fast_batch_scale``), the lr times its square
#: root. Faster as LightGCN, VBPR, FREEDOM and SAND recompute whole-catalogue or whole-graph products once per batch;
#: the square root as the linear rule cost LightGCN and VBPR accuracy (docs/convergence.md).
FAST_BATCH_SCALE = 4
#: The trainer's batch size when no profile sets one (the paper's and MMRec's).
DEFAULT_BATCH_SIZE = 2048


@dataclass(frozen=True)
class ModelSpec:
    """One model: how it is built, what it needs, and where the paper shows it."""

    label: str  #: the paper's display name (report rows and columns)
    target: str  #: the class, as ``"module:Class"`` (imported lazily: it pulls in torch)
    modalities: tuple[str, ...]  #: feature modalities the model reads ((): ID-only)
    lr: float  #: default learning rate (the published setting)
    tables: tuple[str, ...] = ()  #: report tables/figures the model appears in (:data:`TABLES`)
    has_variants: bool = False  #: whether ``train.variant`` selects a variant (else runs record variant null)
    backbone: str | None = None  #: a plug-in's backbone model (Table 3 pairs each backbone with its plug-in)
    renames: dict[str, str] = field(default_factory=dict)  #: config field name -> constructor keyword where they differ
    #: named profiles (``train.profile``) -> the constructor keywords and training settings they set (besides "fast")
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``train.<name>`` fields this entry adds (each declared once; which a model takes is read from its constructor)
    hyperparameters: dict[str, HyperParameter] = field(default_factory=dict)
    follows_lr: tuple[str, ...] = ()  #: constructor keywords defaulting to the training lr (SAND's CLUB estimators)
    fast_batch_scale: int = FAST_BATCH_SCALE  #: the fast profile's batch multiplier (1: it trains as the paper does)
    #: bumped when a fix changes what the model computes: in the train key, so only this model's artifacts retrain
    revision: int = 0

    def __post_init__(self) -> None:
        unknown = [t for t in self.tables if t not in TABLES]
        if unknown:
            raise ValueError(f"model {self.label}: unknown report table {unknown[0]!r} (known: {', '.join(TABLES)})")
        if ":" not in self.target:
            raise ValueError(f"model {self.label}: target {self.target!r} is not 'module:Class'")


#: SAND's own hyper-parameters (the plug-ins take them too).
_SAND_HYPERPARAMETERS = {
    "alpha": _optional(float, ge=0, description="alignment weight (SAND default 0.012)"),
    "beta": _optional(float, ge=0, description="distancing weight (SAND default 0.006)"),
    "tau": _optional(float, gt=0, description="alignment temperature (SAND default 0.2)"),
    "club_steps": _optional(int, ge=0),
    "solosim_scope": _optional(
        _Scope, description="items SoloSim runs over (auto: all up to 20,000 items, else the batch's)"
    ),
    "distance_scope": _optional(
        _Scope, description="items the distancing term and the CLUB fit run over (auto: all up to 1,000,000 items)"
    ),
    "l2_form": _optional(Literal["neg-mse", "neg-log", "margin"]),
    "club_fit_order": _optional(
        Literal["before", "after"],
        description="CLUB fit on the batch's pairs before its bound (default) or after (the authors' order)",
    ),
}
MODELS: dict[str, ModelSpec] = {
    # lr: MMRec's published 1e-3 for the baselines, the SAND authors' 1e-4; the paper's row order. MF-BPR keeps the
    # paper's batch when fast: a larger one cost accuracy, with no whole-graph product to save (docs/convergence.md).
    "bpr": ModelSpec("MF-BPR", "sand.models.bpr:MFBPR", (), 1e-3, tables=("table2",), fast_batch_scale=1),
    "lightgcn": ModelSpec("LightGCN", "sand.models.lightgcn:LightGCN", (), 1e-3, tables=("table2",)),
    "vbpr": ModelSpec("VBPR", "sand.models.vbpr:VBPR", ("image", "text"), 1e-3, tables=("table2", "table3")),
    "freedom": ModelSpec("FREEDOM", "sand.models.freedom:FREEDOM", ("image", "text"), 1e-3,
                         tables=("table2", "table3"), renames={"n_layers": "n_ui_layers"},
                         hyperparameters={"mm_image_weight": _optional(float, ge=0, le=1)}),
    "sand": ModelSpec("SAND", "sand.models.sand:SAND", ("image", "text"), 1e-4,
                      tables=("table2", "table4", "figure3", "figures5-6"), has_variants=True,
                      renames={"n_layers": "n_ui_layers"}, hyperparameters=_SAND_HYPERPARAMETERS,
                      follows_lr=("lr",)),
    # The "authors" profile: the SAND authors' plug-in settings, read from their VBPR+SAND and FREEDOM+SAND training
    # logs (projection heads 32 -> 33 -> 33 -> 63 on FREEDOM's 32 generic columns). Explicit settings win.
    "vbpr-sand": ModelSpec("VBPR+SAND", "sand.models.plugins:VBPRSand", ("image", "text"), 1e-3,
                           tables=("table3",), has_variants=True, backbone="vbpr", follows_lr=("club_lr",),
                           profiles={"authors": {"alpha": 0.1, "tau": 0.1, "reg_weight": 2.0}},
                           hyperparameters={"head_dims": _optional(
                               list[Annotated[int, Field(ge=1)]], min_length=1,
                               description="plug-ins: projection head widths (each at least 1)")}),
    "freedom-sand": ModelSpec("FREEDOM+SAND", "sand.models.plugins:FREEDOMSand", ("image", "text"), 1e-3,
                              tables=("table3",), has_variants=True, backbone="freedom",
                              renames={"n_layers": "n_ui_layers"}, follows_lr=("club_lr",),
                              revision=1,  # the scoring fusion scales its features (models/freedom.py)
                              profiles={"authors": {"head_dims": [33, 33, 63], "reg_weight": 0.0, "dropout": 0.8}},
                              hyperparameters={"plugin_fusion": (Literal[FUSIONS], Field(
                                  FUSIONS[0], description="plug-ins: SAND terms on the auxiliary modal features, "
                                  "or fused into the scores"))}),
}

#: What ``train.profile=fast`` changes, in words, for the CLI and config help (derived, so it cannot drift).
FAST_PROFILE_SUMMARY = (
    f"batch {DEFAULT_BATCH_SIZE * FAST_BATCH_SCALE} (x{FAST_BATCH_SCALE}), lr x{math.sqrt(FAST_BATCH_SCALE):g}"
    f" ({', '.join(m.label for m in MODELS.values() if m.fast_batch_scale == 1)}: the paper's settings)"
)


def hyperparameters() -> dict[str, HyperParameter]:
    """Every ``train.<name>`` hyper-parameter field: the common ones, then each entry's. A name is declared once (else
    ValueError): one field serves every model that takes it."""
    fields = dict(COMMON_HYPERPARAMETERS)
    for name, s in MODELS.items():
        twice = sorted(set(fields) & set(s.hyperparameters))
        if twice:
            raise ValueError(f"model {name}: hyper-parameter {twice[0]!r} is declared elsewhere already")
        fields.update(s.hyperparameters)
    return fields


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name]


#: The train-key field that holds a model's revision; absent at revision 0, so keys made before revisions existed hold.
REVISION_KEY = "model_revision"


def revision_params(name: str) -> dict[str, int]:
    revision = spec(name).revision
    return {REVISION_KEY: revision} if revision else {}


def trained_revision(params: dict[str, Any]) -> int:
    return int(params.get(REVISION_KEY, 0))


def model_names() -> tuple[str, ...]:
    return tuple(MODELS)


def model_choices() -> str:
    return " | ".join(MODELS)


def check_model_name(name: str) -> str:
    spec(name)
    return name


def has_variants(name: str) -> bool:
    """Whether runs of ``name`` have a variant (unknown models, e.g. from an old store: no)."""
    return name in MODELS and MODELS[name].has_variants


def recorded_variant(name: str, variant: str | None) -> str | None:
    """The variant a run of ``name`` records in manifests, summaries and reports: None without variants."""
    return variant if has_variants(name) else None


def variant_models() -> tuple[str, ...]:
    return tuple(n for n, s in MODELS.items() if s.has_variants)


def models_in(table: str) -> tuple[str, ...]:
    if table not in TABLES:
        raise ValueError(f"unknown report table {table!r}: choose one of {', '.join(TABLES)}")
    return tuple(n for n, s in MODELS.items() if table in s.tables)


def plugins() -> dict[str, str]:
    """backbone -> its plug-in model, for the plug-ins in Table 3 (in the paper's order)."""
    return {s.backbone: n for n, s in MODELS.items() if s.backbone is not None and "table3" in s.tables}


def label(name: str) -> str:
    """The paper's display name of ``name`` (the name itself for a model no longer registered)."""
    return MODELS[name].label if name in MODELS else name


def required_modalities(name: str) -> tuple[str, ...]:
    return spec(name).modalities


def default_lr(name: str) -> float:
    return spec(name).lr


#: Profile settings that are training settings (``train.<field>``), not constructor keywords.
TRAINING_PROFILE_FIELDS = ("lr", "batch_size", "patience")


def _training_profiles(name: str) -> dict[str, dict[str, Any]]:
    """The profiles every model has: profile -> training settings for ``name``."""
    scale = spec(name).fast_batch_scale
    return {"fast": {"batch_size": DEFAULT_BATCH_SIZE * scale, "lr": spec(name).lr * math.sqrt(scale)}}


def profile_choices() -> tuple[str, ...]:
    """Values of ``train.profile``: "default" (each model's own defaults), then every profile some model defines."""
    shared = _training_profiles(next(iter(MODELS)))
    return ("default", *dict.fromkeys([*shared, *(p for s in MODELS.values() for p in s.profiles)]))


def check_profile_name(profile: str) -> str:
    if profile not in profile_choices():
        raise ValueError(f"unknown hyper-parameter profile {profile!r}: choose one of {', '.join(profile_choices())}")
    return profile


def _profile(name: str, profile: str) -> dict[str, Any]:
    check_profile_name(profile)
    return {**_training_profiles(name).get(profile, {}), **spec(name).profiles.get(profile, {})}


def profile_hyperparameters(name: str, profile: str) -> dict[str, Any]:
    return {k: v for k, v in _profile(name, profile).items() if k not in TRAINING_PROFILE_FIELDS}


def profile_training(name: str, profile: str) -> dict[str, Any]:
    return {k: v for k, v in _profile(name, profile).items() if k in TRAINING_PROFILE_FIELDS}


def model_class(name: str) -> type[Recommender]:
    module, _, cls = spec(name).target.partition(":")
    return getattr(importlib.import_module(module), cls)


#: Constructor arguments that are the model's inputs (or catch-alls), not hyper-parameters.
_INPUT_ARGUMENTS = {"self", "n_users", "n_items", "train_edges", "features", "item_graphs", "args", "kwargs",
                    "backbone_kwargs"}


def _signature_keywords(cls: type[Recommender]) -> set[str]:
    """``cls``'s constructor parameters, and its backbone's for a plug-in (which passes the rest on)."""
    accepted = set(inspect.signature(cls.__init__).parameters)
    backbone = getattr(cls, "backbone_class", None)
    if backbone is not None:
        accepted |= set(inspect.signature(backbone.__init__).parameters)
    return accepted


def constructor_kwargs(name: str) -> set[str]:
    """Hyper-parameter keywords of ``name``'s constructor, a plug-in's backbone's included."""
    cls = model_class(name)
    accepted = _signature_keywords(cls) - _INPUT_ARGUMENTS
    if not getattr(cls, "fusion_matters", True):  # VBPR+SAND: both fusions are one model
        accepted.discard("plugin_fusion")
    return accepted


def accepted_hyperparameters(name: str) -> set[str]:
    """Config-side names of the hyper-parameters ``name`` takes (after renames)."""
    inverse = {v: k for k, v in spec(name).renames.items()}
    return {inverse.get(a, a) for a in constructor_kwargs(name)}


def build_model(name: str, *, variant: str = "a", **kwargs: Any) -> Recommender:
    """Build ``name`` with its constructor's own defaults for everything not given. Unknown hyper-parameters raise
    ValueError, so a typo in a config or a grid never silently trains the default model."""
    s = spec(name)
    cls = model_class(name)
    accepted = _signature_keywords(cls)
    positional = {"n_users", "n_items", "train_edges", "features", "item_graphs"}
    hparams = {s.renames.get(k, k): v for k, v in kwargs.items() if k not in positional}
    if s.has_variants:
        hparams["variant"] = variant
    unknown = sorted(k for k in hparams if k not in accepted)
    if unknown:
        raise ValueError(f"model {name!r} has no hyper-parameter {unknown[0]!r}")
    missing = [m for m in s.modalities if m not in kwargs.get("features", {})]
    if missing:
        raise ValueError(f"model {name!r} needs {missing[0]} features ({missing[0]}_feat.npy)")
    return cls(**{k: kwargs[k] for k in positional if k in kwargs}, **hparams)
