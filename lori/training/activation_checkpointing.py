"""Activation checkpointing of every decoder layer (``model.gradient_checkpointing``), on any strategy.

    forward:   h_{l+1} = layer_l(h_l)          only each layer's input h_l is kept
    backward:  layer_l(h_l) is run again        its inner activations exist for one layer at a time

Memory for activations drops from (layers x per-layer activations) to (layers x one hidden state +
one layer's activations), for one more forward per step. The checkpoint is torch's non-reentrant
one, set on the model itself through transformers (each decoder layer's ``forward``), so it works
the same on one device, DDP, FSDP and DeepSpeed.

Non-reentrant matters for a frozen base: the reentrant checkpoint only back-propagates into a
segment whose tensor inputs require grad, and with every base weight frozen the hidden state
entering the first decoder layer does not (the embedding is frozen): B would get no gradient at
all, silently. The non-reentrant one records the segment's graph through the parameters it uses,
so B's gradient is the plain run's (tests/test_checkpointing.py compares them).

The FSDP preset used to checkpoint through ``FSDPStrategy(activation_checkpointing_policy=...)``;
a config that still sets it keeps working (the strategy wraps the layers itself, and this setting
then leaves them to it rather than checkpointing twice).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lori.core import LoRIConfigError

CHECKPOINT_KWARGS = {"use_reentrant": False}


class CheckpointingError(LoRIConfigError):
    """A model that cannot checkpoint its decoder layers."""


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder layer of a transformers model (non-reentrant), in place.

    Raises:
        CheckpointingError: the model has no transformers checkpointing support.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise CheckpointingError(
            f"model.gradient_checkpointing: {type(model).__name__} does not support activation checkpointing "
            "(a transformers model with decoder layers does); set model.gradient_checkpointing: false"
        )
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.x
        enable(activation_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Undo ``enable_activation_checkpointing``."""
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()


def is_checkpointing(model: nn.Module) -> bool:
    """Whether some layer of ``model`` checkpoints its activations (transformers' flag)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def strategy_checkpoints(strategy: Any) -> bool:
    """Whether a Lightning strategy wraps layers in activation checkpointing itself (FSDP's
    ``activation_checkpointing_policy`` / ``activation_checkpointing``, as older configs set)."""
    return bool(getattr(strategy, "_activation_checkpointing_kwargs", None))
