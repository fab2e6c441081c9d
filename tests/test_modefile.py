"""The mode file: documented datasets, size per parameter, and storage that adds no error."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from safetensors.torch import load_file

import cmdtool
from cmdtool.checkpoints import CheckpointInfo
from cmdtool.cli import app
from cmdtool.decompose import fit_tile, label_dtype, normalise_references
from cmdtool.errors import CmdError
from cmdtool.layout import build_layout
from cmdtool.modefile import FORMAT_VERSION, open_mode_file, write_mode_file
from cmdtool.modes import FitMetrics, FitSettings, Modes
from helpers import plant, write_run


def write_single_mode_file(path, W: np.ndarray, reference_column: int):
    """A mode file for one tensor ``w`` with one mode, built with the fit's own functions."""
    T, N = W.shape
    normalised = normalise_references(W[:, [reference_column]].T)
    fit = fit_tile(W, normalised.references)
    modes = Modes(
        layout=build_layout({"w": ((N,), "float32")}), references=normalised.references.astype(np.float32),
        reference_offset=normalised.offset, reference_scale=normalised.scale,
        reference_index=np.array([reference_column]), labels=fit.labels.astype(label_dtype(1)),
        a=fit.a.astype(np.float32), b=fit.b.astype(np.float32), mode_sizes=np.array([N]), time=np.arange(T),
        names=[f"epoch_{t}.safetensors" for t in range(T)], infos=[CheckpointInfo("safetensors")] * T,
        settings=FitSettings(), metrics=FitMetrics.of(sse=0.0, mode_sse=[0.0], sq_norm=1.0, sq_displacement=1.0,
                                                     sq_centred=1.0))
    write_mode_file(path, modes)


def test_barely_moving_reference_adds_no_storage_error(tmp_path, runner):
    """DESIGN.md "Numerics": a reference with relative spread 1e-6 and members that move by O(1).

    Against the raw reference, |a| ~ 1e6 and float32 a, b cancel the signal away; against the
    normalised reference the written checkpoints equal the float64 fit to float32 rounding.
    """
    T = 30
    rng = np.random.default_rng(0)
    wave = np.sin(np.linspace(0, 2 * np.pi, T))
    reference = 1.0 + 1e-6 * wave
    members = rng.uniform(0.5, 2, 200) * wave[:, None] + rng.normal(0, 1, 200) + 1e-3 * rng.normal(size=(T, 200))
    W = np.column_stack([reference, members]).astype(np.float32)  # what a checkpoint holds
    path = tmp_path / "m.cmd.h5"
    write_single_mode_file(path, W, reference_column=0)
    result = runner.invoke(app, ["reconstruct", str(path), "-o", str(tmp_path / "out"), "--at", "all"])
    assert result.exit_code == 0, result.output
    written = np.stack([load_file(tmp_path / "out" / f"epoch_{t}.safetensors")["w"].numpy() for t in range(T)])

    # The float64 least-squares fit against the raw (stored) reference trajectory.
    X, r = W.astype(np.float64), W[:, 0].astype(np.float64)
    rc = r - r.mean()
    a = (X - X.mean(0)).T @ rc / (rc @ rc)
    b = X.mean(0) - a * r.mean()
    exact = a * r[:, None] + b
    assert np.abs(a).max() > 1e5  # the regime the normalisation exists for
    # Float32 rounding: of the stored a, r and b (unit roundoff each, relative to the terms of
    # a·r + b as stored) and of the written value.
    with h5py.File(path, "r") as f:
        terms = np.abs(f["a"][()] * f["references"][0][:, None].astype(np.float64)) + np.abs(f["b"][()])
    rounding = 3 * 2.0 ** -24 * terms + np.spacing(np.abs(exact).astype(np.float32))
    assert (np.abs(written - exact) <= rounding).all()
    assert np.array_equal(written[:, 0], W[:, 0])  # the reference itself is exact

    # Storing a, b against the raw reference in float32 would lose the signal.
    raw32 = (a.astype(np.float32).astype(np.float64) * r[:, None] + b.astype(np.float32))
    assert np.abs(raw32 - exact).max() > 1000 * np.abs(written - exact).max()


def test_documented_datasets_and_size(tmp_path):
    planted = plant(M=3, T=20)
    run = write_run(tmp_path / "run", planted.states())
    out = tmp_path / "m.cmd.h5"
    summary = cmdtool.fit(run, out, modes=3, trajectory=tmp_path / "traj.h5").summary
    N, T, M = planted.W.shape[1], 20, summary["modes"]
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "cmdtool-modes" and f.attrs["format_version"] == FORMAT_VERSION
        expected = {"references": ((M, T), "f4"), "reference_index": ((M,), "i8"), "labels": ((N,), "u1"),
                    "a": ((N,), "f4"), "b": ((N,), "f4"), "time": ((T,), "i8"), "mode_sizes": ((M,), "i8"),
                    "checkpoints": ((T,), "O"), "reference_offset": ((M,), "f8"), "reference_scale": ((M,), "f8")}
        for name, (shape, kind) in expected.items():
            assert f[name].shape == shape, name
            assert f[name].dtype.kind + str(f[name].dtype.itemsize) == kind[0] + kind[1:] if kind != "O" else True
        assert f["time"][()].tolist() == list(range(T))
        assert f["mode_sizes"][()].sum() == N == np.bincount(f["labels"][()], minlength=M).sum()
        np.testing.assert_allclose(f["references"][()].mean(axis=1), 0, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(f["references"][()], axis=1), 1, rtol=1e-6)
        assert f["carried"]["bn.num_batches_tracked"].shape == (T, 8)
    # About 9 bytes per parameter plus the references; the rest is a small fixed overhead.
    overhead = out.stat().st_size - (9 * N + 4 * M * T)
    assert 0 < overhead < 32_000


