"""BPR training loop with early stopping, exact resume and per-epoch logs.

Why resume is exact: every source of randomness (numpy sampler, ``on_epoch_start`` generator, torch's global RNG) is
re-derived from ``(seed, epoch)`` at each epoch's start, and ``last.pt`` holds all else that evolves (weights, Adam and
the model's own optimiser states, early-stopping counters, the log), so a run resumed after epoch e replays e+1.. as an
uninterrupted run would, bit-for-bit on CPU. Epochs and batches count from 1; early stopping counts *evaluations*
(:func:`should_stop`), and the last epoch is always evaluated, so a run has a best checkpoint whatever ``eval_every``.
Checkpoints hold only tensors, numbers, strings and plain containers (``weights_only`` loads)."""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from sand.pipeline.base.devices import resolve_device
from sand.pipeline.base.errors import ConfigError, DataError, SandError
from sand.pipeline.base.files import atomic_path
from sand.pipeline.base.hardware import resolve_precision
from sand.pipeline.base.torch_files import save_tensors
from sand.pipeline.dataset.split_data import SplitData
from sand.pipeline.training.checkpoints import BEST_NAME, LAST_NAME, load_model_state, read_checkpoint
from sand.pipeline.training.evaluation import SplitEvaluator, metric_names
from sand.pipeline.training.negative_sampling import sample_bpr_epoch

if TYPE_CHECKING:
    import torch

    from sand.models.base import Recommender

log = logging.getLogger(__name__)

HISTORY_NAME = "epochs.csv"
#: run settings that must not change between a run and its resumption
_RESUME_KEYS = ("seed", "batch_size", "lr", "weight_decay", "eval_every", "valid_metric", "ks", "precision")
EARLY_STOP_RULES = ("mmrec", "strict")
#: Decimals MMRec's evaluator rounds metrics to before early stopping compares them.
MMREC_DECIMALS = 4


@dataclass
class TrainResult:
    """What a training run produced; metrics are those of the best validation epoch."""

    best_epoch: int
    best_valid: dict[str, float]
    test_at_best: dict[str, float]
    epochs_run: int
    stopped_early: bool
    history_path: Path
    best_checkpoint: Path
    last_checkpoint: Path
    seconds_per_epoch: float
    peak_memory_mb: float
    #: the resolved compute precision ("fp32" or "bf16", see pipeline.base.hardware)
    precision: str = "fp32"
    history: list[dict[str, float]] = field(default_factory=list, repr=False)
    #: last epoch of the checkpoint this run continued from (None: started at epoch 1)
    resumed_from_epoch: int | None = None
    #: why an existing checkpoint was discarded and training started over (None: it was not)
    restarted: str | None = None


def epoch_seeds(seed: int, epoch: int) -> tuple[np.random.Generator, int, int]:
    """(numpy Generator for sampling, seed for the on_epoch_start generator, seed for torch's global RNG)."""
    ss = np.random.SeedSequence([int(seed), int(epoch)])
    a, b = (int(x) & ((1 << 63) - 1) for x in ss.spawn(1)[0].generate_state(2, dtype=np.uint64))
    return np.random.default_rng(ss), a, b


def _atomic_torch_save(obj: Any, path: Path) -> None:
    save_tensors(obj, path)


def _atomic_csv(rows: list[dict[str, float]], path: Path) -> None:
    columns = list(dict.fromkeys(c for row in rows for c in row))  # every key, in order of first appearance
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)


def _reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory window, so each epoch (and each run of a grid) reports its own peak (on Linux, writing
    5 to /proc/self/clear_refs resets VmHWM; elsewhere the lifetime ``ru_maxrss`` stands)."""
    import torch  # lazy: torch takes seconds to import

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_memory_mb(device: torch.device) -> float:
    import torch  # lazy: torch takes seconds to import

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _result(state: dict[str, Any], out_dir: Path, resumed_from: int | None = None,
            restarted: str | None = None) -> TrainResult:
    history = list(state["history"])
    secs = [h["seconds"] for h in history if "seconds" in h]
    mem = [h["peak_memory_mb"] for h in history if "peak_memory_mb" in h]
    return TrainResult(
        best_epoch=int(state["best_epoch"]), best_valid=dict(state["best_valid"]),
        test_at_best=dict(state["test_at_best"]), epochs_run=int(state["epoch"]),
        stopped_early=bool(state["stopped_early"]), history_path=out_dir / HISTORY_NAME,
        best_checkpoint=out_dir / BEST_NAME, last_checkpoint=out_dir / LAST_NAME,
        seconds_per_epoch=float(statistics.median(secs)) if secs else float("nan"),
        peak_memory_mb=float(max(mem)) if mem else float("nan"), history=history,
        precision=str(state["config"].get("precision", "fp32")), resumed_from_epoch=resumed_from, restarted=restarted)


def _scalar(term: torch.Tensor, name: str) -> torch.Tensor:
    if term.numel() != 1:
        raise SandError(f"training: loss term {name!r} has shape {tuple(term.shape)}, expected a scalar")
    return term.reshape(())


def early_stop_score(value: float, rule: str) -> float:
    """The number early stopping compares: MMRec's rule rounds the metric as its evaluator reports it."""
    return round(float(value), MMREC_DECIMALS) if rule == "mmrec" else float(value)


