"""Paper claim (Tables 2 and 12, small scale): on one task LoRI-D and LoRI-S learn about as well as
the other methods (FFT, LoRA, DoRA, VeRA, IA3, LoRA-FA, AdaLoRA, rsLoRA, PiSSA, LoRA+) while
training far fewer parameters. Every method trains through the same LightningModule, data, loss,
steps and learning rate; one table compares them.

    python experiments/single_task.py                        # SmolLM2-135M-Instruct + GSM8K, every method
    python experiments/single_task.py --eval-examples 0      # held-out loss only (no generation)
    python experiments/single_task.py --methods lora vera    # some methods (LoRI-D / LoRI-S: lori)
    python experiments/single_task.py --tiny --in-process    # tiny random Llama, toy data (what CI runs)

Each method trains in a process of its own (so that its peak memory is its own): ``lori fit`` on
configs/experiment/default.yaml's model and data with ``model.method`` set (``dense_steps``
steps at ``model.lr``), and ``lori pipeline`` for LoRI-D -> LoRI-S (LoRI-S: ``sparse_steps`` at
``sparse_lr``). A StepTimer callback measures the median step time (the period between
consecutive batch starts, after two warm-up steps: forward, backward, optimizer and callbacks)
and the peak memory (CUDA: max allocated; CPU: the process's peak RSS, which includes the base
model). Each SAVED adapter is then loaded onto a fresh base (``PeftModel.from_pretrained``,
merged) and measured: held-out loss and GSM8K accuracy on the held-out items. A method whose
run is already in <out>/<method>/rows.json (same config) is not run again. Writes
<out>/single_task.{json,md,png}; the real-size run also copies the JSON and the table to
experiments/results/. With --in-process every method runs in this process (seconds at toy size;
the memory column is then the RSS growth during the fit, which allocator reuse can hide).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, base_config, base_model, eval_settings, loaders_for, quiet, write_yaml  # noqa: E402

from lori.ablation import held_out_loss  # noqa: E402
from lori.eval.evaluator import evaluate_model  # noqa: E402
from lori.training.baselines import METHODS  # noqa: E402

# (row name, method, stage): LoRI-D and LoRI-S come from one `lori pipeline`
ROWS = [("LoRI-D", "lori", "lori_d"), ("LoRI-S", "lori", "lori_s")] + [
    (m, m, "adapter") for m in METHODS if m != "lori"
]
MIB = 2**20


def _rss_bytes() -> int:
    """The current resident set size (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * resource.getpagesize()


class StepTimer(L.Callback):
    """Median step time and peak memory of each fit, appended to a JSON file at the fit's end.

    Args:
        path: the JSON file (a list, one entry per fit: ``lori pipeline`` runs two).
        warmup: steps left out of the median.
    """

    def __init__(self, path: str, warmup: int = 2) -> None:
        self.path, self.warmup = Path(path), warmup

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._starts: list[float] = []
        self._rss0 = self._rss_max = _rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._rss_max = max(self._rss_max, _rss_bytes())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        periods = [b - a for a, b in zip(self._starts, self._starts[1:] + [time.perf_counter()])]
        timed = periods[self.warmup:] or periods
        entry = {
            "steps": len(periods), "median_step_s": statistics.median(timed) if timed else None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "rss_growth_mib": (self._rss_max - self._rss0) / MIB,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / MIB if torch.cuda.is_available() else None,
        }
        fits = json.loads(self.path.read_text()) if self.path.is_file() else []
        self.path.write_text(json.dumps(fits + [entry], indent=2))


def run_config(config: dict[str, Any], method: str, run_dir: Path) -> dict[str, Any]:
    """The config of one method's run: ``lori fit`` (a baseline) or ``lori pipeline`` (lori)."""
    timer = {"class_path": "single_task.StepTimer", "init_args": {"path": str(run_dir / "timing.json")}}
    trainer = {**config["trainer"], "callbacks": [timer], "logger": False, "enable_checkpointing": False}
    if method == "lori":
        pipeline = {**config["pipeline"], "output_dir": str(run_dir), "held_out_loss": False}
        return {**config, "trainer": trainer, "pipeline": pipeline}
    save = {"class_path": "lori.training.callbacks.SaveAdapter", "init_args": {"directory": str(run_dir / "adapter"),
                                                                      "stage": method}}
    trainer |= {"max_steps": config["pipeline"]["dense_steps"], "limit_val_batches": 0, "num_sanity_val_steps": 0,
                "callbacks": [timer, save], "default_root_dir": str(run_dir)}
    model = {**config["model"], "method": method}
    return {k: v for k, v in config.items() if k != "pipeline"} | {"model": model, "trainer": trainer}


def train(config: dict[str, Any], method: str, run_dir: Path) -> dict[str, Any]:
    """Train one method (both LoRI stages for ``lori``); returns its timing entries and counts."""
    from lori.commands.main import main as lori_main
    from lori.commands.pipeline_command import pipeline

    (run_dir / "timing.json").unlink(missing_ok=True)
    path = write_yaml(run_config(config, method, run_dir), run_dir / "config.yaml")
    if method == "lori":
        summary = pipeline(["--config", str(path)])
        counts = [summary["lori_d"]["trainable"], summary["lori_s"]["trainable"]]
    else:
        lori_main(["fit", "--config", str(path)])
        counts = [json.loads((run_dir / "adapter" / "lori_meta.json").read_text())["meta"]["trainable"]]
    return {"timing": json.loads((run_dir / "timing.json").read_text()), "trainable": counts}


def load_trained(config: dict[str, Any], directory: Path | None) -> tuple[Any, Any]:
    """A fresh base with a saved adapter merged in (PEFT's loader), or a saved full model."""
    model, tokenizer = base_model(config)
    if directory is None:
        return model, tokenizer
    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(directory)).merge_and_unload().eval(), tokenizer
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32).eval(), tokenizer


