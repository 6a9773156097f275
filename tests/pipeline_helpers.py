"""Shared helpers for the pipeline tests: a tiny GSM8K-style file and a tiny YAML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

TESTS = Path(__file__).parent


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


def multiprocess_config(tmp_path: Path, name: str, devices: int, strategy: Any, callbacks: list | None = None,
                        **pipeline) -> Path:
    """The tiny pipeline for 1 vs N process comparisons: dropout 0, the same global batch of 4, and every
    rank dumping its masks and B at the end of each fit (ddp_dump.DumpState, into <name>/dump)."""
    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / name), held_out_loss=False, **pipeline)
    cfg["model"]["lori"]["dropout"] = 0.0
    # per-sequence sums averaged over sequences: the mean of two ranks' means is the global mean
    cfg["model"]["loss_normalization"] = "sequence_sum"
    cfg["data"]["batch_size"] = 4 // devices
    dump = {"class_path": "ddp_dump.DumpState", "init_args": {"directory": str(tmp_path / name / "dump")}}
    cfg["trainer"].update(devices=devices, strategy=strategy if devices > 1 else "auto",
                          callbacks=[dump, *(callbacks or [])])
    return write_config(tmp_path, cfg, f"{name}{'_extra' if callbacks else ''}.yaml")


def run_lori(*argv: str) -> subprocess.CompletedProcess:
    """``python -m lori ...`` in a fresh process, with tests/ importable (callbacks, test strategies)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "lori", *argv], env=env, capture_output=True, text=True,
                          timeout=900)


def by_kind(state: dict, kind: str) -> dict:
    """The entries of a DumpState file under ``kind/`` (B, mask, local_numel), by module path."""
    return {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(kind + "/")}
