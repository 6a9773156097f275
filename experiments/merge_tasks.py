"""Paper claim (Table 3, small scale): LoRI adapters trained with independent frozen A merge with
little interference: concatenated merging keeps each task close to its single-task adapter, and
the adapters' updates are nearly orthogonal (|cos(ΔW_s, ΔW_t)| ~ 0) with masks overlapping ~(1-s)^2.

    python experiments/merge_tasks.py            # SmolLM2-135M-Instruct: GSM8K, MBPP, safety; ~25 min on 2 cores
    python experiments/merge_tasks.py --tiny     # tiny random Llama, two toy tasks, seconds (what CI runs)

Trains one LoRI-D -> LoRI-S pipeline per task (a different A seed each), merges the three
LoRI-D and the three LoRI-S adapters by concatenation and linearly with the paper's weights
(3 tasks: 0.5 for LoRI-D, 0.4 for LoRI-S), and measures held-out loss on every task for the
base model, each single-task adapter and each merge. `lori merge --config ...` runs the same
merges with generation benchmarks (GSM8K accuracy, pass@k, refusal) at GPU scale.
Writes <out>/merge_tasks.json and <out>/merge_tasks.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_config, base_model, loaders_for, save_results  # noqa: E402

from lori.ablation import merged_losses, run_point, toy_config, with_overrides  # noqa: E402
from lori.core import load_adapter, merge_concat, merge_linear  # noqa: E402
from lori.diagnostics import cosine_report, overlap_report  # noqa: E402

REAL_TASKS = {  # task -> overrides of configs/experiment/default.yaml (each its own A seed)
    "gsm8k": {"model.lori.seed": 0},
    "mbpp": {"model.lori.seed": 1, "data.task": "mbpp"},
    "safety": {"model.lori.seed": 2, "data.task": "safety", "data.max_length": 256},
}
WEIGHTS = {"lori_d": 0.5, "lori_s": 0.4}  # paper: three adapters


def task_configs(tiny: bool, out: Path) -> dict[str, dict]:
    if tiny:
        return {name: with_overrides(toy_config(out / "toy_data", op=op, steps=3), {"model.lori.seed": seed})
                for name, op, seed in (("add", "+", 0), ("mul", "*", 1))}
    base = base_config(False, out, **{"pipeline.dense_steps": 12, "pipeline.sparse_steps": 12,
                                      "pipeline.validate": False})
    return {name: with_overrides(base, o) for name, o in REAL_TASKS.items()}


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
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama, two toy tasks (seconds)")
    parser.add_argument("--out", default="runs/experiments/merge_tasks")
    args = parser.parse_args(argv)
    out = Path(args.out)
    configs = task_configs(args.tiny, out)
    for name, config in configs.items():
        run_point(config, {}, out, name=name)
    adapters = {stage: [load_adapter(out / name / stage) for name in configs] for stage in ("lori_d", "lori_s")}
    tasks = list(configs)

    model, tokenizer = base_model(next(iter(configs.values())))
    loaders = loaders_for(configs, tokenizer)
    rows = [{"model": "base", "loss": merged_losses(model, None, loaders)}]
    for stage, label in (("lori_d", "LoRI-D"), ("lori_s", "LoRI-S")):
        for name, adapter in zip(tasks, adapters[stage]):
            rows.append({"model": f"{label} {name} only", "loss": merged_losses(model, adapter, loaders)})
        weights = [WEIGHTS[stage] if not args.tiny else 0.5] * len(tasks)
        for method, merge in (("concat", merge_concat), ("linear", merge_linear)):
            merged = merge(adapters[stage], weights)
            rows.append({"model": f"{label} {method}", "weights": weights, "loss": merged_losses(model, merged, loaders)})
        print(*(f"{r['model']}: {r['loss']}" for r in rows[-len(tasks) - 2:]), sep="\n", flush=True)
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    diagnostics = {
        f"{tasks[i]}-{tasks[j]}": {
            "lori_d_mean_abs_cos": cosine_report(adapters["lori_d"][i], adapters["lori_d"][j])["mean_abs"],
            "lori_s_mask_overlap": overlap_report(adapters["lori_s"][i], adapters["lori_s"][j]),
        } for i, j in pairs
    }
    results = {"tiny": args.tiny, "tasks": tasks, "rows": rows, "diagnostics": diagnostics}
    save_results(out, "merge_tasks", results)
    plot(rows, tasks, out / "merge_tasks.png")
    print(f"results: {out / 'merge_tasks.json'}  plot: {out / 'merge_tasks.png'}")
    return results


if __name__ == "__main__":
    main()
