"""Mask calibration (paper Sec. 2.2, Alg. 1) and mask statistics, as pure functions.

Calibration keeps, within each group of B matrices, exactly the ``k = n - round(s * n)``
entries of largest |B| (at least one), where ``n`` is the group's entry count:

    M_t = 1[|B_t| >= tau],  tau = the s-quantile of |B| over the group

The threshold is found by radix selection over the bit patterns of |B| (for non-negative
IEEE floats, integer order of the bits equals numeric order), one tensor at a time: three
histogram passes with ``torch.bincount``, no concatenated copy of all B, no sort and no
``torch.quantile`` (which refuses inputs above 2^24 elements; Llama-3-8B has 44M B entries
at r=32). Entries equal to the threshold are kept in a fixed order (groups' tensors by sorted
module path, then row-major position) until exactly k are kept, so the result never depends
on thread count or on the order of the input mapping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from lori.core.config import GRANULARITIES
from lori.core.finite import NonFiniteError, describe_non_finite

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")
# (shift, bits) of the three radix passes over a 31-bit non-negative float pattern.
_PASSES = ((20, 11), (10, 10), (0, 10))


def layer_index(path: str) -> int | None:
    """Decoder-block number in a module path (``model.layers.3.mlp.up_proj`` -> 3)."""
    match = _LAYER_RE.search(path)
    return int(match.group(1)) if match else None


def projection_name(path: str) -> str:
    """Projection type of a module path: its last name component (``up_proj``)."""
    return path.rsplit(".", 1)[-1]


def module_kind(path: str) -> str:
    """``attention`` or ``mlp`` for a module path."""
    parts = path.split(".")
    if any("attn" in p or "attention" in p for p in parts[:-1]):
        return "attention"
    if projection_name(path) in ATTENTION_PROJECTIONS:
        return "attention"
    return "mlp"


def group_of(path: str, granularity: str) -> str:
    """Name of the calibration group a module path belongs to at a granularity."""
    if granularity == "model":
        return "model"
    if granularity == "module":
        return module_kind(path)
    if granularity == "projection":
        return projection_name(path)
    if granularity == "layer":
        return f"layer{layer_index(path)}"
    if granularity == "matrix":
        return path
    raise ValueError(f"unknown granularity {granularity!r}; choose one of {list(GRANULARITIES)}")


def keep_count(n: int, sparsity: float) -> int:
    """Entries kept out of ``n`` at ``sparsity``: ``n - round(sparsity * n)``, at least 1."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got sparsity={sparsity!r}")
    return max(1, n - round(sparsity * n))


def calibrate(
    b_tensors: Mapping[str, Tensor], sparsity: float, granularity: str = "model"
) -> dict[str, Tensor]:
    """Bool masks keeping the top ``1 - sparsity`` fraction of |B| within each group.

    Args:
        b_tensors: B matrices by module path (any float dtype, any device). Not modified.
        sparsity: fraction dropped, in [0, 1).
        granularity: ``model`` (all B), ``module`` (attention vs MLP), ``projection`` (one group
            per projection type across layers), ``layer`` (per decoder block), ``matrix``.

    Returns:
        Bool masks of the same shapes and devices, by module path.
    """
    if not b_tensors:
        raise ValueError("calibrate got no B tensors")
    groups: dict[str, list[str]] = {}
    for path in sorted(b_tensors):
        groups.setdefault(group_of(path, granularity), []).append(path)
    masks: dict[str, Tensor] = {}
    for paths in groups.values():
        masks.update(_calibrate_group({p: b_tensors[p] for p in paths}, sparsity))
    return {p: masks[p] for p in b_tensors}


def _bits(b: Tensor) -> Tensor:
    """|b| as int32 bit patterns (order-preserving for non-negative floats)."""
    return b.detach().float().abs().view(torch.int32)


