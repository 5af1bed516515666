"""Helpers shared by test modules in different folders (``from support import ...``).

Why a module and not sibling imports: the tests are laid out like the packages they test,
and a test module can import only from its own folder or from here (``tests/`` is on the
path through its ``conftest.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from conftest import Reply, RequestInfo

from sand.models import registry
from sand.pipeline.base.config import PipelineConfig, load_config
from sand.pipeline.base.store import Artifact, ArtifactStore


# --------------------------------------------------------------------------- HTTP Range routes
def range_route(body: bytes, honour: bool = True):
    """A route that serves ``body`` and honours ``Range: bytes=N-`` like a real static server."""

    def handler(info: RequestInfo) -> Reply:
        header = info.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-", header or "")
        if not honour or match is None:
            return Reply(200, body)
        start = int(match.group(1))
        if start >= len(body):
            return Reply(416, b"", {"Content-Range": f"bytes */{len(body)}"})
        return Reply(206, body[start:], {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})

    return handler


def range_headers(server) -> list[str | None]:
    return [r.headers.get("Range") for r in server.requests]


# --------------------------------------------------------------------------- kNN graphs
def knn_graph(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k cosine graph (self included), binary, every value 1/k: the graph stage's contract."""
    xn = F.normalize(x, dim=1)
    n = x.shape[0]
    cols = (xn @ xn.T).topk(k, dim=1).indices.reshape(-1)
    rows = torch.arange(n).repeat_interleave(k)
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), torch.full((n * k,), 1.0 / k), (n, n), check_invariants=True
    ).coalesce()


# --------------------------------------------------------------------------- report fixtures
def fake_interactions(store: ArtifactStore, name: str, n_users: int = 30, n_items: int = 40, seed: int = 0) -> Artifact:
    """A real interactions artifact: every user has 6 items, 4 train / 1 valid / 1 test."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=6, replace=False)
        rows += [(u, int(i), s) for i, s in zip(items, (0, 0, 0, 0, 1, 2), strict=True)]
    frame = pd.DataFrame(rows, columns=["user", "item", "split"])
    frame["rating"], frame["timestamp"] = 5.0, 0

    def build(out: Path) -> dict[str, Any]:
        frame.to_parquet(out / "interactions.parquet", index=False)
        return {"name": name, "stats": {"users": n_users, "items": n_items, "interactions": len(frame)}}

    return store.run("interactions", "1", {"name": name, "seed": seed}, {}, build).artifact


def fake_run(
    store: ArtifactStore,
    inter: Artifact,
    model: str,
    *,
    variant: str = "a",
    valid: float,
    test: float,
    tag: float = 0.0,
    seconds: float = 2.0,
    memory: float = 500.0,
    fusion: str | None = None,
    revision: int | None = None,
) -> Artifact:
    """A train + evaluate artifact pair with chosen numbers (recall@20 = the given value;
    the other metrics are fixed offsets of it so each cell is distinguishable)."""

    def metrics(v: float) -> dict[str, float]:
        return {"recall@10": v - 0.01, "recall@20": v, "ndcg@10": v - 0.03, "ndcg@20": v - 0.02}

    params = {"model": model, "variant": variant, "alpha": tag or None, "epochs": 3}
    if fusion is not None:  # the train key holds the fusion only for plug-ins it changes
        params["plugin_fusion"] = fusion
    # as train_key_params: the model's current revision, unless the run is to be from an older one
    if revision is None:
        params.update(registry.revision_params(model))
    elif revision:
        params[registry.REVISION_KEY] = revision

    def build_train(out: Path) -> dict[str, Any]:
        pd.DataFrame(
            {
                "epoch": [1, 2, 3],
                "loss": [0.69, 0.5, 0.4],
                "seconds": [seconds] * 3,
                "valid_recall@20": [valid / 3, valid, valid / 2],
                "peak_memory_mb": [memory] * 3,
            }
        ).to_csv(out / "epochs.csv", index=False)
        result = {
            "model": model,
            "variant": variant,
            "best_epoch": 2,
            "best_valid": metrics(valid),
            "test_at_best": metrics(test),
            "seconds_per_epoch": seconds,
            "peak_memory_mb": memory,
        }
        (out / "result.json").write_text(json.dumps(result))
        return {"result": result}

    train = store.run("train", "1", params, {"interactions": inter}, build_train).artifact

    def build_eval(out: Path) -> dict[str, Any]:
        return {"metrics": {"valid": metrics(valid), "test": metrics(test)}, "model": model, "variant": variant}

    return store.run("evaluate", "1", {"ks": [10, 20]}, {"train": train, "interactions": inter}, build_eval).artifact


# --------------------------------------------------------------------------- real processes (Dask, Prefect workers)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Environment of the processes a test starts: offline, like the machine the tests run on.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@contextlib.contextmanager
def background_processes(logs: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """``start(name, *argv, env=...)`` runs ``python -m argv...`` with its output in ``logs/<name>.log``.

    Why one helper: every process a test starts must stop, even when the test fails:
    on leaving, each gets SIGTERM (the last started first), 30 s to exit, then SIGKILL.
    Only the processes started here are touched, by their handle.
    """
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []

    def start(name: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", *argv], stdout=out, stderr=subprocess.STDOUT,
                                          env={**os.environ, **OFFLINE_ENV, **(env or {})}))
        return procs[-1]

    try:
        yield start
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextlib.contextmanager
def start_dask_cluster(workdir: Path) -> Iterator[str]:
    """A ``dask scheduler`` process and a ``dask worker --nworkers 2 --nthreads 1`` process on loopback,
    started as on a real cluster; yields the scheduler's address once both workers joined."""
    import distributed

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    with background_processes(workdir / "dask-logs") as start:
        start("scheduler", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
        start("workers", "dask", "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard",
              "--local-directory", str(workdir / "dask-workers"))
        with distributed.Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=180)
            assert len(client.scheduler_info()["workers"]) == 2
        yield address


def wait_until_final(client, flow_run_id, timeout: float):
    """The flow run once its state is final (a sync Prefect client); fails after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        assert time.monotonic() < deadline, f"flow run still {run.state_name} after {timeout:.0f} s"
        time.sleep(1)


# --------------------------------------------------------------------------- the sample in several shards
#: The sample cut small, its feature stages in several shards each: what cluster tests drive.
SMALL_SHARDED = [
    "acquire.sample_users=150",
    "acquire.sample_items=100",
    "image_features.image_size=32",
    "image_features.num_workers=0",
    "image_features.shard_size=16",
    "text_features.batch_size=1",  # encoding groups of 32 unique texts: several shards
    "text_features.shard_size=32",
]


def small_sharded_config(root: Path, *extra: str) -> PipelineConfig:
    return load_config(None, {"data_root": str(root)}, [*SMALL_SHARDED, *extra])
