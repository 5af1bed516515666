"""Validated configuration: one pydantic model per stage and one for the pipeline.

Why pydantic: the same models validate YAML files, CLI options and the Prefect UI's forms, and a wrong value is rejected
with its dotted name (``train.lr``) instead of failing deep inside a stage. The command's field options and
``sand.run``'s keywords derive from ``CLI_FIELDS``; ``--set section.field=value`` reaches any other field."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model

from sand.models import registry
from sand.pipeline.base import formats
from sand.pipeline.base.devices import DEVICE_CHOICES, validate_device_name
from sand.pipeline.base.errors import ConfigError


def _enum_of(names: Any) -> Any:
    """A JSON-schema hook listing ``names()`` as the field's choices (the Prefect UI's drop-down)."""
    return lambda schema: schema.update(enum=list(names()))


#: A format of the format table (``pipeline/base/formats.py``), checked when validated: the only list of formats.
DatasetFormat = Annotated[str, AfterValidator(formats.check_format_name),
                          Field(json_schema_extra=_enum_of(formats.format_names))]
#: A model of the registry (``models/registry.py``), checked when validated: the only list of models.
ModelName = Annotated[str, AfterValidator(registry.check_model_name),
                      Field(json_schema_extra=_enum_of(registry.model_names))]
#: "default" or a hyper-parameter profile some registry entry defines.
ProfileName = Annotated[str, AfterValidator(registry.check_profile_name),
                        Field(json_schema_extra=_enum_of(registry.profile_choices))]
#: A SAND variant of the registry (``registry.VARIANTS``).
Variant = Literal[registry.VARIANTS]
#: Every seed: numpy's SeedSequence and torch.manual_seed both take 0 <= seed < 2**32 everywhere.
Seed = Annotated[int, Field(ge=0, lt=2**32, description="seed: 0 <= seed < 2**32")]
#: A compute device, spelled as torch spells it; whether it exists here is checked before a run.
Device = Annotated[str | None, AfterValidator(validate_device_name), Field(description=DEVICE_CHOICES)]
#: A name, URL or path: an empty string names nothing, so it is refused when the config loads.
Text = Annotated[str, Field(min_length=1)]
#: A count or width of at least 1 (list elements: ``evaluate.ks``, ``train.head_dims``).
Positive = Annotated[int, Field(ge=1)]
#: ``host`` or ``host:port`` (IPv6 in brackets), as image URLs name them.
HostPort = Annotated[str, Field(pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?$")]


class _Section(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AcquireConfig(_Section):
    dataset: Text = Field("sample", description="sample | baby | sports | clothing | category name | PATH")
    format: DatasetFormat | None = Field(None, description="raw format; sniffed or implied by the preset")
    reviews: Text | None = Field(None, description="explicit reviews URL or path (overrides the preset)")
    meta: Text | None = Field(None, description="explicit metadata URL or path (overrides the preset)")
    timeout: float = Field(60.0, gt=0, description="seconds per HTTP request")
    retries: int = Field(5, ge=0, le=20)
    sample_seed: Seed = Field(0, description="seed of the bundled sample generator")
    sample_users: int = Field(1000, ge=20)
    sample_items: int = Field(500, ge=20)
    revision: str | None = Field(None, pattern=r"^[0-9a-f]{16}$", description="remote sources' version, set by "
                                 "sand retrain when they changed: part of the acquire key only when set")


class InteractionsConfig(_Section):
    k_core: int = Field(5, ge=1, description="iterative k-core threshold for users and items")
    split: Literal["mmrec", "mmrec-notebook", "chronological"] = "mmrec"
    seed: Seed = 0
    max_bad_lines: int = Field(1000, ge=0, description="dirty lines skipped (and reported) before failing")
    max_line_bytes: int = Field(4 << 20, ge=1024, le=1 << 30, description="longest raw line read; longer ones are "
                                "dirty lines, dropped without being held in memory")


class TextFeaturesConfig(_Section):
    model: Text = Field("all-MiniLM-L6-v2", description="sentence-transformers model name or local path")
    batch_size: int = Field(64, ge=1)
    device: Device = None
    shard_size: int = Field(
        16384, ge=1, description="unique texts per shard job (rounded up to whole groups of batch_size x 32)")
    threads: int | None = Field(None, ge=1, description="torch threads per shard (pinned so bytes do not depend on the "
                                "runner); default: the orchestrating process's torch thread count")


class ImageFeaturesConfig(_Section):
    source: Literal["cnn", "amazon2014"] = Field(
        "cnn", description="cnn: our CNN over the item images | amazon2014: the 4,096-d features the Amazon 2014 "
        "release ships per category (the SAND paper's and MMRec's inputs)")
    amazon2014_url: Text | None = Field(
        None, description="URL or path of image_features_<Category>.b (default: derived from a 2014 dataset)")
    backbone: Literal["resnet50", "resnet18", "vgg16"] | None = Field(
        None, description="CNN; default resnet50 (resnet18 for the bundled sample)")
    weights: Text = Field("auto", description="imagenet | random | PATH | auto (sample: random, else imagenet)")
    image_size: int | None = Field(None, ge=32, le=1024, description="crop size; default 224 (64 for sample)")
    batch_size: int = Field(32, ge=1)
    num_workers: int | None = Field(
        None, ge=0, description="image decode threads per shard beside the CNN's forward pass (0: none, each batch is "
        "decoded on every core between two forward passes; default: the cores the forward leaves free: the machine's "
        "cores on a GPU, none on a CPU whose forward uses them all)")
    concurrency: int = Field(16, ge=1, le=256)
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(3, ge=0, le=10)
    max_bytes: int = Field(10_000_000, ge=1024, description="largest image file or body read, in bytes")
    max_pixels: int = Field(40_000_000, ge=1024, description="largest image decoded (width x height, from its header); "
                            "also the pixels decoded at once per process")
    allow_hosts: list[HostPort] = Field(
        default_factory=list, description="host or host:port that image URLs from downloaded metadata may reach "
        "although private (an internal mirror); local metadata may reach any host")
    min_side: int = Field(32, ge=1)
    fill: Literal["mean", "zeros"] = "mean"
    shard_size: int = Field(1024, ge=1)
    seed: Seed = 0
    device: Device = None
    engine: Literal["eager", "fast"] = Field(
        "fast", description="fast: channels-last, batch norms folded into a frozen graph (~2x on a CPU; features "
        "within 1e-4 of eager) | eager: the module as torchvision defines it")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "auto", description="CNN compute precision; auto: bf16 where the hardware multiplies it natively "
        "(AMX/AVX512-BF16 CPUs, CUDA GPUs with bf16), else fp32")


class GraphsConfig(_Section):
    k: int = Field(10, ge=1, description="neighbours per item in the kNN item-item graphs")
    include_self: bool = True
    block_size: int | None = Field(None, ge=1)
    method: Literal["exact", "faiss", "auto"] = Field(
        "auto", description="exact blocked top-k | faiss IVF index | auto (exact up to auto_threshold items or on a "
        "CUDA GPU, else faiss)")
    auto_threshold: int = Field(100_000, ge=1, description="auto: catalogue size above which CPU runs use faiss")
    nlist: int | None = Field(None, ge=1, description="faiss clusters (default about 2 sqrt(N))")
    nprobe: int | None = Field(None, ge=1, description="faiss clusters searched (default: tuned to target_recall)")
    target_recall: float = Field(0.95, gt=0, le=1, description="faiss: recall@k the nprobe tuning aims for")
    recall_sample: int = Field(1000, ge=2, description="faiss: rows whose exact neighbours measure recall")
    faiss_storage: Literal["float32", "float16"] = Field(
        "float32", description="faiss: how the index stores the vectors (float16: half the memory, N x d x 2 bytes, "
        "e.g. 8 GB instead of 16 GB at 1M x 4096; recall is measured either way)")
    seed: Seed = 0


#: Early-stopping patience per dataset where the SAND authors' logs differ from 20 (Clothing: 30).
DATASET_PATIENCE = {"clothing": 30}
DEFAULT_PATIENCE = 20


class _TrainSettings(_Section):
    """The train section's run settings; :data:`TrainConfig` adds the models' hyper-parameters."""

    model: ModelName = "sand"
    variant: Variant = "a"
    epochs: int = Field(1000, ge=1)
    batch_size: int | None = Field(
        None, ge=1, description=f"default {registry.DEFAULT_BATCH_SIZE} (train.profile=fast: "
        f"{registry.FAST_PROFILE_SUMMARY})")
    lr: float | None = Field(
        None, gt=0, description=f"default: the model's published value (train.profile=fast: "
        f"{registry.FAST_PROFILE_SUMMARY})")
    weight_decay: float = Field(0.0, ge=0)
    patience: int | None = Field(
        None, ge=1, description="evaluations without improvement before stopping; default 20 (clothing: 30)")
    early_stop: Literal["mmrec", "strict"] = Field(
        "mmrec", description="mmrec: metric rounded to 4 decimals, stop after MORE than patience bad evaluations; "
        "strict: unrounded, stop after patience")
    eval_every: int = Field(1, ge=1)
    seed: Seed = 0
    device: Device = None
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="compute precision of the big products with the raw features: fp32 (the faithful "
        "reference) | bf16 | auto (bf16 on CUDA with bf16 and on CPUs with AMX-BF16/AVX512-BF16)")
    profile: ProfileName = Field(
        "default", description=f"fast: {registry.FAST_PROFILE_SUMMARY}; docs/convergence.md; "
        "authors: the SAND authors' plug-in hyper-parameters (VBPR+SAND, FREEDOM+SAND); explicit settings win")
    extra: dict[str, float | int | str | bool] = Field(default_factory=dict, description="other model kwargs")
    memory_budget_gb: float | None = Field(None, gt=0, description="refuse a model whose estimated training memory "
                                           "exceeds this (default: the memory available on the training device)")

    #: Named hyper-parameters (the registry's, one field each): applied to the models that take them, ignored by the
    #: others (so one config serves a whole Table-2 grid). Keys of ``extra`` must be taken by the model.
    NAMED_HYPERPARAMETERS: ClassVar[tuple[str, ...]] = tuple(registry.hyperparameters())
    #: Named hyper-parameters with a value by default: a grid may set them for every model.
    ALWAYS_SET: ClassVar[tuple[str, ...]] = tuple(
        name for name, (_, field) in registry.hyperparameters().items() if field.default is not None)

    def model_kwargs(self, accepted: set[str] | None = None) -> dict[str, Any]:
        """Hyper-parameters the user set explicitly; with ``accepted`` (the model's hyper-parameter names), named fields
        the model does not take are left out, while ``extra`` always passes through, so a typo there is an error."""
        kwargs = {name: getattr(self, name) for name in self.NAMED_HYPERPARAMETERS
                  if getattr(self, name) is not None and (accepted is None or name in accepted)}
        return {**kwargs, **self.extra}

    def with_profile(self) -> TrainConfig:
        """This section with the profile's training settings where none was set, and the default batch: the train stage,
        its artifact key and the trainer must all see one answer to "which lr and batch size"; explicit settings win."""
        update = {k: v for k, v in registry.profile_training(self.model, self.profile).items()
                  if getattr(self, k) is None}
        if update.get("batch_size", self.batch_size) is None:
            update["batch_size"] = registry.DEFAULT_BATCH_SIZE
        return self.model_copy(update=update)

    def resolved_patience(self, dataset: str) -> int:
        """``patience``, or the authors' value for ``dataset`` (a preset name or a folder named so)."""
        if self.patience is not None:
            return self.patience
        return DATASET_PATIENCE.get(Path(str(dataset)).name.lower(), DEFAULT_PATIENCE)


#: The train section: the run settings plus one field per registry hyper-parameter (built from the registry, so a
#: model's hyper-parameters are declared in its entry only).
TrainConfig = create_model("TrainConfig", __base__=_TrainSettings, __module__=__name__, **registry.hyperparameters())


class EvaluateConfig(_Section):
    ks: list[Positive] = Field(default_factory=lambda: [5, 10, 20, 50], min_length=1,
                               description="cut-offs of Recall@k and NDCG@k")
    top_k: int = Field(20, ge=1, description="recommendations written per user")
    batch_users: int = Field(4096, ge=1)


class ReportConfig(_Section):
    tsne_items: int = Field(500, ge=10, description="items drawn for the t-SNE figures (Figures 5-6)")
    select_metric: str = Field("recall@20", pattern=r"^(recall|ndcg)@[1-9][0-9]*$",
                               description="validation metric that picks each table's run: recall@K or ndcg@K")
    seed: Seed = 0


class RetrainConfig(_Section):
    """Scheduled retraining (``sand retrain``, the ``sand-retrain`` deployment): promotion and publication."""

    metric: str = Field("recall@20", pattern=r"^(recall|ndcg)@[1-9][0-9]*$",
                        description="validation metric that decides promotion: recall@K | ndcg@K")
    max_drop: float = Field(0.05, ge=0, le=1, description="largest relative drop of the metric a challenger may "
                            "show against the champion and still be promoted")
    top_k: int = Field(20, ge=1, description="recommendations published per user")
    warm_start: bool = Field(False, description="initialise the challenger from the champion for the users and "
                             "items both know")
    warm_start_from: str | None = Field(None, pattern=r"^[0-9a-f]{16}$", description="train artifact key the train "
                                        "stage starts from; set by sand retrain when warm_start is on")


class PipelineConfig(_Section):
    data_root: Path = Field(default_factory=lambda: Path(os.environ.get("SAND_DATA_ROOT", "data")),
                            description="downloads, artifact store and caches live here (env SAND_DATA_ROOT)")
    seed: Seed | None = Field(None, description="when set, every stage's seed")
    acquire: AcquireConfig = Field(default_factory=AcquireConfig)
    interactions: InteractionsConfig = Field(default_factory=InteractionsConfig)
    text_features: TextFeaturesConfig = Field(default_factory=TextFeaturesConfig)
    image_features: ImageFeaturesConfig = Field(default_factory=ImageFeaturesConfig)
    graphs: GraphsConfig = Field(default_factory=GraphsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)

    def resolved(self) -> PipelineConfig:
        """A copy with the global seed pushed into every stage that draws random numbers."""
        if self.seed is None:
            return self
        data = self.model_dump()
        data["acquire"]["sample_seed"] = self.seed
        for section in ("interactions", "image_features", "train", "report"):
            data[section]["seed"] = self.seed
        return build_config(data)


@dataclass(frozen=True)
class FieldOption:
    """A ``sand`` option (``--data-root``) and :func:`sand.run` keyword (``data_root=``) setting one field."""

    field: str  #: the dotted config field it sets
    type: type  #: what the command line parses its value as: ``str``, ``int`` or ``Path``
    #: the help, or a function that gives it from a table that can grow (formats, models)
    help: str | Callable[[], str]

    def help_text(self) -> str:
        return self.help() if callable(self.help) else self.help


#: The options every stage-running command and ``sand.run`` take that set one config field each, by name: the CLI
#: contract. Any other field: ``--set section.field=value`` (``overrides={"section.field": value}``).
CLI_FIELDS: dict[str, FieldOption] = {
    "dataset": FieldOption("acquire.dataset", str, "sample | baby | sports | clothing | category name | PATH "
                           "(raw files or an MMRec folder)"),
    "format": FieldOption("acquire.format", str, formats.format_help),
    "data_root": FieldOption("data_root", Path, "downloads, artifacts and caches (default: ./data)"),
    "seed": FieldOption("seed", int, "seed for every random choice"),
    "model": FieldOption("train.model", str, registry.model_choices),
    "variant": FieldOption("train.variant", str, f"SAND variant: {' | '.join(registry.VARIANTS)}"),
    "epochs": FieldOption("train.epochs", int, "maximum training epochs"),
    "profile": FieldOption("train.profile", str, lambda: f"training profile: {' | '.join(registry.profile_choices())} "
                           f"(fast: {registry.FAST_PROFILE_SUMMARY}; docs/convergence.md)"),
    "device": FieldOption("train.device", str, f"training device: {DEVICE_CHOICES} (default: cuda when present)"),
    "precision": FieldOption("train.precision", str, "training compute precision: fp32 (default) | bf16 | auto "
                             "(bf16 where the hardware has it)"),
    "image_weights": FieldOption("image_features.weights", str, "CNN weights: imagenet | random | PATH to a state "
                                 "dict (default: imagenet; sample: random)"),
    "image_source": FieldOption("image_features.source", str, "image features: cnn (our CNN over the images; "
                                "default) | amazon2014 (the 2014 release's 4,096-d features, the paper's inputs; "
                                "default of paper grids on 2014 datasets)"),
}


def field_overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    """``CLI_FIELDS`` values by option name as the dotted overrides :func:`load_config` takes."""
    return {CLI_FIELDS[name].field: value for name, value in values.items()}


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    value = first.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    return f"invalid config value {field}={shown}: {msg}{more}"


def build_config(data: dict[str, Any]) -> PipelineConfig:
    """Validate a nested dict; errors become one ConfigError line naming the field."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating sections as needed."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"invalid config key {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """``section.field=value`` with the value parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"invalid --set {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None,
                assignments: list[str] | None = None) -> PipelineConfig:
    """YAML file (optional) + dotted overrides (CLI options) + ``--set`` assignments, validated once."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, dotted, value)
    for text in assignments or []:
        set_dotted(data, *parse_assignment(text))
    return build_config(data)
