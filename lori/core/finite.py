"""Refusing NaN and inf where they enter: adapter and mask files, merges, calibration.

A NaN in B makes every output NaN and a merged one is written into the base weights for good,
so each entry point checks its tensors first and names the first bad one:

    load_adapter / load_masks    every floating tensor of the file       (lori.core.io)
    merge_lori / DeltaMerge      ΔW and W0 + ΔW of every module, before any is merged
    calibrate                    every B it ranks                        (lori.core.masks)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from lori.core.errors import LoRIError


class NonFiniteError(LoRIError, ValueError):
    """A tensor holding NaN or inf where only finite values make sense (the message names it)."""


def non_finite_counts(t: Tensor) -> tuple[int, int]:
    """(NaN count, ±inf count) of a tensor; (0, 0) for integer and bool tensors."""
    if not (t.is_floating_point() or t.is_complex()):
        return 0, 0
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def describe_non_finite(name: str, t: Tensor) -> str | None:
    """``"<name> holds 3 NaN and 0 inf of 128 values"``, or None when every value is finite."""
    if not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all()):
        return None
    nan, inf = non_finite_counts(t)
    return f"{name} holds {nan} NaN and {inf} inf of {t.numel()} values"


def first_non_finite(tensors: Iterable[tuple[str, Tensor]]) -> str | None:
    """The description of the first (name, tensor) pair holding NaN or inf, or None."""
    for name, t in tensors:
        found = describe_non_finite(name, t)
        if found is not None:
            return found
    return None


def check_finite(
    tensors: Iterable[tuple[str, Tensor]], where: str, error: type[Exception] = NonFiniteError,
    hint: str = "",
) -> None:
    """Raise ``error("<where>: tensor <name> holds ...<hint>")`` for the first non-finite tensor.

    Args:
        tensors: (name, tensor) pairs, e.g. ``state.items()``; non-float tensors are skipped.
        where: what holds them (a file path, "merge"), the start of the message.
        error: the exception type to raise (a ValueError subclass the CLI reports in one line).
        hint: appended to the message (what to do about it).
    """
    found = first_non_finite(tensors)
    if found is not None:
        raise error(f"{where}: tensor {found}{hint}")
