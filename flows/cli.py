"""The ``sand`` command.

Why typer with lazy imports: ``sand --help`` must answer instantly, so torch,
transformers and Prefect are imported inside the commands that need them.
Every option maps to a config field (``pipeline.base.config.CLI_FIELDS``); any
other field is reachable with ``--set section.field=value`` or ``--config``.
Errors a user can fix are printed as one line and exit with status 2; values
(devices, seeds, the data root) are checked before Prefect is imported, and
tracebacks go to the run's log file, which the error line names.
"""

import contextlib
import functools
import inspect
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from sand.flows.cli_cache import cache_app
from sand.models.registry import model_choices
from sand.pipeline.base.config import CLI_FIELDS
from sand.pipeline.base.errors import ConfigError, SandError, one_line
from sand.pipeline.base.formats import format_help
from sand.pipeline.stages import STAGE_NAMES, check_stage_names

# Prefect (and our modules that need them): imported inside the functions that use them,
# so importing this module (and `sand --help`) stays fast.

app = typer.Typer(
    help="SAND: raw Amazon reviews to a trained and evaluated multimodal recommender.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
)
export_app = typer.Typer(help="Write datasets in other tools' formats.", no_args_is_help=True)
app.add_typer(export_app, name="export")
app.add_typer(cache_app, name="cache")

log = logging.getLogger("sand")

#: Printed on Ctrl-C: finished artifacts are complete and kept, so the same command resumes.
INTERRUPTED = "interrupted: rerun the same command to resume"
TERMINATED = "terminated: rerun the same command to resume"


@dataclass
class Common:
    """Options shared by every command that runs stages."""

    dataset: str | None
    format: str | None
    data_root: Path | None
    config: Path | None
    seed: int | None
    model: str | None
    variant: str | None
    epochs: int | None
    device: str | None
    precision: str | None
    image_weights: str | None
    image_source: str | None
    set: list[str]
    refresh: list[str]
    runner: str
    dask_address: str | None
    json: bool
    quiet: bool
    verbose: bool

    def pipeline_config(self):
        from sand.pipeline.base.config import load_config

        overrides = {field: getattr(self, opt) for opt, field in CLI_FIELDS.items() if hasattr(self, opt)}
        if overrides.get("data_root") is not None:
            overrides["data_root"] = str(overrides["data_root"])
        return load_config(self.config, overrides, self.set)

    def run_options(self):
        from sand.flows.pipeline_flows import RunOptions

        try:
            return RunOptions(refresh=self.refresh, runner=self.runner, dask_address=self.dask_address,
                              progress=False if self.quiet else None)
        except Exception as err:  # pydantic ValidationError -> one line
            msg = err.errors()[0]["msg"] if hasattr(err, "errors") else str(err)
            raise ConfigError(f"invalid option: {msg.removeprefix('Value error, ')}") from None


