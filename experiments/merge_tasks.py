"""Paper claim (Table 3, small scale): LoRI adapters trained with independent frozen A merge with
little interference: concatenated merging keeps each task close to its single-task adapter, and
the adapters' updates are nearly orthogonal (|cos(ΔW_s, ΔW_t)| ~ 0) with masks overlapping ~(1-s)^2.

    python experiments/merge_tasks.py            # SmolLM2-135M-Instruct: GSM8K, MBPP, safety; ~25 min on 2 cores
    python experiments/merge_tasks.py --tiny     # tiny random Llama, two toy tasks, seconds (what CI runs)
    python experiments/merge_tasks.py --shared-a 0   # every task with the same A (the official code's set-up)

Trains one LoRI-D -> LoRI-S pipeline per task (a different A seed each, or with ``--shared-a`` one
A seed for all), merges the LoRI-D and the LoRI-S adapters with the paper's weights (3 tasks: 0.5
for LoRI-D, 0.4 for LoRI-S) by concatenation (eq. 5-6), by PEFT's linear (what the official code
runs: (Σ √(w s) B)(Σ √(w s) A)) and by the paper's eq. 8 as printed (s (Σ w B)(Σ w A)), and
measures held-out loss on every task for the base model, each single-task adapter and each merge.
Retained gain of a merge = mean over tasks of (base loss - merged loss) / (base loss - the task's
own single-task loss). `lori merge --config ...` runs the same merges with generation benchmarks
(GSM8K accuracy, pass@k, refusal) at GPU scale. Writes <out>/merge_tasks.json and <out>/merge_tasks.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_config, base_model, loaders_for, quiet, save_results  # noqa: E402

from lori.ablation import merged_losses, run_point, toy_config, with_overrides  # noqa: E402
from lori.core import Adapter, load_adapter, merge_concat, merge_linear, merge_linear_eq8  # noqa: E402
from lori.eval.interference import cosine_report, overlap_report  # noqa: E402

REAL_TASKS = {  # task -> (own A seed, overrides of configs/experiment/default.yaml)
    "gsm8k": (0, {}),
    "mbpp": (1, {"data.task": "mbpp"}),
    "safety": (2, {"data.task": "safety", "data.max_length": 256}),
}
TOY_TASKS = {"add": (0, "+"), "mul": (1, "*")}  # task -> (own A seed, toy operation)
WEIGHTS = {"lori_d": 0.5, "lori_s": 0.4}  # paper: three adapters
STAGES = {"lori_d": "LoRI-D", "lori_s": "LoRI-S"}
MERGES = {"concat": merge_concat, "linear": merge_linear, "linear_eq8": merge_linear_eq8}


def run_name(task: str, seed: int, own_seed: int) -> str:
    """A task's run directory: its plain name with its own A seed, ``<task>_A<seed>`` with another."""
    return task if seed == own_seed else f"{task}_A{seed}"


def task_configs(tiny: bool, out: Path, shared_a: int | None = None) -> dict[str, tuple[str, dict]]:
    """task -> (run directory name, config); ``shared_a``: one A seed for every task."""
    if tiny:
        tasks = {name: (seed, toy_config(out / "toy_data", op=op, steps=3)) for name, (seed, op) in TOY_TASKS.items()}
    else:
        base = base_config(False, out, **{"pipeline.dense_steps": 12, "pipeline.sparse_steps": 12,
                                          "pipeline.held_out_loss": False})
        tasks = {name: (seed, with_overrides(base, o)) for name, (seed, o) in REAL_TASKS.items()}
    out_configs = {}
    for name, (own, config) in tasks.items():
        seed = own if shared_a is None else shared_a
        out_configs[name] = (run_name(name, seed, own), with_overrides(config, {"model.lori.seed": seed}))
    return out_configs


