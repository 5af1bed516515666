"""The ``acquire`` stage: the raw dataset files (bundled sample, MMRec folder, or downloaded dumps). Why the key holds
each local file's size and mtime: an edited local file must be acquired again; remote files are checked by the download
itself, and ``acquire.revision`` (set by ``sand retrain`` when a remote source changed) keys a new remote version apart,
in its own download folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from sand.pipeline.acquire.bundled_sample import generate_sample
from sand.pipeline.acquire.download import fetch_file
from sand.pipeline.acquire.sources import resolve_source
from sand.pipeline.base.store import StageOutcome
from sand.pipeline.stage_context import StageContext, link_or_copy, local_fingerprint

MMREC_SUFFIXES = {".inter", ".npy", ".csv", ".npz"}  #: The files of an MMRec folder that make up the dataset.


def run_acquire(ctx: StageContext) -> StageOutcome:
    acfg = ctx.cfg.acquire
    spec = resolve_source(acfg.dataset, acfg.format, acfg.reviews, acfg.meta)
    params: dict[str, Any] = spec.to_dict()
    if spec.format == "sample":
        params.update(seed=acfg.sample_seed, users=acfg.sample_users, items=acfg.sample_items)
    else:
        params["fingerprint"] = {"reviews": local_fingerprint(spec.reviews), "meta": local_fingerprint(spec.meta),
                                 "mmrec": local_fingerprint(str(spec.mmrec_dir)) if spec.mmrec_dir else None}
    if acfg.revision is not None:  # new remote bytes (sand retrain): a new snapshot, old keys unchanged
        params["revision"] = acfg.revision

    def build(out: Path) -> dict[str, Any]:
        files: dict[str, Any] = {}
        if spec.format == "sample":
            # The sample's images play the part of the internet: outside the artifact, at a stable path, so their
            # file:// URLs stay valid after the rename.
            origin = ctx.store.data_root / "sample" / f"seed{acfg.sample_seed}-{acfg.sample_users}x{acfg.sample_items}"
            generated = generate_sample(origin, seed=acfg.sample_seed, n_users=acfg.sample_users,
                                        n_items=acfg.sample_items)
            for role, src in (("reviews", generated.reviews), ("meta", generated.meta)):
                files[role] = Path(shutil.copy2(src, out)).name  # copied into ``out`` under its own name
            return {"format": "amazon2014", "name": spec.name, "files": files, "sample_origin": str(origin)}
        if spec.format == "mmrec":
            for src in sorted(Path(spec.mmrec_dir).iterdir()):
                if src.is_file() and (src.suffix in MMREC_SUFFIXES or src.name == "README.md"):
                    link_or_copy(src, out / src.name)
                    files[src.name] = src.name
            return {"format": "mmrec", "name": spec.name, "files": files}
        downloads = ctx.store.data_root / "downloads"
        if acfg.revision is not None:  # the sidecars there vouch for the previous revision's bytes
            downloads = downloads / acfg.revision
        downloads.mkdir(parents=True, exist_ok=True)
        records = {}
        for role, source in (("reviews", spec.reviews), ("meta", spec.meta)):
            if not source:
                continue
            rec = fetch_file(source, downloads, timeout=acfg.timeout, retries=acfg.retries, progress=ctx.progress)
            dst = out / f"{role}-{rec.path.name}"
            link_or_copy(rec.path, dst)
            files[role] = dst.name
            records[role] = rec.to_dict()
        return {"format": spec.format, "name": spec.name, "files": files, "downloads": records}

    return ctx.run("acquire", params, {}, build)
