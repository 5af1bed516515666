"""Blocked kNN graphs equal a dense reference; normalisation, persistence and errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from sand.pipeline.base.errors import ConfigError, DataError
from sand.pipeline.features.knn import knn_graph, knn_neighbours, load_graph, save_graph


def _features(n: int = 300, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _dense_reference(x: np.ndarray, k: int, include_self: bool) -> sp.csr_matrix:
    """MMRec's recipe on a dense N x N matrix (float64): top-k cosine, binary, row-degree sym-norm."""
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    xn = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    sim = xn @ xn.T
    np.fill_diagonal(sim, np.inf if include_self else -np.inf)
    nbrs = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    n = len(x)
    a = np.zeros((n, n))
    a[np.repeat(np.arange(n), k), nbrs.ravel()] = 1.0
    d = a.sum(axis=1) ** -0.5
    return sp.csr_matrix(d[:, None] * a * d[None, :])


@pytest.mark.parametrize("block_size", [1, 7, 64, 299, 300, 1000, None])
@pytest.mark.parametrize("include_self", [True, False])
def test_blocked_equals_dense_reference(block_size: int | None, include_self: bool) -> None:
    x = _features()
    k = 10
    got = knn_graph(x, k, include_self=include_self, block_size=block_size)
    ref = _dense_reference(x, k, include_self)
    assert got.shape == (300, 300) and got.dtype == np.float32
    assert (got != 0).sum() == 300 * k
    np.testing.assert_array_equal((got != 0).toarray(), (ref != 0).toarray())
    np.testing.assert_allclose(got.toarray(), ref.toarray(), rtol=0, atol=1e-7)


def test_every_value_is_one_over_k_and_self_included() -> None:
    x = _features(n=120, d=8, seed=1)
    for k in (1, 5, 120):
        g = knn_graph(x, k, include_self=True, block_size=50)
        np.testing.assert_allclose(g.data, 1.0 / k, rtol=1e-6)
        np.testing.assert_array_equal(g.diagonal(), np.full(120, 1.0 / k, dtype=np.float32))
        assert np.all(np.diff(g.indptr) == k)


def test_exclude_self_has_empty_diagonal() -> None:
    g = knn_graph(_features(n=50, d=4, seed=2), 49, include_self=False, block_size=16)
    assert g.diagonal().sum() == 0
    assert np.all(np.diff(g.indptr) == 49)


def test_ties_break_by_lower_index_and_zero_rows() -> None:
    # Rows 0..4 identical, rows 5..6 all-zero: the k-th similarity is tied for them.
    x = _features(n=40, d=6, seed=3)
    x[1:5] = x[0]
    x[5:7] = 0.0
    for bs in (3, 40):
        nb = knn_neighbours(x, 3, include_self=True, block_size=bs)
        # Item 3: itself forced in, then the lowest-index equals among the four duplicates.
        np.testing.assert_array_equal(nb[3], [0, 1, 3])
        # A zero row has similarity 0 to everything: itself, then the lowest indices.
        np.testing.assert_array_equal(nb[6], [0, 1, 6])
        nb_ex = knn_neighbours(x, 2, include_self=False, block_size=bs)
        np.testing.assert_array_equal(nb_ex[0], [1, 2])
        np.testing.assert_array_equal(nb_ex[5], [0, 1])
    assert np.isfinite(knn_graph(x, 3, block_size=7).data).all()


def test_same_bytes_for_every_block_size_and_thread_count_and_equal_to_brute_force() -> None:
    """Blocking and threading change how the work is cut, never the result: bit for bit."""
    import torch

    x = _features(n=200, d=12, seed=4)
    k = 7
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, np.inf)
    brute = np.sort(np.argsort(-sim, axis=1, kind="stable")[:, :k], axis=1)  # independent top-k

    threads = torch.get_num_threads()
    graphs = []
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for block_size in (1, 33, 200):
                np.testing.assert_array_equal(knn_neighbours(x, k, block_size=block_size), brute)
                graphs.append(knn_graph(x, k, block_size=block_size))
    finally:
        torch.set_num_threads(threads)
    first = graphs[0]
    for g in graphs[1:]:
        np.testing.assert_array_equal(g.indptr, first.indptr)
        np.testing.assert_array_equal(g.indices, first.indices)
        assert g.data.tobytes() == first.data.tobytes()


def test_save_load_round_trip(tmp_path) -> None:
    g = knn_graph(_features(n=80, d=9, seed=7), 5)
    path = tmp_path / "text_graph.npz"
    save_graph(path, g)
    back = load_graph(path)
    assert isinstance(back, sp.csr_matrix) and back.dtype == g.dtype and back.shape == g.shape
    assert (back != g).nnz == 0
    np.testing.assert_array_equal(back.indices, g.indices)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_graph(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="bad.npz"):
        load_graph(bad)


def test_errors() -> None:
    x = _features(n=20, d=3)
    with pytest.raises(ConfigError, match="^k: .*got 0$"):
        knn_graph(x, 0)
    with pytest.raises(ConfigError, match="^k: .*got 21$"):
        knn_graph(x, 21)
    with pytest.raises(ConfigError, match="^k: "):
        knn_graph(x, 20, include_self=False)
    with pytest.raises(ConfigError, match="block_size"):
        knn_graph(x, 3, block_size=0)
    x_nan = x.copy()
    x_nan[4, 2] = np.nan
    with pytest.raises(DataError, match="row 4, column 2"):
        knn_graph(x_nan, 3)
    with pytest.raises(DataError, match="2-D"):
        knn_graph(x[0], 3)
    for err in (ConfigError, DataError):
        try:
            knn_graph(x_nan if err is DataError else x, 3 if err is DataError else 99)
        except err as e:
            assert "\n" not in str(e)
