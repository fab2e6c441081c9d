"""The tensor layout of torchvision's ResNet-18 state dict, written out so torchvision is not needed.

``torchvision.models.resnet18(num_classes=10)`` (the CIFAR-10 network of the CMD paper):
11,181,642 learnable floats plus 9,600 BatchNorm running statistics (11.19 M floats in all) and one
int64 ``num_batches_tracked`` scalar per BatchNorm. ``width=2`` doubles every channel count, which
gives about 4× the floats (44.7 M) for the scaling check. Names and order are the state dict's.
"""

from __future__ import annotations

import math


def _bn(prefix: str, channels: int) -> list[tuple[str, tuple[int, ...], str]]:
    return [(f"{prefix}.weight", (channels,), "float32"), (f"{prefix}.bias", (channels,), "float32"),
            (f"{prefix}.running_mean", (channels,), "float32"), (f"{prefix}.running_var", (channels,), "float32"),
            (f"{prefix}.num_batches_tracked", (), "int64")]


def resnet18_layout(width: int = 1, num_classes: int = 10) -> list[tuple[str, tuple[int, ...], str]]:
    """``[(name, shape, dtype), ...]`` in state-dict order, as torchvision's ``resnet18`` has it
    (BasicBlock, layers [2, 2, 2, 2], 1×1 downsample conv + BN in the first block of layers 2–4)."""
    c = 64 * width
    tensors = [("conv1.weight", (c, 3, 7, 7), "float32"), *_bn("bn1", c)]
    inplanes = c
    for layer, planes in enumerate((c, 2 * c, 4 * c, 8 * c), start=1):
        for block in range(2):
            p = f"layer{layer}.{block}"
            cin = inplanes if block == 0 else planes
            tensors += [(f"{p}.conv1.weight", (planes, cin, 3, 3), "float32"), *_bn(f"{p}.bn1", planes),
                        (f"{p}.conv2.weight", (planes, planes, 3, 3), "float32"), *_bn(f"{p}.bn2", planes)]
            if block == 0 and layer > 1:
                tensors += [(f"{p}.downsample.0.weight", (planes, cin, 1, 1), "float32"),
                            *_bn(f"{p}.downsample.1", planes)]
        inplanes = planes
    tensors += [("fc.weight", (num_classes, 8 * c), "float32"), ("fc.bias", (num_classes,), "float32")]
    return tensors


def n_floats(layout: list[tuple[str, tuple[int, ...], str]]) -> int:
    return sum(math.prod(shape) for _, shape, dtype in layout if dtype.startswith("float"))


if __name__ == "__main__":
    for width in (1, 2):
        layout = resnet18_layout(width)
        learnable = sum(math.prod(s) for n, s, d in layout if d == "float32" and "running" not in n)
        print(f"width {width}: {len(layout)} tensors, {n_floats(layout):,} floats ({learnable:,} learnable)")
