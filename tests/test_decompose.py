"""CMD math on planted data: recovery, agreement with a plain in-memory implementation, invariances."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.special import comb

import cmdtool
from cmdtool.decompose import (
    _allocate,
    _largest_magnitude,
    choose_references,
    cluster,
    correlation_matrix,
    fit_tile,
    normalise_references,
    sample_parameters,
)
from cmdtool.modefile import open_mode_file
from helpers import plant, write_run


def adjusted_rand_index(x: np.ndarray, y: np.ndarray) -> float:
    """Hubert & Arabie's ARI: 1 for identical partitions up to renaming, ~0 for chance."""
    _, xi = np.unique(x, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    table = np.zeros((xi.max() + 1, yi.max() + 1))
    np.add.at(table, (xi, yi), 1)
    pairs = comb(table, 2).sum()
    rows, cols, total = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum(), comb(len(x), 2)
    expected = rows * cols / total
    return float((pairs - expected) / ((rows + cols) / 2 - expected))


def dense_reconstruction(path) -> np.ndarray:
    """Ŵ (T, N) from a mode file, computed directly from its datasets in float64."""
    with h5py.File(path, "r") as f:
        references, labels = f["references"][()].astype(np.float64), f["labels"][()]
        return f["a"][()] * references[labels].T + f["b"][()].astype(np.float64)


def naive_cmd(W: np.ndarray, sample: np.ndarray, M: int, refine: int = 0):
    """The same steps written the plain way, all in memory, against the raw references; with
    ``refine``, that many Lloyd passes over the sample (assign by |corr|, re-pick each reference as
    the member of least total squared error).

    Returns (labels, predictions Ŵ) for comparison with the streaming implementation.
    """
    S = W[:, sample]
    C = np.nan_to_num(np.abs(np.corrcoef(S.T)))
    raw = fcluster(linkage(C, method="complete", metric="euclidean"), t=M, criterion="maxclust")
    clusters = sorted({c: np.flatnonzero(raw == c) for c in np.unique(raw)}.values(), key=lambda m: (-len(m), m[0]))
    reference_columns = []
    for members in clusters:
        mean_corr = [np.mean([C[i, j] for j in members if j != i]) if len(members) > 1 else 1.0 for i in members]
        reference_columns.append(sample[members[int(np.argmax(mean_corr))]])
    for _ in range(refine):
        position = {c: i for i, c in enumerate(sample)}
        refs = [position[c] for c in reference_columns]
        assigned = [int(np.argmax([C[i, r] for r in refs])) for i in range(len(sample))]
        for m, r in enumerate(refs):
            assigned[r] = m
        new = []
        for m in range(len(refs)):
            members = [i for i in range(len(sample)) if assigned[i] == m]
            sq = [np.sum((S[:, i] - S[:, i].mean()) ** 2) for i in members]
            errors = [sum(sq[k] * (1 - C[i, j] ** 2) for k, i in enumerate(members)) for j in members]
            new.append(sample[members[int(np.argmin(errors))]])
        if new == reference_columns:
            break
        reference_columns = new
    R = W[:, reference_columns]  # (T, M) raw reference trajectories
    labels = np.empty(W.shape[1], dtype=int)
    prediction = np.empty_like(W)
    for i in range(W.shape[1]):
        w = W[:, i]
        if np.all(w == w[0]):
            labels[i], prediction[:, i] = 0, w[0]
            continue
        corr = [abs(np.corrcoef(w, R[:, m])[0, 1]) for m in range(R.shape[1])]
        m = int(np.argmax(corr))
        slope, intercept = np.polyfit(R[:, m], w, 1)
        labels[i], prediction[:, i] = m, slope * R[:, m] + intercept
    return labels, prediction


def fit_run(tmp_path, planted, **options):
    """Fit a planted run; returns the result, the mode file, and the planted W in layout order."""
    run = write_run(tmp_path / "run", planted.states())
    out = tmp_path / "m.cmd.h5"
    result = cmdtool.fit(run, out, trajectory=tmp_path / "traj.h5", **options)
    with open_mode_file(out) as modes:
        order = planted.permutation(modes.layout)
    return result, out, order


def test_planted_modes_are_recovered(tmp_path):
    planted = plant(M=4, T=24, noise=1e-4, seed=1)
    result, out, order = fit_run(tmp_path, planted, modes=4, samples=400)
    with open_mode_file(out) as modes:
        labels = modes.parameters()[0]
        assert modes.M == 4
    assert adjusted_rand_index(labels, planted.labels[order]) >= 0.99
    # Error at the noise level: the planted noise is 1e-4 per entry.
    W32 = planted.W[:, order].astype(np.float32).astype(np.float64)
    rms_error = np.sqrt(np.mean((dense_reconstruction(out) - W32) ** 2))
    assert 0.5e-4 < rms_error < 1.5e-4
    assert result.summary["rel_error"] == pytest.approx(
        np.linalg.norm(dense_reconstruction(out) - W32) / np.linalg.norm(W32), rel=1e-4
    )


@pytest.mark.parametrize("refine", [0, 3])
def test_streaming_fit_equals_naive_in_memory_implementation(tmp_path, refine):
    planted = plant(M=3, T=15, noise=0.05, seed=2)  # noisy enough that choices are not trivial
    _, out, order = fit_run(tmp_path, planted, modes=5, samples=200, seed=3, tile_columns=97, refine=refine)
    W32 = planted.W[:, order].astype(np.float32).astype(np.float64)
    with open_mode_file(out) as modes:
        store_varies = np.ptp(W32, axis=0) > 0
        sample = sample_parameters([s.size for s in modes.layout.modelled], store_varies, 200, 3)
        labels = modes.parameters()[0]
        naive_labels, naive_prediction = naive_cmd(W32, sample, 5, refine)
        assert np.array_equal(sample[np.isin(sample, modes.reference_index)], np.sort(modes.reference_index))
    assert np.array_equal(labels, naive_labels)
    np.testing.assert_allclose(dense_reconstruction(out), naive_prediction, rtol=0, atol=1e-5 * np.abs(W32).max())


def test_results_do_not_depend_on_the_tile_size(tmp_path):
    planted = plant(M=3, T=12, seed=4)
    run = write_run(tmp_path / "run", planted.states())
    outputs = []
    for tile in (1, 13, 100_000):
        out = tmp_path / f"m{tile}.cmd.h5"
        cmdtool.fit(run, out, modes=3, samples=300, trajectory=tmp_path / "traj.h5", tile_columns=tile)
        with h5py.File(out, "r") as f:
            outputs.append((f["labels"][()], f["a"][()], f["b"][()]))
    for labels, a, b in outputs[1:]:
        assert np.array_equal(labels, outputs[0][0])
        np.testing.assert_allclose(a, outputs[0][1], rtol=1e-6, atol=0)
        np.testing.assert_allclose(b, outputs[0][2], rtol=1e-6, atol=0)


def test_allocation_is_even_then_proportional_and_capped():
    capacity = np.array([10, 1000, 90000])
    even = _allocate(500, capacity, np.ones(3))
    assert even.tolist() == [10, 245, 245]
    proportional = _allocate(500, capacity - even, capacity.astype(float))
    assert proportional.tolist() == [0, 5, 495]


def test_sample_is_reproducible_layer_balanced_and_never_constant():
    sizes = [10, 1000, 90000]
    varies = np.ones(sum(sizes), dtype=bool)
    varies[10:510] = False  # half of the second tensor is constant
    sample = sample_parameters(sizes, varies, 1000, seed=7)
    assert len(sample) == 1000 and len(np.unique(sample)) == 1000
    assert varies[sample].all()
    counts = np.histogram(sample, bins=[0, 10, 1010, 91010])[0]
    # even half: 10 + 245 + 245; proportional half over 0 : 500 : 90000 varying -> 0 + 3 + 497
    assert counts.tolist() == [10, 248, 742]
    assert np.array_equal(sample, sample_parameters(sizes, varies, 1000, seed=7))
    assert not np.array_equal(sample, sample_parameters(sizes, varies, 1000, seed=8))
    # K larger than the number of varying parameters: take them all.
    assert len(sample_parameters([5, 5], np.array([1, 0] * 5, dtype=bool), 1000, seed=0)) == 5


def test_correlation_matrix_is_absolute_pearson_with_constants_zeroed():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(9, 4))
    X[:, 2] = -3 * X[:, 0] + 1  # perfectly anti-correlated with column 0
    X[:, 3] = 5.0  # constant
    C = correlation_matrix(X)
    expected = np.abs(np.corrcoef(X[:, :3].T))
    np.testing.assert_allclose(C[:3, :3], expected, atol=1e-12)
    assert C[0, 2] == pytest.approx(1.0)
    assert (C[3] == 0).all() and (C[:, 3] == 0).all()


