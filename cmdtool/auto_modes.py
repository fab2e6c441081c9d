"""Choosing ``M`` (``--modes auto``, not in the paper): the held-out error of the fit against ``M``,
and the smallest ``M`` within 5 % of the best. Pure functions on the sampled trajectories."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from .decompose import find_modes, heldout_error, linkage_tree, normalise_references


class ErrorCurve(NamedTuple):
    modes: np.ndarray      # (n,) the M asked for
    found: np.ndarray      # (n,) the modes the clustering gave (at most M)
    rel_error: np.ndarray  # (n,) held-out relative error of each
    chosen: int            # the M chosen (see ``choose_modes``)


AUTO_TOLERANCE = 0.05


def choose_modes(modes: Sequence[int], rel_error: Sequence[float], tolerance: float = AUTO_TOLERANCE) -> int:
    """The smallest ``M`` whose held-out error is within ``tolerance`` (relative, 5 %) of the
    smallest error on the curve: more modes than that cost storage and buy less than 5 %."""
    errors = np.asarray(rel_error, dtype=np.float64)
    best = float(errors.min())
    return int(np.asarray(modes)[np.flatnonzero(errors <= best * (1 + tolerance))[0]])


def error_curve(trajectories: np.ndarray, C: np.ndarray, held_out: np.ndarray, modes: Sequence[int],
                refine: int = 0, tolerance: float = AUTO_TOLERANCE, tree: np.ndarray | None = None) -> ErrorCurve:
    """Held-out error against ``M``: modes and references found on the sample ``trajectories``
    (``C`` its ``|corr|``), measured on the independent sample ``held_out``. One linkage
    (``tree``, else ``linkage_tree(C)``) gives the clusters of every ``M``: one cut each."""
    tree = linkage_tree(C) if tree is None and C.shape[0] > 1 else tree
    found, errors = [], []
    for M in modes:
        _, positions = find_modes(trajectories, C, int(M), refine, tree)
        references = normalise_references(trajectories[:, positions].T).references
        found.append(len(positions))
        errors.append(heldout_error(held_out, references))
    modes = np.asarray(modes, dtype=np.int64)
    return ErrorCurve(modes, np.asarray(found, dtype=np.int64), np.asarray(errors),
                      choose_modes(modes, errors, tolerance))
