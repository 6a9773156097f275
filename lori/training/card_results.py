"""The ``### Results`` section of an adapter's card: what ``lori eval --adapter DIR`` measured.

The section sits between two markers; the first carries the results as JSON, so a later evaluation
replaces the rows of the tasks it ran and keeps the others (one section, however often eval runs):

    <!-- lori:results {"gsm8k": {"metrics": {"accuracy": 0.25}, "n": 32, ...}} -->
    | task | metric | value | n | protocol | adapter merged | results file |
    ...
    <!-- /lori:results -->

A directory without a lori card (a released adapter, a PEFT dir lori did not write) is left alone.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from lori.core.atomic_files import write_text_atomic

CARD_FILE = "README.md"
RESULTS_END = "<!-- /lori:results -->"
_START = re.compile(r"^<!-- lori:results (?P<json>\{.*\}) -->$", re.M)
NOT_SCORES = ("n", "samples_per_problem")


def results_marker(results: dict[str, Any]) -> str:
    """The section's opening marker holding ``results`` as JSON (``>`` escaped: it cannot end the comment)."""
    return f"<!-- lori:results {json.dumps(results, sort_keys=True).replace('>', chr(92) + 'u003e')} -->"


def results_lines(results: dict[str, Any]) -> list[str]:
    """A Markdown table: one row per task and metric."""
    lines = ["| task | metric | value | n | protocol | adapter merged | results file |",
             "|---|---|---|---|---|---|---|"]
    for task, entry in results.items():
        for metric, value in entry["metrics"].items():
            lines.append(f"| {task} | {metric} | {value:.4f} | {entry.get('n', '')} | {entry.get('protocol', '')} "
                         f"| {entry.get('merged', '')} | `{entry.get('results_file', '')}` |")
    return lines


def results_from_report(report: dict[str, Any], results_file: str | Path) -> dict[str, Any]:
    """The card's entries for one ``lori eval`` report (``run_eval``'s return value)."""
    settings, target = report.get("settings", {}), report.get("target", {})
    out: dict[str, Any] = {}
    for task, metrics in report["results"].items():
        out[task] = {"metrics": {k: float(v) for k, v in metrics.items() if k not in NOT_SCORES},
                     "n": metrics.get("n"), "protocol": settings.get("protocol"),
                     "max_examples": settings.get("max_examples"), "merged": target.get("merged"),
                     "results_file": str(results_file)}
    return out


def read_card_results(card_text: str) -> dict[str, Any] | None:
    """The results a card holds (``{}`` when not evaluated); None for a text that is not a lori card."""
    match = _START.search(card_text)
    return None if match is None or RESULTS_END not in card_text else json.loads(match["json"])


def update_card_results(adapter_dir: str | Path, report: dict[str, Any], results_file: str | Path) -> bool:
    """Put ``report``'s results into the card of ``adapter_dir`` in place (atomically).

    Tasks the report ran replace their rows; other tasks' rows stay. Returns False (and writes
    nothing) when the directory has no lori card, or (with one line on stderr) cannot be written.
    """
    path = Path(adapter_dir) / CARD_FILE
    text = path.read_text() if path.is_file() else ""
    results = read_card_results(text)
    if results is None:
        return False
    results.update(results_from_report(report, results_file))
    start = _START.search(text)
    end = text.index(RESULTS_END, start.start())
    section = "\n".join([results_marker(results), *results_lines(results), ""])
    try:
        write_text_atomic(path, text[: start.start()] + section + text[end:])
    except OSError as err:  # a read-only adapter: the results are in results.json all the same
        print(f"lori: the card {path} keeps its old results: {err}", file=sys.stderr)
        return False
    return True
