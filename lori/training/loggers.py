"""The experiment loggers of a run of several stages (``lori pipeline``, ``lori continual``).

``trainer.logger`` in the YAML (or ``--trainer.logger``) decides what every stage's Trainer logs to:

    null or true (default)    TensorBoard, one run per stage: <output_dir>/tb/<stage> (as before)
    false                     nothing
    a Logger, or a list       the user's logger(s), the SAME object(s) for every stage: one run in
                              the tracker, each metric under its stage's name, hyperparameters once

    lori_d/train/loss   lori_d/lr   lori_d/calibration/density   lori_s/train/loss   lori_s/params/trainable_sparse
    (lori continual:)   safety/lori_d/train/loss   safety/lori_s/...   task_mask/lori_d/...   task/train/loss
                        continual/<task>/<metric> at step 0, 1, 2 (base, safety, task: the Fig. 3 numbers)

One run per pipeline, not one per stage: a sweep over sparsity or learning rate (paper Fig. 5) is
then one row per configuration in W&B's or MLflow's run table, with LoRI-D's and LoRI-S's curves side
by side under their stage names (each stage's steps count from 0). The hyperparameters logged are
the module's and the data's (what Lightning logs) plus the command's own section (``pipeline:`` or
``continual:``), once: MLflow refuses a parameter logged twice with another value (LoRI-S's
``sparse_lr``), and a W&B config is per run. ``lori fit`` is one stage: LightningCLI hands the
logger to its one Trainer, metric names unprefixed.

A rerun that resumes an interrupted pipeline opens a new run in the tracker (finished stages are
reused, not logged again) unless the logger is pointed at the old one (WandbLogger ``id`` with
``resume: allow``, MLFlowLogger ``run_id``).

``RunLoggers.finalize`` ends the run when the command is done (MLflow: status FINISHED; W&B: the
run is finished, so its files are complete and a next run in the same process opens its own).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from lori.core import LoRIConfigError


class StageLogger(Logger):
    """One stage's view of a user's logger: metric names under ``<stage>/``, hyperparameters once.

    Args:
        logger: the user's logger (shared by every stage of the run).
        stage: the stage's name (``lori_d``, ``safety/lori_s``, ...), prefixed to every metric.
        run: the run the stage belongs to (remembers which loggers got the hyperparameters).
    """

    def __init__(self, logger: Logger, stage: str, run: RunLoggers) -> None:
        super().__init__()
        self.logger, self.stage, self.run = logger, stage, run

    @property
    def name(self) -> str | None:
        return self.logger.name

    @property
    def version(self) -> int | str | None:
        return self.logger.version

    @property
    def save_dir(self) -> str | None:
        return self.logger.save_dir

    @property
    def log_dir(self) -> str | None:
        return getattr(self.logger, "log_dir", None)

    @property
    def experiment(self) -> Any:
        return getattr(self.logger, "experiment", None)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.logger.log_metrics({f"{self.stage}/{key}": value for key, value in metrics.items()}, step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if self.run.first_hparams(self.logger):
            self.logger.log_hyperparams({**dict(params or {}), **self.run.hparams}, *args, **kwargs)

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        self.logger.log_graph(model, input_array)

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        self.logger.after_save_checkpoint(checkpoint_callback)

    def save(self) -> None:
        self.logger.save()

    def finalize(self, status: str) -> None:
        """A stage's Trainer ends: the run goes on (next stage) unless the stage failed."""
        if status == "success":
            self.logger.save()
        else:
            self.logger.finalize(status)


class RunLoggers:
    """What each stage's Trainer logs to, from the ``trainer.logger`` setting (see the module docstring).

    Args:
        setting: ``trainer.logger`` as instantiated by the CLI: None / True (TensorBoard), False, a
            Logger or a list of them.
        output_dir: the run's directory (TensorBoard's default place: <output_dir>/tb/<stage>).
        hparams: logged with the module's hyperparameters, once (e.g. ``{"pipeline": {...}}``).
    """

    def __init__(self, setting: Any, output_dir: Path, hparams: Mapping[str, Any] | None = None) -> None:
        self.enabled = setting is not False
        self.loggers = user_loggers(setting)
        quiet_wandb(self.loggers)
        self.output_dir, self.hparams = Path(output_dir), dict(hparams or {})
        self._logged: set[int] = set()

    def first_hparams(self, logger: Logger) -> bool:
        """True the first time ``logger`` is asked to log hyperparameters in this run."""
        first = id(logger) not in self._logged
        self._logged.add(id(logger))
        return first

    def for_stage(self, stage: str) -> Logger | list[Logger] | bool:
        """The ``logger`` argument of one stage's Trainer."""
        if not self.enabled:
            return False
        if not self.loggers:
            return TensorBoardLogger(str(self.output_dir), name="tb", version=stage)
        return [StageLogger(logger, stage, self) for logger in self.loggers]

    def evaluation_writer(self, name: str) -> Any:
        """Where evaluation scalars go (``add_scalar(tag, value, step)``, ``close()``): a TensorBoard
        writer in <output_dir>/tb/<name> by default, the user's loggers (tags as given), or None."""
        if not self.enabled:
            return None
        if self.loggers:
            return _LoggersWriter(self.loggers)
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.output_dir / "tb" / name))

    def finalize(self, status: str = "success") -> None:
        """End the run in every user logger (MLflow's status, W&B's run); TensorBoard needs nothing."""
        for logger in self.loggers:
            logger.finalize(status)
            if isinstance(logger, WandbLogger) and logger.version is not None:  # a W&B run was opened
                logger.experiment.finish(exit_code=0 if status == "success" else 1)


class _LoggersWriter:
    """``SummaryWriter.add_scalar`` onto Lightning loggers (``lori continual``'s evaluations)."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for logger in self.loggers:
            logger.log_metrics({tag: value}, step)

    def close(self) -> None:
        """The run goes on until ``RunLoggers.finalize``."""


def user_loggers(setting: Any) -> list[Logger]:
    """The Logger objects a ``trainer.logger`` setting names ([] for None, True or False)."""
    if setting is None or isinstance(setting, bool):
        return []
    found = [setting] if isinstance(setting, Logger) else list(setting) if isinstance(setting, Iterable) else None
    if found is None or not all(isinstance(logger, Logger) for logger in found):
        raise LoRIConfigError(f"trainer.logger must be true, false or Lightning loggers, got {setting!r}")
    return found


def quiet_wandb(loggers: Iterable[Logger]) -> None:
    """With a WandbLogger in a quiet run (``WANDB_SILENT``, set by ``lori.training.console``), set W&B
    up now: its silence then covers the warnings it prints while checking ``wandb.init``'s arguments
    (Lightning passes ``anonymous``, which W&B has retired)."""
    if any(isinstance(logger, WandbLogger) for logger in loggers) and os.environ.get("WANDB_SILENT") == "true":
        import wandb

        wandb.setup()


def scoped(make: Any, scope: str) -> Any:
    """A trainer factory (``lori.training.pipeline.make_trainer_factory``) whose stages log as
    ``<scope>/<stage>`` (``lori continual``: the safety run's and the task mask's LoRI-D apart)."""

    def make_scoped(*args: Any, **kwargs: Any) -> Any:
        stage = kwargs["stage"] if "stage" in kwargs else args[0]
        return make(*args, **kwargs, log_name=f"{scope}/{stage}")

    return make_scoped
