"""Online CMD inside a training loop: ``OnlineCMD`` (paper §3.3), fed state dicts, its state where
the observed tensors are (``DeviceState``, as ``EmbeddedCMD`` keeps it)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..checkpoints import CheckpointInfo, dtype_name
from ..errors import CmdError
from ..fitting import fit_trajectory
from ..layout import Layout, build_layout, check_same_tensors
from ..modefile import write_mode_file
from ..modes import ONLINECMD_SOURCE, REFINE, FitSettings
from ..online.state import OnlineState, warmup_trajectory
from .state import DeviceState
from .tensors import check_finite_pieces, same_device

ONLINECMD_TRAJECTORY = "none (OnlineCMD keeps no trajectory)"


class OnlineCMD:
    """Online CMD inside a training loop (paper §3.3):

        online = cmdtool.OnlineCMD(modes=10, warmup=20)
        for epoch in range(epochs):
            train_one_epoch(model)
            online.observe(model.state_dict())
        model.load_state_dict(online.reconstruct())   # the CMD weights at the latest epoch
        online.save("run.cmd.h5")                     # a mode file, as cmd fit --warmup writes

    The first ``warmup`` observations are kept on the CPU (as float32, ``warmup · N · 4`` bytes) to
    find the modes, with the same sampling, clustering and references as ``cmd fit``; after that the
    state lives where the observed tensors are (any device: the state of ``cmdtool.training``'s
    ``EmbeddedCMD``), each observation updates ``a, b`` in place by the update of ``cmd update``
    and is dropped. Observing the checkpoints of a folder gives the mode file ``cmd fit --warmup``
    writes.

    Args:
        modes: Most modes (M) to find.
        warmup: Observations (F) the modes and references are found on.
        samples: Parameters sampled (K) to find the modes.
        seed: Seed of that sample.
        include: Model only tensors whose name matches one of these globs.
        exclude: Do not model tensors matching these globs (they are carried verbatim).
        refine: Lloyd-style passes over the references (0: the paper's references).
    """

    def __init__(self, modes: int = 10, warmup: int = 10, samples: int = 1000, seed: int = 0,
                 include: Sequence[str] = (), exclude: Sequence[str] = (), refine: int = REFINE):
        self.settings = FitSettings(modes=modes, samples=samples, seed=seed, include=include,
                                    exclude=exclude, source=ONLINECMD_SOURCE, trajectory=ONLINECMD_TRAJECTORY,
                                    warmup=warmup, refine=refine)
        self.warmup = warmup
        self.layout: Layout | None = None
        self._rows: list[np.ndarray] = []
        self._carried: dict[str, list[np.ndarray]] = {}
        self._names: list[str] = []
        self._times: list[int] = []
        self._latest_carried: dict = {}
        self._error_curve: dict | None = None
        self.state: DeviceState | None = None

    @property
    def T(self) -> int:
        """Observations so far."""
        return self.state.T if self.state is not None else len(self._rows)

    @property
    def ready(self) -> bool:
        """Whether the warm-up is over and the modes exist."""
        return self.state is not None

    def observe(self, state_dict: Mapping[str, torch.Tensor], name: str | None = None,
                time: int | None = None) -> None:
        """Absorb the weights of one checkpoint (e.g. ``model.state_dict()`` once per epoch), on any
        device, in any float dtype (observed as float32).

        Args:
            state_dict: The weights; every observation must have the same tensor names, shapes and dtypes,
                and after the warm-up be on the device of the last warm-up observation.
            name: The file name ``cmd reconstruct`` writes it under (default ``checkpoint_{t}.safetensors``).
            time: Its step or epoch number (default the count of observations); must increase.

        Raises:
            CmdError: Other tensors than the first observation's, NaN or Inf weights, a time that does
                not increase, tensors on another device than the state.
        """
        t = self.T
        name = name or f"checkpoint_{t}.safetensors"
        time = t if time is None else int(time)
        where = f"observation {t} ({name})"
        signature = {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in state_dict.items()}
        if self.layout is None:
            self.layout = build_layout(signature, self.settings.include, self.settings.exclude)
            self._carried = {spec.name: [] for spec in self.layout.carried}
        check_same_tensors(where, signature, self.layout.signature, "the first observation")
        if self._times and time <= self._times[-1]:
            raise CmdError(f"{where}: time {time} does not come after {self._times[-1]}")
        with torch.no_grad():  # flat views of the tensors (a copy only of a non-contiguous one)
            pieces = [state_dict[spec.name].detach().reshape(-1) for spec in self.layout.modelled]
            if self.state is not None:
                same_device(pieces, self.state.device, where)
            check_finite_pieces(pieces, self.layout.modelled, where)
        carried = {spec.name: state_dict[spec.name].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                   .numpy().copy() for spec in self.layout.carried}
        self._latest_carried = carried
        self._names.append(name)
        self._times.append(time)
        if self.state is not None:
            self.state.observe(pieces, name, time, CheckpointInfo("safetensors"), carried)
            return
        with torch.no_grad():
            w = torch.cat([p.to(torch.float32) for p in pieces]) if pieces else torch.zeros(0)
        self._rows.append(w.cpu().numpy())
        for key, rows in self._carried.items():
            rows.append(carried[key])
        if len(self._rows) == self.warmup:
            W = np.stack(self._rows)
            warmup = warmup_trajectory(W, self.layout, self._times, self._names,
                                       [CheckpointInfo("safetensors") for _ in self._names],
                                       {k: np.stack(v) for k, v in self._carried.items()}, {})
            online = OnlineState.from_modes(fit_trajectory(warmup, self.settings), W[0])
            self._error_curve = online.error_curve
            self.state = DeviceState.from_online(online, w.device)
            self._rows, self._carried = [], {}

    def _require_modes(self, what: str) -> OnlineState:
        """The fit so far as the numpy ``OnlineState`` of ``cmd update`` (a copy on the CPU)."""
        if self.state is None:
            raise CmdError(f"OnlineCMD.{what}: no modes yet; the warm-up needs {self.warmup} observations, "
                           f"{self.T} so far")
        online = self.state.to_online()
        online.error_curve = self._error_curve
        return online

    def reconstruct(self) -> dict[str, torch.Tensor]:
        """The CMD state dict at the latest observation.

        Returns:
            The state dict (CPU tensors in each tensor's dtype), loadable with ``load_state_dict(strict=True)``.

        Raises:
            CmdError: The warm-up is not over yet.
        """
        return self._require_modes("reconstruct").state_dict(self._latest_carried)

    def save(self, path: str | Path) -> Path:
        """Write (or atomically replace) a mode file: ``cmd info``, ``reconstruct`` and ``update`` read it.

        Args:
            path: The mode file to write.

        Returns:
            The path written.

        Raises:
            CmdError: The warm-up is not over yet.
        """
        return write_mode_file(Path(path), self._require_modes("save").to_modes())
