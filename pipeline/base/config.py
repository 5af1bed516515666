"""Validated configuration: one pydantic model per stage and one for the pipeline.

Why pydantic: the same models validate YAML files, CLI options and the Prefect
UI's parameter forms, and a wrong value is rejected with the field's dotted
name (``train.lr``) instead of failing deep inside a stage. Every CLI option is
a field here (see ``CLI_FIELDS``), and ``--set section.field=value`` reaches
any other field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from sand.models import registry
from sand.pipeline.base import formats
from sand.pipeline.base.devices import DEVICE_CHOICES, validate_device_name
from sand.pipeline.base.errors import ConfigError


def _enum_of(names: Any) -> Any:
    """A JSON-schema hook listing ``names()`` as the field's choices (the Prefect UI's drop-down)."""
    return lambda schema: schema.update(enum=list(names()))


#: A format of the format table (``pipeline/base/formats.py``), checked when validated, so the
#: table is the only list of formats.
DatasetFormat = Annotated[
    str, AfterValidator(formats.check_format_name), Field(json_schema_extra=_enum_of(formats.format_names))
]
#: A model of the registry (``models/registry.py``), checked when validated: the only list of models.
ModelName = Annotated[
    str, AfterValidator(registry.check_model_name), Field(json_schema_extra=_enum_of(registry.model_names))
]
#: "default" or a hyper-parameter profile some registry entry defines.
ProfileName = Annotated[
    str, AfterValidator(registry.check_profile_name), Field(json_schema_extra=_enum_of(registry.profile_choices))
]
Variant = Literal["a", "b", "c", "d", "no-align", "no-distance", "no-align-no-distance"]
#: Every seed: numpy's SeedSequence and torch.manual_seed both take 0 <= seed < 2**32 everywhere.
Seed = Annotated[int, Field(ge=0, lt=2**32, description="seed: 0 <= seed < 2**32")]
#: A compute device, spelled as torch spells it; whether it exists here is checked before a run.
Device = Annotated[str | None, AfterValidator(validate_device_name), Field(description=DEVICE_CHOICES)]


class _Section(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AcquireConfig(_Section):
    dataset: str = Field("sample", description="sample | baby | sports | clothing | category name | PATH")
    format: DatasetFormat | None = Field(None, description="raw format; sniffed or implied by the preset")
    reviews: str | None = Field(None, description="explicit reviews URL or path (overrides the preset)")
    meta: str | None = Field(None, description="explicit metadata URL or path (overrides the preset)")
    timeout: float = Field(60.0, gt=0, description="seconds per HTTP request")
    retries: int = Field(5, ge=0, le=20)
    sample_seed: Seed = Field(0, description="seed of the bundled sample generator")
    sample_users: int = Field(1000, ge=20)
    sample_items: int = Field(500, ge=20)


class InteractionsConfig(_Section):
    k_core: int = Field(5, ge=1, description="iterative k-core threshold for users and items")
    split: Literal["mmrec", "mmrec-notebook", "chronological"] = "mmrec"
    seed: Seed = 0
    max_bad_lines: int = Field(1000, ge=0, description="dirty lines skipped (and reported) before failing")
    max_line_bytes: int = Field(
        4 << 20, ge=1024, le=1 << 30,
        description="longest raw line read; longer ones are dirty lines, dropped without being held in memory",
    )


class TextFeaturesConfig(_Section):
    model: str = Field("all-MiniLM-L6-v2", description="sentence-transformers model name or local path")
    batch_size: int = Field(64, ge=1)
    device: Device = None
    shard_size: int = Field(
        16384, ge=1, description="unique texts per shard job (rounded up to whole groups of batch_size x 32)"
    )
    threads: int | None = Field(
        None, ge=1, description="torch threads per shard (pinned so bytes do not depend on the runner); "
        "default: the orchestrating process's torch thread count",
    )


class ImageFeaturesConfig(_Section):
    source: Literal["cnn", "amazon2014"] = Field(
        "cnn", description="cnn: our CNN over the item images | amazon2014: the 4,096-d features the Amazon "
        "2014 release ships per category (the SAND paper's and MMRec's inputs)",
    )
    amazon2014_url: str | None = Field(
        None, description="URL or path of image_features_<Category>.b (default: derived from a 2014 dataset)"
    )
    backbone: Literal["resnet50", "resnet18", "vgg16"] | None = Field(
        None, description="CNN; default resnet50 (resnet18 for the bundled sample)"
    )
    weights: str = Field("auto", description="imagenet | random | PATH | auto (sample: random, else imagenet)")
    image_size: int | None = Field(None, ge=32, le=1024, description="crop size; default 224 (64 for sample)")
    batch_size: int = Field(32, ge=1)
    num_workers: int | None = Field(
        None, ge=0, description="image decode threads per shard (0: decode in the shard thread; default: the "
        "machine's cores, decoding ahead of the forward pass)",
    )
    concurrency: int = Field(16, ge=1, le=256)
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(3, ge=0, le=10)
    max_bytes: int = Field(10_000_000, ge=1024, description="largest image file or body read, in bytes")
    max_pixels: int = Field(
        40_000_000, ge=1024, description="largest image decoded (width x height, from its header); also the "
        "pixels decoded at once per process"
    )
    allow_hosts: list[str] = Field(
        default_factory=list, description="host or host:port that image URLs from downloaded metadata may "
        "reach although private (an internal mirror); local metadata may reach any host"
    )
    min_side: int = Field(32, ge=1)
    fill: Literal["mean", "zeros"] = "mean"
    shard_size: int = Field(1024, ge=1)
    seed: Seed = 0
    device: Device = None
    engine: Literal["eager", "fast"] = Field(
        "fast", description="fast: channels-last, batch norms folded into a frozen graph (~2x on a CPU; "
        "features within 1e-4 of eager) | eager: the module as torchvision defines it",
    )
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "auto", description="CNN compute precision; auto: bf16 where the hardware multiplies it natively "
        "(AMX/AVX512-BF16 CPUs, CUDA GPUs with bf16), else fp32",
    )


class GraphsConfig(_Section):
    k: int = Field(10, ge=1, description="neighbours per item in the kNN item-item graphs")
    include_self: bool = True
    block_size: int | None = Field(None, ge=1)
    method: Literal["exact", "faiss", "auto"] = Field(
        "auto", description="exact blocked top-k | faiss IVF index | auto (exact up to auto_threshold items "
        "or on a CUDA GPU, else faiss)",
    )
    auto_threshold: int = Field(100_000, ge=1, description="auto: catalogue size above which CPU runs use faiss")
    nlist: int | None = Field(None, ge=1, description="faiss clusters (default about 2 sqrt(N))")
    nprobe: int | None = Field(None, ge=1, description="faiss clusters searched (default: tuned to target_recall)")
    target_recall: float = Field(0.95, gt=0, le=1, description="faiss: recall@k the nprobe tuning aims for")
    recall_sample: int = Field(1000, ge=2, description="faiss: rows whose exact neighbours measure recall")
    faiss_storage: Literal["float32", "float16"] = Field(
        "float32", description="faiss: how the index stores the vectors (float16: half the memory, N x d x 2 "
        "bytes, e.g. 8 GB instead of 16 GB at 1M x 4096; recall is measured either way)",
    )
    seed: int = 0


#: Early-stopping patience per dataset where the SAND authors' logs differ from 20 (Clothing: 30).
DATASET_PATIENCE = {"clothing": 30}
DEFAULT_PATIENCE = 20


class TrainConfig(_Section):
    model: ModelName = "sand"
    variant: Variant = "a"
    epochs: int = Field(1000, ge=1)
    batch_size: int = Field(2048, ge=1)
    lr: float | None = Field(None, gt=0, description="default: the model's published value")
    weight_decay: float = Field(0.0, ge=0)
    patience: int | None = Field(
        None, ge=1, description="evaluations without improvement before stopping; default 20 (clothing: 30)"
    )
    early_stop: Literal["mmrec", "strict"] = Field(
        "mmrec",
        description="mmrec: metric rounded to 4 decimals, stop after MORE than patience bad evaluations; "
        "strict: unrounded, stop after patience",
    )
    eval_every: int = Field(1, ge=1)
    seed: Seed = 0
    device: Device = None
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32",
        description="compute precision of the big products with the raw features: fp32 (the faithful "
        "reference) | bf16 | auto (bf16 on CUDA with bf16 and on CPUs with AMX-BF16/AVX512-BF16)",
    )
    profile: ProfileName = Field(
        "default", description="authors: the SAND authors' plug-in hyper-parameters (VBPR+SAND, FREEDOM+SAND)"
    )
    embedding_dim: int = Field(64, ge=1)
    alpha: float | None = Field(None, ge=0, description="alignment weight (SAND default 0.012)")
    beta: float | None = Field(None, ge=0, description="distancing weight (SAND default 0.006)")
    tau: float | None = Field(None, gt=0, description="alignment temperature (SAND default 0.2)")
    club_steps: int | None = Field(None, ge=0)
    mm_image_weight: float | None = Field(None, ge=0, le=1)
    reg_weight: float | None = Field(None, ge=0)
    n_layers: int | None = Field(None, ge=0, le=8)
    solosim_scope: Literal["auto", "all", "batch"] | None = Field(
        None, description="items SoloSim runs over (auto: all up to 20,000 items, else the batch's)"
    )
    distance_scope: Literal["auto", "all", "batch"] | None = Field(
        None, description="items the distancing term and the CLUB fit run over (auto: all up to 1,000,000 items)"
    )
    l2_form: Literal["neg-mse", "neg-log", "margin"] | None = None
    plugin_fusion: Literal["auxiliary", "scoring"] = Field(
        "auxiliary", description="plug-ins: SAND terms on the auxiliary modal features, or fused into the scores"
    )
    head_dims: list[int] | None = Field(None, min_length=1, description="plug-ins: projection head widths")
    club_fit_order: Literal["before", "after"] | None = Field(
        None, description="CLUB fit on the batch's pairs before its bound (default) or after (the authors' order)"
    )
    extra: dict[str, float | int | str | bool] = Field(default_factory=dict, description="other model kwargs")

    #: Named hyper-parameters: applied to the models that take them, ignored by the others (so one
    #: config serves a whole Table-2 grid). Keys of ``extra`` must be taken by the model.
    NAMED_HYPERPARAMETERS: ClassVar[tuple[str, ...]] = (
        "embedding_dim", "alpha", "beta", "tau", "club_steps", "mm_image_weight", "reg_weight",
        "n_layers", "solosim_scope", "distance_scope", "l2_form", "plugin_fusion", "head_dims",
        "club_fit_order",
    )
    #: Named hyper-parameters with a value by default: a grid may set them for every model.
    ALWAYS_SET: ClassVar[tuple[str, ...]] = ("plugin_fusion",)

    def model_kwargs(self, accepted: set[str] | None = None) -> dict[str, Any]:
        """Hyper-parameters the user set explicitly; the model's defaults fill the rest.

        With ``accepted`` (the model's hyper-parameter names), named fields the model does
        not take are left out; ``extra`` always passes through, so a typo there is an error.
        """
        kwargs = {
            name: getattr(self, name)
            for name in self.NAMED_HYPERPARAMETERS
            if getattr(self, name) is not None and (accepted is None or name in accepted)
        }
        kwargs.update(self.extra)
        return kwargs

    def resolved_patience(self, dataset: str) -> int:
        """``patience``, or the authors' value for ``dataset`` (a preset name or a folder named so)."""
        if self.patience is not None:
            return self.patience
        return DATASET_PATIENCE.get(Path(str(dataset)).name.lower(), DEFAULT_PATIENCE)


class EvaluateConfig(_Section):
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20, 50])
    top_k: int = Field(20, ge=1, description="recommendations written per user")
    batch_users: int = Field(4096, ge=1)


