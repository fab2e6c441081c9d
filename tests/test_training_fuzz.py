"""Fuzzing a saved training state (``EmbeddedCMD.state_dict()["state"]``): random mutations of a
valid state, loaded with ``EmbeddedCMD.load_state_dict``, then two more observations and a save.
Every outcome is a ``CmdError`` or a mode file that ``cmd info`` reads: never another exception.

Derandomized, so a failure reproduces. The outer parts of ``state_dict()`` (settings, layout,
attachments and a warm-up's rows) are mutated too, and both callbacks' resume paths are fuzzed: the
Hugging Face ``cmdtool_state.pt`` file (mutated states, and empty, truncated, random or code-running
files) and the Lightning callback state of a checkpoint (``load_state_dict``, then ``on_fit_start``
and ``on_train_start``). ``CMDTOOL_TRAINING_FUZZ_EXAMPLES`` sets the cases of the four fuzz tests
together (default 150: 60 for the inner state, 30 for each of the others)."""

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
from cmdtool.training.saved import check_saved
from test_training import RESUME_OPTIONS, Holder, replay, stopped_run

EXAMPLES = int(os.environ.get("CMDTOOL_TRAINING_FUZZ_EXAMPLES", "150"))
INNER, EACH = max(2 * EXAMPLES // 5, 1), max(EXAMPLES // 5, 1)  # the inner state's cases, each other test's
torch.set_num_threads(1)


class Stopped(tuple):
    """``(states, saved)``: the run's states and the state saved after 9 observations."""

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing case
        return "Stopped(...)"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    states, _, first = stopped_run(tmp_path_factory.mktemp("fuzz"), whole=False)
    in_warmup = EmbeddedCMD(Holder(states[0]), **RESUME_OPTIONS)
    replay(in_warmup, states, range(4))  # of a warm-up of 6
    return Stopped((states, first.state_dict(), in_warmup.state_dict()))


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


@settings(max_examples=INNER, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 1000), st.integers(0, len(odd_values()) - 1)),
                        min_size=1, max_size=2))
def test_a_mutated_training_state_resumes_or_is_refused(stopped, tmp_path_factory, changes):
    states, saved, _ = stopped
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
    states, saved, _ = stopped
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
    (huge_layout, "the layout of the state is not the run's"),
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
    states, saved, _ = stopped
    saved = copy.deepcopy(saved)
    spoil(saved["state"])
    with pytest.raises(CmdError, match=r"^the saved CMD state is incomplete or corrupt \(ValueError: " + message):
        EmbeddedCMD(Holder(states[0]), **RESUME_OPTIONS).load_state_dict(saved)


def test_the_inner_check_sizes_a_huge_layout_against_the_tensors(stopped):
    _, saved, _ = stopped
    state = copy.deepcopy(saved["state"])
    huge_layout(state)
    with pytest.raises(ValueError, match=r"labels has \d+ values, not 85899\d+ \(N\)"):
        check_saved(state)


# --------------------------------------------------------------------------- the outer state_dict()

OUTER = ("format", "version", "settings", "layout", "attachments", "state", "warmup",
         "warmup.rows", "warmup.time", "warmup.names", "warmup.infos", "warmup.carried")


