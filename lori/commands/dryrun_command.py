"""Dry run of a lori config: adapter sizes and a GPU-memory estimate, with no weights and no GPU.

    lori dryrun configs/paper/llama3_8b_r32_gsm8k.yaml [more configs ...]    (or --config CONFIG)
    lori dryrun --trainer configs/trainer/fsdp.yaml configs/paper/*.yaml
    lori dryrun --json configs/paper/mistral_7b_r64_gsm8k.yaml
    lori dryrun --method dora configs/paper/llama3_8b_r32_gsm8k.yaml   (a baseline: model.method replaced)
    lori dryrun --gpu-memory 24GiB --config configs/paper/llama3_8b_r32_gsm8k.yaml   the settings that fit
    lori dryrun --gpu-memory 16GiB,24GiB,80GiB configs/paper/*_gsm8k.yaml            the cheapest, as a table

What is counted and estimated, and how: ``lori.training.dry_run`` (sizes on the meta device, the
memory model ``lori.training.memory_model``, the settings that fit ``lori.training.memory_budget``).
This module reads the configs, calls it and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from lori.core.errors import LoRIError
from lori.training.dry_run import budget_fits_of, dry_run_report, parse_size
from lori.training.memory_budget import Fit, cheapest
from lori.training.memory_model import GIB


def _plain(value: Any) -> Any:
    return value.as_dict() if hasattr(value, "as_dict") else dict(value)


def _load(config_path: str | Path, trainer_preset: str | Path | None, method: str | None = None) -> dict[str, Any]:
    """The parsed config as plain dicts, the preset's ``trainer:`` and ``model:`` keys laid over it,
    ``method`` (if given) as ``model.method``."""
    # imports Lightning; kept out of module import time
    from lori.commands.lightning_cli import parse_config

    cfg = {k: _plain(parse_config(config_path)[k]) for k in ("model", "data", "trainer", "pipeline")}
    if trainer_preset is not None:
        parse_config(trainer_preset)  # the preset must be a valid config on its own
        preset = yaml.safe_load(Path(trainer_preset).read_text())
        cfg["trainer"].update(preset.get("trainer") or {})
        cfg["model"].update(preset.get("model") or {})  # e.g. the FSDP preset's gradient_checkpointing
    if method is not None:
        from lori.training.baselines.methods import check_method

        check_method(method)
        cfg["model"]["method"] = method
    return cfg


def dry_run(
    config_path: str | Path, trainer_preset: str | Path | None = None, method: str | None = None
) -> dict[str, Any]:
    """``lori.training.dry_run.dry_run_report`` of a YAML, ``trainer_preset``'s ``trainer:`` (and
    ``model:``) keys laid over it (``configs/trainer/*.yaml``), ``method`` as its ``model.method``."""
    return dry_run_report(_load(config_path, trainer_preset, method), config_path)


def budget_fits(config_path: str | Path, budgets: dict[str, float],
                trainer_preset: str | Path | None = None) -> dict[str, list[Fit]]:
    """``lori.training.dry_run.budget_fits_of`` of a YAML: per budget (name -> bytes), the settings tried."""
    return budget_fits_of(_load(config_path, trainer_preset), budgets)


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e7 else f"{n / 1e6:.0f}M"


def _plan_label(plan: dict[str, Any]) -> str:
    return (f"{plan['strategy']} x{plan['world']}{' +ckpt' if plan['checkpointing'] else ''}"
            f"{' +' + plan['quantize'] if plan.get('quantize') else ''}")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A text table of dry-run results, one line per config."""
    head = (f"{'config':<34} {'r':>3} {'alpha D/S':>10} {'lr D/S':>15} {'ep':>3} {'batch':>5}  "
            f"{'LoRI-D':>14}  {'LoRI-S':>14}  {'GiB/GPU D/S':>13}  plan")
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{Path(row['config']).stem:<34} {row['r']:>3} {row['alpha']:>4g}/{row['sparse_alpha']:<5g} "
            f"{row['lr']:>7.0e}/{row['sparse_lr']:<7.0e} {row['epochs'][0] or '-':>3} "
            f"{row['global_batch']:>5}  "
            f"{_millions(row['trainable_lori_d']):>6} ({row['percent_lori_d']:.2f}%)  "
            f"{_millions(row['trainable_lori_s']):>6} ({row['percent_lori_s']:.2f}%)  "
            f"{row['memory_gib_lori_d']['total']:>6.1f}/{row['memory_gib_lori_s']['total']:<6.1f}  "
            f"{_plan_label(row['plan'])}"
            + (f"  {row['method']}: {_millions(row['trainable'])} ({row['percent']:.2f}%)"
               if row.get("method", "lori") != "lori" else "")
        )
    return "\n".join(lines)


def format_fits(config: str | Path, found: list[Fit], budget_bytes: float) -> str:
    """The settings that fit ``budget_bytes``, cheapest in speed first, then those that do not."""
    configured = found[0].setting
    lines = [f"{Path(config).stem}: {budget_bytes / GIB:.1f} GiB per GPU; micro-batch {configured.micro_batch} x "
             f"{configured.accumulate} accumulation; GiB per GPU (PEFT LoRA: QLoRA on a quantized base)",
             f"  {'setting':<40} {'batch':>7}  {'LoRI-D':>7} {'LoRI-S':>7} {'PEFT LoRA':>9}  fits"]
    for fit in sorted(found, key=lambda f: not f.fits):  # stable: ladder order within each group
        s = fit.setting
        lines.append(f"  {s.label(configured) + fit.note:<40} {f'{s.micro_batch} x {s.accumulate}':>7}  "
                     f"{fit.lori_d / GIB:>7.1f} {fit.lori_s / GIB:>7.1f} {fit.lora / GIB:>9.1f}  "
                     f"{'yes' if fit.fits else 'no'}")
    best = cheapest(found)
    lines.append(f"  cheapest that fits: {best.setting.label(configured)}{best.note}" if best else
                 "  nothing fits: shard over more GPUs (configs/trainer/fsdp.yaml) or shorten data.max_length")
    return "\n".join(lines)


def format_budget_table(configs: list[str], budgets: list[str], found: dict[tuple[str, str], list[Fit]]) -> str:
    """A markdown table: per config and budget, the cheapest setting that fits and its estimate."""
    lines = ["| config | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
    for config in configs:
        cells = []
        for budget in budgets:
            fit = cheapest(found[config, budget])
            cells.append(f"{fit.setting.label(found[config, budget][0].setting)}{fit.note}: "
                         f"{max(fit.lori_d, fit.lori_s) / GIB:.1f}" if fit else "does not fit")
        lines.append(f"| {Path(config).stem} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``lori dryrun [--config] CONFIG... [--trainer PRESET] [--gpu-memory SIZE[,SIZE...]] [--json]``."""
    parser = argparse.ArgumentParser(prog="lori dryrun", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", help="lori pipeline YAML files")
    parser.add_argument("--config", action="append", default=[], metavar="CONFIG",
                        help="a lori pipeline YAML (as every other subcommand takes it); repeatable")
    parser.add_argument("--trainer", help="configs/trainer/*.yaml preset laid over each config's trainer:")
    parser.add_argument("--gpu-memory", metavar="SIZE",
                        help="memory of one GPU (24GiB, 24GB, 80): list the settings that fit, cheapest "
                             "in speed first; several sizes (16GiB,24GiB,80GiB): a table of the cheapest")
    parser.add_argument("--json", action="store_true", help="print the full results as JSON")
    parser.add_argument("--method", help="a model.method in place of each config's (a baseline's trainable count)")
    args = parser.parse_args(argv)
    configs = args.config + args.configs
    if not configs:
        parser.error("give at least one config (positional or --config)")
    # the configs are parsed one by one from Python, not from this process's argv
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        budgets = [b.strip() for b in args.gpu_memory.split(",")] if args.gpu_memory is not None else []
        sizes = {b: parse_size(b) for b in budgets}
        rows = [dry_run(path, args.trainer, args.method) for path in configs] if args.json or not budgets else []
        by_config = {c: budget_fits(c, sizes, args.trainer) for c in configs} if budgets else {}
    except (LoRIError, FileNotFoundError) as err:  # a missing YAML is no LoRIError
        print(f"lori: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    found = {(c, b): fits_of[b] for c, fits_of in by_config.items() for b in budgets}
    if args.json:
        for row in rows:
            row["fits"] = {b: [asdict(f) for f in found[row["config"], b]] for b in budgets}
        print(json.dumps(rows, indent=2))
    elif len(budgets) > 1:
        print(format_budget_table(configs, budgets, found))
    elif budgets:
        print("\n\n".join(format_fits(c, found[c, budgets[0]], sizes[budgets[0]]) for c in configs))
    else:
        print(format_table(rows))


if __name__ == "__main__":
    main()
