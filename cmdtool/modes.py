"""A fit's result in memory: ``Modes`` (what a mode file holds), its typed ``FitSettings`` and
``FitMetrics``, and the one function that evaluates the model ``a · r(t) + b``.

Every producer of modes (``cmd fit``, the warm-up of an online fit, ``cmd update``, ``OnlineCMD``)
returns a ``Modes``; ``modefile.write_mode_file`` is the only code that turns one into a file, and
``modefile.open_mode_file`` the only code that reads one back. No I/O here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .checkpoints.schema import CheckpointInfo
from .errors import CmdError
from .layout import Layout, is_integer

SAMPLING = "layer-balanced"
REFINE = 3  # Lloyd-style passes over the references by default: lower error on every run measured (benchmarks)
AUTO_MODES = 20  # the largest M that --modes auto tries, unless auto:MAX says otherwise

# ``settings.source`` of the mode files written without a checkpoint folder (and so without a
# trajectory store), with the name of the writer that messages give.
ONLINECMD_SOURCE = "an OnlineCMD training loop"
TRAINING_SOURCE = "a cmdtool.training run"
ESTIMATOR_SOURCE = "a cmdtool.CMD estimator"
NO_TRAJECTORY_WRITERS = {ONLINECMD_SOURCE: "OnlineCMD", TRAINING_SOURCE: "cmdtool.training",
                         ESTIMATOR_SOURCE: "cmdtool.CMD"}


def parse_modes(modes: int | str) -> tuple[int, int | None]:
    """``10`` -> ``(10, None)``; ``"auto"`` -> ``(20, 20)``; ``"auto:30"`` -> ``(30, 30)``: the M to fit
    (the largest tried, for auto) and the largest M of the error-vs-M curve (None: no curve)."""
    if isinstance(modes, str):
        word, _, largest = modes.strip().partition(":")
        if word == "auto":
            try:
                top = int(largest) if largest else AUTO_MODES
            except ValueError:
                top = 0
            if top < 1:
                raise CmdError(f"modes {modes!r}: expected a number, auto or auto:MAX (MAX at least 1)",
                               parameter="modes")
            return top, top
        try:
            modes = int(modes)
        except ValueError:
            raise CmdError(f"modes {modes!r}: expected a number, auto or auto:MAX", parameter="modes") from None
    return modes, None


def _at_least(parameter: str, value: int | None, least: int) -> None:
    if value is not None and (not is_integer(value) or value < least):
        raise CmdError(f"{parameter} must be an integer of at least {least} (got {value!r})", parameter=parameter)


@dataclass(frozen=True)
class FitSettings:
    """How a mode file was fitted (the mode file's ``settings`` attribute, as JSON).

    ``modes`` (M) is the most modes to find, ``samples`` (K) the parameters sampled to find them,
    ``seed`` the sample's seed; ``start, stop, every`` slice the checkpoint sequence like Python's
    ``[start:stop:every]``; ``include, exclude`` are the tensor-name globs; ``ema`` models timm's
    EMA weights; ``source`` and ``trajectory`` say where the checkpoints and the trajectory store
    were; ``warmup`` (F) is set for an online fit (paper §3.3). ``auto_modes`` is set by
    ``--modes auto``: the largest M its error-vs-M curve tried (``modes`` is then the M it chose);
    ``refine`` is the number of Lloyd-style passes that re-picked the references
    (``decompose.refine_references``). ``drop_unmodelled`` leaves the floating-point tensors that
    are not modelled out of the mode file (``dropped``): it then cannot rebuild whole checkpoints.
    """
    modes: int = 10
    samples: int = 1000
    seed: int = 0
    start: int | None = None
    stop: int | None = None
    every: int = 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    ema: bool = False
    sampling: str = SAMPLING
    source: str = ""
    trajectory: str = ""
    warmup: int | None = None
    auto_modes: int | None = None
    refine: int = REFINE
    drop_unmodelled: bool = False
    trajectory_fingerprint: str = ""  # of the store fitted on: report and update refuse a store rebuilt since

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if isinstance(patterns, str):  # tuple("fc.*") would be four one-letter patterns
                raise CmdError(f"{name} must be a list of glob patterns, not a string (got {patterns!r}; pass "
                               f"[{patterns!r}])", parameter=name)
            object.__setattr__(self, name, tuple(patterns))
        for name, least in (("modes", 1), ("samples", 1), ("every", 1), ("seed", 0), ("warmup", 2),
                            ("auto_modes", 1), ("refine", 0)):
            _at_least(name, getattr(self, name), least)
        for name in ("ema", "drop_unmodelled"):
            if not isinstance(getattr(self, name), bool):
                raise CmdError(f"{name} must be true or false (got {getattr(self, name)!r})", parameter=name)
        if self.drop_unmodelled and self.warmup is not None:
            raise CmdError("drop_unmodelled cannot be used with `warmup`: online updates carry every tensor",
                           parameter="drop_unmodelled", mentions=("warmup",))
        for name in ("start", "stop"):
            value = getattr(self, name)
            if value is not None and not is_integer(value):
                raise CmdError(f"{name} must be an integer or None (got {value!r})", parameter=name)
        for name in ("modes", "samples", "every", "seed", "warmup", "auto_modes", "refine", "start", "stop"):
            if getattr(self, name) is not None:  # numpy integers as Python ones (the settings are stored as JSON)
                object.__setattr__(self, name, int(getattr(self, name)))

    def replace(self, **changes: Any) -> "FitSettings":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        """The JSON object stored in the mode file (``warmup`` only for an online fit)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        for name, default in (("warmup", None), ("auto_modes", None), ("refine", 0), ("drop_unmodelled", False),
                              ("trajectory_fingerprint", "")):
            if out[name] == default:  # absent as in files written before these options
                del out[name]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FitSettings":
        """Settings read from a mode file; keys that older files lack take their defaults."""
        if not isinstance(data, Mapping):
            raise ValueError("settings must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"refine": 0, **{k: v for k, v in data.items() if k in names}})  # files before --refine: 0


def is_float(dtype: str) -> bool:
    """A floating-point tensor dtype name (``float32``, ``bfloat16``, ``float8_e4m3fn``, …)."""
    return dtype.startswith(("float", "bfloat"))


def dropped(layout: Layout, settings: FitSettings) -> list[str]:
    """The carried tensors a mode file leaves out (``drop_unmodelled``): the floating-point ones."""
    return [s.name for s in layout.carried if settings.drop_unmodelled and is_float(s.dtype)]


def ratio(error_sq: float, reference_sq: float) -> float:
    """``sqrt(error² / reference²)``; 0 when both vanish."""
    return float(np.sqrt(error_sq / reference_sq)) if reference_sq > 0 else 0.0


@dataclass(frozen=True)
class FitMetrics:
    """How well the stored model explains the run (the mode file's ``metrics`` attribute).

    ``sse`` is ``Σ ‖w − ŵ‖²`` over all parameters and checkpoints of what the mode file stores
    (float32 ``a, b`` included); ``mode_sse`` the same per mode; ``sq_norm``, ``sq_displacement``
    and ``sq_centred`` are ``Σ w²``, ``Σ (w − w(0))²`` and ``Σ (w − mean w)²``.
    """
    rel_error: float
    rel_error_displacement: float
    rel_error_centred: float
    mode_sse: tuple[float, ...]
    sse: float
    sq_norm: float
    sq_displacement: float
    sq_centred: float
    error_curve: dict | None = None  # --modes auto: {"modes", "found", "rel_error", "chosen", "rule"}

    @classmethod
    def of(cls, *, sse: float, mode_sse, sq_norm: float, sq_displacement: float, sq_centred: float,
           error_curve: dict | None = None) -> "FitMetrics":
        return cls(rel_error=ratio(sse, sq_norm), rel_error_displacement=ratio(sse, sq_displacement),
                   rel_error_centred=ratio(sse, sq_centred), mode_sse=tuple(float(v) for v in mode_sse),
                   sse=float(sse), sq_norm=float(sq_norm), sq_displacement=float(sq_displacement),
                   sq_centred=float(sq_centred), error_curve=error_curve)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["mode_sse"] = list(self.mode_sse)
        if self.error_curve is None:
            del out["error_curve"]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FitMetrics":
        if not isinstance(data, Mapping):
            raise ValueError("metrics must be a JSON object")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name == "error_curve":
                values[f.name] = error_curve_from_json(data.get("error_curve"))  # only --modes auto writes it
                continue
            value = data[f.name]
            if f.name == "mode_sse":
                if not isinstance(value, list):
                    raise ValueError("metrics.mode_sse must be a list")
                values[f.name] = tuple(float(v) for v in value)
            else:
                values[f.name] = float(value)
        return cls(**values)


CURVE_LISTS = ("modes", "found", "rel_error")


def error_curve_from_json(curve: Any) -> dict | None:
    """``metrics.error_curve`` as ``fitting`` writes it, checked (``ValueError`` says what is wrong):
    lists ``modes`` (the M tried, distinct, at least 1), ``found`` (the modes each gave, 1 … M) and
    ``rel_error`` (finite, not negative) of one length, ``chosen`` among ``modes``, and the strings
    ``measured_on`` and ``rule``; None when absent."""
    if curve is None:
        return None
    if not isinstance(curve, Mapping):
        raise ValueError("metrics.error_curve is not a JSON object")
    missing = [key for key in (*CURVE_LISTS, "chosen", "measured_on", "rule") if key not in curve]
    if missing:
        raise ValueError(f"metrics.error_curve has no {missing[0]!r}")
    lists = {key: curve[key] for key in CURVE_LISTS}
    if not all(isinstance(v, list) for v in lists.values()) or len({len(v) for v in lists.values()}) != 1:
        raise ValueError("metrics.error_curve: modes, found and rel_error must be lists of one length")
    modes, found, errors = lists.values()
    if not modes or not all(is_integer(m) and m >= 1 for m in modes) or len(set(modes)) != len(modes):
        raise ValueError("metrics.error_curve.modes must be distinct integers of at least 1")
    if not all(is_integer(n) and 1 <= n <= m for n, m in zip(found, modes)):
        raise ValueError("metrics.error_curve.found must be integers from 1 to the M tried")
    if not all(_finite_number(e) and e >= 0 for e in errors):
        raise ValueError("metrics.error_curve.rel_error must be finite numbers, not negative")
    if not is_integer(curve["chosen"]) or curve["chosen"] not in modes:
        raise ValueError("metrics.error_curve.chosen must be one of its modes")
    if not isinstance(curve["measured_on"], str) or not isinstance(curve["rule"], str):
        raise ValueError("metrics.error_curve: measured_on and rule must be strings")
    return {**curve, "rel_error": [float(e) for e in errors]}


def _finite_number(value: Any) -> bool:
    """An int or float that is finite as a float (JSON's 10**400 is an int no float holds)."""
    if not (is_integer(value) or isinstance(value, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


@dataclass(frozen=True)
class OnlineInfo:
    """What an online fit keeps beyond post-hoc CMD (the mode file's ``online`` group). In the
    header of a ``modefile.ModeFileWriter`` the arrays may be None: ``first`` is written column by
    column, the error at ``finish``."""
    warmup: int                          # F: the checkpoints the modes were found on
    first: np.ndarray | None             # (N,) float32, the first checkpoint (for rel_error_displacement)
    mode_sse_least_squares: np.ndarray | None  # (M,) float64, least-squares error per mode, before float32 rounding


@dataclass(frozen=True)
class CarriedRows:
    """A carried tensor's ``(T, nbytes)`` raw bytes, read block by block (e.g. from a mode file,
    without holding all ``T`` rows): ``blocks()`` yields ``(rows, nbytes)`` uint8 arrays in order."""
    shape: tuple[int, int]
    blocks: Callable[[], Iterator[np.ndarray]]


class ModesShape:
    """``M``, ``T`` and ``N`` of anything that holds ``references`` (M, T) and a ``layout``: a fit in
    memory, an open mode file, an online state."""

    @property
    def M(self) -> int:
        return self.references.shape[0]

    @property
    def T(self) -> int:
        return self.references.shape[1]

    @property
    def N(self) -> int:
        return self.layout.n_parameters


@dataclass
class Modes(ModesShape):
    """CMD of one run (paper §3.2): every parameter ``i`` follows ``a_i · references[labels_i](t) + b_i``.

    The arrays are those the mode file stores: ``references`` (M, T) float32, normalised to zero
    mean and unit norm over time (raw = ``references · reference_scale + reference_offset``);
    ``labels`` (N,) in ``decompose.label_dtype(M)``; ``a, b`` (N,) float32. ``carried`` holds each carried
    tensor's raw bytes per checkpoint, ``(T, nbytes)`` uint8 (or ``CarriedRows``), ``attachments``
    the files a Hugging Face folder copies back, by SHA-256.
    """
    layout: Layout
    references: np.ndarray
    reference_offset: np.ndarray
    reference_scale: np.ndarray
    reference_index: np.ndarray
    labels: np.ndarray
    a: np.ndarray
    b: np.ndarray
    mode_sizes: np.ndarray
    time: np.ndarray
    names: list[str]
    infos: list[CheckpointInfo]
    settings: FitSettings
    metrics: FitMetrics
    carried: dict[str, np.ndarray | CarriedRows] = field(default_factory=dict)
    attachments: dict[str, bytes] = field(default_factory=dict)
    online: OnlineInfo | None = None

    def values_at(self, index: int, columns: slice = slice(None)) -> np.ndarray:
        """The modelled parameters ``columns`` at checkpoint ``index``, float64."""
        return model_values(self.labels[columns], self.a[columns], self.b[columns],
                            self.references[:, index].astype(np.float64))


def model_values(labels: np.ndarray, a: np.ndarray, b: np.ndarray, reference_values: np.ndarray,
                 out: np.ndarray | None = None) -> np.ndarray:
    """``a · r[label] + b`` in float64, the model of CMD: ``reference_values`` (M,) at one
    checkpoint gives ``(n,)``; ``(T, M)`` over checkpoints gives ``(T, n)`` (``out``: a reused
    float64 buffer of that shape). The one place the model is evaluated."""
    r = np.take(np.asarray(reference_values, dtype=np.float64), np.asarray(labels, dtype=np.intp), axis=-1, out=out)
    r *= a
    r += b
    return r
