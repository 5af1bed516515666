"""Item-item kNN graphs from modality features, built block by block.

Why blocked: MMRec/SAND build the graph from a dense N x N cosine-similarity matrix (40 GB for 100,000 items); here rows
are processed ``block x N`` similarities at a time keeping only each row's top-k, so memory is O(N*k + block*N) for the
same graph: cosine similarity of the raw features (an all-zero row has similarity 0 with everything), each row's top-k
kept with weight 1, then D^-1/2 A D^-1/2 with degrees from the ROW sums (all k, so every value is 1/k).

Tie rule (deterministic): the item itself is forced in (``include_self=True``) or out; among the others, higher
similarity wins, then the lower item index. Similarities are float32 products, so items whose similarities differ only
in the last bits may be ordered differently by another block size or BLAS."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from sand.pipeline.base.devices import resolve_device
from sand.pipeline.base.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Similarity entries (block rows x N) held at once when ``block_size`` is None: 96M float32 = 384 MB, small enough for
#: a laptop, big enough that BLAS runs at full speed.
_DEFAULT_BLOCK_ELEMENTS = 96 * 1024 * 1024


def default_block_size(n_items: int) -> int:
    return int(max(1, min(n_items, _DEFAULT_BLOCK_ELEMENTS // max(n_items, 1))))


def _validate(features: np.ndarray, k: int, include_self: bool, block_size: int | None) -> np.ndarray:
    """Check shapes/values up front so a bad input fails with one line, not deep in torch."""
    x = np.asarray(features)
    if x.ndim != 2:
        raise DataError(f"features: expected a 2-D array (items x dims), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"features: expected numbers, got dtype {x.dtype}")
    n = x.shape[0]
    if n == 0:
        raise DataError("features: no items (0 rows)")
    step = max(1, _DEFAULT_BLOCK_ELEMENTS // 8 // max(x.shape[1], 1))  # NaN/inf checked in row blocks: no N x d copy
    bad = np.concatenate([start + np.flatnonzero(~np.isfinite(x[start : start + step]).all(axis=1))
                          for start in range(0, n, step)])
    if bad.size:
        r = int(bad[0])
        c = int(np.flatnonzero(~np.isfinite(x[r]))[0])
        raise DataError(f"features: non-finite value {x[r, c]} at row {r}, column {c} ({bad.size} rows affected)")
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ConfigError(f"k: expected an integer, got {k!r}")
    k_max = n if include_self else n - 1
    if k < 1 or k > k_max:
        raise ConfigError(f"k: must be between 1 and {k_max} (the number of items"
                          f"{'' if include_self else ' minus the item itself'}), got {k}")
    if block_size is not None and (isinstance(block_size, bool) or int(block_size) < 1):
        raise ConfigError(f"block_size: must be a positive integer or None, got {block_size!r}")
    return x


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero (similarity 0 to everything)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def query_rows(rows: np.ndarray | None, n: int) -> np.ndarray:
    queries = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    if queries.size and (queries.min() < 0 or queries.max() >= n):
        raise ConfigError(f"rows: item indices must be in 0..{n - 1}")
    return queries


def knn_neighbours(features: np.ndarray, k: int = 10, *, include_self: bool = True, block_size: int | None = None,
                   progress: bool = False, device: str | None = None, rows: np.ndarray | None = None) -> np.ndarray:
    """(N x k) int64 indices of each row's top-k cosine neighbours (tie rule in module doc), each row sorted by index.
    ``device`` None: CUDA when available. ``rows``: only these items' rows, e.g. a recall sample."""
    import torch  # lazy: torch takes seconds to import

    x = _validate(features, k, include_self, block_size)
    n = x.shape[0]
    queries = query_rows(rows, n)
    bs = default_block_size(n) if block_size is None else min(int(block_size), n)
    dev = resolve_device(device)
    xn = l2_normalise(x)
    # One more than k: if the (k+1)-th best equals the k-th, the row has a tie at the boundary.
    kk = min(k + 1, n)
    diag_value = math.inf if include_self else -math.inf
    out = np.empty((len(queries), k), dtype=np.int64)
    n_tie_rows = 0
    if dev.type == "cpu":
        # numpy's BLAS matmul into one reused buffer (torch.topk reads it zero-copy): faster than torch.mm here, and no
        # fresh block x N allocation to page-fault per block
        buf = np.empty((bs, n), dtype=np.float32)
    else:
        xg = torch.from_numpy(xn).to(dev)
        xgt = xg.T  # a view: cuBLAS takes the transpose flag, no second N x d copy on the GPU
    with torch.inference_mode():
        for start in tqdm(range(0, len(queries), bs), desc="kNN blocks", disable=not progress, unit="block"):
            stop = min(start + bs, len(queries))
            b = stop - start
            q = queries[start:stop]
            contiguous = rows is None  # all rows: a slice, no gather
            if dev.type == "cpu":
                # xn.T: a BLAS transpose flag, no copy
                np.matmul(xn[start:stop] if contiguous else xn[q], xn.T, out=buf[:b])
                sims = torch.from_numpy(buf[:b])
            else:
                sims = torch.mm(xg[start:stop] if contiguous else xg[torch.from_numpy(q).to(dev)], xgt)
            sims[torch.arange(b, device=dev), torch.from_numpy(q).to(dev)] = diag_value
            vals, idx = torch.topk(sims, kk, dim=1, largest=True, sorted=True)
            idx = idx[:, :k].clone()
            if kk > k:
                # topk picks arbitrarily among items tied at the k-th value: redo those rows by the tie rule.
                tie_rows = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten().tolist()
                for r in tie_rows:
                    row, t = sims[r], vals[r, k - 1]
                    above = torch.nonzero(row > t).flatten()
                    equal = torch.nonzero(row == t).flatten()[: k - above.numel()]
                    idx[r] = torch.cat([above, equal])
                n_tie_rows += len(tie_rows)
            out[start:stop] = np.sort(idx.cpu().numpy(), axis=1)
            del sims, vals, idx
    if n_tie_rows:
        log.debug("kNN: %d of %d rows had ties at the k-th similarity (broken by lower index)", n_tie_rows, n)
    return out