def measure(config: dict[str, Any], directory: Path | None, tiny: bool, examples: int) -> dict[str, Any]:
    """Held-out loss (and GSM8K accuracy on the held-out items) of a saved adapter on a fresh base."""
    model, tokenizer = load_trained(config, directory)
    loader = loaders_for({"gsm8k": config}, tokenizer)["gsm8k"]
    row: dict[str, Any] = {"loss/gsm8k": round(held_out_loss(model, loader), 4)}
    if examples > 0:
        settings = eval_settings(config, ["gsm8k"], tiny, examples)
        row |= {f"gsm8k/{k}": v for k, v in evaluate_model(model, tokenizer, settings)["gsm8k"].items() if k != "n"}
    return row


def run_method(config: dict[str, Any], method: str, out: Path, tiny: bool, examples: int) -> list[dict[str, Any]]:
    """Train and measure one method in this process; its rows (two for lori) go to <out>/<method>/rows.json."""
    run_dir = out / method
    run_dir.mkdir(parents=True, exist_ok=True)
    trained = train(config, method, run_dir)
    rows = []
    for i, (name, _, stage) in enumerate(r for r in ROWS if r[1] == method):
        timing = trained["timing"][-len(trained["trainable"]) + i]
        rows.append({"method": name, "trainable": trained["trainable"][i], **timing,
                     **measure(config, run_dir / stage, tiny, examples)})
    (run_dir / "rows.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    return rows


def cached_rows(config: dict[str, Any], method: str, out: Path) -> list[dict[str, Any]] | None:
    path = out / method / "rows.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["config"] == json.loads(json.dumps(config)):
            return saved["rows"]
    return None


def run_in_subprocess(method: str, base_file: Path, out: Path, tiny: bool, examples: int) -> None:
    argv = [sys.executable, __file__, "--worker", method, "--base-config", str(base_file), "--out", str(out),
            "--eval-examples", str(examples)] + (["--tiny"] if tiny else [])
    subprocess.run(argv, check=True)


def markdown(rows: list[dict[str, Any]], base_params: int, memory: str) -> str:
    """One table: trainable parameters, held-out loss, accuracy, step time (and x LoRI-D), memory."""
    peer = next((r["median_step_s"] for r in rows if r["method"] == "LoRI-D" and r.get("median_step_s")), None)
    head = ("| method | trainable | % of base | held-out loss | GSM8K acc. | step (ms) | x LoRI-D step "
            f"| {memory} (MiB) |")
    lines = [head, "|---" * 8 + "|"]
    for r in rows:
        step = r.get("median_step_s")
        acc = r.get("gsm8k/accuracy")
        mem = r.get("memory_mib")
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {100 * r['trainable'] / base_params:.3f} | {r['loss/gsm8k']:.4f} "
            f"| {'-' if acc is None else f'{100 * acc:.1f}'} | {'-' if step is None else f'{1000 * step:.0f}'} "
            f"| {'-' if step is None or peer is None else f'{step / peer:.2f}'} "
            f"| {'-' if mem is None else f'{mem:.0f}'} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    axes[0].bar(names, [r["loss/gsm8k"] for r in rows], color="tab:blue")
    axes[0].set_title("held-out loss (GSM8K)")
    axes[1].bar(names, [max(r["trainable"], 1) for r in rows], color="tab:gray")
    axes[1].set_yscale("log")
    axes[1].set_title("trainable parameters")
    axes[2].bar(names, [1000 * (r.get("median_step_s") or 0) for r in rows], color="tab:orange")
    axes[2].set_title("median step time (ms)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama and toy data (seconds)")
    parser.add_argument("--out", default="runs/experiments/single_task")
    parser.add_argument("--methods", nargs="+", default=["lori", *[m for m in METHODS if m != "lori"]],
                        choices=list(METHODS), help="methods to run (lori = LoRI-D and LoRI-S)")
    parser.add_argument("--eval-examples", type=int, default=32, help="held-out GSM8K items generated for (0: none)")
    parser.add_argument("--in-process", action="store_true", help="run every method in this process")
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--base-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.worker:  # one method, in a process of its own
        config = json.loads(Path(args.base_config).read_text())
        run_method(config, args.worker, out, args.tiny, args.eval_examples)
        return {}
    config = base_config(args.tiny, out)
    base_file = out / "base_config.json"
    base_file.parent.mkdir(parents=True, exist_ok=True)
    base_file.write_text(json.dumps(config, indent=2))
    rows: list[dict[str, Any]] = []
    for method in args.methods:
        found = cached_rows(config, method, out)
        if found is None and args.in_process:
            found = run_method(config, method, out, args.tiny, args.eval_examples)
        elif found is None:
            run_in_subprocess(method, base_file, out, args.tiny, args.eval_examples)
            found = cached_rows(config, method, out)
        rows += found
        print(*(f"{r['method']}: loss {r['loss/gsm8k']} trainable {r['trainable']}" for r in found), sep="\n",
              flush=True)
    on_gpu = any(r.get("peak_cuda_mib") is not None for r in rows)
    memory = "peak CUDA" if on_gpu else "RSS growth" if args.in_process else "peak RSS"
    key = "peak_cuda_mib" if on_gpu else "rss_growth_mib" if args.in_process else "peak_rss_mib"
    for row in rows:
        row["memory_mib"] = row.get(key)
    model, _ = base_model(config)
    base_params = sum(p.numel() for p in model.parameters())
    rows = [{"method": "base", "trainable": 0, **measure(config, None, args.tiny, args.eval_examples)}] + rows
    results = {"tiny": args.tiny, "in_process": args.in_process, "memory": memory, "base_params": base_params,
               "config": config, "rows": rows}
    (out / "single_task.json").write_text(json.dumps(results, indent=2))
    table = markdown(rows, base_params, memory)
    (out / "single_task.md").write_text(table)
    plot(rows, out / "single_task.png")
    if not args.tiny:
        for name in ("single_task.json", "single_task.md"):
            shutil.copy(out / name, REPO / "experiments" / "results" / name)
    print(table)
    print(f"results: {out / 'single_task.json'}  table: {out / 'single_task.md'}  plot: {out / 'single_task.png'}")
    return results


if __name__ == "__main__":
    quiet()
    main()
