"""Paper claim (Table 2, small scale): on one task, LoRI-D and LoRI-S learn as well as LoRA while
training far fewer parameters (LoRI-S: 10% of LoRI-D's B, no A at all).

    python experiments/single_task.py                 # SmolLM2-135M-Instruct + GSM8K, ~20 min on 2 cores
    python experiments/single_task.py --tiny          # tiny random Llama, seconds (what CI runs)

Trains LoRI-D -> LoRI-S (`lori pipeline`, configs/experiment/default.yaml) and LoRA (`lori fit`,
same data, rank, targets, steps and learning rate as LoRI-D), then measures the base model and
each adapter: held-out loss and GSM8K accuracy on the held-out items. Writes
<out>/single_task.json and <out>/single_task.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import base_config, base_model, eval_settings, loaders_for, measure, save_results, write_yaml  # noqa: E402

from lori.ablation import run_point  # noqa: E402
from lori.cli import main as lori_main  # noqa: E402
from lori.core import load_adapter  # noqa: E402


def train_lora(config: dict, out: Path) -> Path:
    """LoRA with LoRI-D's settings: ``lori fit`` for the same number of steps."""
    adapter = out / "lora" / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return adapter
    cfg = {k: v for k, v in config.items() if k != "pipeline"}
    cfg["model"] = {**cfg["model"], "method": "lora"}
    cfg["trainer"] = {**cfg["trainer"], "max_steps": config["pipeline"]["dense_steps"], "limit_val_batches": 0,
                      "num_sanity_val_steps": 0,
                      "callbacks": [{"class_path": "lori.callbacks.SaveAdapter",
                                     "init_args": {"directory": str(adapter), "stage": "lora"}}],
                      "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                 "init_args": {"save_dir": str(out / "lora"), "name": "tb"}},
                      "default_root_dir": str(out / "lora")}
    lori_main(["fit", "--config", str(write_yaml(cfg, out / "lora" / "config.yaml"))])
    return adapter


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    axes[0].bar(names, [r["loss/gsm8k"] for r in rows], color="tab:blue")
    axes[0].set_title("held-out loss (GSM8K)")
    axes[1].bar(names, [100 * r.get("gsm8k/accuracy", 0.0) for r in rows], color="tab:green")
    axes[1].set_title("GSM8K accuracy (%)")
    axes[2].bar(names, [max(r["trainable"], 1) for r in rows], color="tab:gray")
    axes[2].set_yscale("log")
    axes[2].set_title("trainable parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama and toy data (seconds)")
    parser.add_argument("--out", default="runs/experiments/single_task")
    parser.add_argument("--eval-examples", type=int, default=32, help="held-out GSM8K items generated for")
    args = parser.parse_args(argv)
    out = Path(args.out)
    config = base_config(args.tiny, out)
    summary = run_point(config, {}, out, name="lori")
    lora_dir = train_lora(config, out)

    model, tokenizer = base_model(config)
    loaders = loaders_for({"gsm8k": config}, tokenizer)
    settings = eval_settings(config, ["gsm8k"], args.tiny, args.eval_examples)
    rows = []
    for method, directory in [("base", None), ("LoRI-D", out / "lori" / "lori_d"), ("LoRI-S", out / "lori" / "lori_s"),
                              ("LoRA", lora_dir)]:
        row = {"method": method} | measure(model, tokenizer, directory, loaders, settings)
        rows.append(row)
        print(row, flush=True)
    lora = load_adapter(lora_dir)  # LoRA trains A and B
    counts = [0, summary["lori_d"]["trainable"], summary["lori_s"]["trainable"],
              sum(a.numel() for a in lora.A.values()) + sum(b.numel() for b in lora.B.values())]
    for row, count in zip(rows, counts):
        row["trainable"] = count
    results = {"tiny": args.tiny, "config": config, "rows": rows}
    save_results(out, "single_task", results)
    plot(rows, out / "single_task.png")
    print(f"results: {out / 'single_task.json'}  plot: {out / 'single_task.png'}")
    return results


if __name__ == "__main__":
    main()