def knn_graph(features: np.ndarray, k: int = 10, **options: Any) -> sp.csr_matrix:
    """The normalised top-k cosine graph (N x N, float32 CSR; ``options``: those of :func:`knn_neighbours`)."""
    return graph_from_neighbours(knn_neighbours(features, k, **options))


def graph_from_neighbours(nbrs: np.ndarray) -> sp.csr_matrix:
    """The binary graph of an (N x k) neighbour table (exact or approximate), normalised D^-1/2 A D^-1/2 with D from the
    row sums (MMRec's choice for the non-symmetric kNN graph)."""
    n, k = nbrs.shape
    indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
    a = sp.csr_matrix((np.ones(n * k, dtype=np.float32), nbrs.ravel(), indptr), shape=(n, n))
    deg = np.asarray(a.sum(axis=1), dtype=np.float64).ravel()
    inv_sqrt = np.zeros_like(deg)
    np.power(deg, -0.5, out=inv_sqrt, where=deg > 0)
    coo = a.tocoo()
    vals = (coo.data * inv_sqrt[coo.row] * inv_sqrt[coo.col]).astype(np.float32)
    out = sp.csr_matrix((vals, (coo.row, coo.col)), shape=a.shape)
    out.sort_indices()
    return out


def save_graph(path: str | Path, graph: sp.spmatrix) -> None:
    """Write a graph as a compressed ``.npz`` that loads without pickle."""
    sp.save_npz(Path(path), sp.csr_matrix(graph), compressed=True)


def load_graph(path: str | Path) -> sp.csr_matrix:
    """Read a graph written by :func:`save_graph`; a missing/broken file is a one-line DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: graph file not found")
    try:
        return sp.csr_matrix(sp.load_npz(p))  # scipy loads with allow_pickle=False
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise DataError(f"{p}: not a readable sparse graph file ({type(err).__name__}: {err})") from err