def should_stop(bad_evals: int, patience: int, rule: str) -> bool:
    """MMRec stops when ``bad_evals > patience``; the strict rule at ``bad_evals >= patience``."""
    return bad_evals > patience if rule == "mmrec" else bad_evals >= patience


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}
    return {prefix: value}


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``"batch_size 2048 -> 64, params.alpha 0.001 -> 0.012"``: what differs between two settings."""
    a = {k.lstrip("."): v for k, v in _flat(old, "").items()}
    b = {k.lstrip("."): v for k, v in _flat(new, "").items()}
    return ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _check_rules(valid_metric: str, ks: tuple[int, ...], early_stop: str) -> None:
    """The run's metric and stopping rule (the sizes are TrainConfig's to check; the metric is no config field)."""
    if valid_metric not in metric_names(ks):
        raise ConfigError(f"training: valid_metric {valid_metric!r} is not one of {metric_names(ks)}")
    if early_stop not in EARLY_STOP_RULES:
        raise ConfigError(f"training: early_stop must be one of {', '.join(EARLY_STOP_RULES)}, got {early_stop!r}")


@dataclass
class _Run:
    """What stays fixed during one training run: the model, its optimiser, the data and the settings."""

    model: Recommender
    data: SplitData
    dev: torch.device
    optimizer: torch.optim.Optimizer
    valid_eval: SplitEvaluator
    test_eval: SplitEvaluator
    train_edges: np.ndarray
    config: dict[str, Any]
    out_dir: Path
    epochs: int
    batch_size: int
    patience: int
    early_stop: str
    eval_every: int
    seed: int
    valid_metric: str
    best_path: Path = field(init=False)
    last_path: Path = field(init=False)
    history_path: Path = field(init=False)

    def __post_init__(self) -> None:
        out = self.out_dir
        self.best_path, self.last_path, self.history_path = out / BEST_NAME, out / LAST_NAME, out / HISTORY_NAME

    @property
    def n_batches(self) -> int:
        return math.ceil(len(self.train_edges) / self.batch_size)


def _resume(run: _Run, resume: bool, restart_on_change: bool) -> tuple[dict[str, Any], int | None, str | None]:
    """(state, epoch resumed from, why it restarted): ``last.pt`` restored into the run, or a clean start, which removes
    the previous run's files so none of them is mistaken for this run's."""
    # what evolves during a run besides the weights: counters, the best epoch, the log so far
    state = {"epoch": 0, "best_epoch": 0, "best_valid": {}, "test_at_best": {}, "best_value": float("-inf"),
             "bad_evals": 0, "stopped_early": False, "history": [], "config": run.config}
    restarted = None
    saved = read_checkpoint(run.last_path, run.dev) if resume and run.last_path.exists() else None
    if saved is not None:
        old = {"precision": "fp32", **saved.get("config", {})}  # runs from before precision existed
        changed = {k: old.get(k) for k in (*_RESUME_KEYS, "signature") if old.get(k) != run.config[k]}
        if changed:
            restarted = "parameters changed: " + describe_changes(changed, {k: run.config[k] for k in changed})
            if not restart_on_change:
                raise ConfigError(f"training: {run.last_path} was written with other settings ({restarted}); "
                                  "use restart_on_change=True, resume=False or another out_dir")
            log.info("training: restarting from epoch 1, discarding %s: %s", run.last_path, restarted)
            saved = None
    if saved is None:
        for p in (run.best_path, run.last_path, run.history_path):
            p.unlink(missing_ok=True)
        return state, None, restarted
    load_model_state(run.model, saved["model"], run.last_path)
    run.optimizer.load_state_dict(saved["optimizer"])
    run.model.load_auxiliary_state_dict(saved["auxiliary"])
    state = {k: saved[k] for k in state}
    state["history"] = [dict(h) for h in state["history"]]
    log.info("resuming from %s after epoch %d (best %s=%.6f at epoch %d)", run.last_path, state["epoch"],
             run.valid_metric, state["best_value"], state["best_epoch"])
    return state, int(state["epoch"]), restarted


def _train_epoch(run: _Run, epoch: int) -> dict[str, float]:
    """One epoch of BPR batches, every random choice re-derived from ``(seed, epoch)`` (exact resume); its log row."""
    import torch  # lazy: torch takes seconds to import

    model, dev, batch_size, n_batches = run.model, run.dev, run.batch_size, run.n_batches
    rng, gen_seed, global_seed = epoch_seeds(run.seed, epoch)
    torch.manual_seed(global_seed)
    generator = torch.Generator(device=dev).manual_seed(gen_seed)
    _reset_peak_memory(dev)
    t0 = time.perf_counter()
    model.train()
    model.on_epoch_start(epoch, generator)
    triples = sample_bpr_epoch(run.train_edges, run.valid_eval.train_csr, run.data.n_items, rng)
    users, pos, neg = (torch.from_numpy(a).to(dev) for a in triples)
    sums: defaultdict[str, float] = defaultdict(float)
    for b in range(n_batches):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        u, p, n = users[sl], pos[sl], neg[sl]
        aux = model.auxiliary_step(u, p, n)
        terms = model.loss_terms(u, p, n)
        if not terms:
            raise SandError(f"training: {type(model).__name__}.loss_terms returned no loss terms")
        names = list(terms)
        stacked = torch.stack([_scalar(terms[k], k) for k in names])
        values = stacked.detach().double().cpu().numpy()
        sums["loss"] += float(values.sum())
        for name, value in zip(names, values, strict=True):
            if not np.isfinite(value):
                raise SandError(f"non-finite loss term {name!r} at epoch {epoch}, batch {b + 1}: {value}")
            sums[f"loss_{name}"] += float(value)
        run.optimizer.zero_grad(set_to_none=True)
        stacked.sum().backward()
        run.optimizer.step()
        for name, value in aux.items():
            sums[f"aux_{name}"] += float(value)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {"epoch": epoch, **{k: v / n_batches for k, v in sums.items()}, "seconds": time.perf_counter() - t0}


def _evaluate_and_keep_best(run: _Run, state: dict[str, Any], epoch: int, row: dict[str, float]) -> None:
    """Validate in float32; on a better metric also test and write ``best.pt``; update early stopping. Adds the metrics
    and ``eval_seconds`` to ``row``, updates ``state`` in place."""
    import torch  # lazy: torch takes seconds to import

    from sand.models.precision import precision_scope  # lazy: imports torch

    model = run.model
    t1 = time.perf_counter()
    model.eval()
    with torch.no_grad(), precision_scope(model, "fp32"):
        user_emb, item_emb = model.embeddings()
        valid = run.valid_eval(user_emb, item_emb)
        row.update({f"valid_{k}": v for k, v in valid.items()})
        score = early_stop_score(valid[run.valid_metric], run.early_stop)
        if score > state["best_value"]:
            test = run.test_eval(user_emb, item_emb)
            row.update({f"test_{k}": v for k, v in test.items()})
            state.update(best_value=score, best_epoch=epoch, best_valid=valid, test_at_best=test, bad_evals=0)
            best = {"model": model.state_dict(), "epoch": epoch, "valid": valid, "test": test, "config": run.config}
            _atomic_torch_save(best, run.best_path)
            log.debug("epoch %d: %s improved to %.6f (test %s)", epoch, run.valid_metric, valid[run.valid_metric],
                      {k: round(v, 6) for k, v in test.items()})
        else:
            state["bad_evals"] += 1
    del user_emb, item_emb
    model.train()
    row["eval_seconds"] = time.perf_counter() - t1
    if should_stop(state["bad_evals"], run.patience, run.early_stop):
        state["stopped_early"] = True


def _save_epoch(run: _Run, state: dict[str, Any], epoch: int, row: dict[str, float]) -> None:
    """Append the row to the log and write ``epochs.csv`` and ``last.pt``: the epoch is now resumable."""
    row["peak_memory_mb"] = _peak_memory_mb(run.dev)
    state["history"].append(row)
    state["epoch"] = epoch
    _atomic_csv(state["history"], run.history_path)
    last = {**state, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "auxiliary": run.model.auxiliary_state_dict()}
    _atomic_torch_save(last, run.last_path)


def _progress_postfix(row: dict[str, float], valid_metric: str) -> dict[str, str]:
    postfix = {"loss": f"{row['loss']:.4f}"}
    if f"valid_{valid_metric}" in row:
        postfix[valid_metric] = f"{row[f'valid_{valid_metric}']:.4f}"
    return postfix


def _prepare(model: Recommender, data: SplitData, *, out_dir: Path, dev: torch.device, config: dict[str, Any],
             settings: dict[str, Any]) -> _Run:
    """The run's fixed parts: the model on its device and precision, Adam, the evaluators, the edges."""
    import torch  # lazy: torch takes seconds to import

    from sand.models.precision import set_precision  # lazy: imports torch

    model.to(dev)
    set_precision(model, config["precision"])
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"training: model {type(model).__name__} has no trainable parameters")
    # Fused Adam: one kernel over all parameters; the default per-parameter loop costs more than the update itself for
    # SAND's 4096 x 4096 transform.
    optimizer = torch.optim.Adam(params, lr=config["lr"], weight_decay=config["weight_decay"], fused=True)
    ks = tuple(config["ks"])
    valid_eval = SplitEvaluator(data, "valid", ks)
    test_eval = SplitEvaluator(data, "test", ks)
    train_edges = np.asarray(data.train, dtype=np.int64)
    if len(train_edges) == 0:
        raise DataError("training: the train split has no interactions")
    return _Run(model=model, data=data, dev=dev, optimizer=optimizer, valid_eval=valid_eval, test_eval=test_eval,
                train_edges=train_edges, config=config, out_dir=out_dir, **settings)