def train(configs: dict[str, tuple[str, dict]], out: Path) -> dict[str, list[Adapter]]:
    """One pipeline per task (read back when it already ran under ``out``); adapters by stage."""
    for run, config in configs.values():
        run_point(config, {}, out, name=run)
    return {stage: [load_adapter(out / run / stage) for run, _ in configs.values()] for stage in STAGES}


def retained_gain(rows: list[dict], tasks: list[str], label: str, model: str) -> float:
    """Mean over tasks of (base - merged) / (base - own single-task) held-out loss."""
    by_name = {r["model"]: r["loss"] for r in rows}
    base, merged = by_name["base"], by_name[model]
    gains = [(base[t] - merged[t]) / (base[t] - by_name[f"{label} {t} only"][t]) for t in tasks]
    return sum(gains) / len(gains)


def measure(model: Any, loaders: dict, adapters: dict[str, list[Adapter]], tasks: list[str], tiny: bool,
            base_row: dict | None = None) -> list[dict]:
    """Rows: the base, each adapter alone and each merge, held-out loss on every task."""
    rows = [base_row or {"model": "base", "loss": merged_losses(model, None, loaders)}]
    for stage, label in STAGES.items():
        for name, adapter in zip(tasks, adapters[stage]):
            rows.append({"model": f"{label} {name} only", "loss": merged_losses(model, adapter, loaders)})
        weights = [WEIGHTS[stage] if not tiny else 0.5] * len(tasks)
        for method, merge in MERGES.items():
            merged = merge(adapters[stage], weights)
            rows.append({"model": f"{label} {method}", "method": method, "weights": weights,
                         "loss": merged_losses(model, merged, loaders)})
        for row in rows[-len(MERGES):]:
            row["retained_gain"] = retained_gain(rows, tasks, label, row["model"])
        print(*(f"{r['model']}: {r['loss']}" for r in rows[-len(tasks) - len(MERGES):]), sep="\n", flush=True)
    return rows


def pair_diagnostics(adapters: dict[str, list[Adapter]], tasks: list[str]) -> dict[str, dict]:
    """Per task pair: mean |cos(ΔW_s, ΔW_t)| of the LoRI-D and LoRI-S adapters, LoRI-S mask overlap."""
    out = {}
    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            d, s = adapters["lori_d"], adapters["lori_s"]
            out[f"{tasks[i]}-{tasks[j]}"] = {
                "lori_d_mean_abs_cos": cosine_report(d[i], d[j])["mean_abs"],
                "lori_s_mean_abs_cos": cosine_report(s[i], s[j])["mean_abs"],
                "lori_s_mask_overlap": overlap_report(s[i], s[j]),
            }
    return out


def plot(rows: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(tasks), 3.4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        ax.bar([t + i * width for t in range(len(tasks))], [row["loss"][t] for t in tasks], width, label=row["model"])
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))])
    ax.set_xticklabels(tasks)
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, two toy tasks (seconds)")
    p.add_argument("--out", default="runs/experiments/merge_tasks")
    p.add_argument("--shared-a", type=int, default=None, metavar="SEED",
                   help="train every task with this A seed (the official code: every task gets the same A)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    out = Path(args.out)
    configs = task_configs(args.tiny, out, args.shared_a)
    adapters = train(configs, out)
    tasks = list(configs)
    model, tokenizer = base_model(next(iter(configs.values()))[1])
    loaders = loaders_for({t: c for t, (_, c) in configs.items()}, tokenizer)
    rows = measure(model, loaders, adapters, tasks, args.tiny)
    results = {"tiny": args.tiny, "shared_a": args.shared_a, "tasks": tasks,
               "runs": {t: run for t, (run, _) in configs.items()}, "rows": rows,
               "diagnostics": pair_diagnostics(adapters, tasks)}
    save_results(out, "merge_tasks", results)
    plot(rows, tasks, out / "merge_tasks.png")
    print(f"results: {out / 'merge_tasks.json'}  plot: {out / 'merge_tasks.png'}")
    return results


if __name__ == "__main__":
    quiet()
    main()
