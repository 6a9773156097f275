"""One adapter set, many table rows: what ``--adaptation`` and ``--method`` pick from a merge config's
``adapter_set:`` (``lori.training.merge_run.MergeConfig.adapter_set``).

    lori merge --config configs/paper/merge/llama3_8b_3tasks.yaml --adaptation lori_s --method linear

A paper table (Tables 3, 15, 18) merges one set of training runs (model x tasks) with several methods,
each on LoRI-D, LoRI-S or LoRA adapters. The set names the runs once; a row (method, adaptation)
gives what Appendix D Table 10 sets per row, and the rest derives as single-task runs derive theirs
(``lori.training.fit_settings``), for ``run = parent/name`` (a ``lori pipeline``'s ``pipeline.output_dir``):

    adapters     lori_d, lori_s: run/<adaptation>          (runs/paper/llama3_8b_r32_nlu/lori_s)
                 lora (a baseline): parent/<adaptation>/name  (runs/paper/lora/llama3_8b_r32_nlu: lori fit --model.method lora)
    weights      [row.weight] * number of runs
    density      row.density (None: concat, linear; the pruning methods' kept fraction)
    single_task  row.single_task (the "Single-Task" reference row of the table)
    output_dir   <output_prefix>_<method>_<adaptation>   (runs/paper/merge/llama3_8b_3tasks_linear_lori_s)

Each is filled only where the config (or command line) leaves it unset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lori.core import LoRIConfigError
from lori.training.fit_settings import PIPELINE_STAGES, method_output_dir

ROW_FIELDS = ("adapters", "weights", "density", "single_task", "output_dir")  # what a row fills in


class MergeSetError(LoRIConfigError):
    """An adapter set without the row asked for, or a row asked for without naming one."""


@dataclass
class MergeRow:
    """One table row's settings (paper Appendix D Table 10).

    Args:
        weight: every adapter's merge weight.
        density: kept fraction of magnitude / ties / dare (None for concat and linear).
        single_task: also evaluate each adapter alone (the table's "Single-Task" row).
    """

    weight: float
    density: float | None = None
    single_task: bool = False


@dataclass
class MergeSet:
    """The training runs of one adapter set and its rows.

    Args:
        runs: training run directories, one per task in ``tasks`` order (``pipeline.output_dir``).
        output_prefix: each row writes ``<output_prefix>_<method>_<adaptation>``.
        rows: method -> adaptation (``lori_d``, ``lori_s``, ``lora``) -> that row's settings.
    """

    runs: list[str] = field(default_factory=list)
    output_prefix: str = "runs/merge"
    rows: dict[str, dict[str, MergeRow]] = field(default_factory=dict)

    @classmethod
    def from_value(cls, value: MergeSet | dict[str, Any]) -> MergeSet:
        """A MergeSet from itself or from its parsed YAML mapping."""
        if isinstance(value, MergeSet):
            return value
        rows = {method: {a: row if isinstance(row, MergeRow) else MergeRow(**row) for a, row in by.items()}
                for method, by in (value.get("rows") or {}).items()}
        return cls(runs=list(value.get("runs") or []), output_prefix=value.get("output_prefix", "runs/merge"),
                   rows=rows)

    def listing(self) -> str:
        """The rows, as ``method (adaptation, ...)``."""
        return ", ".join(f"{method} ({', '.join(by)})" for method, by in self.rows.items())

    def row(self, method: str, adaptation: str | None) -> MergeRow:
        """The row of (method, adaptation); refused in one line listing the rows there are."""
        found = self.rows.get(method, {}).get(adaptation) if adaptation is not None else None
        if found is None:
            raise MergeSetError(
                f"this adapter set has no row --method {method} --adaptation {adaptation}; "
                f"its rows, method (adaptations): {self.listing()}"
            )
        return found

    def adapters(self, adaptation: str) -> list[str]:
        """The adapter directories the runs hold for ``adaptation`` (see the module docstring)."""
        if adaptation in PIPELINE_STAGES:
            return [f"{run.rstrip('/')}/{adaptation}" for run in self.runs]
        return [method_output_dir(run, adaptation) for run in self.runs]

    def output_dir(self, method: str, adaptation: str) -> str:
        return f"{self.output_prefix}_{method}_{adaptation}"


def row_settings(merge_set: MergeSet, methods: list[str], adaptation: str | None) -> dict[str, Any]:
    """adapters, weights, density, single_task and output_dir of the row ``methods`` x ``adaptation``.

    Args:
        merge_set: the config's ``adapter_set``.
        methods: the merge methods asked for, by lori's names: exactly one.
        adaptation: ``lori_d``, ``lori_s`` or ``lora``.
    """
    if len(methods) != 1 or adaptation is None:
        raise MergeSetError(
            f"a config with adapter_set runs one of its table rows: pick it with --method and --adaptation "
            f"(got --method {','.join(methods)} --adaptation {adaptation}); rows, method (adaptations): "
            f"{merge_set.listing()}"
        )
    method = methods[0]
    row = merge_set.row(method, adaptation)
    settings = (merge_set.adapters(adaptation), [row.weight] * len(merge_set.runs), row.density, row.single_task,
                merge_set.output_dir(method, adaptation))
    return dict(zip(ROW_FIELDS, settings))