class ReportConfig(_Section):
    tsne_items: int = Field(500, ge=10, description="items drawn for the t-SNE figures (Figures 5-6)")
    select_metric: str = Field("recall@20", description="validation metric that picks each table's run")
    seed: Seed = 0


class PipelineConfig(_Section):
    data_root: Path = Field(
        default_factory=lambda: Path(os.environ.get("SAND_DATA_ROOT", "data")),
        description="downloads, artifact store and caches live here (env SAND_DATA_ROOT)",
    )
    seed: Seed | None = Field(None, description="when set, every stage's seed")
    acquire: AcquireConfig = Field(default_factory=AcquireConfig)
    interactions: InteractionsConfig = Field(default_factory=InteractionsConfig)
    text_features: TextFeaturesConfig = Field(default_factory=TextFeaturesConfig)
    image_features: ImageFeaturesConfig = Field(default_factory=ImageFeaturesConfig)
    graphs: GraphsConfig = Field(default_factory=GraphsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    def resolved(self) -> PipelineConfig:
        """A copy with the global seed pushed into every stage that draws random numbers."""
        if self.seed is None:
            return self
        data = self.model_dump()
        data["acquire"]["sample_seed"] = self.seed
        for section in ("interactions", "image_features", "train", "report"):
            data[section]["seed"] = self.seed
        return build_config(data)


#: CLI option -> dotted config field (the CLI contract of ``sand run`` / ``sand stage``).
CLI_FIELDS = {
    "dataset": "acquire.dataset",
    "format": "acquire.format",
    "data_root": "data_root",
    "seed": "seed",
    "model": "train.model",
    "variant": "train.variant",
    "epochs": "train.epochs",
    "device": "train.device",
    "precision": "train.precision",
    "image_weights": "image_features.weights",
    "image_source": "image_features.source",
}


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
    import yaml

    if "=" not in text:
        raise ConfigError(f"invalid --set {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    path: Path | None = None, overrides: dict[str, Any] | None = None, assignments: list[str] | None = None
) -> PipelineConfig:
    """YAML file (optional) + dotted overrides (CLI options) + ``--set`` assignments, validated once."""
    data: dict[str, Any] = {}
    if path is not None:
        import yaml

        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
        data = loaded
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, dotted, value)
    for text in assignments or []:
        set_dotted(data, *parse_assignment(text))
    return build_config(data)
