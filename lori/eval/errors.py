"""The evaluation's input error (re-exported by ``lori.eval.evaluator``; the CLI reports it in one line)."""

from __future__ import annotations

from lori.core.errors import LoRIError


class EvalError(LoRIError, ValueError):
    """Evaluation settings that cannot work (unknown task, bad sample counts, ...)."""
