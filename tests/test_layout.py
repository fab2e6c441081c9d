"""The flat parameter layout: offsets, modelled vs carried tensors, the JSON round trip, and the one
check that a checkpoint has the expected tensors."""

from __future__ import annotations

import pytest

from cmdtool.errors import CmdError
from cmdtool.layout import Layout, build_layout, check_same_tensors

SIGNATURE = {"conv.weight": ((4, 3), "float32"), "bn.num_batches_tracked": ((), "int64"),
             "bn.weight": ((4,), "bfloat16"), "fc.bias": ((2,), "float64"), "mask": ((5,), "bool")}


def test_modelled_tensors_are_laid_end_to_end_and_the_rest_carried():
    layout = build_layout(SIGNATURE)
    assert [(s.name, s.modelled, s.offset) for s in layout.tensors] == [
        ("conv.weight", True, 0), ("bn.num_batches_tracked", False, -1), ("bn.weight", True, 12),
        ("fc.bias", True, 16), ("mask", False, -1)]
    assert layout.n_parameters == 18
    assert [s.name for s in layout.carried] == ["bn.num_batches_tracked", "mask"]
    assert layout.modelled[1].columns == slice(12, 16)
    assert layout.carried[0].nbytes == 8 and layout.carried[1].nbytes == 5
    assert layout.signature == {name: (tuple(shape), dtype) for name, (shape, dtype) in SIGNATURE.items()}


def test_include_and_exclude_globs_choose_the_modelled_tensors():
    layout = build_layout(SIGNATURE, include=["*.weight"], exclude=["bn.*"])
    assert [s.name for s in layout.modelled] == ["conv.weight"]
    assert layout.n_parameters == 12
    with pytest.raises(CmdError, match=r"^no floating-point tensors to model \(--include 'x\*' left none of 3\)$"):
        build_layout(SIGNATURE, include=["x*"])


def test_locate_maps_a_column_to_its_tensor_and_index():
    layout = build_layout(SIGNATURE)
    assert layout.locate(0) == ("conv.weight", (0, 0))
    assert layout.locate(5) == ("conv.weight", (1, 2))
    assert layout.locate(13) == ("bn.weight", (1,))
    assert layout.locate(17) == ("fc.bias", (1,))
    with pytest.raises(IndexError):
        layout.locate(18)


def test_json_round_trip_and_refusal_of_inconsistent_offsets():
    layout = build_layout(SIGNATURE)
    assert Layout.from_json(layout.to_json()) == layout
    broken = layout.to_json().replace('"float32", true, 0', '"float32", true, 1')
    with pytest.raises(ValueError, match="inconsistent layout at tensor 'conv.weight'"):
        Layout.from_json(broken)


@pytest.mark.parametrize("change, message", [
    (lambda s: {k: v for k, v in s.items() if k != "fc.bias"}, "f: tensor 'fc.bias' is missing (present in first)"),
    (lambda s: {**s, "extra": ((1,), "float32")}, "f: tensor 'extra' is not in first"),
    (lambda s: {**s, "fc.bias": ((3,), "float64")}, "f: tensor 'fc.bias' is float64 [3], but float64 [2] in first"),
    (lambda s: {**s, "fc.bias": ((2,), "float32")}, "f: tensor 'fc.bias' is float32 [2], but float64 [2] in first"),
])
def test_check_same_tensors_names_the_difference(change, message):
    check_same_tensors("f", SIGNATURE, build_layout(SIGNATURE).signature, "first")  # the same: no error
    with pytest.raises(CmdError) as raised:
        check_same_tensors("f", change(SIGNATURE), SIGNATURE, "first")
    assert str(raised.value) == message
