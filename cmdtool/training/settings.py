"""``TrainingSettings``: what a run of ``EmbeddedCMD`` is, checked before training starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import CmdError
from ..modes import TRAINING_SOURCE as SOURCE
from ..modes import FitSettings

TRAINING_TRAJECTORY = "none (a training run keeps no trajectory)"


@dataclass(frozen=True)
class TrainingSettings:
    """What a run of ``EmbeddedCMD`` is, fixed for its life: resuming with others is an error."""
    modes: int = 10
    warmup: int = 10
    embed_window: int = 10
    embed_percent: float = 0.0
    relative: bool = True
    samples: int = 1000
    seed: int = 0
    include: tuple = ()
    exclude: tuple = ()
    every_n_steps: int | None = None  # for the callbacks: observe every n optimizer steps instead of per epoch

    def __post_init__(self):
        if self.warmup is None:
            raise CmdError("warmup must be an integer of at least 2 (got None): the modes are found on the first "
                           "observations", parameter="warmup")
        self.fit_settings()  # modes, samples, seed, warmup, include, exclude checked as cmd fit checks them
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for name in ("embed_window", "every_n_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise CmdError(f"{name} must be an integer (got {value!r})", parameter=name)
        if not 0 <= self.embed_percent <= 100:
            raise CmdError(f"embed_percent {self.embed_percent}: expected a percentage, 0 to 100 "
                           f"(0 = online CMD only)")
        if self.embed_percent > 0 and self.embed_window < 1:
            raise CmdError(f"embed_window {self.embed_window}: must be at least 1 observation")
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise CmdError(f"every_n_steps {self.every_n_steps}: must be at least 1")

    def fit_settings(self) -> FitSettings:
        """The mode file's ``settings``, as ``OnlineCMD`` writes them."""
        return FitSettings(modes=self.modes, samples=self.samples, seed=self.seed, include=self.include,
                           exclude=self.exclude, source=SOURCE, trajectory=TRAINING_TRAJECTORY, warmup=self.warmup)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
