"""Shared vs independent frozen A: does LoRI's merge need a different A per task?

    python experiments/merge_shared_vs_independent_A.py         # SmolLM2-135M-Instruct: GSM8K, MBPP, safety
    python experiments/merge_shared_vs_independent_A.py --tiny  # tiny random Llama, two toy tasks (what CI runs)

At full size: five pipelines of 12 + 12 steps (GSM8K's seed-0 run serves both settings) and 25
held-out loss passes, about 45 minutes on 2 idle cores; the two pipelines of the shared setting
only (about 20 minutes) under a root where merge_tasks.py already ran.

LoRI (paper Property 1) gives every task its own random A, so ΔW_s = s B_s A_s and ΔW_t are nearly
orthogonal. The official code never seeds A: every task's adapter gets the same A (PEFT's init
from torch's default generator, the same set-up each run). This runs the three-task merge of
``merge_tasks.py`` twice, with per-task A seeds (lori's default: 0, 1, 2) and with one shared A
seed (0), and reports per setting and stage (LoRI-D, LoRI-S):

    mean |cos(ΔW_s, ΔW_t)| over task pairs (lori.eval.interference, trace formula)
    LoRI-S mask overlap |M_s ∧ M_t| / n against (1 - s)^2, the independent-mask value
    retained gain of concat, linear (PEFT's, the official code's) and linear_eq8 (the paper's eq. 8)

With one shared A and uniform weights w and scale s, PEFT's linear is (Σ √(ws) B_t)(T √(ws) A) =
T · concat: the official "linear" of LoRI adapters scales each task by T w instead of w.
Runs live under ``--out`` as merge_tasks.py's (the per-task-seed runs are the same runs, so a root
where merge_tasks.py already ran trains only the shared-A runs of the tasks whose own seed is not
0). Writes <out>/merge_shared_vs_independent_A.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import merge_tasks as mt  # noqa: E402
from _common import base_model, loaders_for, quiet, save_results  # noqa: E402

from lori.ablation import merged_losses  # noqa: E402

SETTINGS = {"independent": None, "shared": 0}  # setting -> shared A seed (None = each task its own)
NAME = "merge_shared_vs_independent_A"


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return sum(finite) / len(finite) if finite else None


def summarise(rows: list[dict], diagnostics: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per stage: mean |cos| over pairs, mean mask overlap (LoRI-S), retained gain per merge."""
    out = {}
    for stage, label in mt.STAGES.items():
        pairs = diagnostics.values()
        entry: dict[str, Any] = {"mean_abs_cos": _mean([p[f"{stage}_mean_abs_cos"] for p in pairs])}
        if stage == "lori_s":
            overlaps = [p["lori_s_mask_overlap"] for p in pairs]
            entry["mask_overlap"] = _mean([o["intersection"] for o in overlaps])
            entry["mask_overlap_independent"] = _mean([o["expected_independent"] for o in overlaps])
        by_name = {r["model"]: r for r in rows}
        entry["retained_gain"] = {m: by_name[f"{label} {m}"]["retained_gain"] for m in mt.MERGES}
        out[stage] = entry
    return out


def table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: one row per (A setting, stage)."""
    head = ["A", "adaptation", "mean abs cos", "mask overlap (indep. (1-s)^2)"]
    head += [f"retained {m}" for m in mt.MERGES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, stages in summary.items():
        for stage, e in stages.items():
            overlap = (f"{100 * e['mask_overlap']:.2f}% ({100 * e['mask_overlap_independent']:.2f}%)"
                       if "mask_overlap" in e else "-")
            cells = [setting, mt.STAGES[stage], f"{e['mean_abs_cos']:.4f}", overlap]
            cells += [f"{100 * e['retained_gain'][m]:.0f}%" for m in mt.MERGES]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama, two toy tasks")
    parser.add_argument("--out", default="runs/experiments/merge_tasks")
    args = parser.parse_args(argv)
    out = Path(args.out)
    results: dict[str, Any] = {"tiny": args.tiny, "settings": {}, "summary": {}}
    model = loaders = base_row = None
    for setting, shared_a in SETTINGS.items():
        configs = mt.task_configs(args.tiny, out, shared_a)
        adapters = mt.train(configs, out)
        tasks = list(configs)
        if model is None:  # one base model and one set of held-out loaders serve both settings
            model, tokenizer = base_model(next(iter(configs.values()))[1])
            loaders = loaders_for({t: c for t, (_, c) in configs.items()}, tokenizer)
            base_row = {"model": "base", "loss": merged_losses(model, None, loaders)}
        rows = mt.measure(model, loaders, adapters, tasks, args.tiny, base_row)
        diagnostics = mt.pair_diagnostics(adapters, tasks)
        results["settings"][setting] = {"shared_a": shared_a, "runs": {t: r for t, (r, _) in configs.items()},
                                        "a_seeds": {t: c["model"]["lori"]["seed"] for t, (_, c) in configs.items()},
                                        "rows": rows, "diagnostics": diagnostics}
        results["summary"][setting] = summarise(rows, diagnostics)
    results["table"] = table(results["summary"])
    save_results(out, NAME, results)
    print(results["table"])
    print(f"results: {out / (NAME + '.json')}")
    return results


if __name__ == "__main__":
    quiet()
    main()
