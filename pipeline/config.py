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
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sand.pipeline.errors import ConfigError

STAGES = ("acquire", "interactions", "text_features", "image_features", "graphs", "train", "evaluate", "report")
DatasetFormat = Literal["amazon2014", "amazon2018", "amazon2023", "mmrec", "sample"]
ModelName = Literal["sand", "bpr", "lightgcn", "vbpr", "freedom", "vbpr-sand", "freedom-sand"]
Variant = Literal["a", "b", "c", "d", "no-align", "no-distance", "no-align-no-distance"]


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
    sample_seed: int = Field(0, description="seed of the bundled sample generator")
    sample_users: int = Field(1000, ge=20)
    sample_items: int = Field(500, ge=20)


class InteractionsConfig(_Section):
    k_core: int = Field(5, ge=1, description="iterative k-core threshold for users and items")
    split: Literal["mmrec", "mmrec-notebook", "chronological"] = "mmrec"
    seed: int = 0
    max_bad_lines: int = Field(1000, ge=0, description="dirty lines skipped (and reported) before failing")
    max_line_bytes: int = Field(
        4 << 20, ge=1024, le=1 << 30,
        description="longest raw line read; longer ones are dirty lines, dropped without being held in memory",
    )


class TextFeaturesConfig(_Section):
    model: str = Field("all-MiniLM-L6-v2", description="sentence-transformers model name or local path")
    batch_size: int = Field(64, ge=1)
    device: str | None = None


class ImageFeaturesConfig(_Section):
    backbone: Literal["resnet50", "resnet18", "vgg16"] | None = Field(
        None, description="CNN; default resnet50 (resnet18 for the bundled sample)"
    )
    weights: str = Field("auto", description="imagenet | random | PATH | auto (sample: random, else imagenet)")
    image_size: int | None = Field(None, ge=32, le=1024, description="crop size; default 224 (64 for sample)")
    batch_size: int = Field(32, ge=1)
    num_workers: int = Field(2, ge=0)
    concurrency: int = Field(16, ge=1, le=256)
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(3, ge=0, le=10)
    max_bytes: int = Field(10_000_000, ge=1024)
    min_side: int = Field(32, ge=1)
    fill: Literal["mean", "zeros"] = "mean"
    shard_size: int = Field(1024, ge=1)
    seed: int = 0
    device: str | None = None


class GraphsConfig(_Section):
    k: int = Field(10, ge=1, description="neighbours per item in the kNN item-item graphs")
    include_self: bool = True
    block_size: int | None = Field(None, ge=1)


class TrainConfig(_Section):
    model: ModelName = "sand"
    variant: Variant = "a"
    epochs: int = Field(1000, ge=1)
    batch_size: int = Field(2048, ge=1)
    lr: float | None = Field(None, gt=0, description="default: the model's published value")
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(20, ge=1)
    eval_every: int = Field(1, ge=1)
    seed: int = 0
    device: str | None = None
    embedding_dim: int = Field(64, ge=1)
    alpha: float | None = Field(None, ge=0, description="alignment weight (SAND default 0.012)")
    beta: float | None = Field(None, ge=0, description="distancing weight (SAND default 0.006)")
    tau: float | None = Field(None, gt=0, description="alignment temperature (SAND default 0.2)")
    club_steps: int | None = Field(None, ge=0)
    mm_image_weight: float | None = Field(None, ge=0, le=1)
    reg_weight: float | None = Field(None, ge=0)
    n_layers: int | None = Field(None, ge=0, le=8)
    solosim_scope: Literal["auto", "all", "batch"] | None = None
    l2_form: Literal["neg-mse", "neg-log", "margin"] | None = None
    extra: dict[str, float | int | str | bool] = Field(default_factory=dict, description="other model kwargs")

    #: Named hyper-parameters: applied to the models that take them, ignored by the others (so one
    #: config serves a whole Table-2 grid). Keys of ``extra`` must be taken by the model.
    NAMED_HYPERPARAMETERS: ClassVar[tuple[str, ...]] = (
        "embedding_dim", "alpha", "beta", "tau", "club_steps", "mm_image_weight", "reg_weight",
        "n_layers", "solosim_scope", "l2_form",
    )

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


class EvaluateConfig(_Section):
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20, 50])
    top_k: int = Field(20, ge=1, description="recommendations written per user")
    batch_users: int = Field(4096, ge=1)


class ReportConfig(_Section):
    tsne_items: int = Field(500, ge=10, description="items drawn for the t-SNE figures (Figures 5-6)")
    select_metric: str = Field("recall@20", description="validation metric that picks each table's run")
    seed: int = 0


class PipelineConfig(_Section):
    data_root: Path = Field(
        default_factory=lambda: Path(os.environ.get("SAND_DATA_ROOT", "data")),
        description="downloads, artifact store and caches live here (env SAND_DATA_ROOT)",
    )
    seed: int | None = Field(None, description="when set, every stage's seed")
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
    "image_weights": "image_features.weights",
}


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    value = first.get("input")
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"invalid config value {field}={shown}: {first['msg']}{more}"


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
