"""The merge results as a table like the paper's Table 3: rows = merge methods, columns = task metrics.

    | Merging | Adaptation | gsm8k accuracy | humaneval pass@1 | ... | Average |

Scores in [0, 1] print as percentages with one decimal; the eight NLU sets show as their average
(``nlu_average``); a missing score prints as ``-``. ``lori.training.merge_run`` fills the rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lori.data.sources import NLU_TASKS

NOT_SCORES = ("n", "samples_per_problem")  # counts that evaluate_model reports beside the metrics


def table_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(task, metric) columns in the order evaluated; the eight NLU sets show as their average."""
    columns: list[tuple[str, str]] = []
    for row in rows:
        scores = row["scores"]
        hidden = tuple(NLU_TASKS) if "nlu_average" in scores else ()
        for task, metrics in scores.items():
            if task not in hidden:
                columns += [(task, m) for m in metrics if m not in NOT_SCORES and (task, m) not in columns]
    return columns


def row_average(scores: dict[str, dict[str, float]], tasks: Sequence[str]) -> float | None:
    """Mean over the table's tasks of each task's first metric; None when one is missing."""
    tasks = list(dict.fromkeys(tasks))
    primary = [next(m for k, m in scores[t].items() if k not in NOT_SCORES) for t in tasks if scores.get(t)]
    return sum(primary) / len(primary) if primary and len(primary) == len(tasks) else None


def results_table(results: dict[str, Any]) -> str:
    """Markdown like the paper's Table 3: Merging | Adaptation | task metrics ... | Average."""
    columns = [tuple(c) for c in results["columns"]]
    head = ["Merging", "Adaptation"] + [f"{t} {m}" for t, m in columns] + ["Average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"]:
        cells = [row["merging"], row["adaptation"]]
        cells += [_fmt(row["scores"].get(t, {}).get(m)) for t, m in columns]
        lines.append("| " + " | ".join(cells + [_fmt(row.get("average"))]) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}" if abs(value) <= 1.0 else f"{value:.2f}"
