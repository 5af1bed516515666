"""Every model of the package, one entry each: the single table the rest is derived from.

Why one table: the config's allowed ``train.model`` names and ``train.<hyper-parameter>`` fields, the CLI help, the
train stage (modalities, default lr, variants), the grid presets and the report's labels and table membership all ask
"what is model X". Answering it here means adding a model is its file plus one :data:`MODELS` entry, and no other module
lists models, their hyper-parameters, SAND's variants (:data:`VARIANTS`) or the plug-in fusions (:data:`FUSIONS`).

This module must stay cheap to import (``sand --help`` and config validation use it): model classes are named as
``"module:Class"`` strings and imported (with torch) only when a model is built or introspected."""

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

#: SAND's variants (``train.variant``): name -> (alignment, distancing) term, "none" where the
#: term is off. a-d are Table 4; the ablations (Figure 3) switch terms of a off.
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
#: How a plug-in uses the SAND-processed modal representation (``train.plugin_fusion``, see
#: ``models/plugins.py``); the first, the faithful plug-in, is the default.
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


#: ``train.profile=fast``: the batch this many times larger (each model may opt out: ``ModelSpec.fast_batch_scale``)
#: and the lr times its square root. Why it is faster: LightGCN, VBPR, FREEDOM and SAND recompute whole-catalogue or
#: whole-graph products once per batch whatever the batch's size (SAND's folded feature reads, SoloSim and CLUB fit over
#: all items; the propagations), so an epoch of fewer, larger batches costs several times less. Why the square root:
#: with the linear rule (4x lr) LightGCN and VBPR lost 3% of their best valid Recall@20 on Baby; with 2x they kept it
#: (measured in docs/convergence.md).
FAST_BATCH_SCALE = 4
#: The trainer's batch size when no profile sets one (the paper's and MMRec's).
DEFAULT_BATCH_SIZE = 2048


@dataclass(frozen=True)
class ModelSpec:
    """One model: how it is built, what it needs, and where the paper shows it."""

    #: the paper's display name (report rows and columns)
    label: str
    #: the class, as ``"module:Class"`` (imported lazily: it pulls in torch)
    target: str
    #: feature modalities the model reads ((): ID-only)
    modalities: tuple[str, ...]
    #: default learning rate (the published setting)
    lr: float
    #: report tables/figures the model appears in (see :data:`TABLES`)
    tables: tuple[str, ...] = ()
    #: whether ``train.variant`` selects a variant of this model (else runs record variant null)
    has_variants: bool = False
    #: a plug-in's backbone model (Table 3 pairs each backbone with its plug-in)
    backbone: str | None = None
    #: config field name -> constructor keyword where they differ
    renames: dict[str, str] = field(default_factory=dict)
    #: named profiles (``train.profile``) -> constructor keywords (and training settings,
    #: :data:`TRAINING_PROFILE_FIELDS`) they set; every model also has the "fast" profile
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: config fields ``train.<name>`` this entry adds (each declared once, here or in
    #: :data:`COMMON_HYPERPARAMETERS`; which a model takes is read from its constructor)
    hyperparameters: dict[str, HyperParameter] = field(default_factory=dict)
    #: constructor keywords that default to the training lr (SAND's CLUB estimators, docs/model.md)
    follows_lr: tuple[str, ...] = ()
    #: the fast profile's batch multiplier for this model (1: its fast profile trains as the paper does)
    fast_batch_scale: int = FAST_BATCH_SCALE
    #: bumped when a fix changes what the model computes: it enters the train key (from 1), so only this model's
    #: artifacts retrain, never another's
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
    # MMRec's published settings: lr 1e-3 for the ID-only baselines, VBPR and FREEDOM; the SAND
    # authors' config uses lr 1e-4. Order is the paper's row order (baselines, SAND, plug-ins).
    # MF-BPR keeps the paper's batch in the fast profile: at 8,192 its best valid Recall@20 fell 12-19% whatever the lr
    # (1e-3 to 4e-3), and it has no whole-graph product per batch to save (docs/convergence.md).
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
                              # 1: the scoring fusion scales the fused features to the ID embeddings (models/freedom.py)
                              revision=1,
                              profiles={"authors": {"head_dims": [33, 33, 63], "reg_weight": 0.0, "dropout": 0.8}},
                              hyperparameters={"plugin_fusion": (Literal[FUSIONS], Field(
                                  FUSIONS[0], description="plug-ins: SAND terms on the auxiliary modal features, "
                                  "or fused into the scores"))}),
}

