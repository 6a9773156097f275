"""Preemption: SIGTERM or SIGUSR1 save a checkpoint at the next optimizer step and exit requeue-able.

    kill -TERM <pid>      spot reclaim, SLURM preemption or time limit, Kubernetes eviction
    kill -USR1 <pid>      SLURM's warning before the time limit (``#SBATCH --signal=USR1@90``)

      -> the optimizer step under way finishes
      -> <stage>_ckpt/last.ckpt is written at that step (atomically: ``AtomicCheckpointIO``), with the
         RNG state and the held-out loss measured before the stage (a rerun resumes bit for bit);
         ``lori fit``: last.ckpt of its ModelCheckpoint, or under a SLURM requeue Lightning's
         ``hpc_ckpt_<n>.ckpt``, which the requeued ``lori fit`` resumes from by itself
      -> under SLURM with Lightning's auto-requeue (``SLURMEnvironment``, the default there) and its
         requeue signal (SIGUSR1): ``scontrol requeue $SLURM_JOB_ID`` (array jobs: ``<array id>_<task id>``)
      -> one line on stderr, the lock of the output directory released:
         lori: preempted (SIGTERM) at LoRI-D step 8/20; checkpoint runs/x/lori_d_ckpt/last.ckpt;
               rerun the same command to resume
      -> exit code 128 + the signal's number: 143 (SIGTERM), 138 (SIGUSR1)

The exit code is the one a shell (``$?``) or Kubernetes reports for a command that the signal killed,
so a wrapper that requeues killed jobs requeues this one the same way; a run that finished exits 0
and one that failed 1 or 2, so "preempted" is never confused with either.

Where the signal lands (``handles_signals`` installs the handlers around ``run_pipeline``,
``run_continual`` and ``lori fit``'s ``Trainer.fit``; they only record the signal):

- during a training step: the step finishes and the stage stops there (``PreemptionCheckpoint``);
- outside a training step (calibration, an adapter being written, evaluation, the gap between
  stages, a held-out loss for SIGUSR1): that work completes (a mask or adapter is whole or absent, never half
  written) and the run stops at the next optimizer step, so the random stream of the next stage is
  the uninterrupted run's; a signal after the last step lets the run finish (exit 0, one line);
- Lightning's own SIGTERM check ends a held-out-loss measurement at once (``SIGTERMException``): the
  run stops with the stages' last checkpoints, which a rerun resumes from.

Before these handlers are installed (parsing, model loading) a signal ends the process as usual:
nothing has trained yet, and the next run takes over the lock the killed one left.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lori.training.checkpoint_io import LAST
from lori.training.run_lock import is_launching_process

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RESUME = "rerun the same command to resume"

_pending: int | None = None  # the first signal received while the handlers are installed
_depth = 0  # nested ``handling()`` blocks (run_continual runs run_pipeline)


class Preempted(SystemExit):
    """The run stopped for a signal; the exit code is 128 + its number (the line is already printed)."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(128 + signum)
        self.signum, self.where = signum, where
        if is_launching_process():
            print(f"lori: preempted ({signal.Signals(signum).name}) {where}", file=sys.stderr, flush=True)


def pending() -> int | None:
    """The signal received and not yet acted on, or None."""
    return _pending


def _record(signum: int, frame: Any) -> None:
    global _pending
    if _pending is None:
        _pending = signum


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Record SIGTERM and SIGUSR1 for the block (``PreemptionCheckpoint`` acts on them); the outermost
    block restores the previous handlers and turns Lightning's ``SIGTERMException`` into ``Preempted``."""
    global _depth, _pending
    if _depth or threading.current_thread() is not threading.main_thread():
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    previous = {s: signal.signal(s, _record) for s in SIGNALS}
    _depth, _pending = 1, None
    try:
        yield
        if _pending is not None and is_launching_process():
            print(f"lori: {signal.Signals(_pending).name} arrived after the last training step; the run finished",
                  file=sys.stderr, flush=True)
    except SIGTERMException:  # Lightning's loops end a held-out-loss measurement on SIGTERM
        raise Preempted(_pending or signal.SIGTERM,
                        f"outside a training step; the stages' last checkpoints are kept; {RESUME}") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _depth, _pending = 0, None


