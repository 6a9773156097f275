"""Checkpoints that survive a full disk, a kill mid-write and a damaged file.

Writing (``AtomicCheckpointIO``, a Lightning ``CheckpointIO`` plugin every lori Trainer gets):

    <stage>_ckpt/.last.ckpt.<random>.tmp   torch.save, flush, fsync
    <stage>_ckpt/last.prev.ckpt            the checkpoint it replaces (the previous good one)
    <stage>_ckpt/last.ckpt                 renamed in, directory fsynced

A failed write (full disk: ``DiskFullError`` naming the path and the free space) leaves
last.ckpt and last.prev.ckpt as they were. A state dict holding NaN or inf (the last optimizer
step diverged) is not written: the run stops with a FloatingPointError naming the tensor and
step, and the previous checkpoint stays. Lightning's own TorchCheckpointIO writes the file in
place, so a full disk leaves a truncated last.ckpt that no later run can read.

Resuming (``resume_checkpoint``): last.ckpt, else last.prev.ckpt, the first that loads and holds
finite weights. One that does not is set aside (renamed ``<name>.unreadable``, never deleted)
and the run says in one line which checkpoint it resumes from, or that the stage starts again.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lori.core.atomic_files import atomic_write, previous_path
from lori.core.finite import first_non_finite
from lori.training.run_lock import is_launching_process

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` writing each checkpoint atomically and keeping the one it replaces.

    Remote paths (``s3://...``) go to Lightning's own writer unchanged.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        bad = first_non_finite((k, v) for k, v in checkpoint.get("state_dict", {}).items() if torch.is_tensor(v))
        if bad is not None:
            raise FloatingPointError(
                f"not writing checkpoint {path}: {bad} at global step {checkpoint.get('global_step')} "
                "(the last optimizer step diverged); the previous checkpoint is kept"
            )
        with atomic_write(path, keep_previous=True) as f:
            torch.save(checkpoint, f)


def with_atomic_checkpoints(plugins: Any, strategy: Any = None) -> list[Any]:
    """A Trainer's ``plugins`` with ``AtomicCheckpointIO`` added, unless a CheckpointIO is already set
    (in ``plugins`` or on a strategy object, where Lightning refuses a second one)."""
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

    plugins = list(plugins) if isinstance(plugins, list | tuple) else ([] if plugins is None else [plugins])
    if any(isinstance(p, CheckpointIO) for p in plugins) or getattr(strategy, "_checkpoint_io", None) is not None:
        return plugins
    return plugins + [AtomicCheckpointIO()]


def _say(message: str) -> None:
    if is_launching_process():
        print(f"lori: {message}", file=sys.stderr, flush=True)


def _read(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(checkpoint, "") when ``path`` loads and its weights are finite, else (None, why not)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read is a damaged file
        return None, " ".join(str(err).split())[:200]
    if not isinstance(ckpt, dict):
        return None, f"it holds a {type(ckpt).__name__}, not a checkpoint"
    bad = first_non_finite((k, v) for k, v in ckpt.get("state_dict", {}).items() if torch.is_tensor(v))
    return (None, bad) if bad is not None else (ckpt, "")


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``<name>.unreadable`` (``.unreadable.1``, ... if taken)."""
    target, n = path.with_name(path.name + ".unreadable"), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.unreadable.{n}")
    with contextlib.suppress(FileNotFoundError):  # another rank set it aside first
        os.replace(path, target)
    return target


def resume_checkpoint(directory: str | Path, stage: str) -> tuple[str | None, dict[str, Any] | None]:
    """The checkpoint a stage resumes from, and its contents; (None, None) to start the stage.

    Tries ``last.ckpt`` then ``last.prev.ckpt``; each one that cannot be read (or holds NaN / inf
    weights) is set aside by the launching process (rank 0), and a line on stderr says which
    checkpoint the stage resumes from instead, or that it starts again.
    """
    directory = Path(directory)
    refused: list[str] = []
    for path in (directory / LAST, previous_path(directory / LAST)):
        if not path.is_file():
            continue
        ckpt, why = _read(path)
        if ckpt is not None:
            if refused:
                _say(f"{'; '.join(refused)}; {stage} resumes from {path} (global step {ckpt.get('global_step')})")
            return str(path), ckpt
        aside = set_aside(path) if is_launching_process() else path
        refused.append(f"checkpoint {path} cannot be used ({why}), set aside as {aside.name}")
    if refused:
        _say(f"{'; '.join(refused)}; no earlier checkpoint: {stage} starts again from its beginning")
    return None, None