def train_model(
    model: Recommender, data: SplitData, *, out_dir: Path, epochs: int = 1000, batch_size: int = 2048, lr: float = 1e-3,
    weight_decay: float = 0.0, patience: int = 20, early_stop: str = "mmrec", eval_every: int = 1, seed: int = 0,
    device: str | torch.device | None = None, valid_metric: str = "recall@20", ks: Sequence[int] = (10, 20),
    progress: bool = True, resume: bool = True, on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    signature: dict[str, Any] | None = None, restart_on_change: bool = False, precision: str = "fp32",
) -> TrainResult:
    """Train ``model`` with BPR triples and Adam, keeping the best epoch by ``valid_metric``, into ``out_dir``.

    With ``resume`` and a ``last.pt`` the run continues where it stopped (or returns the stored result if it had
    finished); ``signature`` (e.g. hyper-parameters, input keys) must match like the run settings, else the checkpoint
    is an error or, with ``restart_on_change``, discarded (``TrainResult.restarted`` says why). ``on_epoch_end`` runs
    after the epoch's checkpoint is written, so an exception there stops training with everything saved. ``precision``
    (:func:`pipeline.base.hardware.resolve_precision`) applies to training; evaluation runs in float32."""
    ks = tuple(int(k) for k in ks)
    _check_rules(valid_metric, ks, early_stop)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    config = {"seed": int(seed), "batch_size": int(batch_size), "lr": float(lr), "weight_decay": float(weight_decay),
              "eval_every": int(eval_every), "valid_metric": valid_metric, "ks": list(ks), "signature": signature,
              "precision": resolve_precision(precision, dev)}
    settings = {"epochs": epochs, "batch_size": batch_size, "patience": patience, "early_stop": early_stop,
                "eval_every": eval_every, "seed": seed, "valid_metric": valid_metric}
    run = _prepare(model, data, out_dir=out_dir, dev=dev, config=config, settings=settings)
    state, resumed_from, restarted = _resume(run, resume, restart_on_change)
    if resumed_from is not None and (state["stopped_early"] or state["epoch"] >= epochs):
        log.info("training had already finished; returning the stored result")
        if not run.history_path.exists():
            _atomic_csv(state["history"], run.history_path)
        return _result(state, out_dir, resumed_from)

    log.info("training %s on %s in %s: %d users, %d items, %d train edges, %d batches/epoch, epochs %d..%d",
             type(model).__name__, dev, config["precision"], data.n_users, data.n_items, len(run.train_edges),
             run.n_batches, state["epoch"] + 1, epochs)
    bar = tqdm(range(state["epoch"] + 1, epochs + 1), initial=state["epoch"], total=epochs, desc="train",
               unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        row = _train_epoch(run, epoch)
        if epoch % run.eval_every == 0 or epoch == run.epochs:
            _evaluate_and_keep_best(run, state, epoch, row)
        _save_epoch(run, state, epoch, row)
        bar.set_postfix(_progress_postfix(row, valid_metric))
        log.debug("epoch %d: %s", epoch, row)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if state["stopped_early"]:
            log.info("early stop at epoch %d (%s rule): no better %s in %d evaluations (best %.6f at epoch %d)", epoch,
                     early_stop, valid_metric, state["bad_evals"], state["best_value"], state["best_epoch"])
            break
    bar.close()
    log.info("finished after epoch %d; best epoch %d, valid %s, test %s", state["epoch"], state["best_epoch"],
             state["best_valid"], state["test_at_best"])
    return _result(state, out_dir, resumed_from, restarted)