def test_clusters_are_numbered_by_size_and_references_are_most_central():
    # Two tight groups of 3 and 5 plus a loner, as correlation rows.
    groups = [0, 0, 0, 1, 1, 1, 1, 1, 2]
    C = np.array([[1.0 if gi == gj else 0.05 for gj in groups] for gi in groups])
    C[4, 5] = C[5, 4] = C[4, 6] = C[6, 4] = C[4, 7] = C[7, 4] = 0.9  # member 4 less central
    labels = cluster(C, 3)
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 2]
    references = choose_references(C, labels)
    assert references[1] == 0 and references[2] == 8
    assert references[0] == 3  # 3, 5, 6, 7 tie at the top; 4 is out; argmax takes the first


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings describe the same clusters (whatever the numbering)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def near_duplicate_trajectories(rng: np.random.Generator) -> np.ndarray:
    """(T, K) trajectories as CMD meets them: a few families of random walks, and within them
    parameters that move almost identically (a copy plus 1e-9 noise), exactly alike up to scale
    and shift (equal rows of ``C``: tied distances), or constant (zero rows)."""
    T, families = int(rng.integers(4, 30)), int(rng.integers(1, 6))
    base = rng.standard_normal((T, families)).cumsum(axis=0)
    columns = []
    for _ in range(int(rng.integers(3, 70))):
        kind = rng.integers(0, 4)
        source = base[:, rng.integers(0, families)]
        if kind == 0:  # the family plus its own motion
            columns.append(source + rng.uniform(0.01, 1.0) * rng.standard_normal(T).cumsum())
        elif kind == 1 and columns:  # near-duplicate of an earlier parameter
            columns.append(columns[rng.integers(0, len(columns))] + 1e-9 * rng.standard_normal(T))
        elif kind == 2 and columns:  # an exact affine copy: its row of C equals the original's
            columns.append(rng.choice([-2.0, 0.5, 3.0]) * columns[rng.integers(0, len(columns))] + 1.0)
        else:
            columns.append(source * rng.uniform(0.5, 2.0) if rng.random() < 0.9 else np.full(T, 0.3))
    return np.column_stack(columns)


