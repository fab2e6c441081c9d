"""The user's evaluation function (``--eval``) and the CI thresholds (``--max-…``, ``--require``)."""

from __future__ import annotations

import importlib
import importlib.util
import math
import operator
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, NamedTuple, Sequence

from ..errors import CmdError
from .selection import flatten_scores

if TYPE_CHECKING:
    import torch

Evaluate = Callable[[dict], Mapping]  # state_dict -> {metric: value} or {split: {metric: value}}


class EvaluationTimeout(BaseException):
    """The user's function ran past ``--eval-timeout`` (a BaseException: its ``except Exception`` must
    not swallow it)."""


@contextmanager
def _contained() -> Iterator[None]:
    """Run the user's code so that it cannot disturb the command: what it prints, with ``print`` or
    on file descriptor 1 (C code, ``os.write(1, …)``), goes to stderr, not into ``--json`` output on
    stdout; and the working folder is restored after it (a ``os.chdir`` in it would make the
    command's relative paths, its output's temporary name among them, resolve elsewhere)."""
    folder = os.getcwd()
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 (a closed stdout): nothing to protect
        saved = None
    try:
        if saved is not None:
            os.dup2(2, 1)
        with redirect_stdout(sys.stderr):
            yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
        os.chdir(folder)


def time_limited(evaluate: Evaluate, seconds: float | None) -> Evaluate:
    """``evaluate`` stopped after ``seconds`` (``--eval-timeout``) with ``EvaluationTimeout``.

    In the main thread of a POSIX process, a ``SIGALRM`` timer (``signal.setitimer``) raises it
    inside the function: Python code stops at once, a long C call (one big tensor operation) when it
    returns. Elsewhere (Windows has no ``SIGALRM``; a caller's own thread cannot receive signals) the
    function runs in a daemon thread that is waited for ``seconds``; on expiry the command goes on
    to its error and the thread is left behind (Python cannot stop a thread), ending with the process."""
    if seconds is None:
        return evaluate

    def limited(state):
        if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
            return _with_alarm(evaluate, state, seconds)
        return _in_thread(evaluate, state, seconds)

    limited.__name__ = getattr(evaluate, "__name__", "evaluate")
    limited.time_limit = seconds
    return limited


def _with_alarm(function: Evaluate, state: dict, seconds: float):
    def expire(signum, frame):
        raise EvaluationTimeout(seconds)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return function(state)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _in_thread(function: Evaluate, state: dict, seconds: float):
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = function(state)
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True, name="cmdtool-eval")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise EvaluationTimeout(seconds)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def load_evaluate(spec: str, timeout: float | None = None, parameter: str = "evaluate") -> Evaluate:
    """``module:function`` (imported with the current folder on the path, like ``python -m``) or
    ``path/to/file.py:function`` (imported with its own folder on the path, so it can import the
    modules beside it): a function ``state_dict -> {metric: float}`` or ``{split: {metric: float}}``.
    ``timeout``: seconds each call may take (``time_limited``)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise CmdError(f"{parameter} {spec!r}: expected module:function or path.py:function", parameter=parameter)
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise CmdError(f"eval_timeout must be a positive number of seconds (got {timeout})", parameter="eval_timeout")
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
            with _contained():
                module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            with _contained():
                module = importlib.import_module(target)
    except (CmdError, KeyboardInterrupt):
        raise
    except BaseException as e:  # the user's module failed to import (or called sys.exit): say so in one line
        raise CmdError(f"{parameter} {spec!r}: importing {target} failed: {describe_error(e)}",
                       parameter=parameter) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise CmdError(f"{parameter} {spec!r}: {target} has no function {name!r}", parameter=parameter)
    return time_limited(function, timeout)


def run_evaluate(evaluate: Evaluate, state: dict[str, torch.Tensor], what: str, spec: str) -> dict[str, float]:
    """Call the user's function on one state dict; its answer maps names to numbers, or split names
    to such maps (``{"val": {...}, "test": {...}}``, keyed ``val/accuracy`` from then on)."""
    try:
        with _contained():
            result = evaluate(state)
    except (KeyboardInterrupt, CmdError):
        raise
    except EvaluationTimeout as e:
        raise CmdError(f"evaluate {spec}: did not finish on {what} within {e.args[0]:g} s (`eval_timeout`)",
                       parameter="evaluate", mentions=("eval_timeout",)) from None
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
