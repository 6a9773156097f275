"""What the ``lori`` command prints: a line per stage, a progress bar, the summary.

Lightning, transformers and datasets each talk on their own: Lightning's INFO logs ("GPU
available: ...", the litlogger tip, "`Trainer.fit` stopped"), a model summary table per Trainer,
progress bars for loading weights and tokenising, and a few warnings about their own internals.
``configure`` silences exactly those at their source: the Lightning loggers' level, the progress
bars of transformers / datasets, and warning filters matched on the module that raises them and
on their message, so a warning from any other module (a user's callback, lori itself) still
shows. ``configure(verbose=True)`` (``lori --verbose``, or ``LORI_VERBOSE=1``) leaves everything
as the libraries set it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

VERBOSE_FLAGS = ("--verbose",)
VERBOSE_ENV = "LORI_VERBOSE"

# Lightning's package loggers: their INFO records are the per-Trainer chatter (device report,
# tips, "Seed set to", "`Trainer.fit` stopped", "Restoring states from ..."); WARNING and above stay.
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")

# (module that raises it, message start, category): warnings about dependencies' own internals,
# nothing a lori user can act on.
DEPENDENCY_WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = (
    # lori passes its own argv to LightningCLI by design (one parser per subcommand)
    (r"lightning\.pytorch\.cli", "LightningCLI's args parameter is intended", UserWarning),
    # Lightning's pytree helper against torch >= 2.10's pytree
    (r"lightning\.pytorch\.utilities\._pytree", r".*isinstance\(treespec, LeafSpec\)", FutureWarning),
    # num_workers advice: lori's tokenised datasets are in memory (data.num_workers sets it)
    (r"lightning\.pytorch\.trainer\.connectors\.data_connector", "The '.*' does not have many workers", Warning),
    # transformers renaming its own property, read by PEFT / Lightning
    (r"transformers\..*|peft\..*", "`is_gradient_checkpointing` is deprecated", FutureWarning),
)

# (logger, message start): log records about dependencies' own optional extras. bitsandbytes' CPU
# backend logs at import (and PEFT imports it whenever it is installed) that it could not fetch an
# optional kernel from a model hub; its pure-torch kernels run instead.
DEPENDENCY_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)

_state = {"verbose": False}


class _DropRecords(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def pop_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--verbose``, and whether detail was asked for (flag or ``LORI_VERBOSE=1``)."""
    rest = [a for a in argv if a not in VERBOSE_FLAGS]
    env = os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return rest, env or len(rest) != len(argv)


def configure(verbose: bool = False) -> None:
    """Quiet the dependencies (see the module docstring), or with ``verbose`` leave them as they are."""
    _state["verbose"] = verbose
    if verbose:
        return
    import lightning.pytorch  # noqa: F401 - importing it sets its loggers' levels: quiet them after

    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level in (logging.NOTSET, logging.INFO):  # Lightning's own default; a user's DEBUG stays
            logger.setLevel(logging.WARNING)
    for module, message, category in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in {name for name, _ in DEPENDENCY_LOG_RECORDS}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) for f in logger.filters):
            logger.addFilter(_DropRecords(tuple(m for n, m in DEPENDENCY_LOG_RECORDS if n == name)))
    _quiet_progress_bars()
    os.environ.setdefault("WANDB_SILENT", "true")  # W&B's banner and run summary (trainer.logger: WandbLogger)


def _quiet_progress_bars() -> None:
    """No progress bars for loading weights or tokenising (a stage line says what is loaded)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from datasets.utils import logging as ds_logging

        ds_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass


def is_verbose() -> bool:
    """Whether ``configure`` was asked for the libraries' own output."""
    return _state["verbose"]


def trainer_overrides(trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Trainer settings of a quiet run: no model summary table unless the config asks for one."""
    if _state["verbose"] or trainer_kwargs.get("enable_model_summary") is not None:
        return {}
    return {"enable_model_summary": False}


def say(message: str) -> None:
    """One line of progress for the user, on stderr, from global rank 0 only."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        print(message, file=sys.stderr, flush=True)
