"""What every stage's run function shares: its context, key parameters and artifact helpers. Why here, below the stage
packages and apart from the table (``pipeline/stages.py``): no stage package then imports the table or the runner, so
there are no import cycles. :meth:`StageContext.run` is the one place that turns (stage, params, inputs, build) into a
cached artifact."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sand.pipeline.base.config import PipelineConfig
from sand.pipeline.base.devices import check_devices, device_type
from sand.pipeline.base.errors import StageError
from sand.pipeline.base.locations import local_path
from sand.pipeline.base.store import Artifact, ArtifactStore, StageOutcome, artifact_key

#: Fields that change speed, not results: left out of artifact keys. Only fields with a test showing the same artifact
#: bytes under a changed value belong here (tests/test_cache_keys.py): batch sizes, block sizes and devices change float
#: bits (BLAS and conv kernels pick their algorithm by shape and device), so they are part of every key that sees them.
PERFORMANCE_FIELDS = {"num_workers", "concurrency"}
#: A function that runs picklable shard jobs, e.g. over a Prefect task runner.
ShardMapper = Callable[[Callable[..., Any], Sequence[Any]], list[Any]]


class NotCached(Exception):
    """Raised in a ``cache_only`` context by the first stage whose artifact is not in the store."""


@dataclass
class StageContext:
    """Everything a stage needs besides its inputs. ``cache_only``: serve artifacts from the store and raise
    :class:`NotCached` instead of building one, so a caller can answer a fully cached run without starting Prefect."""

    cfg: PipelineConfig
    store: ArtifactStore
    versions: Mapping[str, str]
    refresh: frozenset[str] = field(default_factory=frozenset)
    progress: bool = True
    cache_only: bool = False

    @classmethod
    def create(cls, cfg: PipelineConfig, versions: Mapping[str, str], refresh: Sequence[str] = (),
               progress: bool = True) -> StageContext:
        cfg = cfg.resolved()
        check_devices(cfg)  # a deployment's worker may lack the GPU the config asks for
        # Absolute, so artifact paths stay valid in Prefect subprocesses and on Dask workers.
        cfg = cfg.model_copy(update={"data_root": Path(cfg.data_root).expanduser().resolve()})
        return cls(cfg, ArtifactStore(cfg.data_root), dict(versions), frozenset(refresh), progress)

    def version(self, stage: str) -> str:
        if stage not in self.versions:
            raise StageError(f"stage {stage!r} has no row in the stage table (pipeline/stages.py)")
        return self.versions[stage]

    def run(self, stage: str, params: dict[str, Any], inputs: dict[str, Artifact],
            build: Callable[[Path], Any]) -> StageOutcome:
        """The stage's artifact for ``params`` and ``inputs``: cached, or built by ``build(staging_dir)``."""
        if self.cache_only:
            existing = None if stage in self.refresh else self.store.lookup(stage, self.work_key(stage, params, inputs))
            if existing is None:
                raise NotCached(stage)
            return StageOutcome(existing, True, 0.0)
        return self.store.run(stage, self.version(stage), params, inputs, build, stage in self.refresh)

    def work_key(self, stage: str, params: dict[str, Any], inputs: dict[str, Artifact]) -> str:
        """Key of a stage's resumable scratch directory (same scheme as artifact keys)."""
        return artifact_key(stage, self.version(stage), params, {k: a.key for k, a in inputs.items()})


def key_params(section: Any, drop: set[str] = PERFORMANCE_FIELDS, allow_mps: bool = False) -> dict[str, Any]:
    """A config section as artifact-key parameters, without speed-only knobs. ``device`` enters as the device type the
    stage will compute on, so a GPU-built artifact is not served as a CPU run's result."""
    params = {k: v for k, v in section.model_dump(mode="json").items() if k not in drop}
    if "device" in params:
        params["device"] = device_type(params["device"], allow_mps=allow_mps)
    return params


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link big raw files into an artifact (no second copy on disk); copy across devices."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def local_fingerprint(source: str | None) -> dict[str, Any] | None:
    """For local inputs the key includes size and mtime, so an edited file is re-acquired."""
    path = local_path(source) if source else None
    if path is None or not path.exists():  # remote (the download's own checks decide) or missing
        return None
    if path.is_dir():
        return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir()) if p.is_file()}
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def jsonable(obj: Any) -> Any:
    """numpy scalars and paths to plain JSON values (manifests must be readable anywhere)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def dataset_counts(inter: Artifact) -> tuple[int, int]:
    return int(inter.manifest["stats"]["users"]), int(inter.manifest["stats"]["items"])