_P = inspect.Parameter
_COMMON_PARAMS = [
    _P("dataset", _P.KEYWORD_ONLY, default=None, annotation=Annotated[str | None, typer.Option(
        help="sample | baby | sports | clothing | category name | PATH (raw files or an MMRec folder)")]),
    _P("format", _P.KEYWORD_ONLY, default=None, annotation=Annotated[str | None, typer.Option(
        "--format", help=format_help())]),
    _P("data_root", _P.KEYWORD_ONLY, default=None, annotation=Annotated[Path | None, typer.Option(
        help="downloads, artifacts and caches (default: ./data)")]),
    _P("config", _P.KEYWORD_ONLY, default=None, annotation=Annotated[Path | None, typer.Option(
        help="YAML file with config sections (see README)")]),
    _P("seed", _P.KEYWORD_ONLY, default=None, annotation=Annotated[int | None, typer.Option(
        help="seed for every random choice")]),
    _P("model", _P.KEYWORD_ONLY, default=None, annotation=Annotated[str | None, typer.Option(
        help=model_choices())]),
    _P("variant", _P.KEYWORD_ONLY, default=None, annotation=Annotated[str | None, typer.Option(
        help="SAND variant: a | b | c | d | no-align | no-distance | no-align-no-distance")]),
    _P("epochs", _P.KEYWORD_ONLY, default=None, annotation=Annotated[int | None, typer.Option(
        help="maximum training epochs")]),
    _P("device", _P.KEYWORD_ONLY, default=None, annotation=Annotated[str | None, typer.Option(
        help="training device: cpu | cuda | cuda:N | mps (default: cuda when present)")]),
    _P("precision", _P.KEYWORD_ONLY, default=None, annotation=Annotated[str | None, typer.Option(
        help="training compute precision: fp32 (default) | bf16 | auto (bf16 where the hardware has it)")]),
    _P("image_weights", _P.KEYWORD_ONLY, default=None, annotation=Annotated[str | None, typer.Option(
        help="CNN weights: imagenet | random | PATH to a state dict (default: imagenet; sample: random)")]),
    _P("image_source", _P.KEYWORD_ONLY, default=None, annotation=Annotated[str | None, typer.Option(
        help="image features: cnn (our CNN over the images; default) | amazon2014 (the 2014 release's "
        "4,096-d features, the paper's inputs; default of paper grids on 2014 datasets)")]),
    _P("set", _P.KEYWORD_ONLY, default=[], annotation=Annotated[list[str], typer.Option(
        "--set", help="any config field: --set train.lr=0.001 (repeatable)")]),
    _P("refresh", _P.KEYWORD_ONLY, default=[], annotation=Annotated[list[str], typer.Option(
        "--refresh", help="rebuild this stage even if cached (repeatable)")]),
    _P("runner", _P.KEYWORD_ONLY, default="threads", annotation=Annotated[str, typer.Option(
        help="task runner for image and text shards: threads | processes | dask")]),
    _P("dask_address", _P.KEYWORD_ONLY, default=None, annotation=Annotated[str | None, typer.Option(
        help="tcp://host:port of an existing Dask scheduler (with --runner dask)")]),
    _P("json", _P.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--json", help="print one JSON object on stdout")]),
    _P("quiet", _P.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--quiet", "-q", help="warnings and errors only, no progress bars")]),
    _P("verbose", _P.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--verbose", "-v", help="also debug lines and Prefect's flow-run lines")]),
]
_COMMON_NAMES = [p.name for p in _COMMON_PARAMS]


def with_common_options(fn):
    """Give a command the shared options; it receives them as ``common: Common``."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.name != "common"]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any):
        common = Common(**{name: kwargs.pop(name) for name in _COMMON_NAMES})
        _set_verbosity(common.quiet, common.verbose)
        return fn(common=common, **kwargs)

    wrapper.__signature__ = inspect.Signature(own + _COMMON_PARAMS)
    return wrapper


def _setup_logging() -> None:
    from sand.flows.cli_logging import RUN_LOG

    RUN_LOG.install()


def _set_verbosity(quiet: bool, verbose: bool) -> None:
    from sand.flows.cli_logging import RUN_LOG, requested_level

    RUN_LOG.set_level(requested_level(quiet, verbose))


def _preflight(cfg) -> None:
    """Checks that need no stage: devices exist here, the data root can be written (or serves
    its cached artifacts read-only); then this run's log file opens under the data root."""
    from sand.flows.cli_logging import RUN_LOG
    from sand.pipeline.base.devices import check_devices
    from sand.pipeline.base.store import ArtifactStore

    check_devices(cfg)
    writable = ArtifactStore(cfg.data_root).check_writable()
    RUN_LOG.open(cfg.data_root, writable)


def _check_prefect_server(required_by: str | None = None) -> None:
    """Fail early, in one line, when a configured Prefect server cannot be reached.

    ``required_by`` names a command that cannot use Prefect's temporary server (what it
    registers must outlive it): for it, no configured server is an error too.
    """
    from prefect.settings import Settings

    url = Settings().api.url  # read afresh: the environment may have changed since import
    if not url and not required_by:
        return
    start = "start one with `prefect server start`"
    if not url:
        raise ConfigError(f"{required_by} needs a Prefect server: {start} and set PREFECT_API_URL=http://HOST:4200/api")
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=5.0).raise_for_status()
    except httpx.HTTPError as err:
        fallback = "" if required_by else ", or unset PREFECT_API_URL to run without a server"
        raise SandError(f"Prefect server at {url} is unreachable ({type(err).__name__}): {start}{fallback}") from None


def _emit(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
        return
    from sand.flows.report_text import render_summary

    typer.echo(render_summary(summary))


def _served_from_store(cfg: Any, until: str | None, stage: str | None, common: Common):
    """The PipelineResult of a run whose every stage is already in the store, else None.

    Why: a fully cached run has nothing to orchestrate, and starting Prefect's temporary
    API server and one flow run per stage costs most of a warm run (about 45 s of 48 s
    on a Baby-sized dataset). Stages are looked up in-process, in the same order and
    with the same keys as the flows; the first one missing hands the run to Prefect.
    No flow run is recorded for a run answered this way.
    """
    import dataclasses

    from sand.pipeline.runner import PipelineResult, resolve_upstream, run_pipeline, run_stage
    from sand.pipeline.stage_context import NotCached
    from sand.pipeline.stages import Context

    if common.refresh:
        return None
    ctx = dataclasses.replace(Context.create(cfg, progress=False), cache_only=True)
    try:
        if stage is None:
            result = run_pipeline(ctx, until=until)
        else:
            result = PipelineResult({stage: run_stage(ctx, stage, resolve_upstream(ctx, stage))})
    except NotCached:
        return None
    logging.getLogger(__name__).info("every stage is in the store (%s): answered without a Prefect run",
                                     ", ".join(result.outcomes))
    return result


def _run_flow(common: Common, until: str | None, stage: str | None = None):
    """Run the pipeline (up to ``until``) or one stage as Prefect flows; returns the PipelineResult.

    Stage names are checked first, from the stage table alone: a typo answers before
    the config is read, and long before Prefect or torch is imported.
    """
    check_stage_names([until, stage, *common.refresh])
    cfg = common.pipeline_config()
    options = common.run_options()
    from sand.pipeline.features.amazon2014_stage import check_feature_source
    from sand.pipeline.runner import PipelineResult, planned_stages

    check_feature_source(cfg, [] if stage == "report" else planned_stages(cfg, stage or until))
    _preflight(cfg)
    cached = _served_from_store(cfg, until, stage, common)
    if cached is not None:
        return cached
    _check_prefect_server()
    from sand.flows.pipeline_flows import STAGE_FLOWS, outcome_from_ref, pipeline_flow

    if stage is None:
        return pipeline_flow(config=cfg, options=options, until=until)
    ref = STAGE_FLOWS[stage](config=cfg, options=options)
    return PipelineResult({stage: outcome_from_ref(ref)})


@app.command()
@with_common_options
def run(
    common: Common,
    until: Annotated[str | None, typer.Option(help=f"stop after this stage: {', '.join(STAGE_NAMES)}")] = None,
) -> None:
    """Run the whole pipeline (default: the bundled sample, offline); cached stages are reused."""
    _emit(_run_flow(common, until).summary(), common.json)


@app.command()
@with_common_options
def stage(
    common: Common,
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(STAGE_NAMES)}")],
) -> None:
    """Run one stage (its inputs are reused from the store, or built first)."""
    _emit(_run_flow(common, None, stage=name).summary(), common.json)


@export_app.command("mmrec")
@with_common_options
def export_mmrec(
    common: Common,
    out: Annotated[Path, typer.Option(help="folder to write")],
    until: Annotated[str, typer.Option(help="last stage to run before exporting")] = "image_features",
) -> None:
    """Write an MMRec dataset folder: <name>.inter, id maps, features, user_graph_dict.npy and <name>.yaml."""
    from sand.pipeline.dataset.export import export_mmrec_folder

    result = _run_flow(common, until)
    manifest = export_mmrec_folder(result.artifacts(), out)
    summary = result.summary()
    for warning in manifest["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    summary["export"] = {"out": str(out), **manifest}
    _emit(summary, common.json)


@app.command()
@with_common_options
def recommend(
    common: Common,
    user: Annotated[str, typer.Option(help="user id (raw reviewerID or 0-based index)")],
    k: Annotated[int, typer.Option("-k", "--k", help="how many items")] = 10,
) -> None:
    """Print a user's top-K items (training items excluded), with titles where known."""
    from sand.pipeline.training.recommend import recommend_for_user

    result = _run_flow(common, "train")
    table = recommend_for_user(common.pipeline_config().resolved().train, result.artifacts(), user, k)
    if common.json:
        _emit({"user": user, "recommendations": table.to_dict(orient="records")}, True)
    else:
        typer.echo(table.to_string(index=False))


@app.command()
@with_common_options
def grid(
    common: Common,
    preset: Annotated[str | None, typer.Option(help="table2 | table3 | table3-authors | all-models | variants | "
                                               "ablations | sensitivity-alpha | sensitivity-beta | "
                                               "sensitivity-tau")] = None,
    axis: Annotated[list[str] | None, typer.Option(
        "--axis", help="field=v1,v2,... (repeatable), e.g. train.alpha=0.001,0.012")] = None,
    name: Annotated[str | None, typer.Option(help="grid name (folder under <data-root>/grids)")] = None,
) -> None:
    """Run a grid of settings; select by validation Recall@20, report its test metrics, write the report."""
    check_stage_names(common.refresh)
    from sand.pipeline.experiments.grid import PRESETS

    axes: dict[str, list[Any]] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown grid preset {preset!r}: choose one of {', '.join(PRESETS)}")
        axes.update(PRESETS[preset])
    for text in axis or []:
        axes.update(_parse_axis(text))
    if not axes:
        raise ConfigError("sand grid needs --preset NAME or at least one --axis field=v1,v2")
    from sand.pipeline.experiments.grid import with_paper_inputs

    cfg = with_paper_inputs(common.pipeline_config(), preset)
    options = common.run_options()
    _preflight(cfg)
    _check_prefect_server()
    from sand.flows.pipeline_flows import grid_flow

    summary = grid_flow(config=cfg, axes=axes, name=name or preset or "grid", options=options)
    if common.json:
        _emit(summary, True)
    else:
        typer.echo(json.dumps(summary, indent=2, default=str))


def _parse_axis(text: str) -> dict[str, list[Any]]:
    import yaml

    if "=" not in text:
        raise ConfigError(f"invalid --axis {text!r}: expected field=v1,v2,...")
    field, raw = text.split("=", 1)
    values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
    if not values:
        raise ConfigError(f"invalid --axis {text!r}: no values")
    return {field.strip(): values}


@app.command()
@with_common_options
def report(
    common: Common,
    out: Annotated[Path | None, typer.Option(help="also copy the tables and figures here")] = None,
) -> None:
    """Tables (paper layouts) and figures from every evaluated run in the data root."""
    import shutil

    summary = _run_flow(common, None, stage="report").summary()
    if out is not None:
        shutil.copytree(summary["report"], out, dirs_exist_ok=True)
        summary["report"] = str(out)
    if common.json:
        _emit(summary, True)
    else:
        typer.echo(f"report written to {summary['report']}")


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
    from sand.pipeline.base.config import load_config

    _set_verbosity(quiet, verbose)
    overrides = {"acquire.dataset": dataset, "data_root": str(data_root) if data_root else None}
    cfg = load_config(config, overrides)
    _preflight(cfg)
    _check_prefect_server()
    from sand.flows.serve import serve_deployments

    serve_deployments(cfg, cron)


@app.command(help="Register the deployments of `sand serve` with a Prefect work pool, then exit; "
             "the pool's workers run them.")
@with_common_options
def deploy(
    common: Common,
    work_pool: Annotated[str, typer.Option(help="existing Prefect work pool whose workers run the flows")],
    cron: Annotated[str | None, typer.Option(help="retraining schedule (default: weekly, Sunday 03:00)")] = None,
) -> None:
    """Register the deployments of `sand serve` with a Prefect work pool, then exit.

    Why a command of its own and not `sand serve --work-pool`: serving runs the flows in
    that process until stopped, deploying only registers them and returns, and a
    flag that turned a long-running command into one that exits at once would surprise.
    Every run option (--runner, --dask-address, --refresh) and config option becomes the
    deployments' default parameters; nothing is checked against this machine's devices or
    data root, because the flows run on the workers' machines.
    """
    check_stage_names(common.refresh)
    cfg = common.pipeline_config()
    options = common.run_options()
    _check_prefect_server(required_by="sand deploy")
    from sand.flows.serve import deploy_to_work_pool

    summary = deploy_to_work_pool(cfg, work_pool, cron, options)
    if common.json:
        _emit(summary, True)
        return
    typer.echo(f"registered {len(summary['deployments'])} deployments with work pool {work_pool!r} "
               f"({summary['work_pool_type']}; runner {options.runner}"
               + (f" at {options.dask_address}" if options.dask_address else "")
               + f"; data root {summary['data_root']}):")
    for deployment in summary["deployments"]:
        typer.echo(f"  {deployment['name']}" + (f"  (cron {deployment['cron']})" if deployment["cron"] else ""))
    if not summary["workers_online"]:
        typer.echo(f"no worker polls {work_pool!r} yet: start one with `prefect worker start --pool {work_pool}`")


def _is_out_of_memory(err: BaseException) -> bool:
    """MemoryError (numpy), torch.cuda.OutOfMemoryError, or torch's CPU allocator failing."""
    return (
        isinstance(err, MemoryError)
        or type(err).__name__ == "OutOfMemoryError"
        or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err))
    )


#: What ``sand`` prints for an out-of-memory failure (exit 2: the user can size the run down).
OUT_OF_MEMORY_HINT = (
    "out of memory: reduce train.batch_size, evaluate.batch_users, image_features.batch_size, "
    "text_features.batch_size or graphs.block_size (--set section.field=N), or use a machine with more memory"
)


def _fail(message: str, exit_code: int, err: BaseException, always_log: bool) -> None:
    """Print exactly one line on stderr (naming the log file with the traceback) and exit."""
    from sand.flows.cli_logging import RUN_LOG

    first = one_line(message, limit=None) or type(err).__name__
    path = RUN_LOG.record_exception(err) if always_log or RUN_LOG.path is not None else None
    typer.echo(f"error: {first}" + (f" (details: {path})" if path else ""), err=True)
    raise SystemExit(exit_code) from None


def _stop_temporary_prefect_servers() -> None:
    """Terminate the API servers Prefect started for this process (if Prefect was imported at all)."""
    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:
        return
    servers = getattr(server_module.SubprocessASGIServer, "_instances", {}).values()
    running = [p for p in (getattr(s, "server_process", None) for s in list(servers)) if p and p.poll() is None]
    for process in running:
        process.terminate()
    for process in running:  # a few seconds to shut down cleanly, then no more
        try:
            process.wait(timeout=5)
        except Exception:
            process.kill()


def _exit_on_interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C (or SIGTERM): one line, stop Prefect's temporary server, exit 130 (143) at once.

    Why not let ``KeyboardInterrupt`` unwind: shard work runs in worker threads that
    the interpreter joins at exit (minutes for an image shard), and a terminal's
    Ctrl-C also reaches Prefect's temporary API server (same process group), so every
    state update made while unwinding fails with a connection error. Leaving now is
    safe: artifacts, shards and checkpoints are written atomically (temp file, then
    rename), and the OS releases the store's locks, so a rerun resumes.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # e.g. the signal arrived while this thread was writing to it
            stream.flush()
    # Other threads may write until the process ends: from now on to nowhere, so our line,
    # written through a private copy of the descriptor, stays the last one.
    stderr_fd = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    bars = getattr(sys.modules.get("tqdm.std"), "tqdm", None)
    after_bar = "\n" if bars is not None and len(getattr(bars, "_instances", ())) else ""  # a bar ends mid-line
    os.write(stderr_fd, (after_bar + (INTERRUPTED if signum == signal.SIGINT else TERMINATED) + "\n").encode())
    _stop_temporary_prefect_servers()
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
    _setup_logging()
    from sand.flows.settings import apply_prefect_defaults

    apply_prefect_defaults()
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