#: What ``train.profile=fast`` changes, in words, for the CLI's and the config schema's help (read from the
#: constants above and the models that opt out, so the help cannot drift from what the profile does).
FAST_PROFILE_SUMMARY = (
    f"batch {DEFAULT_BATCH_SIZE * FAST_BATCH_SCALE} (x{FAST_BATCH_SCALE}), lr x{math.sqrt(FAST_BATCH_SCALE):g}"
    f" ({', '.join(m.label for m in MODELS.values() if m.fast_batch_scale == 1)}: the paper's settings)"
)


def hyperparameters() -> dict[str, HyperParameter]:
    """Every ``train.<name>`` hyper-parameter field: the common ones, then each entry's, in order.

    A name is declared once (else ValueError): one field serves every model that takes it."""
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
    """The train-key entry of model ``name``'s revision (none at revision 0)."""
    revision = spec(name).revision
    return {REVISION_KEY: revision} if revision else {}


def trained_revision(params: dict[str, Any]) -> int:
    """The model revision a run with train-key ``params`` was trained by."""
    return int(params.get(REVISION_KEY, 0))


def model_names() -> tuple[str, ...]:
    """Every registered model name, in the paper's order."""
    return tuple(MODELS)


def model_choices() -> str:
    """``"bpr | lightgcn | ..."``: the models as CLI help lists them."""
    return " | ".join(MODELS)


def check_model_name(name: str) -> str:
    """``name`` if registered, else a ValueError naming it and the allowed names (config validation)."""
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
    """Models that appear in report ``table`` (one of :data:`TABLES`), in the paper's order."""
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


def profile_names() -> tuple[str, ...]:
    """Every named profile some model defines ("default" excluded)."""
    shared = _training_profiles(next(iter(MODELS)))
    return tuple(dict.fromkeys([*shared, *(p for s in MODELS.values() for p in s.profiles)]))


def profile_choices() -> tuple[str, ...]:
    """Values of ``train.profile``: "default" (each model's own defaults), then the named profiles."""
    return ("default", *profile_names())


def check_profile_name(profile: str) -> str:
    """``profile`` if some model defines it (or "default"), else a ValueError naming the choices."""
    if profile not in profile_choices():
        raise ValueError(f"unknown hyper-parameter profile {profile!r}: choose one of {', '.join(profile_choices())}")
    return profile


def _profile(name: str, profile: str) -> dict[str, Any]:
    check_profile_name(profile)
    return {**_training_profiles(name).get(profile, {}), **spec(name).profiles.get(profile, {})}


def profile_hyperparameters(name: str, profile: str) -> dict[str, Any]:
    """Constructor keywords that ``profile`` sets for model ``name`` ({} for "default" or none)."""
    return {k: v for k, v in _profile(name, profile).items() if k not in TRAINING_PROFILE_FIELDS}


def profile_training(name: str, profile: str) -> dict[str, Any]:
    """Training settings (lr, batch_size, patience) that ``profile`` sets for model ``name``."""
    return {k: v for k, v in _profile(name, profile).items() if k in TRAINING_PROFILE_FIELDS}


def model_class(name: str) -> type[Recommender]:
    module, _, cls = spec(name).target.partition(":")
    return getattr(importlib.import_module(module), cls)


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

    Unknown hyper-parameters raise ValueError naming them, so a typo in a config or a grid never silently trains the
    default model."""
    s = spec(name)
    cls = model_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    backbone = getattr(cls, "backbone_class", None)  # plug-ins pass the rest to their backbone
    if backbone is not None:
        accepted |= set(inspect.signature(backbone.__init__).parameters)
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