def _calibrate_group(group: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    for path, b in group.items():
        if not torch.isfinite(b).all():
            found = describe_non_finite(f"B of {path!r}", b)
            raise NonFiniteError(f"{found}; cannot calibrate a mask from it")
    n = sum(b.numel() for b in group.values())
    k = keep_count(n, sparsity)
    threshold, n_above = _kth_largest_bits(group, k)
    need = k - n_above  # entries equal to the threshold still to keep, in path/row order
    masks: dict[str, Tensor] = {}
    for path, b in group.items():
        bits = _bits(b)
        mask = bits > threshold
        if need > 0:
            ties = (bits == threshold).flatten().nonzero().squeeze(1)[:need]
            mask.view(-1)[ties] = True
            need -= ties.numel()
        masks[path] = mask
    return masks


def _kth_largest_bits(group: dict[str, Tensor], k: int) -> tuple[int, int]:
    """Bit pattern of the k-th largest |B| in a group, and how many entries exceed it."""
    prefix, prefix_shift, remaining, n_above = 0, 31, k, 0
    for shift, width in _PASSES:
        hist = torch.zeros(1 << width, dtype=torch.int64)
        for b in group.values():
            bits = _bits(b).flatten()
            if prefix_shift < 31:
                bits = bits[(bits >> prefix_shift) == prefix]
            digits = (bits >> shift) & ((1 << width) - 1)
            hist += torch.bincount(digits.cpu(), minlength=1 << width)
        # walk the histogram from the largest digit down until `remaining` is covered
        above = torch.flip(hist, [0]).cumsum(0)
        pos = int(torch.searchsorted(above, remaining))
        digit = (1 << width) - 1 - pos
        count_above_digit = int(above[pos - 1]) if pos > 0 else 0
        n_above += count_above_digit
        remaining -= count_above_digit
        prefix = (prefix << width) | digit
        prefix_shift = shift
    return prefix, n_above


def mask_density(masks: Mapping[str, Tensor]) -> float:
    """Fraction of all entries kept over a mask set."""
    kept = sum(int(m.sum()) for m in masks.values())
    return kept / max(1, sum(m.numel() for m in masks.values()))


def sparsity_by(masks: Mapping[str, Tensor], by: str = "layer") -> dict[str, float]:
    """Sparsity (fraction dropped) per ``layer``, ``projection`` or ``module`` group."""
    if by not in ("layer", "projection", "module", "matrix"):
        raise ValueError(f"sparsity_by: unknown grouping {by!r}")
    kept: dict[str, int] = {}
    total: dict[str, int] = {}
    for path, mask in masks.items():
        key = group_of(path, by)
        kept[key] = kept.get(key, 0) + int(mask.sum())
        total[key] = total.get(key, 0) + mask.numel()
    return {key: 1.0 - kept[key] / total[key] for key in total}


def sparsity_table(masks: Mapping[str, Tensor]) -> tuple[list[int], list[str], Tensor]:
    """Sparsity by (layer, projection): rows = layers, columns = projections (paper Fig. 4b)."""
    layers = sorted({layer_index(p) for p in masks if layer_index(p) is not None})
    projections = sorted({projection_name(p) for p in masks})
    kept = torch.zeros(len(layers), len(projections), dtype=torch.float64)
    total = torch.zeros_like(kept)
    for path, mask in masks.items():
        if layer_index(path) is None:
            continue
        i, j = layers.index(layer_index(path)), projections.index(projection_name(path))
        kept[i, j] += int(mask.sum())
        total[i, j] += mask.numel()
    return layers, projections, 1.0 - kept / total.clamp(min=1)


def mask_overlap(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, float]:
    """Overlap of two mask sets over the same modules.

    Returns:
        ``intersection``: |Ma ∧ Mb| / n (about (1-s)^2 for independent masks), ``jaccard``:
        |Ma ∧ Mb| / |Ma ∨ Mb|, and ``of_a``: |Ma ∧ Mb| / |Ma|.
    """
    if set(a) != set(b):
        raise ValueError(f"mask sets cover different modules: {sorted(set(a) ^ set(b))[:5]}")
    inter = union = kept_a = n = 0
    for path in a:
        if a[path].shape != b[path].shape:
            raise ValueError(f"mask shapes differ at {path!r}: {a[path].shape} vs {b[path].shape}")
        inter += int((a[path] & b[path]).sum())
        union += int((a[path] | b[path]).sum())
        kept_a += int(a[path].sum())
        n += a[path].numel()
    return {
        "intersection": inter / max(1, n),
        "jaccard": inter / max(1, union),
        "of_a": inter / max(1, kept_a),
    }
