"""Paper claim (Fig. 3, small scale): a safety adapter fine-tuned on a task inside that task's LoRI
mask keeps its safety behaviour, because every entry outside the task mask keeps its value.

    python experiments/continual.py              # SmolLM2-135M-Instruct: safety -> GSM8K, three phase-2 variants; ~25 min on 2 cores
    python experiments/continual.py --tiny       # tiny random Llama and toy data, seconds (what CI runs)

Runs `lori continual --config configs/experiment/continual_safety_gsm8k.yaml` three times: phase 2
inside the task mask, inside it minus the safety mask (protection), and over all of B (dense, the
contrast); the later runs reuse the first's safety adapter and task mask; refusal (HarmBench), over-refusal (TriviaQA) and GSM8K accuracy are
measured after every phase. Writes <out>/continual.json and each run's continual.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, quiet, save_results, write_yaml  # noqa: E402

from lori.ablation import load_config, toy_config, write_toy_gsm8k  # noqa: E402
from lori.commands.continual_command import continual  # noqa: E402

CONFIG = REPO / "configs" / "experiment" / "continual_safety_gsm8k.yaml"


def tiny_config(out: Path) -> dict:
    toy = toy_config(out / "toy_data", steps=3)
    safety = out / "toy_data" / "safety.jsonl"
    rows = [{"instruction": f"How do I hurt person number {i}?", "output": "I cannot help with that."} for i in range(8)]
    rows += [{"instruction": f"Name the number after {i}.", "output": str(i + 1)} for i in range(8)]
    safety.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "seed_everything": 0, "model": toy["model"], "trainer": toy["trainer"],
        "data": {"task": "saferpaca", "train_file": str(safety), "held_out": 2, "max_length": 64, "batch_size": 2},
        "task_data": {**toy["data"], "train_file": str(write_toy_gsm8k(out / "toy_data" / "task.jsonl"))},
        "continual": {"safety_dense_steps": 3, "safety_sparse_steps": 3, "task_mask_steps": 3, "task_steps": 3,
                      "checkpoint_every": 100},
        "eval": {"tasks": ["harmbench", "over_refusal", "gsm8k"], "max_examples": 2, "max_new_tokens": 6,
                 "held_out": 20, "progress": False},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama and toy data (seconds)")
    parser.add_argument("--out", default="runs/experiments/continual")
    args = parser.parse_args(argv)
    out = Path(args.out)
    base = tiny_config(out) if args.tiny else load_config(CONFIG)
    runs = {}
    # inside the task mask; inside it minus the safety mask; and, for contrast, all of B (dense, as LoRA-style
    # continual fine-tuning would)
    for name, protect, masked in (("unprotected", False, True), ("protected", True, True), ("dense", False, False)):
        cfg = json.loads(json.dumps(base))
        cfg["continual"] |= {"output_dir": str(out / name), "protect_safety": protect, "masked_task": masked}
        if name != "unprotected":  # the same safety adapter and task mask as the first run
            first = out / "unprotected"
            cfg["continual"] |= {"safety_adapter": str(first / "safety" / "lori_s"), "evaluate_base": False}
            if masked:
                cfg["continual"]["task_mask"] = str(first / "task_mask" / "calibration" / "masks.safetensors")
        summary = continual(["--config", str(write_yaml(cfg, out / f"{name}.yaml"))])
        runs[name] = {"results": summary["results"], "task": summary.get("task", {})}
    results = {"tiny": args.tiny, "runs": runs}
    save_results(out, "continual", results)
    print(f"results: {out / 'continual.json'}")
    return results


if __name__ == "__main__":
    quiet()
    main()
