"""Training memory, estimated from the config and the dataset's counts before any model is built.

Why: a model too big for the machine used to be found out by the kernel (the OOM killer, exit 137, no ``error:`` line)
or refused with a hint that never named the field at fault. Training memory is a simple function of the counts (users,
items, training edges, feature widths) and a few fields, so the train stage computes it first, refuses in one line
naming the fields that drive it, and records it next to the measured peak (``benchmarks/bench_memory_model.py`` checks
the two). The terms (float32; docs/scaling.md, *Memory model*): every trainable float four times (value, gradient, two
Adam moments); the inputs (feature matrices, read whole every batch, and graphs); the activations autograd keeps over
one batch, which for the graph models span the whole user-item graph. The activation coefficients are measured by the
bench, not derived: autograd keeps more per-row tensors than a first-order count sees."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sand.pipeline.base.devices import resolve_device
from sand.pipeline.base.errors import ConfigError
from sand.pipeline.stage_context import dataset_counts
from sand.pipeline.training.evaluation import MAX_SCORE_ELEMENTS
from sand.pipeline.training.model_io import effective_model_kwargs

FLOAT = 4  # bytes of a float32
#: Value, gradient and Adam's two moments: every trainable float, four times.
STATE_COPIES = 4
#: Users scored at once in the evaluation the trainer runs every epoch (the trainer's default).
EVAL_USERS = 4096
#: Bytes per stored edge of a sparse graph (int64 column index + float32 value, CSR, plus a transpose).
EDGE_BYTES = 2 * (8 + FLOAT)
#: Neighbours per item in the kNN item graphs the feature models read (``graphs.k``' default).
KNN = 10
#: Measured (bench_memory_model.py) floats autograd keeps per (row x width) of a propagated
#: graph layer, per model; and for SAND and the plug-ins, per item x feature column read.
GRAPH_ACTIVATIONS = {"bpr": 0.0, "lightgcn": 3.0, "vbpr": 0.0, "freedom": 3.0, "sand": 6.0,
                     "vbpr-sand": 0.0, "freedom-sand": 3.0}
READ_ACTIVATIONS = {"sand": 1.0, "vbpr-sand": 0.5, "freedom-sand": 0.5}
#: Memory the estimate leaves for what it does not count (allocator slack, small temporaries).
SLACK = 1.10


@dataclass(frozen=True)
class Part:
    bytes: float
    fields: tuple[str, ...]  # the config fields that set its size


@dataclass(frozen=True)
class MemoryEstimate:
    model: str
    parts: dict[str, Part] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return SLACK * sum(p.bytes for p in self.parts.values())

    def drivers(self, share: float = 0.5) -> list[str]:
        """Config fields that size at least ``share`` of the estimate (at least the largest), largest first."""
        weight: dict[str, float] = {}
        for part in self.parts.values():
            for name in part.fields:
                weight[name] = weight.get(name, 0.0) + part.bytes
        ranked = sorted(weight, key=lambda name: -weight[name])
        whole = sum(p.bytes for p in self.parts.values())
        return [name for i, name in enumerate(ranked) if i == 0 or weight[name] >= share * whole]

    def summary(self) -> dict[str, Any]:
        """For the manifest and ``--json``: the total and the parts, in MB."""
        return {"total_mb": round(self.total / 2**20, 1),
                "parts_mb": {name: round(p.bytes / 2**20, 1) for name, p in self.parts.items()}}


def estimate_training_memory(model: str, *, n_users: int, n_items: int, n_train_edges: int,
                             feature_dims: Mapping[str, int], batch_size: int = 2048,
                             hyperparameters: Mapping[str, Any] | None = None) -> MemoryEstimate:
    """The training memory of ``model`` (a registry name) at these counts and settings; absent ``hyperparameters`` (the
    model keywords the run passes) take the models' defaults."""
    hp = dict(hyperparameters or {})
    e = int(hp.get("embedding_dim", 64))
    layers = int(hp.get("n_layers", hp.get("n_ui_layers", 2)))  # every graph model's default: 2
    U, N, E = int(n_users), int(n_items), int(n_train_edges)
    dims = {m: int(d) for m, d in feature_dims.items()}
    D, rows = sum(dims.values()), U + N
    emb, batch = ("train.embedding_dim",), ("train.batch_size", "train.embedding_dim")
    parts: dict[str, Part] = {}

    def add(name: str, n_bytes: float, fields: tuple[str, ...] = ()) -> None:
        if n_bytes > 0:
            parts[name] = Part(float(n_bytes), fields)

    backbone = {"vbpr-sand": "vbpr", "freedom-sand": "freedom"}.get(model, model)
    # trainable floats (x4: value, gradient, Adam moments)
    if backbone in ("bpr", "lightgcn", "freedom"):
        add("embeddings", STATE_COPIES * FLOAT * rows * e, emb)
    if backbone == "vbpr":
        blocks = 1 if hp.get("modal_fusion", "sum") == "sum" else max(len(dims), 1)
        add("embeddings", STATE_COPIES * FLOAT * (U * e * (1 + blocks) + N * e), emb)
    if backbone in ("vbpr", "freedom"):
        add("feature projections", STATE_COPIES * FLOAT * D * e, emb)
    if backbone == "freedom" and bool(hp.get("train_features", True)):
        add("trainable features", STATE_COPIES * FLOAT * N * D, ("train.extra.train_features",))
    if model == "sand":
        add("embeddings", STATE_COPIES * FLOAT * len(dims) * U * e, emb)
        add("feature transforms", STATE_COPIES * FLOAT * sum(d * d + 4 * e * d + 4 * e * e for d in dims.values()))
    if model in ("sand", "vbpr-sand", "freedom-sand"):
        heads = [int(w) for w in hp.get("head_dims", (64, 64, 32))]
        add("separation heads", STATE_COPIES * FLOAT * sum(d // 2 * (heads[0] + 64) for d in dims.values()),
            ("train.head_dims",))
    # inputs: the features (memory-mapped, read whole every batch) and the graphs
    add("features", FLOAT * N * D)
    graph_edges = 2 * E + (2 * len(dims) * KNN * N if dims else 0)
    add("graphs", EDGE_BYTES * graph_edges * (2 if model in ("sand", "freedom", "freedom-sand") else 1))
    # activations over one batch and one block of the per-epoch evaluation
    copies = len(dims) if model == "sand" else 1  # SAND propagates one graph per modality
    add("graph activations", GRAPH_ACTIVATIONS.get(model, 0.0) * FLOAT * rows * e * (layers + 1) * copies,
        ("train.embedding_dim", "train.n_layers"))
    add("feature reads", READ_ACTIVATIONS.get(model, 0.0) * FLOAT * N * D, ())
    add("batch activations", FLOAT * batch_size * 6 * e, batch)  # u, p, n rows and their gradients
    if backbone == "vbpr":  # the projected features of every item, per modality block
        add("projected features", FLOAT * N * e * 4 * max(len(dims), 1), emb)
    scores = min(min(U, EVAL_USERS) * N, MAX_SCORE_ELEMENTS)  # one block of users' scores
    add("evaluation", FLOAT * (scores + rows * e * max(len(dims), 1)), ("train.embedding_dim",))
    return MemoryEstimate(model, parts)


def feature_dims_of(paths: Mapping[str, Path]) -> dict[str, int]:
    """Widths of ``.npy`` feature matrices, read from their headers (no data is read)."""
    return {m: int(np.load(path, mmap_mode="r", allow_pickle=False).shape[1]) for m, path in paths.items()}


def available_memory(device: Any) -> float | None:
    """Bytes this process may still use on ``device``: free GPU memory, or MemAvailable under any cgroup limit on a CPU;
    None where it cannot be known."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch  # lazy: torch takes seconds to import

        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    values = [v for v in (_meminfo_available(), _cgroup_headroom()) if v is not None]
    return min(values) if values else None


def _meminfo_available() -> float | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return None


def _cgroup_headroom() -> float | None:
    """cgroup v2 ``memory.max - memory.current`` of this process's group, if limited."""
    with contextlib.suppress(OSError, ValueError):
        group = Path("/proc/self/cgroup").read_text().strip().splitlines()[0].split(":", 2)[2]
        base = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit != "max":
            return float(limit) - float((base / "memory.current").read_text())
    return None


def resident_bytes() -> float:
    """This process's resident memory now (the estimate is added to it)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/statm") as fh:
        return float(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0.0


def check_fits(estimate: MemoryEstimate, *, available: float | None, where: str, budget_gb: float | None = None,
               resident: float = 0.0) -> None:
    """Refuse, in one line naming the config fields that drive the size, an estimate beyond ``train.memory_budget_gb``
    (which bounds the run's peak: what this process holds now plus the estimate) or the memory available on the
    device."""
    if budget_gb is not None:
        need, limit, what = resident + estimate.total, budget_gb * 2**30, f"train.memory_budget_gb={budget_gb:g}"
    else:
        need, limit, what = estimate.total, available, f"the memory available on {where} ({_gb(available or 0)})"
    if limit is None or need <= limit:
        return
    largest = sorted(estimate.parts.items(), key=lambda kv: -kv[1].bytes)[:2]
    shown = ", ".join(f"{name} {_gb(p.bytes)}" for name, p in largest)
    fields = estimate.drivers()
    advice = f"reduce {' or '.join(fields)}" if fields else "use a machine with more memory"
    raise ConfigError(f"train.model={estimate.model} needs about {_gb(need)} to train ({shown}), more than "
                      f"{what}: {advice}")


def check_training_memory(tcfg: Any, inter: Any, feature_arts: Mapping[str, Any]) -> dict[str, Any]:
    """The train stage's check before the model is built; returns the estimate for the manifest, whose
    ``estimated_peak_memory_mb`` compares with the trainer's ``peak_memory_mb`` (on a CPU: resident memory +
    estimate)."""
    n_users, n_items = dataset_counts(inter)
    stats = inter.manifest.get("stats", {})
    n_train = int(stats.get("train", stats.get("interactions", 0)))
    paths = {m: feature_arts[f"{m}_features"].file(f"{m}_feat.npy")
             for m in ("image", "text") if f"{m}_features" in feature_arts}
    _, kwargs = effective_model_kwargs(tcfg)
    estimate = estimate_training_memory(tcfg.model, n_users=n_users, n_items=n_items, n_train_edges=n_train,
                                        feature_dims=feature_dims_of(paths), batch_size=tcfg.batch_size,
                                        hyperparameters=kwargs)
    device = resolve_device(tcfg.device)
    resident = resident_bytes() if device.type == "cpu" else 0.0
    check_fits(estimate, available=available_memory(device), where=str(device), budget_gb=tcfg.memory_budget_gb,
               resident=resident)
    return {"estimated_peak_memory_mb": round((resident + estimate.total) / 2**20, 1), **estimate.summary()}


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3g} GB" if n_bytes < 2**30 * 1e6 else f"{n_bytes / 2**30:.3e} GB"
