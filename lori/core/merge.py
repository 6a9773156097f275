"""Merging T adapters (paper Sec. 2.3, eq. 5-8) and the LoRA merging baselines.

LoRI, in factor space (the result is again an adapter, so it can be saved, reloaded and merged):
    concat:  ΔW = Σ_t w_t s_t B_t A_t = [w_1 s_1 B_1, ..., w_T s_T B_T] [A_1; ...; A_T]   (eq. 6)
             -> one adapter of rank Σ r_t with scale 1.
    linear:  ΔW = s (Σ_t w_t B_t)(Σ_t w_t A_t)    (eq. 7; cross terms B_s A_t; equal r and scale)

LoRA baselines, in ΔW space (``merge_deltas``; the result is one dense ΔW per module):
    concat / linear:  Σ_t w_t ΔW_t   (the same in ΔW space)
    magnitude:        Σ_t w_t prune(ΔW_t, density)            keep the top-|.| ``density`` fraction
    ties:             trim each to ``density``, elect the sign of Σ_t w_t ΔW_t, average the agreeing
                      entries (Yadav et al. 2023)
    dare:             drop each entry with probability 1 - density, rescale by 1 / density, Σ_t w_t
and in factor space as PEFT's add_weighted_adapter does (``merge_factors``: the same operator on
the stacked A_t and on the stacked s_t B_t with weights sqrt(w_t)); cheaper to store, different maths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lori.core.adapter import Adapter, AdapterMismatchError
from lori.core.config import LoRIConfig
from lori.core.finite import NonFiniteError, describe_non_finite

LORA_METHODS = ("concat", "linear", "magnitude", "ties", "dare")


def check_mergeable(adapters: Sequence[Adapter], weights: Sequence[float], same_rank: bool) -> None:
    """Refuse adapters that cannot be merged: count, modules, shapes, base model, rank."""
    if len(adapters) < 1:
        raise AdapterMismatchError("nothing to merge: no adapters given")
    if len(weights) != len(adapters):
        raise AdapterMismatchError(f"{len(weights)} weights given for {len(adapters)} adapters")
    first = adapters[0]
    for i, other in enumerate(adapters[1:], start=1):
        if set(other.A) != set(first.A):
            diff = sorted(set(other.A) ^ set(first.A))[:3]
            raise AdapterMismatchError(f"adapter {i} adapts other modules than adapter 0 (e.g. {diff})")
        for path, shape in first.shapes.items():
            if other.shapes[path] != shape:
                raise AdapterMismatchError(
                    f"adapter {i} has {path} of shape {other.shapes[path]}, adapter 0 {shape}: different base models"
                )
        fps = {first.base_fingerprint, other.base_fingerprint} - {None, "meta"}
        if len(fps) > 1:
            raise AdapterMismatchError(f"adapter {i} comes from another base model than adapter 0 ({fps})")
        if same_rank and other.rank != first.rank:
            raise AdapterMismatchError(f"adapter {i} has rank {other.rank}, adapter 0 rank {first.rank}")
        if same_rank and other.config.scale != first.config.scale:
            raise AdapterMismatchError(
                f"adapter {i} has scale {other.config.scale}, adapter 0 {first.config.scale}"
            )


def _merged_config(first: Adapter, r: int, alpha: float) -> LoRIConfig:
    cfg = first.config.to_dict() | {"r": r, "alpha": alpha, "sparsity": 0.0, "seed": -1}
    return LoRIConfig.from_dict(cfg)


def merge_concat(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """Concatenated merge (eq. 6) as one adapter of rank Σ r_t and scale 1."""
    check_mergeable(adapters, weights, same_rank=False)
    A, B = {}, {}
    for path in adapters[0].A:
        A[path] = torch.cat([a.A[path].float() for a in adapters], dim=0)
        B[path] = torch.cat([w * a.config.scale * a.B[path].float() for a, w in zip(adapters, weights)], dim=1)
    r = sum(a.rank for a in adapters)
    first = adapters[0]
    meta = {"merge": {"method": "concat", "weights": list(weights)}}
    return Adapter(_merged_config(first, r, float(r)), A, B, None, first.base_model, first.base_fingerprint, meta)


def merge_linear(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """Linear merge (eq. 7): (Σ w_t B_t)(Σ w_t A_t); equal rank and scale required."""
    check_mergeable(adapters, weights, same_rank=True)
    A = {p: sum(w * a.A[p].float() for a, w in zip(adapters, weights)) for p in adapters[0].A}
    B = {p: sum(w * a.B[p].float() for a, w in zip(adapters, weights)) for p in adapters[0].A}
    first = adapters[0]
    meta = {"merge": {"method": "linear", "weights": list(weights)}}
    cfg = _merged_config(first, first.rank, first.config.alpha)
    return Adapter(cfg, A, B, None, first.base_model, first.base_fingerprint, meta)


def magnitude_prune(t: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of entries of largest magnitude, zero the rest."""
    k = max(1, round(density * t.numel()))
    if k >= t.numel():
        return t.clone()
    threshold = t.abs().reshape(-1).kthvalue(t.numel() - k + 1).values
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


