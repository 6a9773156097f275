"""The progress bar of lori's Trainers: one bar per fit, counting optimizer steps of the stage.

    LoRI-D  12/20 steps |██████████▉         | 00:41<00:34  loss 0.932

Lightning's own bar counts batches of the current epoch ("Epoch 0/-2" when a stage is budgeted
in steps); this one counts ``trainer.global_step`` against the fit's total
(``trainer.estimated_stepping_batches``: ``max_steps``, or epochs x batches / accumulation),
starts at the resumed step, and shows the progress-bar metrics (``train/loss`` as ``loss``).
Held-out passes get a transient bar that disappears when they end. Bars go to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf

STAGE_NAMES = {"lori_d": "LoRI-D", "lori_s": "LoRI-S", "task": "task", "eval": "held-out loss",
               "fit": "training", "validate": "held-out loss", "test": "test"}


def stage_name(stage: str) -> str:
    """The name a user reads for a stage key (``lori_d`` -> ``LoRI-D``)."""
    return STAGE_NAMES.get(stage, stage)


def format_metrics(metrics: dict[str, Any]) -> str:
    """``loss 0.932  acc 0.5``: progress-bar metrics with their ``train/`` prefix dropped."""
    parts = []
    for name, value in metrics.items():
        if name == "v_num":
            continue
        name = name.removeprefix("train/")
        parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return "  ".join(parts)


class StepProgressBar(TQDMProgressBar):
    """One training bar per fit in optimizer steps, with the stage's name and its loss.

    Args:
        label: what the bar is called (``LoRI-D``, ``LoRI-S``, ``training``).
    """

    BAR_FORMAT = "{desc}  {n_fmt}/{total_fmt} steps |{bar:20}| {elapsed}<{remaining}{postfix}"
    EVAL_FORMAT = "{desc}  {n_fmt}/{total_fmt} batches |{bar:20}| {elapsed}<{remaining}"

    def __init__(self, label: str = "training") -> None:
        super().__init__(leave=False)
        self.label = label
        self._shown = ""  # the metrics last drawn

    @property
    def validation_description(self) -> str:
        return "held-out loss"

    def init_train_tqdm(self, total: int | None = None, initial: int = 0) -> Tqdm:
        return Tqdm(desc=self.label, total=total, initial=initial, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)

    def init_validation_tqdm(self, total: int | None = None, desc: str | None = None) -> Tqdm:
        # drawn only once a held-out pass has lasted a second; erased when it ends
        return Tqdm(desc=desc or self.validation_description, total=total, disable=self.is_disabled,
                    leave=False, delay=1.0, dynamic_ncols=True, file=sys.stderr, bar_format=self.EVAL_FORMAT)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a resumed fit starts where it stopped
        total = convert_inf(trainer.estimated_stepping_batches)
        self.train_progress_bar = self.init_train_tqdm(total, trainer.global_step)
        self._shown = ""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar across epochs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, bar.total):
            self._show(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._show(trainer, pl_module)

    def on_sanity_check_start(self, *_: Any) -> None:
        self.train_progress_bar = Tqdm(disable=True)  # no training bar yet; validation makes its own

    def on_sanity_check_end(self, *_: Any) -> None:
        self._close_validation_bar()
        self.train_progress_bar.close()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # the bar starts with the first batch, once its total is known

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.has_dataloader_changed(dataloader_idx):
            self._close_validation_bar()
            desc = self.sanity_check_description if trainer.sanity_checking else self.validation_description
            self.val_progress_bar = self.init_validation_tqdm(
                convert_inf(self.total_val_batches_current_dataloader), desc)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        bar = self.val_progress_bar
        bar.update(batch_idx + 1 - bar.n)  # update(), not refresh(): keeps the bar's delay

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close_validation_bar()
        self.reset_dataloader_idx_tracker()
        if self._train_progress_bar is not None and trainer.state.fn == "fit":
            self._show(trainer, pl_module)

    def _close_validation_bar(self) -> None:
        if self._val_progress_bar is not None:
            self._val_progress_bar.close()
            self._val_progress_bar = None

    def _show(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self.train_progress_bar
        if bar.disable:
            return
        metrics = format_metrics(self.get_metrics(trainer, pl_module))
        if (trainer.global_step, metrics) == (bar.n, self._shown):
            return  # nothing new: no redraw (each one is a line in a log file)
        bar.n, self._shown = trainer.global_step, metrics
        bar.set_postfix_str(metrics, refresh=False)
        bar.refresh()


def for_trainer(stage: str, trainer_kwargs: dict[str, Any], callbacks: Iterable[Any]) -> list[L.Callback]:
    """``[StepProgressBar]`` for a Trainer of ``stage``, or ``[]`` when the config turns bars off
    (``enable_progress_bar: false``, ``barebones``) or brings its own bar callback."""
    if trainer_kwargs.get("enable_progress_bar") is False or trainer_kwargs.get("barebones"):
        return []
    if any(isinstance(c, ProgressBar) for c in callbacks):
        return []
    return [StepProgressBar(stage_name(stage))]
