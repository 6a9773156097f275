"""Shared helpers for the pipeline tests: a tiny GSM8K-style file and a tiny YAML."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def write_tiny_gsm8k(path: Path, n: int = 12) -> Path:
    rows = []
    for i in range(n):
        a, b = i + 2, 2 * i + 1
        rows.append({"question": f"Tom has {a} apples and buys {b} more. How many now?",
                     "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def tiny_config(tmp_path: Path, **pipeline) -> dict:
    data_file = write_tiny_gsm8k(tmp_path / "tiny_gsm8k.jsonl")
    return {
        "seed_everything": 0,
        "model": {"model": "tiny-llama", "lori": {"r": 4, "alpha": 8, "sparsity": 0.9, "dropout": 0.0},
                  "lr": 0.01},
        "data": {"task": "gsm8k", "train_file": str(data_file), "held_out": 4, "max_length": 64,
                 "batch_size": 2},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_model_summary": False,
                    "enable_progress_bar": False, "log_every_n_steps": 1},
        "pipeline": {"output_dir": str(tmp_path / "run"), "dense_steps": 4, "sparse_steps": 4,
                     "checkpoint_every": 2} | pipeline,
    }


def write_config(tmp_path: Path, config: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path
