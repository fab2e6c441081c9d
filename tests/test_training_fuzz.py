"""Fuzzing a saved training state (``EmbeddedCMD.state_dict()["state"]``): random mutations of a
valid state, loaded with ``EmbeddedCMD.load_state_dict``, then two more observations and a save.
Every outcome is a ``CmdError`` or a mode file that ``cmd info`` reads: never another exception.

``CMDTOOL_TRAINING_FUZZ_EXAMPLES`` sets the number of mutated states (default 150).
Derandomized, so a failure reproduces. The outer parts of ``state_dict()`` (settings, layout and
the warm-up's rows, read by ``EmbeddedCMD.load_state_dict`` itself) and the callbacks' files are
not mutated here."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmdtool import CmdError
from cmdtool.modefile import open_mode_file
from cmdtool.training import EmbeddedCMD
from test_training import RESUME_OPTIONS, Holder, replay, stopped_run

EXAMPLES = int(os.environ.get("CMDTOOL_TRAINING_FUZZ_EXAMPLES", "150"))
torch.set_num_threads(1)


class Stopped(tuple):
    """``(states, saved)``: the run's states and the state saved after 9 observations."""

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing case
        return "Stopped(...)"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    states, _, first = stopped_run(tmp_path_factory.mktemp("fuzz"), whole=False)
    return Stopped((states, first.state_dict()))


def odd_values() -> list:
    """Values of the wrong kind or range, made afresh for every case (a mutation may change a list)."""
    return [None, "x", 1.5, 10**400, -1, 0, float("nan"), float("inf"), [], {}, True, "../x", 2**33]


def mutate_tensor(value: torch.Tensor, kind: int, other: torch.Tensor) -> object:
    """One of a dozen changes of a tensor: lengths, dtypes, values, views, sharing."""
    value = value.detach().clone()  # an earlier change may have made it a leaf that requires grad
    changes = [
        lambda: value[:-1], lambda: torch.cat([value, value[:1]]), lambda: value[:0],
        lambda: value.double() if not value.is_floating_point() else value.long(),
        lambda: value.float().fill_(float("nan")), lambda: value.clone().fill_(-1),
        lambda: value.double().fill_(1e308), lambda: value[None],
        lambda: value.float().clone().requires_grad_(), lambda: other,
        lambda: value.to(torch.int8) if value.dtype != torch.int8 else value.int(),
        lambda: value.clone().fill_(2**31 - 1) if value.dtype in (torch.int32, torch.int64) else value * -1,
    ]
    return changes[kind % len(changes)]()


def mutate_list(value: list, kind: int, odd) -> list:
    changes = [lambda: value[:-1], lambda: value + value[-1:], lambda: value[:1] + value,
               lambda: [odd] + value[1:], lambda: value[:-1] + [odd], lambda: [], lambda: value[::-1]]
    return changes[kind % len(changes)]()


def mutate_layout(text: str, kind: int, odd) -> object:
    try:
        layout = json.loads(text)
    except (TypeError, ValueError):  # spoilt by an earlier change
        return odd
    if kind % 4 == 0:
        layout[0][1] = [2**33]
    elif kind % 4 == 1:
        layout = layout[1:]
    elif kind % 4 == 2:
        layout[-1][0] = odd
    else:
        return text[: len(text) // 2]
    return json.dumps(layout)


def mutate(state: dict, key: str, kind: int, odd) -> None:
    value = state.get(key)
    if kind % 9 == 8:
        state.pop(key, None)
    elif key == "layout":
        state[key] = mutate_layout(value, kind, odd)
    elif isinstance(value, torch.Tensor):
        other = next(v for k, v in state.items() if isinstance(v, torch.Tensor) and k != key)
        state[key] = mutate_tensor(value, kind, other)
    elif isinstance(value, list):
        state[key] = mutate_list(value, kind, odd)
    elif isinstance(value, dict) and value and key in ("carried", "attachments"):
        name = sorted(value)[kind % len(value)]
        if not isinstance(value[name], torch.Tensor):
            value[name] = odd
        elif kind % 3 == 0:
            value[name] = value[name].float()
        elif kind % 3 == 1:
            value[f"../{name}"] = value.pop(name)
        else:
            value[name] = value[name][:1]
    elif isinstance(value, dict):
        value[sorted(value)[kind % len(value)] if value else "x"] = odd
    else:
        state[key] = odd


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 1000), st.integers(0, len(odd_values()) - 1)),
                        min_size=1, max_size=2))
