"""The paper's baselines (Tables 1, 2, 11, 12), built on the same base model and LoRIConfig as LoRI.

What each method trains, what builds it and how it saves: the overview table, rendered from the
entries by ``method_table()`` (``python -m lori.training.baselines`` prints it; ``--write`` renews its
copy in docs/guide.md, "Baselines", which a test compares with the entries).

One registry entry per method (``Method``, ``lori.training.baselines.registry``; the table is
``lori.training.baselines.methods``): every part of lori that treats methods differently reads a
field of the entry. Every method reads r, alpha, dropout, target modules and seed from the same
``LoRIConfig`` (the fields each one uses: ``Method.reads``), and its own options from ``model.baseline``
(``BaselineOptions``), so a config differs from another only in ``method`` (and those options).
``lori_d`` (named ``lora_frozen_a`` before; the old name fails in one line naming it) is LoRI-D
alone, the paper's "limiting case" of LoRI (Sec. 2.1: a single task and zero sparsity reduce LoRI to
LoRA-FA): frozen A, plain AdamW on B, fit by ``lori fit`` with LoRI-D's budget. ``lora_fa`` is the
LoRA-FA optimizer PEFT ships (B's gradient projected through (A A^T)^-1), the published method's
later version.
"""

from __future__ import annotations

from torch import nn

from lori.core import LoRIConfig
from lori.training.baselines.adalora import AdaLoraBudget, kept_ranks, orthogonality_penalty
from lori.training.baselines.methods import (
    LORI_METHODS,
    METHODS,
    OPTIONS,
    PEFT_METHODS,
    BaselineOptions,
    BaselineOptionsError,
    build_optimizer,
    check_method,
    check_method_options,
    is_saved_key,
    resolved_options,
    target_paths,
)
from lori.training.baselines.peft_methods import PeftHandle, attach_peft, peft_handle
from lori.training.baselines.registry import (
    Method,
    all_methods,
    current_name,
    get_method,
    method_table,
)
from lori.training.baselines.saving import (
    peft_state,
    save_full_model,
    save_peft_adapter,
)

__all__ = [
    "LORI_METHODS", "METHODS", "OPTIONS", "PEFT_METHODS", "AdaLoraBudget", "BaselineOptions",
    "BaselineOptionsError", "Method", "PeftHandle", "all_methods", "attach", "attach_peft", "build_optimizer",
    "check_method", "check_method_options", "current_name", "get_method", "is_saved_key", "kept_ranks",
    "method_table", "orthogonality_penalty", "peft_config", "peft_handle", "peft_state", "resolved_options", "save_full_model",
    "save_peft_adapter", "target_paths",
]


def attach(
    model: nn.Module, method: str, config: LoRIConfig, options: BaselineOptions | None = None,
    shapes_only: bool = False,
) -> LoRIConfig:
    """Make ``model`` trainable the way ``method`` says, in place (the entry's ``attach``).

    Args:
        model: the base model.
        method: a ``METHODS`` name.
        config: r, alpha, dropout, targets, seed (and LoRI's sparsity, granularity).
        options: the method's ``model.baseline`` options (None: all defaults).
        shapes_only: a meta-device model, for counting: PEFT adapters are built on the meta
            device without running value-dependent initialisation (see ``attach_peft``).

    Returns:
        The effective config (``lori_d`` is LoRI with sparsity 0).
    """
    options = BaselineOptions.from_value(options)
    check_method_options(method, config, options)
    target_paths(model, config.target_modules)  # same error for every method on a bad target
    return get_method(method).attach(model, config, resolved_options(method, config, options), shapes_only)


def peft_config(method: str, lori: LoRIConfig, options: BaselineOptions) -> object:
    """The PEFT config of a PEFT ``method`` with LoRI's targets and, where it has them, r / alpha / dropout."""
    entry = get_method(method)
    if entry.peft_config is None:
        raise ValueError(f"method {method!r} is not a PEFT method; PEFT methods are {list(PEFT_METHODS)}")
    return entry.peft_config(lori, resolved_options(method, lori, options))