def mutate_outer(saved: dict, where: str, kind: int, odd) -> None:
    """One change of the outer parts of ``state_dict()`` (or of its warm-up's lists)."""
    top, _, inner = where.partition(".")
    if inner:
        if not isinstance(saved.get(top), dict):
            return
        rows = saved[top].get("rows")
        if inner == "rows" and kind % 2 and isinstance(rows, list) and rows \
                and isinstance(rows[kind % len(rows)], torch.Tensor):  # one row (an earlier change may have spoilt it)
            rows[kind % len(rows)] = mutate_tensor(rows[kind % len(rows)], kind // 2, rows[-1 - kind % len(rows)])
            return
        mutate(saved[top], inner, kind, odd)
    elif top == "settings" and isinstance(saved.get(top), dict) and kind % 9 != 8:
        saved[top][sorted(saved[top])[kind % len(saved[top])]] = odd
    elif top == "layout" and kind % 9 != 8 and kind % 5 == 0:
        saved["layout"] = odd
    else:
        mutate(saved, top, kind, odd)


def resume_or_refuse(resumed, states, directory) -> None:
    """Two more observations after a resumed state (9 observed) or the rest of the run after a warm-up
    one (4 observed), then a save that ``cmd info`` must read; a CmdError at any point is a refusal."""
    try:
        replay(resumed, states, range(resumed.T, 11) if not resumed.ready and resumed.T < 9 else (9, 10))
        path = resumed.save(directory / "resumed.cmd.h5")
    except CmdError:
        return
    with open_mode_file(path) as modes:  # what cmd info opens: a CmdError here is a failure
        assert modes.T == 11 and modes.names[-1] == "epoch_10.safetensors"


OUTER_CASES = st.tuples(st.booleans(), st.lists(st.tuples(
    st.integers(0, len(OUTER) - 1), st.integers(0, 1000), st.integers(0, len(odd_values()) - 1)), min_size=1,
    max_size=2))


@settings(max_examples=EACH, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=OUTER_CASES)
def test_a_mutated_outer_state_resumes_or_is_refused(stopped, tmp_path_factory, case):
    """The outer keys of a state saved after the warm-up or in it, mutated, then resumed."""
    states, after, during = stopped
    in_warmup, changes = case
    saved = copy.deepcopy(during if in_warmup else after)
    for where, kind, odd in changes:
        mutate_outer(saved, OUTER[where], kind, odd_values()[odd])
    resumed = EmbeddedCMD(Holder(states[0]), **RESUME_OPTIONS)
    try:
        resumed.load_state_dict(saved)
    except CmdError:
        return
    resume_or_refuse(resumed, states, tmp_path_factory.mktemp("case"))


def nan_row(saved: dict) -> None:
    saved["warmup"]["rows"][1][3] = float("nan")


def outer_huge_layout(saved: dict) -> None:
    huge_layout(saved)  # the outer layout: compared with the model's before anything of its size is made


@pytest.mark.parametrize("in_warmup, spoil, message", [
    (False, lambda s: s.pop("settings"), r"the saved CMD state is incomplete or corrupt \(its settings are NoneType, "
                                         r"not a dict\)$"),
    (False, lambda s: s["settings"].update(seed=True), r"resuming with other CMD settings: seed is True in the saved "
                                                       r"state, 0 now$"),
    (False, outer_huge_layout, r"the saved CMD state is incomplete or corrupt \(ValueError: the layout is not the "
                               r"one of the model's tensors\)$"),
    (True, outer_huge_layout, r"\(ValueError: the layout is not the one of the model's tensors\)$"),
    (False, lambda s: s.pop("state"), r"\(ValueError: it holds neither a state nor a warm-up\)$"),
    (False, lambda s: s.update(version="1"), r"\(ValueError: version 1 is not 1\)$"),
    (False, lambda s: s.update(attachments=[]), r"\(ValueError: carried and attachments must be dicts\)$"),
    (True, nan_row, r"\(ValueError: a warm-up row holds NaN or Inf values\)$"),
    (True, lambda s: s["warmup"]["rows"].__setitem__(0, s["warmup"]["rows"][0].double()),
     r"\(ValueError: a warm-up row is not \d+ float32 values \(N\)\)$"),
    (True, lambda s: s["warmup"]["rows"].__setitem__(0, s["warmup"]["rows"][0][:-1]),
     r"\(ValueError: a warm-up row is not \d+ float32 values \(N\)\)$"),
    (True, lambda s: s["warmup"]["time"].reverse(), r"\(ValueError: the warm-up's times do not increase\)$"),
    (True, lambda s: s["warmup"]["names"].__setitem__(0, "../x"),
     r"\(ValueError: checkpoint name '../x' is not a plain file name\)$"),
    (True, lambda s: s["warmup"].pop("infos"),
     r"\(ValueError: the warm-up is not a dict of rows, time, names, infos and carried\)$"),
    (True, lambda s: s["warmup"]["rows"].extend(s["warmup"]["rows"][:2]),
     r"\(ValueError: the warm-up's rows, time, names and infos are not lists of one length\)$"),
])
def test_named_corruptions_of_the_outer_state_are_one_cmd_error(stopped, in_warmup, spoil, message):
    """Each a one-line CmdError, and the object refusing it is left as it was (a fresh one here)."""
    states, after, during = stopped
    saved = copy.deepcopy(during if in_warmup else after)
    spoil(saved)
    resumed = EmbeddedCMD(Holder(states[0]), **RESUME_OPTIONS)
    with pytest.raises(CmdError, match=message) as refused:
        resumed.load_state_dict(saved)
    assert "\n" not in str(refused.value)
    assert (resumed.layout, resumed.state, resumed.T) == (None, None, 0)


# --------------------------------------------------------------------------- the callbacks' resume paths


class Evil:
    """A pickle with a REDUCE of ``os.system``: loading it must never run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hf_resume(states, folder):
    """The Hugging Face callback's resume at step 9 from ``folder`` (its ``cmdtool_state.pt``), the
    model holding the weights of observation 8 as the Trainer would have loaded them."""
    pytest.importorskip("transformers")
    from cmdtool.integrations.transformers import CMDCallback

    model = Holder(states[8])
    callback = CMDCallback(**RESUME_OPTIONS)
    args = type("Args", (), {"resume_from_checkpoint": str(folder), "output_dir": str(folder.parent)})()
    state = type("State", (), {"global_step": 9})()
    callback.on_train_begin(args, state, None, model=model)
    return callback


def hf_state_file(states, saved: dict) -> dict:
    """``saved`` with the mark ``CMDCallback.on_save`` adds (run, step 9, the weights' fingerprint)."""
    from cmdtool.integrations.transformers import RUN_KEY, CMDCallback

    callback = CMDCallback(**RESUME_OPTIONS)
    callback.cmd = EmbeddedCMD(Holder(states[8]), **RESUME_OPTIONS)
    return {**saved, RUN_KEY: {"run": "run", "step": 9, "weights": callback._weights()}}


def spoilt_file(kind: int, good: bytes, seed: int, marker) -> bytes | object:
    """Bytes of a broken state file, or an object to torch.save."""
    changes = [lambda: b"", lambda: good[: seed % len(good)], lambda: bytes(random_bytes(seed, 1 + seed % 3000)),
               lambda: good[:40] + bytes(random_bytes(seed, 200)) + good[240:],
               lambda: {"format": "cmdtool-training-state", "evil": Evil(marker)},
               lambda: b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."]
    return changes[kind % len(changes)]()


def random_bytes(seed: int, n: int) -> bytes:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).numpy()


@settings(max_examples=EACH, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=st.tuples(st.booleans(), OUTER_CASES, st.integers(0, 11), st.integers(0, 10**6)))
def test_a_mutated_hf_state_file_resumes_or_is_refused(stopped, tmp_path_factory, case):
    pytest.importorskip("transformers")
    states, after, _ = stopped
    spoil_bytes, (_, changes), kind, seed = case
    folder = tmp_path_factory.mktemp("case") / "checkpoint-9"
    folder.mkdir()
    path, marker = folder / "cmdtool_state.pt", folder.parent / "ran"
    saved = hf_state_file(states, copy.deepcopy(after))
    if spoil_bytes and kind < 6:
        torch.save(saved, path)
        spoilt = spoilt_file(kind, path.read_bytes(), seed, marker)
        if isinstance(spoilt, bytes):
            path.write_bytes(spoilt)
        else:
            torch.save(spoilt, path)
    else:
        for where, kind, odd in changes:
            mutate_outer(saved, OUTER[where], kind, odd_values()[odd])
        torch.save(saved, path)
    try:
        callback = hf_resume(states, folder)
    except CmdError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{path}: ")
        return
    finally:
        assert not marker.exists()
    resume_or_refuse(callback.cmd, states, folder.parent)


@pytest.mark.parametrize("kind, message", [
    (0, "not a readable CMD state (an empty file)"),
    (4, "not a readable CMD state (UnpicklingError: it would call posix.system; only tensors, numbers and strings "
        "are loaded, and nothing was run)"),
    (5, "not a readable CMD state (UnpicklingError: it would call os.system; only tensors, numbers and strings "
        "are loaded, and nothing was run)"),
])
def test_named_hf_state_files_are_one_cmd_error(stopped, tmp_path, kind, message):
    pytest.importorskip("transformers")
    if os.name == "nt":
        message = message.replace("posix.system", "nt.system")
    states, after, _ = stopped
    folder, marker = tmp_path / "checkpoint-9", tmp_path / "ran"
    folder.mkdir()
    spoilt = spoilt_file(kind, b"", 0, marker)
    path = folder / "cmdtool_state.pt"
    path.write_bytes(spoilt) if isinstance(spoilt, bytes) else torch.save(spoilt, path)
    with pytest.raises(CmdError) as refused:
        hf_resume(states, folder)
    assert str(refused.value) == f"{path}: {message}"
    assert not marker.exists()


def test_a_truncated_hf_state_file_is_one_cmd_error(stopped, tmp_path):
    pytest.importorskip("transformers")
    states, after, _ = stopped
    folder = tmp_path / "checkpoint-9"
    folder.mkdir()
    path = folder / "cmdtool_state.pt"
    torch.save(hf_state_file(states, after), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CmdError, match=r"cmdtool_state.pt: not a readable CMD state \(RuntimeError: "
                                       r"PytorchStreamReader failed") as refused:
        hf_resume(states, folder)
    assert "\n" not in str(refused.value)
    torch.save(hf_state_file(states, after), path)  # the good file resumes
    resume_or_refuse(hf_resume(states, folder).cmd, states, tmp_path)


class LightningTrainer:
    """What the Lightning callback reads of its trainer when resuming."""

    ckpt_path = "run/epoch=8.ckpt"
    global_step = 9


def lightning_resume(states, callback_state):
    """The Lightning callback given a checkpoint's callback state, as ``Trainer.fit(ckpt_path=...)`` does."""
    pytest.importorskip("lightning")
    from cmdtool.integrations.lightning import CMDCallback

    module = Holder(states[8])
    callback = CMDCallback(**RESUME_OPTIONS)
    callback.load_state_dict(callback_state)
    callback.on_fit_start(LightningTrainer(), module)
    callback.on_train_start(LightningTrainer(), module)
    return callback


@settings(max_examples=EACH, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=st.tuples(st.integers(0, 5), OUTER_CASES, st.integers(0, len(odd_values()) - 1)))
def test_a_mutated_lightning_callback_state_resumes_or_is_refused(stopped, tmp_path_factory, case):
    pytest.importorskip("lightning")
    states, after, during = stopped
    kind, (in_warmup, changes), odd = case
    saved = copy.deepcopy(during if in_warmup else after)
    for where, change, value in changes:
        mutate_outer(saved, OUTER[where], change, odd_values()[value])
    callback_state = [lambda: {"cmd": saved, "observed_step": 8}, lambda: {}, lambda: {"cmd": saved},
                      lambda: {"cmd": saved, "observed_step": odd_values()[odd]}, lambda: odd_values()[odd],
                      lambda: {"cmd": saved, "observed_step": 8, "x": 1}][kind]()
    try:
        callback = lightning_resume(states, callback_state)
    except CmdError as e:
        assert "\n" not in str(e)
        return
    resume_or_refuse(callback.cmd, states, tmp_path_factory.mktemp("case"))


@pytest.mark.parametrize("callback_state, message", [
    ({}, "run/epoch=8.ckpt: resuming at step 9, but the CMD state of that checkpoint is missing or empty (was it "
         "written with CMDCallback?)"),
    ({"cmd": {}}, "the checkpoint's CMDCallback state is not a CMD state and an observed step"),
    ({"cmd": {}, "observed_step": 8}, "run/epoch=8.ckpt: the saved CMD state is not an EmbeddedCMD state"),
])
def test_named_lightning_callback_states_are_one_cmd_error(stopped, callback_state, message):
    states, _, _ = stopped
    with pytest.raises(CmdError) as refused:
        lightning_resume(states, callback_state)
    assert str(refused.value) == message


def test_lightning_resumes_from_a_good_callback_state(stopped, tmp_path):
    states, after, _ = stopped
    callback = lightning_resume(states, {"cmd": copy.deepcopy(after), "observed_step": 8})
    assert callback.cmd.T == 9
    resume_or_refuse(callback.cmd, states, tmp_path)
    assert (tmp_path / "resumed.cmd.h5").is_file()