def test_a_mutated_training_state_resumes_or_is_refused(stopped, tmp_path_factory, changes):
    states, saved = stopped
    saved = copy.deepcopy(saved)
    keys = sorted(saved["state"])
    for key_index, kind, odd in changes:
        mutate(saved["state"], keys[key_index % len(keys)], kind, odd_values()[odd])
    resumed = EmbeddedCMD(Holder(states[0]), **RESUME_OPTIONS)
    try:
        resumed.load_state_dict(saved)
        replay(resumed, states, (9, 10))
        path = resumed.save(tmp_path_factory.mktemp("case") / "resumed.cmd.h5")
    except CmdError:
        return
    with open_mode_file(path) as modes:  # what cmd info opens: a CmdError here is a failure
        assert modes.T == 11 and modes.names[-1] == "epoch_10.safetensors"


def test_a_and_b_saved_as_one_storage_stay_two(stopped):
    states, saved = stopped
    saved = copy.deepcopy(saved)
    saved["state"]["b"] = saved["state"]["a"]  # one tensor under two keys (torch.save keeps the sharing)
    resumed = EmbeddedCMD(Holder(states[0]), **RESUME_OPTIONS)
    resumed.load_state_dict(saved)
    assert resumed.state.a.data_ptr() != resumed.state.b.data_ptr()
    before = resumed.state.a.clone()
    replay(resumed, states, (9,))
    assert not torch.equal(resumed.state.a, resumed.state.b) and not torch.equal(resumed.state.a, before)


def huge_layout(state: dict) -> None:
    """The last modelled tensor declared as 2³³ values: N of the layout no longer that of the tensors."""
    layout = json.loads(state["layout"])
    last = max((entry for entry in layout if entry[3]), key=lambda entry: entry[4])
    last[1] = [2**33]
    state["layout"] = json.dumps(layout)


@pytest.mark.parametrize("spoil, message", [
    (huge_layout, r"labels has \d+ values, not 85899\d+ \(N\)"),
    (lambda s: s.update(time=[]), "time is 0 entries, expected a list of the T = 9 observations"),
    (lambda s: s.update(sq_norm=float("nan")), "sq_norm is not a finite number of at least 0"),
    (lambda s: s.update(sq_norm=10**400), "sq_norm is not a finite number of at least 0"),
    (lambda s: s["mode_sse"].fill_(-1.0), "a mode's error is negative"),
    (lambda s: s.update(names=s["names"][:-1] + ["../x"]), "checkpoint name '../x' is not a plain file name"),
    (lambda s: s.update(names=s["names"][:-1] + s["names"][:1]), "checkpoint names are not unique"),
    (lambda s: s["embedded_at"].fill_(3), r"embedded_at holds positions other than -1 and 6 … 8"),
    (lambda s: s["mode_sizes"].add_(1), "mode_sizes do not count the labels"),
    (lambda s: s.pop("labels"), "no 'labels'"),
    (lambda s: s.update(warmup=0), "warmup 0 is not an integer from 2 to the T = 9 observations"),
])
def test_named_corruptions_of_a_state_are_one_cmd_error(stopped, spoil, message):
    states, saved = stopped
    saved = copy.deepcopy(saved)
    spoil(saved["state"])
    with pytest.raises(CmdError, match=r"^the saved CMD state is incomplete or corrupt \(ValueError: " + message):
        EmbeddedCMD(Holder(states[0]), **RESUME_OPTIONS).load_state_dict(saved)
