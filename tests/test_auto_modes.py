"""Choosing M (--modes auto): the held-out error curve recovers the planted number of modes, the
rule picks the smallest M within 5 % of the best, and a fit costs one linkage for all its cuts."""

from __future__ import annotations

import numpy as np
import pytest

from cmdtool.auto_modes import choose_modes, error_curve
from cmdtool.decompose import correlation_matrix, sample_parameters
from helpers import plant, write_run


@pytest.mark.parametrize("M, noise", [(2, 1e-4), (3, 1e-4), (3, 1e-2), (5, 1e-3)])
def test_error_curve_recovers_the_planted_number_of_modes(M, noise):
    planted = plant(M=M, T=20, noise=noise, seed=0)
    N = planted.W.shape[1]
    first = sample_parameters([N], np.ones(N, bool), 300, 0)
    second = np.setdiff1d(sample_parameters([N], np.ones(N, bool), 300, 1), first)
    C = correlation_matrix(planted.W[:, first])
    curve = error_curve(planted.W[:, first], C, planted.W[:, second], range(1, 9))
    assert curve.chosen == M
    assert list(curve.modes) == list(range(1, 9)) and list(curve.found[:M]) == list(range(1, M + 1))
    assert curve.rel_error[M - 2] > 10 * curve.rel_error[M - 1]  # one mode too few explains much less
    assert curve.rel_error[M - 1] < 3 * noise / planted.W[:, second].std()  # at M the error is the noise's


def test_choose_modes_takes_the_smallest_within_five_percent_of_the_best():
    assert choose_modes([1, 2, 5, 10, 20], [0.5, 0.3, 0.2, 0.161, 0.154]) == 10  # 0.161 <= 1.05 · 0.154 = 0.1617
    assert choose_modes([1, 2, 3], [0.2, 0.1, 0.1]) == 2
    assert choose_modes([1, 2, 3], [0.1, 0.2, 0.3]) == 1


def test_fit_costs_one_linkage_for_every_cut_of_modes_auto(tmp_path, planted, monkeypatch):
    """``--modes auto`` tries M = 1 … 20 and then fits the chosen M: all 21 clusterings are cuts of
    one linkage. With the 2-fold split (too few parameters left to hold out), each half has its own."""
    import scipy.cluster.hierarchy

    from cmdtool.fitting import fit_trajectory
    from cmdtool.modes import FitSettings
    from cmdtool.stores import prepare_store

    calls = []
    real = scipy.cluster.hierarchy.linkage

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(scipy.cluster.hierarchy, "linkage", counted)
    store = prepare_store(write_run(tmp_path / "run", planted.states()), trajectory=tmp_path / "t.h5").store
    held_out = fit_trajectory(store, FitSettings(modes=20, auto_modes=20, samples=300))
    curve = held_out.metrics.error_curve
    assert "held-out" in curve["measured_on"] and curve["modes"] == list(range(1, 21))
    assert held_out.settings.modes == 3 and len(calls) == 1  # one linkage, 20 + 1 cuts
    calls.clear()
    fit_trajectory(store, FitSettings(modes=5))
    assert len(calls) == 1
    calls.clear()
    split = fit_trajectory(store, FitSettings(modes=20, auto_modes=20))  # the sample takes every parameter
    assert "2-fold split" in split.metrics.error_curve["measured_on"]
    K = int(np.count_nonzero(store.varies))
    assert len(calls) == 3 and sorted(calls) == sorted([(K // 2 * (K // 2 - 1) // 2,),
                                                       ((K - K // 2) * (K - K // 2 - 1) // 2,), (K * (K - 1) // 2,)])
    calls.clear()
    fit_trajectory(store, FitSettings(modes=1))
    assert calls == []  # one mode needs no clustering
