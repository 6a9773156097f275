"""Dry run of a lori config: adapter sizes and a GPU-memory estimate, with no weights and no GPU.

    lori dryrun configs/paper/llama3_8b_r32_gsm8k.yaml [more configs ...]    (or --config CONFIG)
    lori dryrun --trainer configs/trainer/fsdp.yaml configs/paper/*.yaml
    lori dryrun --json configs/paper/mistral_7b_r64_gsm8k.yaml
    lori dryrun --method dora configs/paper/llama3_8b_r32_gsm8k.yaml   (a baseline: model.method replaced)
    lori dryrun --gpu-memory 24GiB --config configs/paper/llama3_8b_r32_gsm8k.yaml   the settings that fit
    lori dryrun --gpu-memory 16GiB,24GiB,80GiB configs/paper/*_gsm8k.yaml            the cheapest, as a table

The base model is built from its architecture config on the meta device (shapes only, no memory),
LoRI is injected with the config's ``model.lori`` settings and the trainable entries are counted:

    LoRI-D: every entry of every B   = sum over adapted W0 (d_out x d_in) of d_out * r
    LoRI-S: the entries calibration keeps = sum over calibration groups of keep_count(n_group, s)

Meta tensors hold no values, so LoRI-S cannot be calibrated here; its size does not depend on the
values though: calibration keeps exactly ``keep_count(n, s) = n - round(s * n)`` entries of each
group (``lori.core.masks``), which is what is summed.

A config whose ``model.method`` is a baseline (``lori.training.baselines``) also gets that method's count:
its adapter is built on the meta device by ``lori.training.baselines.attach(..., shapes_only=True)`` and its
trainable tensors counted (PiSSA's SVD does not run: its tensors are LoRA's; VeRA's shared
projections are built, they are small). On Llama-3-8B, r = 32, all seven projections: LoRA / rsLoRA
/ PiSSA / LoRA+ 83,886,080; AdaLoRA 83,893,248 (+ E); DoRA 85,262,336; LoRA-FA and LoRI-D
44,040,192; IA3 1,703,936; VeRA 1,383,424 (the paper's 84M, 85M, 44M, 1.70M, 1.38M).

Percentages are ``trainable / (base parameters + adapter entries A and B)``, the denominator of
PEFT's ``print_trainable_parameters`` (the paper's "# Params (%)" column matches it); the percentage
of the base model alone is reported too. The memory estimate is ``lori.training.memory_model``
(``memory_terms``; a quantized base, ``model.quantize``, and ``model.gradient_checkpointing`` are
terms of it), explained in docs/reproducing_the_paper.md and docs/fit_your_gpu.md; ``--gpu-memory``
searches the settings that fit a card (``lori.training.memory_budget``). This module parses and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import warnings
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from lori.core import InjectionError, LoRIConfig, LoRIConfigError, count_trainable
from lori.training.base_model import ModelLoadError, arch_config_names, build_from_arch_config
from lori.training.memory_budget import Fit, cheapest, fits
from lori.training.memory_model import (  # noqa: F401 - estimate_memory, memory_terms, Plan: this module's API
    GIB,
    QUANTIZE,
    AdapterShape,
    Plan,
    adapter_shape,
    estimate_memory,
    memory_terms,
    plan_of,
    sparse_trainable,
)

# hub ids of the paper's base models -> the architecture configs shipped in configs/arch
KNOWN_ARCHS = {
    "meta-llama/Meta-Llama-3-8B": "llama3_8b",
    "mistralai/Mistral-7B-v0.1": "mistral_7b",
}


def arch_for(model: str | None) -> str:
    """The architecture config of a ``model:`` value: a known hub id, a shipped name or a local folder.

    Raises:
        ModelLoadError: no architecture config is known for the model.
    """
    if model in KNOWN_ARCHS:
        return KNOWN_ARCHS[model]
    if model in arch_config_names():
        return model
    if model and (Path(model).expanduser() / "config.json").is_file():
        return str(Path(model).expanduser())
    raise ModelLoadError(
        f"no architecture config for model {model!r}: use one of {sorted(KNOWN_ARCHS)}, a shipped "
        f"architecture {arch_config_names()} or a local folder holding a config.json"
    )


def _entries(model: Any) -> int:
    """Parameters and buffers of a model, each shared tensor once."""
    return sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())


@lru_cache(maxsize=64)
def method_size(
    arch: str, method: str, r: int, targets: tuple[str, ...], options: tuple[tuple[str, Any], ...] = ()
) -> tuple[int, int]:
    """(trainable entries, entries the adapter adds) of ``method`` on ``arch``, on the meta device.

    Args:
        arch: an architecture config (``configs/arch`` name or folder).
        method: a ``lori.training.baselines.METHODS`` name.
        r: rank (AdaLoRA: initial rank; unused by IA3 and full fine-tuning).
        targets: target module names.
        options: the method's ``model.baseline`` options as sorted (key, value) pairs.
    """
    # PEFT; kept out of module import time
    from lori.training.baselines import BaselineOptions, attach

    model = build_from_arch_config(arch, device="meta")
    before = _entries(model)
    opts = BaselineOptions(**{k: list(v) if isinstance(v, tuple) else v for k, v in options})
    attach(model, method, LoRIConfig(r=r, target_modules=list(targets), sparsity=0.0), opts, shapes_only=True)
    return count_trainable(model), _entries(model) - before


def _option_items(baseline: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    items = {k: tuple(v) if isinstance(v, list) else v for k, v in (baseline or {}).items() if v is not None}
    return tuple(sorted(items.items()))


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


OFFICIAL_NOTE = " (protocol: lori)"  # lori.training.quantize refuses a quantized base under the official protocol


class DryRunError(ValueError):
    """A ``lori dryrun`` option or config value it cannot use; the message names the bad value."""


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(gib|gb|mib|mb|tib|tb|g|m|t)?\s*", re.IGNORECASE)
_UNITS = {"gib": GIB, "g": GIB, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6, "tib": 2**40, "t": 2**40,
          "tb": 10**12, None: GIB}


def parse_size(text: str) -> float:
    """Bytes of a memory size: ``24GiB``, ``24 GB`` (10^9), ``81920MiB``, ``80`` (GiB).

    Raises:
        DryRunError: not a positive size.
    """
    match = _SIZE.fullmatch(text)
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").lower() or None] if match else 0.0
    if value <= 0:
        raise DryRunError(f"--gpu-memory {text!r}: give a positive size such as 24GiB, 24GB or 80 (GiB)")
    return value


def _inputs(config_path: str | Path, trainer_preset: str | Path | None,
            method: str | None = None) -> dict[str, Any]:
    """The parsed config with its LoRI config, architecture, shapes, plan and accumulation."""
    cfg = _load(config_path, trainer_preset, method)
    model, data, trainer = cfg["model"], cfg["data"], cfg["trainer"]
    quantize = model.get("quantize")
    if quantize not in (None, *QUANTIZE):
        raise DryRunError(f"model.quantize {quantize!r}: use one of {list(QUANTIZE)} or null")
    lori = LoRIConfig.from_dict(dict(model["lori"]))
    arch = arch_for(model["model"])
    plan = plan_of(trainer, model["dtype"], data["batch_size"], data["max_length"],
                   checkpointing=bool(model.get("gradient_checkpointing")), quantize=quantize)
    return cfg | {"lori": lori, "arch": arch, "shape": adapter_shape(arch, lori.r, tuple(lori.target_modules)),
                  "plan": plan, "accumulate": int(trainer.get("accumulate_grad_batches") or 1)}


def dry_run(
    config_path: str | Path, trainer_preset: str | Path | None = None, method: str | None = None
) -> dict[str, Any]:
    """Sizes of a config's LoRI-D and LoRI-S adapters and the memory they need, from shapes alone.

    Args:
        config_path: a ``lori pipeline`` YAML (e.g. ``configs/paper/llama3_8b_r32_gsm8k.yaml``).
        trainer_preset: a YAML whose ``trainer:`` (and ``model:``) keys replace the config's (``configs/trainer/*.yaml``).
        method: a ``model.method`` in place of the config's (a baseline's count from a LoRI config).

    Returns:
        method, its trainable entries and percentage (of base + adapter entries), model, arch, r,
        alphas, learning rates, epochs, global batch, base parameters, trainable entries and
        percentages of LoRI-D and LoRI-S, the device plan and memory estimates (GiB).
    """
    inputs = _inputs(config_path, trainer_preset, method)
    model, data, pipe = inputs["model"], inputs["data"], inputs["pipeline"]
    lori, arch, shape, plan = inputs["lori"], inputs["arch"], inputs["shape"], inputs["plan"]
    dense = shape.trainable_dense
    sparse = sparse_trainable(shape.b_by_path, lori.sparsity, lori.granularity)
    total = shape.base_params + shape.a_entries + sum(n for _, n in shape.b_by_path)
    world_batch = data["batch_size"] * plan.world * inputs["accumulate"]
    method = model.get("method", "lori")
    if method == "lori":
        trainable, added = dense, total - shape.base_params
    else:
        trainable, added = method_size(arch, method, lori.r, tuple(lori.target_modules),
                                       _option_items(model.get("baseline")))
    return {
        "method": method, "trainable": trainable,
        "percent": 100 * trainable / (shape.base_params + added),
        "config": str(config_path), "model": model["model"], "arch": Path(arch).name, "r": lori.r,
        "alpha": lori.alpha, "sparse_alpha": pipe.get("sparse_alpha") or lori.alpha,
        "sparsity": lori.sparsity, "granularity": lori.granularity, "seed": lori.seed,
        "lr": model["lr"], "sparse_lr": pipe.get("sparse_lr") or model["lr"],
        "epochs": [pipe.get("dense_epochs"), pipe.get("sparse_epochs")], "global_batch": world_batch,
        "base_params": shape.base_params, "adapter_entries": total - shape.base_params,
        "trainable_lori_d": dense, "trainable_lori_s": sparse,
        "percent_lori_d": 100 * dense / total, "percent_lori_s": 100 * sparse / total,
        "percent_of_base_lori_d": 100 * dense / shape.base_params,
        "percent_of_base_lori_s": 100 * sparse / shape.base_params,
        "plan": asdict(plan),
        "memory_gib_lori_d": estimate_memory(shape, lori, dense, False, plan),
        "memory_gib_lori_s": estimate_memory(shape, lori, sparse, True, plan),
    }


def budget_fits(config_path: str | Path, budgets: dict[str, float],
                trainer_preset: str | Path | None = None) -> dict[str, list[Fit]]:
    """Per budget (name -> bytes), every setting ``lori.training.memory_budget.ladder`` tries for a
    config, with its estimates and whether it fits. A quantized setting of a ``protocol: official``
    config needs ``protocol: lori`` (``lori.training.quantize`` refuses the pair): its label says so."""
    inputs = _inputs(config_path, trainer_preset)
    lori, shape = inputs["lori"], inputs["shape"]
    trainable = (shape.trainable_dense, sparse_trainable(shape.b_by_path, lori.sparsity, lori.granularity))
    found = fits(shape, lori, trainable, inputs["plan"], inputs["accumulate"], budget_bytes=0)
    if inputs["model"].get("protocol") == "official":
        found = [dataclasses.replace(f, note=OFFICIAL_NOTE if f.setting.quantize else "") for f in found]
    return {name: [dataclasses.replace(f, fits=max(f.lori_d, f.lori_s) <= size) for f in found]
            for name, size in budgets.items()}


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
    except (ModelLoadError, LoRIConfigError, FileNotFoundError, DryRunError, InjectionError) as err:
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
