"""Complete-linkage hierarchical clustering cut into at most ``M`` clusters (CMD step 3), on arrays.

It reproduces ``scipy.cluster.hierarchy``: ``linkage(y, method="complete")`` (the nearest-neighbour
chain algorithm, then the merges sorted by height, stable, and relabelled) and ``fcluster(Z, M,
criterion="maxclust")`` (the same cut), merge for merge, ties included:
``tests/test_linkage.py`` pins it against scipy. Importing ``scipy.cluster`` costs a third of a
second at every start (it pulls in ``scipy.spatial``), more than the clustering itself; the
distances are formed here with one matrix product.
"""

from __future__ import annotations

import numpy as np


def row_distances(X: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``X`` (K, d), as a square (K, K) float64 matrix:
    ``‖x‖² + ‖y‖² − 2⟨x, y⟩`` from one BLAS product, clipped at 0, zero on the diagonal."""
    X = np.asarray(X, dtype=np.float64)
    gram = X @ X.T
    norms = np.diag(gram).copy()
    squared = norms[:, None] + norms[None, :] - 2.0 * gram
    np.maximum(squared, 0.0, out=squared)
    np.fill_diagonal(squared, 0.0)
    return np.sqrt(squared, out=squared)


def complete_linkage(distances: np.ndarray) -> np.ndarray:
    """The linkage matrix ``Z`` (n − 1, 4) of scipy's ``linkage(method="complete")`` for a square
    symmetric distance matrix: nearest-neighbour chain with scipy's tie rules (the previous chain
    element is preferred, then the lowest index), merges sorted by height (stable) and relabelled
    with scipy's union-find numbering."""
    n = distances.shape[0]
    D = np.array(distances, dtype=np.float64)
    np.fill_diagonal(D, np.inf)
    size = np.ones(n, dtype=np.int64)
    merges = np.empty((n - 1, 4))
    chain: list[int] = []
    for k in range(n - 1):
        if not chain:
            chain.append(int(np.flatnonzero(size)[0]))
        while True:  # follow nearest neighbours until two are each other's
            x = chain[-1]
            if len(chain) > 1:
                y, current = chain[-2], D[x, chain[-2]]
            else:
                current = np.inf
            nearest = int(np.argmin(D[x]))  # dropped clusters and x itself are at +inf
            if D[x, nearest] < current:
                y, current = nearest, D[x, nearest]
            if len(chain) > 1 and y == chain[-2]:
                break
            chain.append(y)
        del chain[-2:]
        x, y = min(x, y), max(x, y)
        merges[k] = x, y, current, size[x] + size[y]
        size[y] += size[x]
        size[x] = 0
        joined = np.maximum(D[x], D[y])  # complete linkage: the farthest pair
        D[y, :] = joined
        D[:, y] = joined
        D[y, y] = np.inf
        D[x, :] = np.inf
        D[:, x] = np.inf
    merges = merges[np.argsort(merges[:, 2], kind="mergesort")]
    return _relabel(merges, n)


def _relabel(Z: np.ndarray, n: int) -> np.ndarray:
    """scipy's ``label``: clusters named by the merge that made them (``n + i``), lower first."""
    parent = np.arange(2 * n - 1)
    sizes = np.ones(2 * n - 1, dtype=np.int64)

    def find(node: int) -> int:
        while parent[node] != node:
            node = parent[node]
        return node

    for i in range(n - 1):
        x, y = find(int(Z[i, 0])), find(int(Z[i, 1]))
        Z[i, 0], Z[i, 1] = min(x, y), max(x, y)
        parent[x] = parent[y] = n + i
        sizes[n + i] = sizes[x] + sizes[y]
        Z[i, 3] = sizes[n + i]
    return Z


def cut_max_clusters(Z: np.ndarray, M: int) -> np.ndarray:
    """scipy's ``fcluster(Z, M, criterion="maxclust")`` as a partition: one id per observation
    (numbered differently from scipy; the clusters are the same). The cut is at the lowest merge
    height that leaves at most ``M`` clusters, every merge at or below it taken (ties included);
    no cut at all when there are no more than ``M`` observations."""
    n = Z.shape[0] + 1
    if n <= M:
        return np.arange(n)
    heights = np.empty(n - 1)  # the largest merge height in each subtree (monotone up the tree)
    for i in range(n - 1):
        below = [heights[int(c) - n] for c in Z[i, :2] if c >= n]
        heights[i] = max([Z[i, 2], *below])
    clusters = n - np.searchsorted(np.sort(heights), heights, side="right")  # left by cutting at each height
    threshold = heights[np.flatnonzero(clusters <= M)].min()
    parent = np.arange(2 * n - 1)
    for i in np.flatnonzero(heights <= threshold):
        parent[Z[i, :2].astype(np.int64)] = n + i
    root = np.arange(n)
    while True:
        up = parent[root]
        if np.array_equal(up, root):
            return root
        root = up
