"""The paper's baselines (Tables 1, 2, 11, 12), built on the same base model and LoRIConfig as LoRI.

    method         trainable                            built with                          saved as
    lori           B (then B ⊙ M after calibration)     LoRILinear, A frozen from seed      lori adapter dir
    lora_frozen_a  B, dense (LoRI with s = 0)           LoRILinear, A frozen from seed      lori adapter dir
    lora           A and B                              PEFT LoRA                           PEFT dir
    dora           A, B and the magnitude vector        PEFT LoRA use_dora                  PEFT dir
    lora_fa        B (A frozen, Kaiming from seed)      PEFT LoRA + PEFT LoraFAOptimizer    PEFT dir
    rslora         A and B, scale alpha / sqrt(r)       PEFT LoRA use_rslora                PEFT dir (use_rslora)
    pissa          A and B, from the top-r SVD of W0    PEFT LoRA init "pissa"              PEFT LoRA dir, rank 2r
    loraplus       A and B, B at a higher lr            PEFT LoRA + create_loraplus_opt.    PEFT dir
    adalora        P, E, Q; E pruned to a rank budget   PEFT AdaLoRA (+ AdaLoraBudget)      PEFT AdaLoRA dir
    vera           lambda_b, lambda_d (shared frozen    PEFT VeRA                           PEFT VeRA dir
                   projections from a seed)
    ia3            one scaling vector per module        PEFT IA3                            PEFT IA3 dir
    full           every base weight                    none                                HF model dir

One registry entry per method (``Method``, ``lori.training.baselines.registry``; the table is
``lori.training.baselines.methods``): every part of lori that treats methods differently reads a
field of the entry. Every method reads r, alpha, dropout, target modules and seed from the same
``LoRIConfig`` (the fields each one uses: ``Method.reads``), and its own options from ``model.baseline``
(``BaselineOptions``), so a config differs from another only in ``method`` (and those options).
``lora_frozen_a`` is the paper's "limiting case" of LoRI (Sec. 2.1: a single task and zero
sparsity reduce LoRI to LoRA-FA): frozen A, plain AdamW on B. ``lora_fa`` is the LoRA-FA optimizer
PEFT ships (B's gradient projected through (A A^T)^-1), the published method's later version.
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
from lori.training.baselines.registry import Method, all_methods, current_name, get_method
from lori.training.baselines.saving import (
    peft_state,
    save_full_model,
    save_peft_adapter,
)

__all__ = [
    "LORI_METHODS", "METHODS", "OPTIONS", "PEFT_METHODS", "AdaLoraBudget", "BaselineOptions",
    "BaselineOptionsError", "Method", "PeftHandle", "all_methods", "attach", "attach_peft", "build_optimizer",
    "check_method", "check_method_options", "current_name", "get_method", "is_saved_key", "kept_ranks",
    "orthogonality_penalty", "peft_config", "peft_handle", "peft_state", "resolved_options", "save_full_model",
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
        The effective config (``lora_frozen_a`` is LoRI with sparsity 0).
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
