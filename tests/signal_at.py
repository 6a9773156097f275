"""``SignalAt``: a test callback that sends this process a real signal at a chosen point of a run.

Given in a YAML's ``trainer.callbacks`` (tests/ is on PYTHONPATH), it is shared by every Trainer the run
builds; ``fit`` counts the run's training fits (stages) from 1:

    - class_path: signal_at.SignalAt
      init_args: {fit: 1, step: 8, signal: SIGTERM}    # during optimizer step 8 of the first fit
      init_args: {fit: 1, step: 0, signal: SIGTERM}    # as the first fit ends: calibration (LoRI-D)
"""

from __future__ import annotations

import os
import signal as signals

import lightning as L


class SignalAt(L.Callback):
    """Send ``signal`` to this process during optimizer step ``step`` of training fit ``fit`` (before the
    optimizer updates), or with ``step: 0`` as that fit ends (before LoRI-D's calibration callback runs)."""

    def __init__(self, fit: int = 1, step: int = 1, signal: str = "SIGTERM") -> None:
        self.fit, self.step, self.signum = fit, step, getattr(signals, signal)
        self.fits = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fits += 1

    def on_before_optimizer_step(self, trainer: L.Trainer, *args) -> None:
        if self.fits == self.fit and self.step and trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.fits == self.fit and not self.step:
            os.kill(os.getpid(), self.signum)