def test_clusters_equal_scipys_on_near_duplicate_and_tied_rows():
    """Step 3 is scipy's complete linkage on Euclidean distances between the rows of C, cut by
    ``fcluster(maxclust)``, written the plain way (scipy forms the distances from the rows): the
    same partition in each of 200 cases, every cut; modes numbered by size, largest first."""
    rng = np.random.default_rng(19)
    for case in range(200):
        C = correlation_matrix(near_duplicate_trajectories(rng))
        tree = linkage(C, method="complete", metric="euclidean")
        for M in (2, 3, 5, int(rng.integers(2, 12))):
            expected = fcluster(tree, t=M, criterion="maxclust")
            labels = cluster(C, M)
            assert same_partition(labels, expected), (case, M)
            sizes = np.bincount(labels)
            assert (np.diff(sizes) <= 0).all() and len(sizes) <= M, (case, M)


def test_fit_tile_against_normalised_references():
    t = np.linspace(0, 1, 10)
    raw = np.stack([t**2, np.sin(3 * t)])
    normalised = normalise_references(raw)
    np.testing.assert_allclose(normalised.references.sum(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(normalised.references, axis=1), 1)
    np.testing.assert_allclose(normalised.references * normalised.scale[:, None] + normalised.offset[:, None], raw)
    block = np.stack([2 * t**2 + 1, -0.5 * np.sin(3 * t) + 4, np.full(10, 0.1, dtype=np.float32)], axis=1)
    fit = fit_tile(block, normalised.references)
    assert fit.labels.tolist() == [0, 1, 0]
    prediction = fit.a * normalised.references[fit.labels].T + fit.b
    np.testing.assert_allclose(prediction[:, :2], block[:, :2], atol=1e-12)
    np.testing.assert_allclose(fit.sse[:2], 0, atol=1e-12 * fit.sq_centred[:2].max())
    assert fit.a[2] == 0 and fit.b[2] == np.float64(np.float32(0.1))  # constant: exact


def direct_fit_tile(block: np.ndarray, references: np.ndarray) -> dict:
    """Steps 5–6 the direct way (centre in float64, argmax of |D|): what ``fit_tile`` must equal."""
    X = block.astype(np.float64)
    mean = X.mean(axis=0)
    centred = X - mean
    D = references @ centred
    labels = np.argmax(np.abs(D), axis=0)
    a = D[labels, np.arange(X.shape[1])]
    constant = (X == X[0]).all(axis=0)
    a[constant] = 0.0
    sq_centred = (centred**2).sum(axis=0)
    return dict(
        labels=labels,
        a=a,
        b=np.where(constant, X[0], mean),
        sq_centred=sq_centred,
        sse=np.maximum(sq_centred - a * a, 0.0),
        sq_norm=(X**2).sum(axis=0),
        sq_displacement=((X - X[0]) ** 2).sum(axis=0),
    )


def test_fit_tile_equals_the_direct_computation():
    """``fit_tile`` works from displacements and one product with ``[references; 1]``; it must give
    what centring and ``argmax`` give, also for large offsets with tiny motion and constant columns."""
    rng = np.random.default_rng(5)
    T, M, n = 25, 6, 4000
    references = normalise_references(np.cumsum(rng.standard_normal((M, T)), axis=1)).references
    modes = rng.integers(0, M, n)
    offset = rng.choice([0.0, 1.0, 100.0, -3e3], n)
    motion = rng.choice([1.0, 1e-3, 1e-6], n)
    W = offset + motion * (rng.standard_normal(n) * references[modes].T + 0.3 * rng.standard_normal((T, n)))
    block = W.astype(np.float32)
    block[:, :10] = block[0, :10]  # constant columns
    block[:, 10] = block[:, 11]  # a duplicate
    fit, direct = fit_tile(block, references), direct_fit_tile(block, references)
    assert np.array_equal(fit.labels, direct["labels"])
    scale = np.sqrt(direct["sq_centred"])  # how far each parameter moves
    np.testing.assert_allclose(np.abs(fit.a - direct["a"]) / np.maximum(scale, 1e-300), 0, atol=1e-9)
    np.testing.assert_allclose(fit.b - direct["b"], 0, atol=1e-12 * np.abs(offset).max())
    assert np.array_equal(fit.b[:10], block[0, :10].astype(np.float64)) and (fit.a[:10] == 0).all()
    np.testing.assert_allclose(fit.sq_centred, direct["sq_centred"], rtol=1e-9, atol=1e-12 * scale.max() ** 2)
    np.testing.assert_allclose(fit.sq_displacement, direct["sq_displacement"], rtol=1e-12)
    np.testing.assert_allclose(fit.sq_norm, direct["sq_norm"], rtol=1e-12)
    np.testing.assert_allclose(fit.sse, direct["sse"], rtol=1e-6, atol=1e-9 * direct["sq_centred"].max())


def test_largest_magnitude_picks_the_first_of_equal_magnitudes_as_argmax_does():
    D = np.array([[1.0, -2.0, 0.5, 0.0], [-1.0, 2.0, -3.0, 0.0], [0.5, -2.5, 3.0, 0.0]])
    labels, a = _largest_magnitude(D)
    assert labels.tolist() == np.argmax(np.abs(D), axis=0).tolist() == [0, 2, 1, 0]
    assert a.tolist() == [1.0, -2.5, -3.0, 0.0]


@pytest.mark.parametrize("M, dtype", [(1, np.uint8), (7, np.uint8), (256, np.uint8), (300, np.uint16), (9, np.intp)])
def test_largest_magnitude_equals_argmax_in_every_label_dtype(M, dtype):
    """The running maximum gives argmax's rows (first on ties: small integers tie often, signs
    differing) into labels of the mode file's dtype, and the signed entry."""
    D = np.random.default_rng(M).integers(-3, 4, size=(M, 5000)).astype(np.float64)
    D[:, :3] = 0.0  # all tied
    labels = np.full(D.shape[1], 99, dtype=dtype)  # overwritten
    got, a = _largest_magnitude(D, labels)
    expected = np.argmax(np.abs(D), axis=0)
    assert got is labels and got.dtype == dtype
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(a, D[expected, np.arange(D.shape[1])])


def test_fit_tile_slices_do_not_change_the_result(monkeypatch):
    """fit_tile works through a tile in cache-sized slices; any slicing gives the same fit."""
    import cmdtool.decompose as decompose

    rng = np.random.default_rng(6)
    T, n = 12, 1000
    references = normalise_references(rng.standard_normal((4, T))).references
    block = (rng.standard_normal((T, n)) + rng.standard_normal(n)).astype(np.float32)
    whole = fit_tile(block, references)
    for columns in (1, 7, 999):
        monkeypatch.setattr(decompose, "CHUNK_BYTES", 8 * T * columns)
        sliced = fit_tile(block, references)
        assert np.array_equal(sliced.labels, whole.labels)
        for field in ("a", "b", "sse", "sq_norm", "sq_displacement", "sq_centred"):
            np.testing.assert_allclose(getattr(sliced, field), getattr(whole, field), rtol=1e-12, atol=1e-12)


def test_skipping_constant_columns_gives_the_same_fit_bit_for_bit(monkeypatch):
    """``fit_tile(..., varies)`` never computes runs of constant columns; what it fills in for them
    must be exactly what the full computation gives (negative zeros included), and so must the
    varying columns between and around them."""
    import cmdtool.decompose as decompose

    rng = np.random.default_rng(7)
    T, n = 9, 3000
    references = normalise_references(rng.standard_normal((5, T))).references
    block = (rng.standard_normal((T, n)) * rng.choice([1.0, 1e-4], n) + rng.standard_normal(n)).astype(np.float32)
    constant = np.zeros(n, dtype=bool)
    for start, stop in ((0, 40), (100, 103), (500, 1700), (2990, 3000)):
        constant[start:stop] = True
    constant[rng.choice(n, 50, replace=False)] = True  # scattered single constants
    block[:, constant] = block[0, constant]
    block[:, 600:610] = -0.0
    block[:, 610:620] = 0.0
    full = fit_tile(block, references)
    for gap in (1, 5, 4096):
        monkeypatch.setattr(decompose, "MERGE_COLUMNS", gap)
        skipped = fit_tile(block, references, ~constant)
        for name, want, got in zip(full._fields, full, skipped):
            assert want.dtype == got.dtype and want.tobytes() == got.tobytes(), (gap, name)
    all_constant = fit_tile(block[:, constant], references, np.zeros(int(constant.sum()), dtype=bool))
    for want, got in zip(fit_tile(block[:, constant], references), all_constant):
        assert want.tobytes() == got.tobytes()


# Choosing M (--modes auto) and refining the references (--refine)


def test_heldout_error_is_the_fit_relative_centred_error():
    from cmdtool.decompose import heldout_error

    planted = plant(M=3, T=15, noise=1e-2, seed=2)
    references = normalise_references(planted.references).references
    X = planted.W
    centred = X - X.mean(axis=0)
    R = references.T  # (T, M)
    best = np.max(np.abs(R.T @ centred), axis=0)  # |<r̃_m, w − mean w>| of the mode fitted
    expected = np.sqrt(((centred**2).sum(axis=0) - best**2).sum() / (centred**2).sum())
    assert heldout_error(X, references) == pytest.approx(expected, rel=1e-9)


def test_refinement_never_raises_the_sample_error_and_keeps_its_conventions():
    from cmdtool.decompose import find_modes, heldout_error

    rng = np.random.default_rng(0)
    T, K = 25, 400
    t = np.linspace(0, 1, T)[:, None]
    # Smoothly varying families of trajectories, not exact copies: the clustering's references are
    # not the least-squares best and the passes have room to improve them.
    X = (np.sin(6 * t * rng.uniform(0.5, 1.5, K)) + rng.normal(0, 0.3, (T, K)) * t + rng.normal(0, 1, K)).astype(
        np.float64
    )
    C = correlation_matrix(X)
    errors = []
    for passes in (0, 1, 3):
        labels, positions = find_modes(X, C, 5, passes)
        sizes = np.bincount(labels)
        assert (np.diff(sizes) <= 0).all() and len(positions) == len(sizes)  # modes by size, largest first
        assert (labels[positions] == np.arange(len(positions))).all()  # each reference in its own mode
        errors.append(heldout_error(X, normalise_references(X[:, positions].T).references))
    assert errors[1] <= errors[0] + 1e-12 and errors[2] <= errors[1] + 1e-12
    assert errors[2] < errors[0]  # it does improve here


def test_fit_modes_auto_writes_the_curve_and_info_shows_it(tmp_path, run_dir, runner):
    from cmdtool.cli import app

    result = cmdtool.fit(run_dir, tmp_path / "auto.cmd.h5", modes="auto", trajectory=tmp_path / "t.h5")
    summary = result.summary
    assert summary["modes"] == 3  # the planted number (conftest: plant() has M = 3)
    assert summary["settings"]["modes"] == 3 and summary["settings"]["auto_modes"] == 20
    curve = summary["error_curve"]
    assert curve["modes"] == list(range(1, 21)) and curve["chosen"] == 3 and len(curve["rel_error"]) == 20
    assert curve["rule"] == "smallest M within 5% of the smallest held-out error"
    fixed = cmdtool.fit(run_dir, tmp_path / "fixed.cmd.h5", modes=3, trajectory=tmp_path / "t.h5").summary
    assert fixed["rel_error"] == summary["rel_error"]  # the same fit as asking for 3
    assert fixed["error_curve"] is None and "auto_modes" not in fixed["settings"] and fixed["settings"]["refine"] == 3
    paper = cmdtool.fit(run_dir, tmp_path / "paper.cmd.h5", modes=3, refine=0, trajectory=tmp_path / "t.h5").summary
    assert "refine" not in paper["settings"]  # the paper's references: settings as before --refine existed
    info = runner.invoke(app, ["info", str(tmp_path / "auto.cmd.h5")])
    assert info.exit_code == 0
    assert "M = 3: smallest M within 5% of the smallest held-out error" in " ".join(info.stdout.split())
    assert f"3:{curve['rel_error'][2]:.3g}" in info.stdout
    from cmdtool.report import make_report

    report = make_report(tmp_path / "auto.cmd.h5", tmp_path / "report").report
    assert report["fit"]["error_curve"] == curve
    assert "**M = 3** was chosen by `--modes auto`" in (tmp_path / "report" / "report.md").read_text()


def _runs_by_edges(varies: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """varying_runs written the long way: every run of moving columns, merged across short gaps."""
    runs = []
    for i in np.flatnonzero(varies):
        if runs and i - runs[-1][1] < gap:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(int(a), int(b)) for a, b in runs]


@pytest.mark.parametrize("seed", range(6))
def test_varying_runs_merge_gaps_shorter_than_the_gap(seed):
    from cmdtool.decompose import varying_runs

    rng = np.random.default_rng(seed)
    for n in (0, 1, 7, 300, 5000):
        for density in (0.0, 0.01, 0.5, 0.99, 1.0):
            varies = rng.random(n) < density
            if n > 200 and seed % 2:
                varies[50:180] = False  # a long constant run
            for gap in (1, 3, 100, 4096):
                assert varying_runs(varies, gap) == _runs_by_edges(varies, gap), (n, density, gap)


@pytest.mark.parametrize("block", [1, 3, 64, 1 << 20])
def test_the_nth_moving_parameter_found_block_by_block_is_flatnonzero(block):
    from cmdtool.decompose import _moving_at

    rng = np.random.default_rng(block)
    varies = rng.random(1000) < 0.3
    varies[:100] = False  # a first block with none
    positions = rng.choice(int(varies.sum()), size=50, replace=False)
    np.testing.assert_array_equal(_moving_at(varies, positions, block), np.flatnonzero(varies)[positions])
