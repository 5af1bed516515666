"""The ``sand`` command. Why typer with lazy imports: ``sand --help`` must answer instantly, so torch, transformers and
Prefect are imported inside the commands that need them. A command that runs stages is a dataclass of its options
inheriting :class:`Common`, whose config-field options come from the one table ``CLI_FIELDS`` (``sand.run``'s keywords
too); ``--set section.field=value`` or ``--config`` reach any other field. Fixable errors are one line, exit status 2;
values (devices, seeds, the data root) are checked before Prefect is imported; tracebacks go to the run's log file."""

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from typer.core import TyperCommand

from sand.flows import cli_logging
from sand.flows.cli_cache import cache_app
from sand.flows.cli_models import models_app, write_all_recommendations
from sand.flows.run_options import RunOptions
from sand.flows.server_lifetime import keep_children_with_this_process
from sand.flows.settings import apply_prefect_defaults
from sand.pipeline.base.config import CLI_FIELDS, PipelineConfig, field_overrides, load_config
from sand.pipeline.base.devices import check_devices
from sand.pipeline.base.errors import ConfigError, SandError, one_line
from sand.pipeline.base.store import ArtifactStore
from sand.pipeline.base.torch_env import apply_torch_env_defaults
from sand.pipeline.dataset.export import export_mmrec_folder
from sand.pipeline.experiments import grid as grids
from sand.pipeline.runner import PipelineResult, from_store, planned_stages
from sand.pipeline.serving.runs import champion_run
from sand.pipeline.stages import STAGE_NAMES, Context, check_stage_names
from sand.pipeline.training.model_io import check_extra_hyperparameters
from sand.pipeline.training.recommend import recommend_for_user

