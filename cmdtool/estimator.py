"""``CMD``: Correlation Mode Decomposition as an estimator, for a trajectory held in memory.

Settings go to the constructor, ``fit`` returns the estimator, fitted results are attributes
ending in ``_`` (scikit-learn's ``IncrementalPCA``, PyDMD's ``DMD``)::

    cmd = cmdtool.CMD(modes=3).fit(W)          # W: (T, N), one row per checkpoint
    cmd.labels_, cmd.a_, cmd.b_                # W ≈ a_ · references_[labels_].T + b_
    cmd.partial_fit(w)                         # one more checkpoint (online CMD, paper §3.3)
    cmd.reconstruct()                          # (T, N); cmd.reconstruct(-1): the last row
    cmd.save("run.cmd.h5")                     # a mode file: cmd info, reconstruct, update read it

The same computation as ``cmd fit`` (``fitting.fit_trajectory``: steps 1–6 streamed over column
tiles of the array, which is read where it lies and never copied to disk) and ``cmd update``
(``online.state.OnlineState.observe``); the fitted state is a ``Modes``, what a mode file holds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .checkpoints.schema import CheckpointInfo
from .errors import CmdError
from .fitting import fit_trajectory
from .layout import Layout, build_layout, check_same_tensors, is_integer
from .modefile import check_output_path, open_mode_file, write_mode_file
from .modes import ESTIMATOR_SOURCE, REFINE, CarriedRows, FitMetrics, FitSettings, Modes, parse_modes
from .online.state import OnlineState, fit_warmup, flatten
from .trajectory import InMemoryTrajectory, check_finite, moving_parameters

if TYPE_CHECKING:
    import torch

ARRAY_TENSOR = "w"  # the one tensor of a fit of a (T, N) array: its rows are the checkpoints
NO_TRAJECTORY = "none (a cmdtool.CMD estimator keeps no trajectory)"
TILE_COLUMNS = 1 << 16  # columns per block when an array is checked or reconstructed


class NotFittedError(CmdError, AttributeError):
    """A fitted attribute (``labels_``, …) read before ``fit``: also an ``AttributeError``, so that
    ``hasattr(cmd, "labels_")`` is False until the estimator is fitted."""


class CMD:
    """Correlation Mode Decomposition (Brokman et al., ICLR 2024) of a trajectory in memory.

    Every parameter ``i`` follows an affine copy of its mode's reference trajectory,
    ``w_i(t) ≈ a_i · r̃_{labels_i}(t) + b_i``, where ``r̃`` is the reference normalised to zero mean
    and unit norm over time (raw reference = ``r̃ · reference_scale_ + reference_offset_``).

    Args:
        modes: M, the most modes to find; ``"auto"`` or ``"auto:MAX"`` chooses M from an error-vs-M
            curve measured on a held-out sample (as ``cmd fit --modes auto``).
        samples: K, the parameters sampled to find the modes.
        seed: the sample's seed.
        refine: Lloyd-style passes that re-pick the references (3, ``REFINE``; 0: the paper's references).
        warmup: F, for online CMD: ``fit`` finds the modes on the first F rows and absorbs the
            others one by one (as ``cmd fit --warmup F``); ``partial_fit`` on an unfitted estimator
            keeps the first F observations and fits them when the F-th arrives. None: post-hoc CMD.
        include: glob patterns of the tensor names to model (state dicts only; all floating-point
            tensors by default).
        exclude: glob patterns of tensor names to carry verbatim instead of modelling them.
        tile_columns: columns per block of the streaming pass (default: 32 MB of float64).

    Raises:
        CmdError: a setting out of range (a ``ValueError``).
    """

    def __init__(self, modes: int | str = 10, samples: int = 1000, seed: int = 0, refine: int = REFINE,
                 warmup: int | None = None, include: Sequence[str] = (), exclude: Sequence[str] = (),
                 tile_columns: int | None = None):
        self.modes, self.samples, self.seed, self.refine, self.warmup = modes, samples, seed, refine, warmup
        self.include, self.exclude, self.tile_columns = include, exclude, tile_columns
        self.settings = self._settings()  # checks every value now, not at the first fit
        self._modes: Modes | None = None     # the fit, as the mode file save() writes holds it
        self._state: OnlineState | None = None  # after partial_fit: the online state (float64 a, b)
        self._first: np.ndarray | None = None   # (N,) the first row, for the first partial_fit of a post-hoc fit
        self._pending: list[tuple[np.ndarray, dict, int]] = []  # warm-up observations: row, carried, time
        self._pending_layout: Layout | None = None

    def _settings(self) -> FitSettings:
        M, auto_modes = parse_modes(self.modes)
        if self.tile_columns is not None and (not is_integer(self.tile_columns) or self.tile_columns < 1):
            raise CmdError(f"tile_columns must be an integer of at least 1 (got {self.tile_columns!r})",
                           parameter="tile_columns")
        return FitSettings(modes=M, samples=self.samples, seed=self.seed, refine=self.refine, warmup=self.warmup,
                           auto_modes=auto_modes, include=self.include, exclude=self.exclude,
                           source=ESTIMATOR_SOURCE, trajectory=NO_TRAJECTORY)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in ("modes", "samples", "seed", "refine", "warmup"))
        return f"CMD({shown})"

    # -- fitting -------------------------------------------------------------------------------

    def fit(self, W: Any, time: Sequence[int] | None = None) -> "CMD":
        """Post-hoc CMD (paper §3.2) of a whole trajectory, or online CMD with ``warmup``.

        Args:
            W: a ``(T, N)`` array (numpy, or anything ``np.asarray`` takes; a CPU torch tensor),
                one row per checkpoint, read in column tiles where it lies (a memory map stays one);
                or a sequence of ``T`` state dicts (name -> tensor or array), flattened as
                ``cmd fit`` flattens checkpoints (floating-point tensors modelled, others carried).
            time: the step or epoch number of each row, increasing (default ``0 … T − 1``).

        Returns:
            The estimator, fitted.

        Raises:
            CmdError: ``W`` is not a trajectory of at least 2 finite rows, or the state dicts
                differ in their tensors.
        """
        if _is_state_dicts(W):
            layout = self._layout_of(W[0])
            rows = np.empty((len(W), layout.n_parameters), dtype=np.float32)  # the trajectory, filled row by row
            carried = {spec.name: np.empty((len(W), spec.nbytes), dtype=np.uint8) for spec in layout.carried}
            for t, state in enumerate(W):
                rows[t], raw = self._observation(state, layout, f"state dict {t}")
                for name, values in raw.items():
                    carried[name][t] = values
            return self._fit(rows, layout, carried, time)
        W = _as_trajectory(W)
        for start in range(0, W.shape[1], TILE_COLUMNS):
            check_finite(np.asarray(W[:, start:start + TILE_COLUMNS]).ravel(), "W", ARRAY_TENSOR)
        return self._fit(W, self._layout_of(W[0]), {}, time)

    def _fit(self, W: np.ndarray, layout: Layout, carried: dict[str, np.ndarray], time: Sequence[int] | None) -> "CMD":
        """Steps 1–6 over the rows ``W`` as ``cmd fit`` runs them, or ``cmd fit --warmup``'s online fit."""
        T = W.shape[0]
        if T < 2:
            raise CmdError(f"W: CMD needs at least 2 rows (observations), got {T}", parameter="W")
        trajectory = InMemoryTrajectory(layout, _times(time, T), [_name(t) for t in range(T)],
                                        [CheckpointInfo("safetensors") for _ in range(T)], moving_parameters(W), W,
                                        carried, {})
        if self.warmup is None:
            modes = fit_trajectory(trajectory, self.settings, tile_columns=self.tile_columns)
        else:
            modes = fit_warmup(trajectory, self.settings, self.tile_columns)
        self._modes, self._state, self._pending, self._pending_layout = modes, None, [], None
        self._first = np.array(W[0], dtype=np.float32)
        return self

    def _layout_of(self, first: Any) -> Layout:
        """The layout of a fit whose first observation is ``first``: a state dict's tensors, or one
        tensor ``w`` for rows of an array."""
        if _is_state_dict(first):
            return build_layout(_signature(first), self.include, self.exclude)
        return build_layout({ARRAY_TENSOR: ((first.shape[-1],), _float_dtype(first.dtype))}, self.include,
                            self.exclude)

    def partial_fit(self, w: Any, time: int | None = None) -> "CMD":
        """Absorb one more observation (online CMD, paper §3.3): modes, labels and reference
        parameters stay fixed, every ``a, b`` is updated exactly (the update of ``cmd update``).

        Before the estimator is fitted, with ``warmup=F``, the observations are kept until the F-th,
        then fitted as ``fit`` fits them (so ``partial_fit`` of each row gives what ``fit`` gives).

        Args:
            w: one row ``(N,)``, or one state dict with the tensors of the fit's.
            time: its step or epoch number (default: one after the last).

        Returns:
            The estimator.

        Raises:
            CmdError: not fitted and no ``warmup``; ``w`` does not match the fit; ``time`` not after
                the last one; non-finite values.
        """
        if self._modes is None and self._state is None:
            return self._warm_up(w, time)
        fitted = self._state if self._state is not None else self._modes
        T, time = fitted.T, _next_time(time, int(fitted.time[-1]))
        row, carried = self._observation(w, fitted.layout, f"observation {T}")
        state = self._online()
        state.observe(row, _name(T), time, CheckpointInfo("safetensors"), carried)
        self._state, self._modes = state, None  # the Modes is made again from the state when asked for
        return self

    def _warm_up(self, w: Any, time: int | None) -> "CMD":
        """``partial_fit`` before the modes exist: keep the observation; fit at the ``warmup``-th."""
        if self.warmup is None:
            raise CmdError("partial_fit needs modes first: fit(W) on the first observations, or CMD(warmup=F) "
                           "to find them on the first F observations given to partial_fit", parameter="warmup")
        if not self._pending:
            self._pending_layout = self._layout_of(w if _is_state_dict(w) else _as_row(w, "observation 0"))
        time = _next_time(time, self._pending[-1][2] if self._pending else None)
        row, carried = self._observation(w, self._pending_layout, f"observation {len(self._pending)}")
        self._pending.append((row, carried, time))
        if len(self._pending) == self.warmup:
            layout, pending = self._pending_layout, self._pending
            carried = {spec.name: np.stack([c[spec.name] for _, c, _ in pending]) for spec in layout.carried}
            self._fit(np.stack([row for row, _, _ in pending]), layout, carried, [t for _, _, t in pending])
        return self

    @staticmethod
    def _observation(w: Any, layout: Layout, what: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One observation as a trajectory row and its carried tensors' raw bytes, checked against ``layout``."""
        if _is_state_dict(w):
            check_same_tensors(what, _signature(w), layout.signature, "the first observation")
            return flatten(what, lambda name: _float32_values(w[name]), lambda name: _raw_bytes(w[name]), layout)
        if [spec.name for spec in layout.tensors] != [ARRAY_TENSOR]:
            raise CmdError(f"{what}: this fit is of state dicts; pass a state dict with its tensors", parameter="w")
        row = _as_row(w, what)
        if row.shape[0] != layout.n_parameters:
            raise CmdError(f"{what}: {row.shape[0]} values, the fit has {layout.n_parameters}", parameter="w")
        return row, {}

    def _online(self) -> OnlineState:
        """The online state (``cmd update``'s), made from the fit on the first ``partial_fit``."""
        if self._state is not None:
            return self._state
        modes = self._modes
        if modes.online is None and self._first is None:
            raise CmdError("partial_fit of a loaded post-hoc fit needs its first observation, which a mode file of "
                           "a plain fit does not hold; use cmdtool.update with the checkpoints instead",
                           parameter="w")
        return OnlineState.from_modes(modes, None if modes.online is not None else self._first)

    # -- fitted attributes ---------------------------------------------------------------------

    @property
    def modes_(self) -> Modes:
        """The fit as a ``Modes``: what the mode file ``save`` writes holds (float32 ``a, b``)."""
        if self._modes is None:
            if self._state is None:
                raise NotFittedError("this CMD is not fitted yet: call fit(W) first"
                                     + (f" (or partial_fit {self.warmup} observations)" if self.warmup else ""))
            self._modes = self._state.to_modes()
        return self._modes

    @property
    def labels_(self) -> np.ndarray:
        """(N,) the mode of every parameter, ``0 … M − 1``, largest mode first."""
        return self.modes_.labels

    @property
    def a_(self) -> np.ndarray:
        """(N,) float32 slope of every parameter against its mode's normalised reference."""
        return self.modes_.a

    @property
    def b_(self) -> np.ndarray:
        """(N,) float32 intercept (each parameter's mean over time)."""
        return self.modes_.b

    @property
    def references_(self) -> np.ndarray:
        """(M, T) float32 normalised reference trajectories (zero mean, unit norm over time)."""
        return self.modes_.references

    @property
    def reference_offset_(self) -> np.ndarray:
        """(M,) mean of each raw reference over time."""
        return self.modes_.reference_offset

    @property
    def reference_scale_(self) -> np.ndarray:
        """(M,) norm of each centred raw reference: raw = ``references_ · scale + offset``."""
        return self.modes_.reference_scale

    @property
    def reference_index_(self) -> np.ndarray:
        """(M,) the parameter (column of ``W``) that is each mode's reference."""
        return self.modes_.reference_index

    @property
    def mode_sizes_(self) -> np.ndarray:
        """(M,) parameters per mode."""
        return self.modes_.mode_sizes

    @property
    def n_modes_(self) -> int:
        """M, the modes found (at most ``modes``; with ``"auto"`` the M chosen)."""
        return self.modes_.M

    @property
    def n_observations_(self) -> int:
        """T, the rows fitted and absorbed so far."""
        return self.modes_.T

    @property
    def time_(self) -> np.ndarray:
        """(T,) the step or epoch number of each row."""
        return self.modes_.time

    @property
    def metrics_(self) -> FitMetrics:
        """How well the stored model explains the rows (errors as ``cmd info`` reports them)."""
        return self.modes_.metrics

    @property
    def rel_error_(self) -> float:
        """``‖W − Ŵ‖ / ‖W‖`` over all rows (``metrics_`` has the displacement and centred variants)."""
        return self.modes_.metrics.rel_error

    # -- using the fit -------------------------------------------------------------------------

    def reconstruct(self, t: int | None = None, dtype: Any = np.float32) -> np.ndarray:
        """The CMD model ``a · r̃[labels](t) + b`` (computed in float64, returned as ``dtype``).

        Args:
            t: a row position (negative from the end); None for every row.

        Returns:
            ``(N,)`` for one row, ``(T, N)`` for all.
        """
        modes = self.modes_
        if t is None:
            out = np.empty((modes.T, modes.N), dtype=dtype)
            for start in range(0, modes.N, TILE_COLUMNS):
                columns = slice(start, start + TILE_COLUMNS)
                out[:, columns] = _model(modes, columns)
            return out
        return modes.values_at(self._position(t)).astype(dtype, copy=False)

    def state_dict(self, t: int = -1) -> dict[str, torch.Tensor]:
        """The CMD state dict at row ``t`` (a fit of state dicts; tensors in their source dtypes),
        loadable with ``model.load_state_dict(state, strict=True)``."""
        from .reconstruct import assemble_state_dict

        modes, index = self.modes_, self._position(t)
        return assemble_state_dict(modes.layout, lambda spec: modes.values_at(index, spec.columns),
                                   lambda spec: _carried_row(modes.carried[spec.name], index))

    def _position(self, t: Any) -> int:
        T = self.modes_.T
        if not is_integer(t) or not -T <= t < T:
            raise CmdError(f"t {t!r}: expected a row position from {-T} to {T - 1}", parameter="t")
        return int(t) % T

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the fit as a mode file (``cmd info``, ``cmd reconstruct``, ``cmd update`` read it).

        Args:
            path: the mode file to write (to a temporary name, renamed into place when complete).
            force: replace an existing file.

        Returns:
            ``path``.
        """
        path = Path(path)
        check_output_path(path, force)
        return write_mode_file(path, self.modes_)

    @classmethod
    def load(cls, path: str | Path) -> "CMD":
        """A fitted estimator from a mode file (any: ``cmd fit``, ``cmd update``, ``OnlineCMD``…).

        ``partial_fit`` continues an online fit; a post-hoc fit's mode file does not hold the first
        checkpoint that its first update needs (``cmdtool.update`` finds it in the checkpoints).
        """
        with open_mode_file(Path(path)) as mode_file:
            mode_file.require_whole("CMD.load")
            modes = mode_file.load()
            carried = {name: mode_file.carried(name) for name in modes.carried}  # read now: the file closes
        settings = modes.settings
        estimator = cls(modes=f"auto:{settings.auto_modes}" if settings.auto_modes else settings.modes,
                        samples=settings.samples, seed=settings.seed, refine=settings.refine,
                        warmup=settings.warmup, include=settings.include, exclude=settings.exclude)
        estimator.settings = settings
        estimator._modes = replace(modes, carried=carried)
        return estimator


def _model(modes: Modes, columns: slice) -> np.ndarray:
    from .modes import model_values

    return model_values(modes.labels[columns], modes.a[columns], modes.b[columns], modes.references.T)


def _carried_row(rows: np.ndarray | CarriedRows, index: int) -> np.ndarray:
    if not isinstance(rows, CarriedRows):
        return rows[index]
    start = 0
    for block in rows.blocks():
        if index < start + len(block):
            return block[index - start]
        start += len(block)
    raise IndexError(index)


def _name(t: int) -> str:
    """The name ``cmd reconstruct`` writes row ``t`` under (as ``OnlineCMD`` names its observations)."""
    return f"checkpoint_{t}.safetensors"


def _next_time(time: Any, previous: int | None) -> int:
    """An observation's time: ``time``, which must come after ``previous``, or the one after it."""
    if time is None:
        return 0 if previous is None else previous + 1
    if not is_integer(time) or (previous is not None and time <= previous):
        raise CmdError(f"time {time!r}: must be an integer" + (f" after {previous}, the last observation's"
                       if previous is not None else ""), parameter="time")
    return int(time)


def _times(time: Sequence[int] | None, T: int) -> np.ndarray:
    if time is None:
        return np.arange(T, dtype=np.int64)
    values = list(time)
    if len(values) != T or not all(is_integer(v) for v in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise CmdError(f"time must be {T} increasing integers, one per row", parameter="time")
    return np.asarray(values, dtype=np.int64)


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_state_dicts(W: Any) -> bool:
    return isinstance(W, Sequence) and not isinstance(W, (str, bytes)) and len(W) > 0 and _is_state_dict(W[0])


def _as_trajectory(W: Any) -> np.ndarray:
    """``W`` as a ``(T, N)`` array of floats, without a copy when it is one (a memory map stays one)."""
    if hasattr(W, "detach"):  # a torch tensor
        W = W.detach().cpu().numpy()
    W = W if isinstance(W, np.ndarray) else np.asarray(W)
    if W.dtype.kind in "iub":
        W = W.astype(np.float64)
    if W.dtype.kind != "f" or W.ndim != 2 or W.shape[0] < 2 or W.shape[1] < 1:
        raise CmdError(f"W must be a (T, N) array of floats with T >= 2 rows and N >= 1 columns "
                       f"(got {W.dtype} {list(W.shape)})", parameter="W")
    return W


def _as_row(w: Any, what: str) -> np.ndarray:
    """One observation ``(N,)`` as a float row of its own (a copy: the caller's array may change)."""
    if hasattr(w, "detach"):
        w = w.detach().cpu().numpy()
    row = np.array(w, dtype=None, copy=True)
    if row.dtype.kind in "iub":
        row = row.astype(np.float64)
    if row.dtype.kind != "f" or row.ndim != 1:
        raise CmdError(f"{what}: expected a state dict or an (N,) array of floats (got {row.dtype} "
                       f"{list(row.shape)})", parameter="w")
    check_finite(row, what, ARRAY_TENSOR)
    return row


def _float_dtype(dtype: np.dtype) -> str:
    """The layout dtype of an array's one tensor (``cmd reconstruct`` writes rows in it)."""
    return dtype.name if dtype.name in ("float16", "float32", "float64") else "float32"


def _signature(state: Mapping) -> dict[str, tuple[tuple[int, ...], str]]:
    signature = {}
    for name, value in state.items():
        if not isinstance(name, str) or not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise CmdError(f"state dict entry {str(name)[:80]!r}: expected a tensor or an array "
                           f"(got {type(value).__name__})", parameter="W")
        signature[name] = (tuple(value.shape), str(value.dtype).removeprefix("torch."))
    return signature


def _float32_values(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        import torch

        return value.detach().to("cpu", torch.float32).reshape(-1).numpy()
    return np.asarray(value, dtype=np.float32).reshape(-1)


def _raw_bytes(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        import torch

        return value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(value).reshape(-1).view(np.uint8)
