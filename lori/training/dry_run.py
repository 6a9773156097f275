"""Dry run of a lori config: adapter sizes and a GPU-memory estimate, with no weights and no GPU.

    dry_run_report(cfg, "llama3_8b_r32_gsm8k.yaml")     cfg: the parsed config as plain dicts

The command over it is ``lori dryrun`` (its usage lines: ``lori.commands.dryrun_command``).

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
searches the settings that fit a card (``lori.training.memory_budget``). ``lori dryrun``
(``lori.commands.dryrun_command``) parses the configs and prints these reports.
"""


from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

from lori.core import LoRIConfig, LoRIConfigError, count_trainable
from lori.training.base_model import ModelLoadError, arch_config_names, build_from_arch_config
from lori.training.baselines.registry import get_method
from lori.training.memory_budget import Fit, fits
from lori.training.memory_model import (
    GIB,
    QUANTIZE,
    adapter_shape,
    estimate_memory,
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


OFFICIAL_NOTE = " (protocol: lori)"  # lori.training.quantize refuses a quantized base under the official protocol


class DryRunError(LoRIConfigError):
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


def _inputs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The parsed config with its LoRI config, architecture, shapes, plan and accumulation."""
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


def dry_run_report(cfg: dict[str, Any], config_path: str | Path) -> dict[str, Any]:
    """Sizes of a config's LoRI-D and LoRI-S adapters and the memory they need, from shapes alone.

    Args:
        cfg: the parsed config's ``model``, ``data``, ``trainer`` and ``pipeline`` sections as plain
            dicts (a baseline: ``model.method`` set to it; ``lori.commands.dryrun_command`` reads
            a YAML, with a trainer preset laid over it, into this).
        config_path: the config's path, as reported.

    Returns:
        method, its trainable entries and percentage (of base + adapter entries), model, arch, r,
        alphas, learning rates, epochs, global batch, base parameters, trainable entries and
        percentages of LoRI-D and LoRI-S, the device plan and memory estimates (GiB).
    """
    inputs = _inputs(cfg)
    model, data, pipe = inputs["model"], inputs["data"], inputs["pipeline"]
    lori, arch, shape, plan = inputs["lori"], inputs["arch"], inputs["shape"], inputs["plan"]
    dense = shape.trainable_dense
    sparse = sparse_trainable(shape.b_by_path, lori.sparsity, lori.granularity)
    total = shape.base_params + shape.a_entries + sum(n for _, n in shape.b_by_path)
    world_batch = data["batch_size"] * plan.world * inputs["accumulate"]
    method = model.get("method", "lori")
    if get_method(method).runs_pipeline:  # LoRI: the dense B of LoRI-D (LoRI-S's count is beside it)
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


def budget_fits_of(cfg: dict[str, Any], budgets: dict[str, float]) -> dict[str, list[Fit]]:
    """Per budget (name -> bytes), every setting ``lori.training.memory_budget.ladder`` tries for a
    parsed config (as :func:`dry_run_report` takes it), with its estimates and whether it fits. A
    quantized setting of a ``protocol: official`` config needs ``protocol: lori``
    (``lori.training.quantize`` refuses the pair): its label says so."""
    inputs = _inputs(cfg)
    lori, shape = inputs["lori"], inputs["shape"]
    trainable = (shape.trainable_dense, sparse_trainable(shape.b_by_path, lori.sparsity, lori.granularity))
    found = fits(shape, lori, trainable, inputs["plan"], inputs["accumulate"], budget_bytes=0)
    if inputs["model"].get("protocol") == "official":
        found = [dataclasses.replace(f, note=OFFICIAL_NOTE if f.setting.quantize else "") for f in found]
    return {name: [dataclasses.replace(f, fits=max(f.lori_d, f.lori_s) <= size) for f in found]
            for name, size in budgets.items()}