def handles_signals(run: Callable) -> Callable:
    """Decorate a run function to hold ``handling()`` while it runs."""

    @functools.wraps(run)
    def handled(*args: Any, **kwargs: Any) -> Any:
        with handling():
            return run(*args, **kwargs)

    return handled


def requeues(trainer: L.Trainer, signum: int) -> bool:
    """Whether the Trainer runs under SLURM with auto-requeue and ``signum`` is its requeue signal."""
    # a single-device strategy keeps no environment: the one Lightning's signal connector reads
    env = (getattr(trainer.strategy, "cluster_environment", None)
           or getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None))
    return isinstance(env, SLURMEnvironment) and env.auto_requeue and signum == env.requeue_signal


def requeue(trainer: L.Trainer, signum: int) -> str:
    """``scontrol requeue <job>`` (rank 0) when ``requeues(trainer, signum)``, as Lightning's own handler
    would; the clause the preemption line gets."""
    if not requeues(trainer, signum):
        return ""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID", "")
    if not trainer.is_global_zero or not job:
        return ""
    try:
        code = subprocess.call(["scontrol", "requeue", job], stdout=subprocess.DEVNULL)
    except FileNotFoundError:
        return f"; scontrol not found, SLURM job {job} not requeued"
    return f"; SLURM job {job} requeued" if code == 0 else f"; scontrol requeue {job} failed (exit {code})"


class PreemptionCheckpoint(L.Callback):
    """After the optimizer step in which a signal arrived: checkpoint, requeue under SLURM, raise ``Preempted``.

    The checkpoint is the Trainer's ``last.ckpt`` (in its ModelCheckpoint's directory, else in
    ``default_root_dir``), written by ``trainer.save_checkpoint`` at the same hook as ModelCheckpoint's
    own, so resuming from it is resuming from a periodic one. Batches that only accumulate gradients
    are no step: the stop waits for the step that uses them.

    With ``slurm_checkpoint`` (``lori fit``, whose rerun starts over unless given ``--ckpt_path``), a stop
    that requeues the SLURM job writes Lightning's own ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir``
    instead, which Lightning resumes from when the requeued job runs the same command.

    Args:
        stage: the stage's name in the line (``LoRI-D``).
        resume: how to resume, ``{path}`` standing for the checkpoint.
        slurm_checkpoint: on a SLURM requeue, write the checkpoint Lightning's auto-requeue resumes from.
    """

    def __init__(self, stage: str, resume: str = RESUME, slurm_checkpoint: bool = False) -> None:
        self.stage, self.resume, self.slurm_checkpoint = stage, resume, slurm_checkpoint
        self._step_before = -1

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        stop = _pending is not None
        if trainer.world_size > 1:  # every rank saves (and stops) at the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        if trainer.global_step == self._step_before:  # inside an accumulation window: wait for its step
            connector = getattr(trainer, "_signal_connector", None)  # Lightning would stop at this batch
            if connector is not None:
                connector.received_sigterm = False
            return
        signum = _pending or signal.SIGTERM  # (another rank's signal under DDP)
        resume = self.resume
        if self.slurm_checkpoint and requeues(trainer, signum):  # where Lightning's SIGUSR1 handler saves
            path = Path(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
            resume = "the requeued job resumes from it"
        else:
            path = self.checkpoint_path(trainer)
            if isinstance(trainer.checkpoint_callback, ModelCheckpoint):  # its file now: a resumed one
                trainer.checkpoint_callback.last_model_path = str(path)  # replaces it, writes no last-v1.ckpt
        trainer.save_checkpoint(path)
        requeued = requeue(trainer, signum)
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        of = f"/{int(total)}" if math.isfinite(total) else ""
        _end_step_bar(trainer)
        raise Preempted(signum, f"at {self.stage} step {trainer.global_step}{of}; checkpoint {path}{requeued}; "
                                f"{resume.format(path=path)}")

    @staticmethod
    def checkpoint_path(trainer: L.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None) or trainer.default_root_dir
        return Path(directory) / LAST


def _end_step_bar(trainer: L.Trainer) -> None:
    """Close the training bar (its line ends) so that the preemption line starts a line of its own."""
    try:
        bar = trainer.progress_bar_callback.train_progress_bar  # type: ignore[union-attr]
    except (AttributeError, TypeError):  # no bar, or one not drawn yet
        return
    bar.close()
