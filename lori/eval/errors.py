"""The evaluation's input error (re-exported by ``lori.eval.evaluator``; the CLI reports it in one line)."""

from __future__ import annotations


class EvalError(ValueError):
    """Evaluation settings that cannot work (unknown task, bad sample counts, ...)."""
