"""``lori merge``: merge T adapters into the base model, evaluate on every task, write a Table-3-style table.

    lori merge --config configs/merge/example_tiny.yaml
    lori merge --config configs/paper/merge/llama3_8b_4tasks.yaml --adaptation lori_d --method concat --eval.max_examples 50

What is merged, how, and what is written: ``lori.training.merge_run`` (the library, with the
config's fields); the table: ``lori.eval.merge_table``. This module parses, calls and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lori.eval.merge_table import results_table
from lori.training.merge_run import MergeConfig, check_config, run_merge
from lori.training.merge_sets import ROW_FIELDS


def build_parser():
    """``lori merge`` options: MergeConfig at the top level, EvalSettings (but tasks) under ``eval:``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lori.eval.evaluator import EvalSettings

    parser = ArgumentParser(prog="lori merge", description="Merge T adapters and evaluate on every task")
    parser.add_argument("--config", action=ActionConfigFile, help="a merge YAML (configs/merge/)")
    parser.add_class_arguments(MergeConfig, None, help="the adapters and how to merge them")
    parser.add_class_arguments(EvalSettings, "eval", skip={"tasks"}, help="evaluation settings but tasks")
    return parser


def parse_args(argv: list[str]) -> tuple[MergeConfig, Any, str]:
    """MergeConfig, EvalSettings and the resolved YAML; only the config is checked (no file read)."""
    from lori.eval.evaluator import EvalSettings

    parser = build_parser()
    args = parser.parse_args(argv)
    evaluation = args["eval"].as_dict()
    if args.get("protocol") == "official":  # one switch: the merged model is evaluated as the official code does
        evaluation["protocol"] = "official"
    settings = EvalSettings(**evaluation)
    cfg = MergeConfig(**{k: v for k, v in args.as_dict().items() if k not in ("eval", "config")})
    for key in ROW_FIELDS:  # what an adapter_set row filled in: the written config says what ran
        args[key] = getattr(cfg, key)
    check_config(cfg)
    return cfg, settings, parser.dump(args, skip_validation=True)  # checked when parsed


def parse_config(path: str | Path, *options: str) -> tuple[MergeConfig, Any]:
    """Parse and check a merge YAML (and ``options``, e.g. ``--adaptation lori_s --method linear``)
    without reading adapters or loading anything."""
    cfg, settings, _ = parse_args(["--config", str(path), *options])
    return cfg, settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``lori merge --config FILE [--<option> ...]``: run and print the table."""
    cfg, settings, config_text = parse_args(list(argv or []))
    results = run_merge(cfg, settings, config_text=config_text)
    print(results_table(results))
    print(f"written: {Path(cfg.output_dir) / 'results.md'}, results.json")
    return results
