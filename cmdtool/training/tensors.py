"""Small operations on the state's tensors, one code path on every device."""

from __future__ import annotations

import torch

from ..errors import CmdError


def count_true(mask: torch.Tensor) -> int:
    """The number of True in a bool tensor (``count_nonzero``: torch's sum of bools is 20× slower on the CPU)."""
    return int(torch.count_nonzero(mask))


def nonzero(mask: torch.Tensor) -> torch.Tensor:
    """The positions of True in a 1-D bool tensor, sorted, int64."""
    return torch.nonzero(mask).reshape(-1)


def same_device(tensors, device: torch.device, where: str) -> None:
    """The state's arrays and the observed tensors must be on one device (the update reads the model's
    own tensors); a model moved after the warm-up or a resume is an error naming both."""
    moved = next((t.device for t in tensors if t.device != device), None)
    if moved is not None:
        raise CmdError(f"{where}: the model is on {moved} but the CMD state on {device}; move the model "
                       f"before the first observation or before load_state_dict, and keep it there")


def check_finite_pieces(pieces, specs, where: str) -> None:
    """Refuse NaN and Inf in the observed tensors (``pieces``, flat, of the layout's ``specs``), naming
    the first such tensor. One sum per tensor, on its device: a finite total proves every value finite;
    only then is a tensor looked at value by value."""
    if not pieces or bool(torch.isfinite(torch.stack([p.sum().float() for p in pieces]).sum())):
        return
    for spec, piece in zip(specs, pieces):
        piece = piece.float() if piece.dtype == torch.float64 else piece  # as it is observed
        if not bool(torch.isfinite(piece).all()):
            kind = "NaN" if bool(torch.isnan(piece).any()) else "Inf"
            raise CmdError(f"{where}: tensor {spec.name!r} contains {kind} values")
