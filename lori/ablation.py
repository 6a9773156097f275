"""Sweeps over ``lori pipeline`` for the ablation notebooks and experiments/ (paper Figs. 4 and 5).

    from lori import ablation as ab
    rows = ab.run_sweep(ab.toy_config(workdir), ab.expand_grid({"model.lori.sparsity": [0.5, 0.9]}), "runs/abl")

The sweep API is ``lori.training.sweeps`` (re-exported here, names and all); this module adds its
default runner, ``lori pipeline`` itself (``lori.commands.pipeline_command.pipeline``), to
``run_point`` and ``run_sweep``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lori.training import sweeps
from lori.training.sweeps import *  # the sweep API, re-exported (sweeps.__all__)
from lori.training.sweeps import Runner

__all__ = list(sweeps.__all__)  # the same names; run_point and run_sweep are defined below


def _default_runner(argv: list[str]) -> dict[str, Any]:
    from lori.commands.pipeline_command import pipeline

    return pipeline(argv)


def run_point(
    base: Mapping[str, Any], overrides: Mapping[str, Any], root: str | Path, run: Runner | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """``lori.training.sweeps.run_point``; ``run`` defaults to ``lori pipeline``."""
    return sweeps.run_point(base, overrides, root, run or _default_runner, name)


def run_sweep(
    base: Mapping[str, Any], grid: Sequence[Mapping[str, Any]], root: str | Path, run: Runner | None = None,
) -> list[dict[str, Any]]:
    """``lori.training.sweeps.run_sweep``; ``run`` defaults to ``lori pipeline``."""
    return sweeps.run_sweep(base, grid, root, run or _default_runner)