app = typer.Typer(help="SAND: raw Amazon reviews to a trained and evaluated multimodal recommender.",
                  add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
export_app = typer.Typer(help="Write datasets in other tools' formats.", no_args_is_help=True)
app.add_typer(export_app, name="export")
app.add_typer(models_app, name="models")
app.add_typer(cache_app, name="cache")

log = logging.getLogger("sand")

#: Printed on Ctrl-C: finished artifacts are complete and kept, so the same command resumes.
INTERRUPTED = "interrupted: rerun the same command to resume"
TERMINATED = "terminated: rerun the same command to resume"


def _shared(help: str, *flags: str) -> Any:
    return typer.Option(*flags, help=help, rich_help_panel="Shared options")


def _run_option_help(name: str) -> str:
    return RunOptions.model_fields[name].description or name


#: The options of :data:`~sand.pipeline.base.config.CLI_FIELDS` as dataclass fields: the table is their one declaration.
_FieldOptions = dataclasses.make_dataclass("_FieldOptions", [
    (name, Annotated[spec.type | None, _shared(spec.help_text())], dataclasses.field(default=None))
    for name, spec in CLI_FIELDS.items()
], frozen=True, kw_only=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Common(_FieldOptions):
    """The options of every command that runs stages, each declared once; a command's dataclass inherits them."""

    config: Annotated[Path | None, _shared("YAML file with config sections (see README)")] = None
    set: Annotated[list[str] | None, _shared("any config field: --set train.lr=0.001 (repeatable)")] = None
    refresh: Annotated[list[str] | None, _shared(_run_option_help("refresh") + " (repeatable)")] = None
    runner: Annotated[str, _shared(_run_option_help("runner"))] = RunOptions.model_fields["runner"].default
    dask_address: Annotated[str | None, _shared(_run_option_help("dask_address"))] = None
    json: Annotated[bool, _shared("print one JSON object on stdout", "--json")] = False
    quiet: Annotated[bool, _shared("warnings and errors only, no progress bars", "--quiet", "-q")] = False
    verbose: Annotated[bool, _shared("also debug lines and Prefect's flow-run lines", "--verbose", "-v")] = False

    @property
    def stages_to_refresh(self) -> list[str]:
        return list(self.refresh or [])

    def checked(self, *stages: str | None) -> tuple[PipelineConfig, RunOptions]:
        """Stage names first, from the stage table alone (a typo answers before the config is read)."""
        check_stage_names([*stages, *self.stages_to_refresh])
        return self.pipeline_config(), self.run_options()

    def pipeline_config(self) -> PipelineConfig:
        fields = {name: getattr(self, name) for name in CLI_FIELDS}
        return load_config(self.config, field_overrides(fields), self.set)

    def run_options(self) -> RunOptions:
        try:
            return RunOptions(refresh=self.stages_to_refresh, runner=self.runner, dask_address=self.dask_address,
                              progress=False if self.quiet else None)
        except ValueError as err:  # pydantic's ValidationError -> one line
            msg = err.errors()[0]["msg"] if hasattr(err, "errors") else str(err)
            raise ConfigError(f"invalid option: {msg.removeprefix('Value error, ')}") from None


class StageCommand(TyperCommand):
    """The click command of a :class:`Common` dataclass, which typer builds from the options: this calls it."""

    def invoke(self, ctx: typer.Context) -> Any:
        command = super().invoke(ctx)
        _set_verbosity(command.quiet, command.verbose)
        return command()


def stage_command(typer_app: typer.Typer, name: str, **settings: Any) -> Any:
    """Register a :class:`Common` subclass (made a frozen dataclass) as command ``name`` of ``typer_app``."""

    def register(cls: type[Common]) -> type[Common]:
        typer_app.command(name, cls=StageCommand, **settings)(dataclasses.dataclass(frozen=True, kw_only=True)(cls))
        return cls

    return register


def _set_verbosity(quiet: bool, verbose: bool) -> None:
    cli_logging.RUN_LOG.set_level(cli_logging.requested_level(quiet, verbose))


def _preflight(cfg: PipelineConfig, *, model_from_config: bool = True) -> None:
    """Checks that need no stage (devices, a data root writable or serving its cache read-only), then the log file.
    Grids: ``train.extra`` must suit each combination's model, checked when the grid expands, not the base config's."""
    check_devices(cfg)
    if model_from_config:
        check_extra_hyperparameters(cfg.train)
    writable = ArtifactStore(cfg.data_root).check_writable()
    cli_logging.RUN_LOG.open(cfg.data_root, writable)


#: The temporary Prefect API server this process started (see :func:`_prefect_api`).
_temporary_server: Any = None


def _prefect_api(required_by: str | None = None) -> None:
    """Give this command's flow runs a Prefect API: the configured server, checked, or a temporary one this process
    holds (Prefect stops it at exit; :func:`_exit_on_interrupt` on Ctrl-C and SIGTERM). ``required_by`` names a command
    that cannot use a temporary server (what it registers must outlive it)."""
    global _temporary_server
    from prefect.settings import Settings  # lazy: only commands with work to orchestrate need Prefect
    settings = Settings()  # read afresh: the environment may have changed since import
    url = settings.api.url
    start = "start one with `prefect server start`"
    if url:
        import httpx  # lazy: only to check a configured server; a tenth of a second off `sand --help`
        try:
            httpx.get(url.rstrip("/") + "/health", timeout=5.0).raise_for_status()
        except httpx.HTTPError as err:
            hint = start + ("" if required_by else ", or unset PREFECT_API_URL to run without a server")
            raise SandError(f"Prefect server at {url} is unreachable ({type(err).__name__}): {hint}") from None
    elif required_by:
        raise ConfigError(f"{required_by} needs a Prefect server: {start} and set PREFECT_API_URL=http://HOST:4200/api")
    elif settings.server.ephemeral.enabled:  # else Prefect itself says that it needs a server
        from prefect.server.api.server import SubprocessASGIServer  # lazy: Prefect, as above
        keep_children_with_this_process()  # the temporary server never outlives this process (SIGKILL too)
        _temporary_server = SubprocessASGIServer()  # no port: the one Prefect's client uses
        _temporary_server.start()


def render_summary(summary: dict[str, Any]) -> str:
    lines = []
    if "dataset" in summary:
        d = summary["dataset"]
        lines.append(f"dataset: {d.get('users')} users, {d.get('items')} items, {d.get('interactions')} interactions")
    lines.append(f"{'stage':<16}{'cached':<8}{'seconds':>9}  artifact")
    for stage, info in summary.get("stages", {}).items():
        lines.append(f"{stage:<16}{str(info['cached']):<8}{info['seconds']:>9.1f}  {info['artifact']}")
    train = summary.get("train") or {}
    if train.get("model"):
        seconds = float(train.get("seconds_per_epoch") or float("nan"))
        lines.append(f"train: {train['model']} in {train.get('precision', 'fp32')}, {seconds:.1f} s/epoch, "
                     f"best epoch {train.get('best_epoch')}")
    for split, values in summary.get("metrics", {}).items():
        lines.append(f"{split:<6} " + "  ".join(f"{k}={float(v):.4f}" for k, v in values.items()))
    if "export" in summary:
        lines.append(f"exported to {summary['export']['out']}: {', '.join(summary['export']['files'])}")
    return "\n".join(lines)


def _emit(summary: dict[str, Any], as_json: bool, text: str | None = None) -> None:
    """One JSON line, or for a person ``text`` (default: the rendered run summary)."""
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
    else:
        typer.echo(render_summary(summary) if text is None else text)


def _run_flow(common: Common, until: str | None, stage: str | None = None) -> PipelineResult:
    """Run the pipeline (up to ``until``) or one stage. A run whose every stage is in the store is answered by the
    runner without Prefect (nothing to orchestrate); any other runs as Prefect flows over the same runner loop."""
    cfg, options = common.checked(until, stage)
    from sand.pipeline.features.amazon2014_stage import check_feature_source  # lazy: httpx, via its downloader
    check_feature_source(cfg, [] if stage == "report" else planned_stages(cfg, stage or until))
    _preflight(cfg)
    served = from_store(Context.create(cfg, options.refresh, progress=False), until, stage)
    if served is not None:
        log.info("every stage is in the store (%s): answered without a Prefect run", ", ".join(served.outcomes))
        return served
    _prefect_api()
    from sand.flows.pipeline_flows import STAGE_FLOWS, outcome_from_ref, pipeline_flow  # lazy: imports Prefect
    if stage is None:
        return pipeline_flow(config=cfg, options=options, until=until)
    return PipelineResult({stage: outcome_from_ref(STAGE_FLOWS[stage](config=cfg, options=options))})


@stage_command(app, "run")
class Run(Common):
    """Run the whole pipeline (default: the bundled sample, offline); cached stages are reused."""

    until: Annotated[str | None, typer.Option(help=f"stop after this stage: {', '.join(STAGE_NAMES)}")] = None

    def __call__(self) -> None:
        _emit(_run_flow(self, self.until).summary(), self.json)


@stage_command(app, "stage")
class Stage(Common):
    """Run one stage (its inputs are reused from the store, or built first)."""

    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(STAGE_NAMES)}")]

    def __call__(self) -> None:
        _emit(_run_flow(self, None, stage=self.name).summary(), self.json)


@stage_command(export_app, "mmrec")
class ExportMMRec(Common):
    """Write an MMRec dataset folder: <name>.inter, id maps, features, user_graph_dict.npy and <name>.yaml."""

    out: Annotated[Path, typer.Option(help="folder to write")]
    until: Annotated[str, typer.Option(help="last stage to run before exporting")] = "image_features"

    def __call__(self) -> None:
        result = _run_flow(self, self.until)
        manifest = export_mmrec_folder(result.artifacts(), self.out)
        for warning in manifest["warnings"]:
            typer.echo(f"warning: {warning}", err=True)
        _emit({**result.summary(), "export": {"out": str(self.out), **manifest}}, self.json)


@stage_command(app, "recommend")
class Recommend(Common):
    """Print a user's top-K items (training items excluded), with titles where known; the champion by default."""

    user: Annotated[str | None, typer.Option(help="user id (raw reviewerID or 0-based index)")] = None
    k: Annotated[int, typer.Option("-k", "--k", help="how many items")] = 10
    all_users: Annotated[bool, typer.Option("--all", help="every user's top-K, written to --out as Parquet "
                                            "(user_id, rank, item_id, score)")] = False
    out: Annotated[Path | None, typer.Option(help="with --all: the Parquet file to write")] = None
    run_model: Annotated[bool, typer.Option("--run", help="use the run these options name, not the "
                                            "registered champion of the dataset and model")] = False

    def __call__(self) -> None:
        if self.all_users:
            summary = write_all_recommendations(_run_flow(self, "train").artifacts(), self.pipeline_config(),
                                                self.k, self.out)
            _emit(summary, self.json, f"wrote {summary['rows']} rows to {summary['out']}")
            return
        if self.user is None:
            raise ConfigError("sand recommend needs --user ID, or --all --out FILE")
        champion = None if self.run_model else champion_run(self.pipeline_config().resolved())
        tcfg, artifacts = champion[1:] if champion else (self.pipeline_config().resolved().train,
                                                         _run_flow(self, "train").artifacts())
        table = recommend_for_user(tcfg, artifacts, self.user, self.k)
        _emit({"user": self.user, "model_key": champion[0] if champion else artifacts["train"].key,
               "recommendations": table.to_dict(orient="records")}, self.json, table.to_string(index=False))


@stage_command(app, "retrain")
class Retrain(Common):
    """New data? Train a challenger, compare it with the champion, promote the better one, publish its top-K."""

    def __call__(self) -> None:
        cfg, options = self.checked()
        _preflight(cfg)
        from sand.pipeline.serving.retrain import survey  # lazy: httpx, via change detection
        report = None if self.stages_to_refresh else survey(cfg).unchanged()  # nothing new: no Prefect run
        if report is not None:
            summary = report.to_dict()
        else:
            _prefect_api()
            from sand.flows.retrain import retrain_flow  # lazy: imports Prefect
            summary = retrain_flow(config=cfg, options=options)
        _emit(summary, self.json, summary["message"])


@stage_command(app, "grid")
class Grid(Common):
    """Run a grid of settings; select by validation Recall@20, report its test metrics, write the report."""

    preset: Annotated[str | None, typer.Option(help=" | ".join(grids.PRESETS))] = None
    axis: Annotated[list[str] | None, typer.Option(
        help="field=v1,v2,... (repeatable), e.g. train.alpha=0.001,0.012")] = None
    name: Annotated[str | None, typer.Option(help="grid name (folder under <data-root>/grids)")] = None

    def __call__(self) -> None:
        check_stage_names(self.stages_to_refresh)
        axes: dict[str, list[Any]] = grids.preset(self.preset) if self.preset is not None else {}
        for text in self.axis or []:
            field, eq, raw = text.partition("=")
            values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
            if not eq or not values:
                raise ConfigError(f"invalid --axis {text!r}: " + ("no values" if eq else "expected field=v1,v2,..."))
            axes[field.strip()] = values
        if not axes:
            raise ConfigError("sand grid needs --preset NAME or at least one --axis field=v1,v2")
        cfg = grids.with_paper_inputs(self.pipeline_config(), self.preset)
        options = self.run_options()
        grids.expand_grid(cfg, axes)  # every combination valid, its model's hyper-parameters included
        _preflight(cfg, model_from_config=False)
        _prefect_api()
        from sand.flows.pipeline_flows import grid_flow  # lazy: imports Prefect
        summary = grid_flow(config=cfg, axes=axes, name=self.name or self.preset or "grid", options=options)
        _emit(summary, self.json, json.dumps(summary, indent=2, default=str))


@stage_command(app, "report")
class Report(Common):
    """Tables (paper layouts) and figures from every evaluated run in the data root."""

    out: Annotated[Path | None, typer.Option(help="also copy the tables and figures here")] = None

    def __call__(self) -> None:
        summary = _run_flow(self, None, stage="report").summary()
        if self.out is not None:
            shutil.copytree(summary["report"], self.out, dirs_exist_ok=True)
            summary["report"] = str(self.out)
        _emit(summary, self.json, f"report written to {summary['report']}")


@app.command()
def serve(
    cron: Annotated[str | None, typer.Option(help="retraining schedule (default: weekly, Sunday 03:00)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config the deployments default to")] = None,
    dataset: Annotated[str | None, typer.Option(help="dataset the deployments default to")] = None,
    data_root: Annotated[Path | None, typer.Option(help="data root the deployments default to")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="warnings and errors only")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also debug lines")] = False,
) -> None:
    """Register deployments (end-to-end and each stage) with a schedule and serve them."""
    _set_verbosity(quiet, verbose)
    cfg = load_config(config, field_overrides({"dataset": dataset, "data_root": data_root}))
    _preflight(cfg)
    _prefect_api()
    from sand.flows.serve import serve_deployments  # lazy: imports Prefect
    serve_deployments(cfg, cron)


@stage_command(app, "deploy", help="Register the deployments of `sand serve` with a Prefect work pool, then "
               "exit; the pool's workers run them.")
class Deploy(Common):
    """Why not `sand serve --work-pool`: serving runs the flows until stopped, deploying registers them and returns; a
    flag that made a long-running command exit at once would surprise. Every run and config option becomes the
    deployments' default parameters; nothing is checked against this machine's devices or data root (workers run)."""

    work_pool: Annotated[str, typer.Option(help="existing Prefect work pool whose workers run the flows")]
    cron: Annotated[str | None, typer.Option(help="retraining schedule (default: weekly, Sunday 03:00)")] = None

    def __call__(self) -> None:
        cfg, options = self.checked()
        _prefect_api(required_by="sand deploy")
        from sand.flows.serve import deploy_to_work_pool  # lazy: imports Prefect
        summary = deploy_to_work_pool(cfg, self.work_pool, self.cron, options)
        _emit(summary, self.json, _deployed_text(summary, options))


def _deployed_text(summary: dict[str, Any], options: RunOptions) -> str:
    pool = summary["work_pool"]
    lines = [f"registered {len(summary['deployments'])} deployments with work pool {pool!r} "
             f"({summary['work_pool_type']}; runner {options.runner}"
             + (f" at {options.dask_address}" if options.dask_address else "")
             + f"; data root {summary['data_root']}):"]
    lines += [f"  {d['name']}" + (f"  (cron {d['cron']})" if d["cron"] else "") for d in summary["deployments"]]
    if not summary["workers_online"]:
        lines.append(f"no worker polls {pool!r} yet: start one with `prefect worker start --pool {pool}`")
    return "\n".join(lines)


def _is_out_of_memory(err: BaseException) -> bool:
    """MemoryError (numpy), torch.cuda.OutOfMemoryError, or torch's CPU allocator failing."""
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


#: What ``sand`` prints for an out-of-memory failure (exit 2: the user can size the run down).
OUT_OF_MEMORY_HINT = (
    "out of memory: reduce train.batch_size, evaluate.batch_users, image_features.batch_size, text_features.batch_size "
    "or graphs.block_size (--set section.field=N), or use a machine with more memory")


def _fail(message: str, exit_code: int, err: BaseException, always_log: bool) -> None:
    """Exactly one line on stderr, naming the log file with the traceback."""
    run_log = cli_logging.RUN_LOG
    first = one_line(message, limit=None) or type(err).__name__
    path = run_log.record_exception(err) if always_log or run_log.path is not None else None
    typer.echo(f"error: {first}" + (f" (details: {path})" if path else ""), err=True)
    raise SystemExit(exit_code) from None


def _exit_on_interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C (or SIGTERM): one line, stop Prefect's temporary server, exit 130 (143) at once. Why not let
    ``KeyboardInterrupt`` unwind: the interpreter joins the shard worker threads at exit (minutes for an image shard),
    and Ctrl-C also reaches Prefect's temporary server (same process group), so every state update while unwinding
    fails. Leaving now is safe: artifacts are written atomically and the OS releases the store's locks."""
    global _temporary_server
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # e.g. the signal arrived while this thread was writing to it
            stream.flush()
    # Other threads may write until the process ends: to nowhere now, so our line (on a private copy) stays the last.
    stderr_fd = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    bars = getattr(sys.modules.get("tqdm.std"), "tqdm", None)
    after_bar = "\n" if bars is not None and len(getattr(bars, "_instances", ())) else ""  # a bar ends mid-line
    os.write(stderr_fd, (after_bar + (INTERRUPTED if signum == signal.SIGINT else TERMINATED) + "\n").encode())
    server, _temporary_server = _temporary_server, None  # None first: a second signal must not stop it again
    if server is not None:
        server.stop()  # Prefect's: SIGTERM, then SIGKILL after 5 s
    os._exit(128 + signum)


def main() -> None:
    """Console entry point: every failure is one line on stderr; fixable ones exit with status 2."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if saved[signal.SIGINT] is signal.default_int_handler:  # not when started with SIGINT ignored
        signal.signal(signal.SIGINT, _exit_on_interrupt)
    if saved[signal.SIGTERM] == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_interrupt)
    try:
        _main()
    finally:  # called in-process (tests, notebooks): leave the caller's handlers as they were
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _main() -> None:
    cli_logging.RUN_LOG.install()
    apply_prefect_defaults()
    apply_torch_env_defaults()  # before any command imports torch
    try:
        app()
    except SandError as err:
        _fail(str(err), err.exit_code, err, always_log=False)
    except Exception as err:
        if _is_out_of_memory(err):
            _fail(OUT_OF_MEMORY_HINT, 2, err, always_log=True)
        _fail(f"unexpected {type(err).__name__}: {err} (a bug: please report it with the log file)", 1, err,
              always_log=True)
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED, err=True)
        raise SystemExit(130) from None
    except SystemExit as done:
        if done.code == 130:  # typer turns Ctrl-C into a silent exit 130 before we could catch it
            typer.echo(INTERRUPTED, err=True)
        raise


if __name__ == "__main__":
    main()
