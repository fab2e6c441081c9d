"""cmdtool/linkage.py reproduces scipy's complete linkage and maxclust cut, merge for merge."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

from cmdtool.linkage import complete_linkage, cut_max_clusters, row_distances


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings describe the same clusters (whatever the numbering)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def matrices():
    rng = np.random.default_rng(0)
    for n in (2, 3, 4, 5, 8, 17, 60, 200):
        yield f"uniform-{n}", squareform(pdist(rng.random((n, 6))))
        # small integers: many exactly equal distances, so every tie rule shows
        yield f"ties-{n}", squareform(rng.integers(1, 4, n * (n - 1) // 2).astype(np.float64))
        yield f"duplicates-{n}", squareform(pdist(rng.integers(0, 2, (n, 3)).astype(np.float64)))
    C = np.abs(np.corrcoef(rng.standard_normal((300, 30)).cumsum(axis=1)))  # like CMD's |corr| rows
    yield "correlation-300", squareform(pdist(C), checks=False)


@pytest.mark.parametrize("name, D", list(matrices()), ids=lambda v: v if isinstance(v, str) else "")
def test_linkage_and_cut_equal_scipys(name, D):
    n = D.shape[0]
    want = linkage(squareform(D, checks=False), method="complete")
    got = complete_linkage(D)
    assert np.array_equal(got, want), name
    for M in range(1, min(n, 12) + 2):
        expected = fcluster(want, t=M, criterion="maxclust")
        assert same_partition(cut_max_clusters(got, M), expected), (name, M)


def test_row_distances_match_pdist_to_rounding():
    rng = np.random.default_rng(1)
    X = rng.random((150, 150))
    np.testing.assert_allclose(row_distances(X), squareform(pdist(X)), rtol=1e-12, atol=1e-12)
    assert (np.diag(row_distances(X)) == 0).all()


def test_clustering_does_not_import_scipy_spatial():
    code = ("import sys, numpy as np; from cmdtool.decompose import cluster; "
            "cluster(np.abs(np.corrcoef(np.random.default_rng(0).random((40, 9)))), 4); "
            "print(any(m.startswith(('scipy.spatial', 'scipy.cluster')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
