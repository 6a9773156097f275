"""``lori eval``: evaluate a base model, an adapter directory or a merged model from one config.

    lori eval --config configs/eval/default.yaml
    lori eval --config configs/eval/default.yaml --adapter runs/default/lori_s --eval.tasks '[gsm8k]'

What is evaluated, checked and written (results.json, samples.json, tb/, the adapter card's results):
``lori.training.eval_run`` (``EvalTarget``: the options at the top level; ``EvalSettings``: under
``eval:``). This module parses, calls and prints.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from lori.eval.evaluator import EvalSettings, headline
from lori.training.eval_run import EvalTarget, run_eval


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lori eval", description="Evaluate a base model or an adapter on the paper's tasks",
                            default_meta=False, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file")
    parser.add_class_arguments(EvalTarget, None, help="what to evaluate")
    parser.add_class_arguments(EvalSettings, "eval", help="tasks and generation settings")
    return parser


def format_results(results: dict[str, dict[str, float]]) -> str:
    lines = ["task            metric           value      n"]
    for task, metrics in results.items():
        if task == "nlu_average":
            for key, value in metrics.items():
                lines.append(f"{task:<15} {key:<16} {value:7.4f}")
            continue
        key, value = headline(task, metrics)
        lines.append(f"{task:<15} {key:<16} {value:7.4f} {int(metrics.get('n', 0)):6d}")
    return "\n".join(lines)


def main(argv: list[str]) -> dict[str, Any]:
    """``lori eval`` entry point (errors are reported by ``lori.commands.main``)."""
    parser = build_parser()
    cfg = parser.parse_args(argv)
    settings = EvalSettings(**cfg.pop("eval").as_dict())
    cfg.pop("config", None)
    target = EvalTarget(**cfg.as_dict())
    if settings.protocol_changes:
        print("lori: protocol official set " + ", ".join(settings.protocol_changes), file=sys.stderr)
    report = run_eval(target, settings)
    print(format_results(report["results"]))
    print(f"results: {Path(target.output_dir) / 'results.json'}   "
          f"tensorboard: tensorboard --logdir {Path(target.output_dir) / 'tb'}")
    return report
