"""THE method table: one ``Method`` entry per ``model.method`` name (``lori.training.baselines.registry``).

Every method reads its rank, alpha, dropout, targets and seed from ``model.lori`` (LoRIConfig), so
two configs differ only in ``method`` (and, for the methods that have them, ``model.baseline``).
An option that does not apply to the method is refused before anything loads:

* a ``model.baseline`` key the method has no use for (``target_r`` for LoRA);
* a LoRI-only field (``sparsity``, ``granularity``) other than LoRIConfig's default, for any method
  that does not sparsify (every shipped config carries the defaults, which stay accepted;
  ``sparsity: 0`` is accepted too).

The ``model.lori`` fields a method has no use for (``Method.reads``) are not checked, since the
embedded configs share one ``model.lori`` block across methods: IA3 reads only ``target_modules``
(no rank, alpha or dropout), VeRA has no ``alpha``, full fine-tuning reads none (AdaLoRA: r is the
initial rank; PiSSA: the seed only matters for the randomized SVD).

A new method: one ``Method(...)`` below (its builders in ``peft_methods`` / ``optimizers`` /
``saving``; its ``trains`` / ``built_with`` / ``saved_as`` are its row of the overview table, rendered
by ``method_table``) and a row in ``tests/test_method_registry.py`` (``TRAINS``): the battery there
then checks it (docs/extending.md walks through it).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import nn

from lori.core import InjectionError, LoRIConfig, inject_lori
from lori.training.baselines import optimizers, peft_methods, saving
from lori.training.baselines.adalora import AdaLoraBudget, orthogonality_penalty
from lori.training.baselines.options import (
    LORI_ONLY,
    BaselineOptions,
    BaselineOptionsError,
    check_range,
    resolve,
)
from lori.training.baselines.registry import Method, all_methods, get_method, register


def attach_lori(
    model: nn.Module, lori: LoRIConfig, opts: dict[str, Any], shapes_only: bool = False, dense: bool = False
) -> LoRIConfig:
    """LoRILinear layers (A frozen from ``lori.seed``, B trained); ``dense``: sparsity 0 (LoRI-D alone)."""
    config = replace(lori, sparsity=0.0) if dense else lori
    inject_lori(model, config)
    return config


def attach_full(model: nn.Module, lori: LoRIConfig, opts: dict[str, Any], shapes_only: bool = False) -> LoRIConfig:
    """Every base weight trains (no adapter)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return lori


def adalora_callbacks() -> list[AdaLoraBudget]:
    """AdaLoRA's rank budget, a new Callback for every fit."""
    return [AdaLoraBudget()]


def _peft(name: str, label: str, trains: str, build: Any, *, built_with: str, saved_as: str = "PEFT dir",
          freeze_a: bool = False, keep_initial: bool = False, save: Any = saving.save_peft, **fields: Any) -> Method:
    """The entry of a PEFT method: ``attach_peft`` over ``build``, saved as a PEFT dir, trainable tensors kept."""
    attach = partial(peft_methods.attach_peft, name=name, build=build, freeze_a=freeze_a, keep_initial=keep_initial)
    return Method(name, "peft", label, trains, attach=attach, save=save, checkpoint_keeps=saving.keeps_trainable,
                  built_with=built_with, saved_as=saved_as, peft_config=build, **fields)


for _entry in (  # today's METHODS order: the LoRI family, the PEFT baselines, full fine-tuning
    Method("lori", "lori", "LoRI", "B (then B ⊙ M after calibration); A frozen from the seed",
           attach=attach_lori, save=saving.save_lori, checkpoint_keeps=saving.keeps_lori_keys,
           built_with="LoRILinear, A frozen from the seed", saved_as="lori adapter dir",
           sparsifies=True, frozen_seeded_a=True, runs_pipeline=True),
    # LoRI-D alone (the paper's limiting case, Sec. 2.1: s = 0); not `lori pipeline`'s lori_d stage, which
    # is method lori (sparsity recorded for the calibration that follows): its own fit, budget and dir
    Method("lori_d", "lori", "LoRI-D (LoRI with s = 0)", "B, dense (LoRI with s = 0); A frozen from the seed",
           attach=partial(attach_lori, dense=True), save=saving.save_lori, checkpoint_keeps=saving.keeps_lori_keys,
           built_with="LoRILinear, A frozen from the seed", saved_as="lori adapter dir",
           frozen_seeded_a=True, renamed_from=("lora_frozen_a",)),
    _peft("lora", "LoRA", "A and B", peft_methods.lora_config, built_with="PEFT LoRA"),
    _peft("dora", "DoRA", "A, B and the magnitude vector", partial(peft_methods.lora_config, use_dora=True),
          built_with="PEFT LoRA use_dora",
          quantize_refused={"int8": "PEFT 0.21's DoRA re-reads an int8 weight every step through Int8Params.to(), "
                                    "which drops its scales (SCB) on the CPU; use model.quantize nf4 or fp4"}),
    _peft("lora_fa", "LoRA-FA", "B (A frozen, Kaiming from the seed); LoRA-FA optimizer", peft_methods.lora_config,
          built_with="PEFT LoRA + PEFT's LoraFAOptimizer", freeze_a=True, optimizer=optimizers.lora_fa,
          frozen_seeded_a=True),
    _peft("vera", "VeRA", "lambda_b, lambda_d (shared frozen projections from a seed)", peft_methods.vera_config,
          built_with="PEFT VeRA", saved_as="PEFT VeRA dir",
          options=("d_initial", "projection_prng_key"), reads=("r", "dropout", "target_modules")),
    _peft("ia3", "IA3", "one scaling vector per module", peft_methods.ia3_config,
          built_with="PEFT IA3", saved_as="PEFT IA3 dir",
          options=("feedforward_modules",), reads=("target_modules",)),
    _peft("adalora", "AdaLoRA", "P, E, Q; E pruned to a rank budget", peft_methods.adalora_config,
          built_with="PEFT AdaLoRA (+ AdaLoraBudget)", saved_as="PEFT AdaLoRA dir",
          options=("target_r", "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg_weight"),
          extra_losses={"orth_penalty": orthogonality_penalty}, callbacks=adalora_callbacks),
    _peft("rslora", "rsLoRA", "A and B, scale alpha / sqrt(r)", partial(peft_methods.lora_config, use_rslora=True),
          built_with="PEFT LoRA use_rslora", saved_as="PEFT dir (use_rslora)"),
    _peft("pissa", "PiSSA", "A and B, from the top-r SVD of W0", peft_methods.pissa_config, keep_initial=True,
          built_with='PEFT LoRA init "pissa"', saved_as="PEFT LoRA dir, rank 2r (on the original base)",
          save=partial(saving.save_peft, as_lora=True), options=("pissa_niter",),
          changes_base="PiSSA replaces each base weight by its residual W0 - U S V^T"),
    _peft("loraplus", "LoRA+", "A and B, B at a higher lr", peft_methods.lora_config,
          built_with="PEFT LoRA + PEFT's create_loraplus_optimizer",
          optimizer=optimizers.loraplus_optimizer, options=("loraplus_lr_ratio",)),
    Method("full", "full", "full fine-tuning", "every base weight", attach=attach_full, save=saving.save_full,
           checkpoint_keeps=saving.keeps_all, built_with="none (the base's own weights)",
           saved_as="Hugging Face model dir", reads=(), trains_base=True,
           changes_base="full fine-tuning trains every base weight"),
):
    register(_entry)
