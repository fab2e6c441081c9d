"""The user's evaluation function (``--eval``) and the CI thresholds (``--max-…``, ``--require``)."""

from __future__ import annotations

import importlib
import importlib.util
import math
import operator
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, NamedTuple, Sequence

from ..errors import CmdError
from .selection import flatten_scores

if TYPE_CHECKING:
    import torch

Evaluate = Callable[[dict], Mapping]  # state_dict -> {metric: value} or {split: {metric: value}}


def load_evaluate(spec: str, parameter: str = "evaluate") -> Evaluate:
    """``module:function`` (imported with the current folder on the path, like ``python -m``) or
    ``path/to/file.py:function`` (imported with its own folder on the path, so it can import the
    modules beside it): a function ``state_dict -> {metric: float}`` or ``{split: {metric: float}}``."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise CmdError(f"{parameter} {spec!r}: expected module:function or path.py:function", parameter=parameter)
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise CmdError(f"{parameter} {spec!r}: {path}: no such file", parameter=parameter)
            folder = str(path.resolve().parent)  # so that the file imports the modules beside it
            if folder not in sys.path:
                sys.path.insert(0, folder)
            module_spec = importlib.util.spec_from_file_location(f"cmdtool_eval_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except (CmdError, KeyboardInterrupt):
        raise
    except BaseException as e:  # the user's module failed to import (or called sys.exit): say so in one line
        raise CmdError(f"{parameter} {spec!r}: importing {target} failed: {describe_error(e)}",
                       parameter=parameter) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise CmdError(f"{parameter} {spec!r}: {target} has no function {name!r}", parameter=parameter)
    return function


def run_evaluate(evaluate: Evaluate, state: dict[str, torch.Tensor], what: str, spec: str) -> dict[str, float]:
    """Call the user's function on one state dict; its answer maps names to numbers, or split names
    to such maps (``{"val": {...}, "test": {...}}``, keyed ``val/accuracy`` from then on)."""
    try:
        result = evaluate(state)
    except (KeyboardInterrupt, CmdError):
        raise
    except BaseException as e:  # SystemExit too: the user's function ending the process is its failure
        raise CmdError(f"evaluate {spec}: failed on {what}: {describe_error(e)}", parameter="evaluate") from None
    return flatten_scores(result, what, spec)


def run_recalibrate(recalibrate: Callable, state: dict, what: str, spec: str) -> dict:
    """Call the user's ``--recalibrate`` function on ``state`` (a fresh state dict it may change in
    place, returning None, or replace); returns the recalibrated state dict, the same tensor names."""
    names = list(state)
    try:
        result = recalibrate(state)
    except (KeyboardInterrupt, CmdError):
        raise
    except BaseException as e:  # the user's function failing is bad input: one line
        raise CmdError(f"recalibrate {spec}: failed on {what}: {describe_error(e)}", parameter="recalibrate") from None
    if result is None:
        result = state
    if not isinstance(result, Mapping) or sorted(result) != sorted(names):
        raise CmdError(f"recalibrate {spec}: on {what}, expected the state dict back (the same tensor names) or None",
                       parameter="recalibrate")
    return {name: result[name] for name in names}


def describe_error(error: BaseException) -> str:
    """``Type: message`` on one line (``SystemExit: 0`` for ``sys.exit()``)."""
    if isinstance(error, SystemExit):
        return f"called sys.exit({error.code!r})"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


class Requirement(NamedTuple):
    """One CI threshold: ``metric op threshold`` must hold for the compared value."""
    option: str
    metric: str
    op: str
    threshold: float

    def check(self, value: float | None) -> dict:
        passed = value is not None and not math.isnan(value) and _OPS[self.op](value, self.threshold)
        return {"option": self.option, "metric": self.metric, "op": self.op, "threshold": self.threshold,
                "value": value, "passed": bool(passed)}

    def describe(self, value: float | None) -> str:
        shown = "missing" if value is None else repr(float(value))  # exact: the shortest text that reads back as it
        return f"{self.metric} = {shown}, required {self.op} {float(self.threshold)!r} ({self.option})"


_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def parse_requirement(text: str) -> Requirement:
    """``METRIC>=VALUE`` (also ``<=``, ``>``, ``<``), on a metric of the CMD weights at the last checkpoint."""
    match = re.fullmatch(r"\s*([^<>=\s]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+|[-+]?inf(?:inity)?|nan)\s*", text,
                         re.IGNORECASE)
    if not match:
        raise CmdError(f"require {text!r}: expected METRIC>=VALUE (or <=, >, <), e.g. accuracy>=0.9",
                       parameter="require")
    try:
        threshold = float(match.group(3))
    except ValueError:
        raise CmdError(f"require {text!r}: {match.group(3)!r} is not a number", parameter="require") from None
    if not math.isfinite(threshold):
        raise CmdError(f"require {text!r}: the threshold must be a finite number", parameter="require")
    return Requirement(f"--require {text.strip()}", match.group(1), match.group(2), threshold)


@dataclass
class Thresholds:
    """What ``cmd report`` checks (exit 1 when one fails): ``rel_error`` and
    ``rel_error_displacement`` at most these, and ``--require`` conditions on evaluated metrics.

    Attributes:
        max_rel_error: Fail when ``rel_error`` is above this.
        max_rel_error_displacement: Fail when ``rel_error_displacement`` is above this.
        require: Conditions on the evaluated metrics of the CMD weights at the last checkpoint
            (``parse_requirement("test/accuracy>=0.9")``).
    """
    max_rel_error: float | None = None
    max_rel_error_displacement: float | None = None
    require: Sequence[Requirement] = ()
