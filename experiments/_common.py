"""Shared bits of the paper-claim experiments: configs at real or toy size, evaluation, plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from lori.ablation import DEFAULT_CONFIG, base_model, held_out_loss, load_config, task_data, toy_config, with_overrides
from lori.core import apply_adapter, load_adapter, lori_layers, unload
from lori.eval.evaluator import EvalSettings, evaluate_model
from lori.training import console

REPO = Path(__file__).resolve().parents[1]


def quiet() -> None:
    """Print what the ``lori`` command prints (stage lines, step bars), not the libraries' own
    chatter; ``--verbose`` or ``LORI_VERBOSE=1`` brings it back. Called by each script's
    ``__main__`` only: the tests import the scripts and keep their own logging."""
    argv, verbose = console.pop_verbose(sys.argv[1:])
    console.configure(verbose)
    sys.argv = [sys.argv[0], *argv]


def base_config(tiny: bool, workdir: Path, **overrides: Any) -> dict[str, Any]:
    """The embedded default (or the toy config: tiny random Llama, toy GSM8K file) with overrides."""
    config = toy_config(workdir / "toy_data", steps=3) if tiny else load_config(DEFAULT_CONFIG)
    return with_overrides(config, overrides)


def write_yaml(config: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def eval_settings(config: dict[str, Any], tasks: list[str], tiny: bool, examples: int) -> EvalSettings:
    data = config["data"]
    return EvalSettings(tasks=tasks, max_examples=2 if tiny else examples, held_out=data.get("held_out", 200),
                        split_seed=data.get("split_seed", 0), batch_size=8, max_new_tokens=8 if tiny else 192,
                        progress=not tiny)


def measure(model: Any, tokenizer: Any, adapter_dir: Path | None, loaders: dict[str, Any],
            settings: EvalSettings | None) -> dict[str, Any]:
    """Held-out loss on every loader and the evaluation metrics of the base model + one adapter."""
    if lori_layers(model):
        unload(model, merge=False)
    if adapter_dir is not None:
        apply_adapter(model, load_adapter(adapter_dir), strict_base=True)
    row: dict[str, Any] = {f"loss/{task}": round(held_out_loss(model, loader), 4) for task, loader in loaders.items()}
    if settings is not None:
        for task, metrics in evaluate_model(model, tokenizer, settings).items():
            row |= {f"{task}/{k}": v for k, v in metrics.items() if k != "n"}
    return row


def loaders_for(configs: dict[str, dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
    out = {}
    for task, config in configs.items():
        dm = task_data(config, tokenizer)
        dm.setup("validate")
        out[task] = dm.val_dataloader()
    return out


def save_results(out: Path, name: str, results: dict[str, Any]) -> Path:
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


__all__ = ["REPO", "base_config", "base_model", "eval_settings", "loaders_for", "measure", "save_results",
           "write_yaml"]