def dare_drop(t: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Drop each entry with probability 1 - density and rescale the rest by 1 / density."""
    keep = torch.rand(t.shape, generator=generator) < density
    return torch.where(keep, t / density, torch.zeros_like(t))


def ties_combine(tensors: Sequence[Tensor], weights: Sequence[float], density: float) -> Tensor:
    """TIES: trim each to ``density``, elect the sign by weighted sum, mean of agreeing entries."""
    stacked = torch.stack([w * magnitude_prune(t, density) for t, w in zip(tensors, weights)])
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    total = (stacked * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


def combine(
    tensors: Sequence[Tensor], weights: Sequence[float], method: str, density: float, generator: torch.Generator
) -> Tensor:
    """One LoRA-baseline merge operator on same-shaped tensors."""
    if method in ("concat", "linear"):
        return sum(w * t for t, w in zip(tensors, weights))
    if method == "magnitude":
        return sum(w * magnitude_prune(t, density) for t, w in zip(tensors, weights))
    if method == "dare":
        return sum(w * dare_drop(t, density, generator) for t, w in zip(tensors, weights))
    if method == "ties":
        return ties_combine(tensors, weights, density)
    raise ValueError(f"unknown merge method {method!r}; choose one of {list(LORA_METHODS)}")


def _check_density(method: str, density: float) -> None:
    if method in ("magnitude", "ties", "dare") and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1] for {method}, got density={density!r}")


def merge_deltas(
    adapters: Sequence[Adapter], weights: Sequence[float], method: str, density: float = 1.0, seed: int = 0
) -> dict[str, Tensor]:
    """A LoRA-baseline merge in ΔW space: one fp32 ΔW (d_out x d_in) per module."""
    _check_density(method, density)
    check_mergeable(adapters, weights, same_rank=False)
    generator = torch.Generator().manual_seed(seed)
    return {
        p: combine([a.delta(p) for a in adapters], weights, method, density, generator) for p in adapters[0].A
    }


def merge_factors(
    adapters: Sequence[Adapter], weights: Sequence[float], method: str, density: float = 1.0, seed: int = 0
) -> Adapter:
    """A LoRA-baseline merge in factor space, as PEFT does: operator on A_t and on s_t B_t."""
    _check_density(method, density)
    if method == "concat":
        return merge_concat(adapters, weights)
    check_mergeable(adapters, weights, same_rank=True)
    roots = [math.copysign(math.sqrt(abs(w)), w) for w in weights]
    generator = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for p in adapters[0].A:
        A[p] = combine([a.A[p].float() for a in adapters], roots, method, density, generator)
        B[p] = combine([a.config.scale * a.B[p].float() for a in adapters], roots, method, density, generator)
    first = adapters[0]
    meta = {"merge": {"method": method, "space": "factors", "weights": list(weights), "density": density}}
    cfg = _merged_config(first, first.rank, float(first.rank))
    return Adapter(cfg, A, B, None, first.base_model, first.base_fingerprint, meta)


class DeltaMerge:
    """ΔW tensors added into a model's base weights, reversibly; ``merge`` twice is a no-op."""

    def __init__(self, model: nn.Module, deltas: dict[str, Tensor]) -> None:
        self.model, self.deltas, self.merged = model, deltas, False
        for path, delta in deltas.items():
            weight = self._weight(path)
            if tuple(weight.shape) != tuple(delta.shape):
                raise AdapterMismatchError(f"{path}: ΔW {tuple(delta.shape)} vs weight {tuple(weight.shape)}")

    def _weight(self, path: str) -> Tensor:
        module = self.model.get_submodule(path)
        return module.weight

    @torch.no_grad()
    def check_finite(self) -> None:
        """Refuse (NonFiniteError) a ΔW, or a W0 + ΔW, holding NaN or inf, before any weight changes."""
        for path, delta in self.deltas.items():
            weight = self._weight(path)
            merged = (weight.float() + delta.to(weight.device)).to(weight.dtype)
            found = describe_non_finite(f"ΔW of {path}", delta) or describe_non_finite(
                f"W0 + ΔW of {path} ({weight.dtype})", merged
            )
            if found is not None:
                raise NonFiniteError(f"refusing to merge: {found}; no base weight was changed")

    @torch.no_grad()
    def _apply(self, sign: float) -> None:
        for path, delta in self.deltas.items():
            weight = self._weight(path)
            weight.copy_((weight.float() + sign * delta.to(weight.device)).to(weight.dtype))

    def merge(self) -> DeltaMerge:
        """Add every ΔW into its weight; all or nothing (``check_finite`` runs first)."""
        if not self.merged:
            self.check_finite()
            self._apply(+1.0)
            self.merged = True
        return self

    def unmerge(self) -> DeltaMerge:
        if self.merged:
            self._apply(-1.0)
            self.merged = False
        return self