def test_reader_refuses_inconsistent_files(tmp_path):
    planted = plant(M=2, T=8)
    out = tmp_path / "m.cmd.h5"
    cmdtool.fit(write_run(tmp_path / "run", planted.states()), out, modes=2, trajectory=tmp_path / "t.h5")
    with h5py.File(out, "r+") as f:
        del f["a"]
        f.create_dataset("a", data=np.zeros(3, dtype=np.float32))
    with pytest.raises(CmdError, match=r"m\.cmd\.h5: corrupt mode file \(a has shape \(3,\), expected"):
        open_mode_file(out)


def test_drop_unmodelled_leaves_float_tensors_out_and_refuses_whole_checkpoints(tmp_path, run_dir, runner):
    """--include fc.*: the conv and bn float tensors are not modelled; --drop-unmodelled leaves them
    out (the integer buffer stays), the report's storage figures count the same tensors for CMD and
    PCA, and rebuilding or scoring whole checkpoints is refused with one clear line."""
    kept, dropped = tmp_path / "kept.cmd.h5", tmp_path / "dropped.cmd.h5"
    cmdtool.fit(run_dir, kept, modes=3, include=["fc.*"], trajectory=tmp_path / "t.h5")
    summary = cmdtool.fit(run_dir, dropped, modes=3, include=["fc.*"], drop_unmodelled=True,
                          trajectory=tmp_path / "t.h5").summary
    assert summary["settings"]["drop_unmodelled"] is True and summary["parameters"] == 10 * 72 + 10
    names = ["bn.running_mean", "bn.weight", "conv.bias", "conv.weight"]
    with h5py.File(dropped, "r") as f, h5py.File(kept, "r") as g:
        assert sorted(f["carried"]) == ["bn.num_batches_tracked"]
        assert sorted(g["carried"]) == sorted(["bn.num_batches_tracked", *names])
        for name in ("a", "b", "labels", "references"):
            assert np.array_equal(f[name][()], g[name][()])  # the same fit
    with open_mode_file(dropped) as modes:
        assert sorted(modes.dropped) == names
    saved = 20 * 4 * (8 * 27 + 8 + 8 + 8)  # T × float32 bytes of the dropped tensors
    assert kept.stat().st_size - dropped.stat().st_size >= saved
    result = runner.invoke(app, ["reconstruct", str(dropped), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {dropped}: fitted with --drop-unmodelled, it does not hold ")
    assert "reconstructing a checkpoint needs every tensor" in result.stderr and not (tmp_path / "out").exists()
    from cmdtool.report import make_report
    for path, carried_tensors in ((kept, 5), (dropped, 1)):
        compact = make_report(path, tmp_path / f"r-{path.stem}").report["compactness"]
        assert compact["carried_tensors"] == carried_tensors
        assert compact["modelled_bytes"] == compact["mode_file_bytes"] - compact["carried_bytes"]
        assert compact["compression_ratio_modelled"] == pytest.approx(4 * 730 * 20 / compact["modelled_bytes"])
    kept_compact = make_report(kept, tmp_path / "r2").report["compactness"]
    assert kept_compact["carried_bytes"] == 20 * 8 + saved  # what --include carries per checkpoint
    evaluate = tmp_path / "ev.py"
    evaluate.write_text("def evaluate(state):\n    return {'x': 1.0}\n")
    result = runner.invoke(app, ["report", str(dropped), "-o", str(tmp_path / "r3"), "--eval", f"{evaluate}:evaluate"])
    assert result.exit_code == 2 and "scoring CMD reconstructions with --eval needs every tensor" in result.stderr



def _check_reader(mode_file, expected) -> None:
    with open_mode_file(mode_file) as modes:
        for width in (1, 7, 1000):
            read = modes.parameter_reader(width)
            for start in range(0, modes.N, width):
                columns = slice(start, min(start + width, modes.N))
                for got, want in zip(read(columns), expected):
                    assert got.dtype.isnative and got.dtype == want.dtype.newbyteorder("=")
                    assert np.array_equal(got, want[columns])


def test_parameter_reader_reads_what_parameters_reads(tmp_path, run_dir):
    """``parameter_reader``: ``pread`` at the datasets' offsets for the file ``write_mode_file``
    writes, h5py for one whose ``a`` and ``b`` are chunked and big-endian (a file from elsewhere)."""
    mode_file = tmp_path / "m.cmd.h5"
    cmdtool.fit(run_dir, mode_file, modes=3, trajectory=tmp_path / "t.h5")
    with open_mode_file(mode_file) as modes:
        expected = modes.parameters()
        assert modes.handle["a"].id.get_offset() is not None  # the pread path
    _check_reader(mode_file, expected)
    with h5py.File(mode_file, "r+") as f:
        for name in ("a", "b"):
            values = f[name][()]
            del f[name]
            f.create_dataset(name, data=values.astype(">f4"), chunks=(7,))
    _check_reader(mode_file, expected)
