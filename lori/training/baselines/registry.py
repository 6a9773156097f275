"""The method registry: one ``Method`` entry per ``model.method`` name, looked up, never ``if method == ...``.

Every place that treats methods differently (attach, optimizer, loss, callbacks, saving, checkpoint
contents, the dtype of a trained base, quantization, the pipeline, the model card) reads a field of
the method's entry. The entries themselves are the table in ``lori.training.baselines.methods``
(registered there, in ``METHODS`` order); a new method is one ``Method(...)`` there plus a row in
``tests/test_method_registry.py``. The overview table of the methods is rendered from the entries
(``method_table``; ``python -m lori.training.baselines`` prints it or rewrites its copy in docs/guide.md).

    get_method("qlora")          InjectionError: unknown method 'qlora'; choose one of [...]
    get_method("old_name")       LoRIConfigError: model.method 'old_name' is now called 'new_name' ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lori.core import InjectionError, LoRIConfig, LoRIConfigError
from lori.training.baselines.optimizers import adamw

# the LoRIConfig fields a method may read (r, alpha, dropout, targets, seed); sparsity and
# granularity belong to the methods that sparsify (``Method.sparsifies``)
LORI_FIELDS: tuple[str, ...] = ("r", "alpha", "dropout", "target_modules", "seed")

Attach = Callable[[nn.Module, LoRIConfig, dict[str, Any], bool], LoRIConfig]
Save = Callable[..., Path]  # (model, tokenizer, lori, directory, base_model, fingerprint, meta) -> directory


@dataclass(frozen=True)
class Method:
    """What ``model.method: <name>`` trains, and how each part of lori treats it.

    Args:
        name: the ``model.method`` value.
        family: ``lori`` (LoRILinear layers, lori adapter dir), ``peft`` (a PEFT tuner, PEFT dir) or
            ``full`` (the base itself, Hugging Face model dir).
        label: the method's name in prose (model cards, tables): ``LoRA-FA``.
        trains: what trains, in a few words (a cell of the overview table, ``method_table``).
        attach: ``(model, lori, options, shapes_only) -> effective LoRIConfig``: adapt ``model`` in
            place (``options``: the resolved ``model.baseline`` options; ``shapes_only``: a meta model).
        save: ``(model, tokenizer, lori, directory, base_model, fingerprint, meta) -> directory``.
        checkpoint_keeps: ``(state-dict key, trainable keys) -> bool``: what a checkpoint holds.
        built_with: what builds it, in a few words (``PEFT LoRA use_dora``; the overview table).
        saved_as: what ``save`` writes, in a few words (``PEFT dir``; the overview table).
        optimizer: ``(model, lr, weight_decay, betas, options) -> Optimizer`` (AdamW unless the
            method is an optimizer itself).
        peft_config: ``(lori, options) -> PEFT config`` (family ``peft``).
        options: the ``model.baseline`` keys it reads (``lori.training.baselines.options``).
        reads: the ``model.lori`` fields it reads (IA3: targets only; full fine-tuning: none).
        sparsifies: it may set ``model.lori.sparsity`` / ``granularity`` (a mask on B).
        trains_base: every base weight trains: fp32 master weights, a strict full checkpoint.
        changes_base: why ``model.quantize`` is refused (its training rewrites the base), or None.
        quantize_refused: ``model.quantize`` modes that fail in a dependency for it, with why.
        frozen_seeded_a: its A is frozen and drawn from ``model.lori.seed`` (merging reads its
            adapters as LoRI's).
        runs_pipeline: ``lori pipeline`` (LoRI-D -> calibration -> LoRI-S) accepts it.
        extra_losses: terms added to the training loss, by the name they are logged under
            (``train/<name>``; AdaLoRA's ``orth_penalty``).
        callbacks: the Lightning callbacks every fit of it adds (AdaLoRA's rank budget).
        renamed_from: names it had before: a config or command line naming one fails in one line
            naming this one (``get_method``); a file written before the rename (a checkpoint, an
            adapter's ``lori_meta.json``) reads as this method (``current_name``).
    """

    name: str
    family: Literal["lori", "peft", "full"]
    label: str
    trains: str
    attach: Attach
    save: Save
    checkpoint_keeps: Callable[[str, set[str]], bool]
    built_with: str = ""
    saved_as: str = ""
    optimizer: Callable[..., torch.optim.Optimizer] = adamw
    peft_config: Callable[[LoRIConfig, dict[str, Any]], Any] | None = None
    options: tuple[str, ...] = ()
    reads: tuple[str, ...] = LORI_FIELDS
    sparsifies: bool = False
    trains_base: bool = False
    changes_base: str | None = None
    quantize_refused: Mapping[str, str] = field(default_factory=dict)
    frozen_seeded_a: bool = False
    runs_pipeline: bool = False
    extra_losses: Mapping[str, Callable[[nn.Module], Tensor]] = field(default_factory=dict)
    callbacks: Callable[[], list[Any]] = list
    renamed_from: tuple[str, ...] = ()


REGISTRY: dict[str, Method] = {}  # name -> entry, in registration order (the table's)


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a name or an old name already taken is a bug: ValueError)."""
    taken = {method.name, *method.renamed_from} & ({*REGISTRY} | {old for m in REGISTRY.values() for old in m.renamed_from})
    if taken:
        raise ValueError(f"method name(s) {sorted(taken)} already registered")
    if method.family == "peft" and method.peft_config is None:
        raise ValueError(f"PEFT method {method.name!r} needs a peft_config")
    if not (method.trains and method.built_with and method.saved_as):
        raise ValueError(f"method {method.name!r} needs trains, built_with and saved_as (its row of the overview table)")
    REGISTRY[method.name] = method
    return method


def all_methods() -> tuple[Method, ...]:
    """Every registered method, in the table's order."""
    return tuple(REGISTRY.values())


def get_method(name: str) -> Method:
    """The entry of ``model.method: name``.

    Raises:
        LoRIConfigError: ``name`` is an old name of a method (the message names the new one).
        InjectionError: ``name`` is no method's (the message lists them all).
    """
    if name in REGISTRY:
        return REGISTRY[name]
    for method in REGISTRY.values():
        if name in method.renamed_from:
            raise LoRIConfigError(f"model.method {name!r} is now called {method.name!r} (same method); "
                                  f"write model.method: {method.name}")
    raise InjectionError(f"unknown method {name!r}; choose one of {list(REGISTRY)}")


def find_method(name: str) -> Method | None:
    """The entry of ``name`` (or of the method it is an old name of), None for a name of no method
    (``merge:<method>`` in a merged adapter's facts)."""
    return REGISTRY.get(current_name(name))


def current_name(name: str) -> str:
    """``name``, or the method's name now when ``name`` is an old one (for files written before a rename)."""
    for method in REGISTRY.values():
        if name in method.renamed_from:
            return method.name
    return name


def method_table() -> str:
    """The overview table of every method, rendered from the entries (Markdown, in the table's order).

    One row per entry: its name (and the names it had), ``trains``, ``built_with``, ``saved_as``.
    docs/guide.md ("Baselines") holds a copy; ``python -m lori.training.baselines --write`` renews it.
    """
    rows = [f"| `{m.name}`" + "".join(f" (was `{old}`)" for old in m.renamed_from)
            + f" | {m.trains} | {m.built_with} | {m.saved_as} |" for m in all_methods()]
    return "\n".join(["| method | trains | built with | saved as |", "|---|---|---|---|", *rows]) + "\n"