del _entry

# ---- the public names, derived from the table (same names and order as before the registry) ----
METHODS: tuple[str, ...] = tuple(m.name for m in all_methods())
LORI_METHODS: tuple[str, ...] = tuple(m.name for m in all_methods() if m.family == "lori")
PEFT_METHODS: tuple[str, ...] = tuple(m.name for m in all_methods() if m.family == "peft")
OPTIONS: dict[str, tuple[str, ...]] = {m.name: m.options for m in all_methods() if m.options}

__all__ = [
    "LORI_METHODS", "LORI_ONLY", "METHODS", "OPTIONS", "PEFT_METHODS", "BaselineOptions", "BaselineOptionsError",
    "attach_full", "attach_lori", "build_optimizer", "check_method", "check_method_options", "get_method",
    "is_saved_key", "resolved_options", "target_paths",
]


def check_method(method: str) -> None:
    """Refuse an unknown method (or an old name) by name, in one line (``get_method``)."""
    get_method(method)


def target_paths(model: nn.Module, targets: list[str]) -> list[str]:
    """Paths of the ``nn.Linear`` modules whose name ends with a target (inject_lori's rule).

    Raises:
        InjectionError: a target matches no linear layer (the message lists the linear names).
    """
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    hits = {t: [p for p in linears if p == t or p.endswith("." + t)] for t in targets}
    missing = [t for t, found in hits.items() if not found]
    if missing:
        names = sorted({p.rsplit(".", 1)[-1] for p in linears})
        raise InjectionError(
            f"target_modules {missing} match no nn.Linear in {type(model).__name__}; "
            f"linear layer names there: {names}"
        )
    return sorted({p for found in hits.values() for p in found})


def check_method_options(method: str, lori: LoRIConfig, options: BaselineOptions) -> None:
    """Refuse an unknown method, an option for another method, or an option out of range.

    Raises:
        InjectionError: unknown method (LoRIConfigError: an old name).
        BaselineOptionsError: the first option that does not apply or is out of range, named.
    """
    entry = get_method(method)
    default = LoRIConfig()
    if not entry.sparsifies:
        for name in LORI_ONLY:
            value = getattr(lori, name)
            if value != getattr(default, name) and not (name == "sparsity" and value == 0.0):
                raise BaselineOptionsError(
                    f"model.lori.{name}={value!r} does not apply to method {method!r} (only LoRI "
                    f"sparsifies B); leave it at {getattr(default, name)!r} or drop it"
                )
    for name in options.given():
        if name not in entry.options:
            users = [m.name for m in all_methods() if name in m.options]
            raise BaselineOptionsError(
                f"model.baseline.{name} is an option of {users}, not of method {method!r} "
                f"(its options: {list(entry.options) or 'none'})"
            )
    for name, value in options.given().items():
        check_range(name, value, lori)


def resolved_options(method: str, lori: LoRIConfig, options: BaselineOptions) -> dict[str, Any]:
    """Every option of ``method`` with its default filled in (what the run uses and records)."""
    return resolve(get_method(method).options, lori, options)


def build_optimizer(
    method: str, model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
    options: dict[str, Any],
) -> torch.optim.Optimizer:
    """The optimizer of ``method`` over ``model``'s trainable tensors (the entry's ``optimizer``).

    Args:
        method: a ``METHODS`` name.
        model: the adapted model.
        lr: learning rate (of A, for LoRA+).
        weight_decay: decoupled weight decay.
        betas: Adam betas.
        options: the method's resolved ``model.baseline`` options (``resolved_options``).
    """
    return get_method(method).optimizer(model, lr, weight_decay, tuple(betas), options)


def is_saved_key(method: str, key: str, trainable: set[str]) -> bool:
    """Whether a LightningModule state-dict key belongs in a checkpoint of ``method`` (the entry's
    ``checkpoint_keeps``: LoRI keeps every ``lori_`` tensor, a PEFT method its trainable tensors,
    full fine-tuning everything)."""
    return get_method(method).checkpoint_keeps(key, trainable)
