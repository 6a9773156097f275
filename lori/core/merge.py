"""Merging T adapters (paper Sec. 2.3, eq. 5-8) and the LoRA merging baselines.

Notation: s_t = alpha_t / r_t, w_t the merge weights, a_t = sign(w_t s_t) sqrt(|w_t s_t|) and
b_t = sqrt(|w_t s_t|). Factor-space merges return an Adapter, exactly as PEFT's
``PeftModel.add_weighted_adapter(adapters, weights, name, combination_type, density)`` builds its
new adapter (the official LoRI code merges with it; PEFT's combination type in brackets):

    concat [cat]:      A = [w_1 s_1 A_1; ...; w_T s_T A_T]   (Σr x d_in)    B = [B_1, ..., B_T]  (d_out x Σr)
                       ΔW = Σ_t w_t s_t B_t A_t   (eq. 5-6; any ranks)          rank Σ r_t, scale 1
    linear [linear]:   A = Σ_t a_t A_t,  B = Σ_t b_t B_t,  ΔW = B A  (cross terms B_s A_t)  rank r, scale 1
    magnitude [magnitude_prune], ties [ties], dare [dare_linear], dare_ties [dare_ties]:
                       the operator below on {A_t} with weights a_t and on {B_t} with weights b_t
    linear_eq8:        ΔW = s (Σ_t w_t B_t)(Σ_t w_t A_t)   (the paper's eq. 8 as printed; equal r and s)

The operators on same-shaped tensors X_t with weights c_t (``combine``; as peft.utils.merge_utils):

    sum        Σ_t c_t X_t
    magnitude  Σ_t c_t top(X_t)              top: keep the k = int(density · numel) largest |.|
    ties       X'_t = top(X_t), γ = sign(Σ_t X'_t) (+1 where the sum is 0), then per entry the mean
               of c_t X'_t over the t with sign(X'_t) = γ   (majority_sign_method "total"; "frequency"
               elects by Σ_t sign(X'_t))
    dare       Σ_t c_t drop(X_t)             drop: X ⊙ Bernoulli(density), / density if ``rescale``
    dare_ties  ties with drop instead of top
    density >= 1 leaves a tensor as it is (and draws nothing).

``merge_deltas`` applies the same operators to each ΔW_t = s_t B_t A_t with weights w_t (the
result is one dense ΔW per module, not an adapter).

DARE's drops are ``torch.bernoulli(full_like(X, density), generator)`` tensor by tensor in PEFT's
order: module by module in the base model's order (``order``), inside a module A_1..A_T, then
B_1..B_T. ``seed=None`` draws from torch's default generator, as PEFT does; ``seed=s`` draws from
a fresh generator seeded s: the same drops as PEFT's when torch's default generator is at
``torch.manual_seed(s)`` at PEFT's first drop. PEFT 0.12.0, the version the official code pins,
does not rescale (its ``random_pruning`` computes ``torch.div(pruned, density)`` and discards the
result); later PEFT releases divide: ``rescale=False`` is 0.12.0's DARE, ``rescale=True`` DARE's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from lori.core.adapter import Adapter, AdapterMismatchError
from lori.core.config import LoRIConfig
from lori.core.finite import NonFiniteError, describe_non_finite
from lori.core.layer import check_float_weight

METHODS = ("concat", "linear", "linear_eq8", "magnitude", "ties", "dare", "dare_ties")
PRUNING = ("magnitude", "ties", "dare", "dare_ties")  # the methods that take a density
ALIASES = {"cat": "concat", "magnitude_prune": "magnitude", "dare_linear": "dare"}  # PEFT's names
PEFT_TYPES = {"concat": "cat", "linear": "linear", "magnitude": "magnitude_prune", "ties": "ties",
              "dare": "dare_linear", "dare_ties": "dare_ties"}  # lori name -> PEFT combination_type
SIGN_METHODS = ("total", "frequency")


def canonical_method(name: str) -> str:
    """lori's name of a merge method, PEFT's combination-type names accepted (``cat`` -> ``concat``)."""
    method = ALIASES.get(name, name)
    if method not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; choose one of {list(METHODS) + list(ALIASES)}")
    return method


def check_mergeable(
    adapters: Sequence[Adapter], weights: Sequence[float], same_rank: bool, same_scale: bool = False
) -> None:
    """Refuse adapters that cannot be merged: count, modules, shapes, base model, rank, scale."""
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
        if same_scale and other.config.scale != first.config.scale:
            raise AdapterMismatchError(
                f"adapter {i} has scale {other.config.scale} (alpha / r), adapter 0 scale {first.config.scale}"
            )


def module_order(adapters: Sequence[Adapter], order: Sequence[str] | None) -> list[str]:
    """The adapted module paths in ``order`` (e.g. the base model's ``named_modules`` paths; other
    paths are skipped); None = the first adapter's order."""
    paths = list(adapters[0].A)
    if order is None:
        return paths
    known = set(paths)
    ordered = [p for p in dict.fromkeys(order) if p in known]
    if len(ordered) != len(paths):
        missing = sorted(known - set(ordered))[:3]
        raise AdapterMismatchError(f"the module order misses adapted modules, e.g. {missing}")
    return ordered


def _merged_config(first: Adapter, r: int, alpha: float) -> LoRIConfig:
    cfg = first.config.to_dict() | {"r": r, "alpha": alpha, "sparsity": 0.0, "seed": -1}
    return LoRIConfig.from_dict(cfg)


def _merged(first: Adapter, A: dict, B: dict, alpha: float, meta: dict) -> Adapter:
    r = next(iter(A.values())).shape[0]
    return Adapter(_merged_config(first, r, alpha), A, B, None, first.base_model, first.base_fingerprint,
                   {"merge": meta})


def merge_concat(adapters: Sequence[Adapter], weights: Sequence[float], order: Sequence[str] | None = None) -> Adapter:
    """Concatenated merge (eq. 5-6) as PEFT's ``cat``: rank Σ r_t, scale 1, w_t s_t folded into A."""
    check_mergeable(adapters, weights, same_rank=False)
    A, B = {}, {}
    for path in module_order(adapters, order):
        A[path] = torch.cat([a.A[path].float() * w * a.config.scale for a, w in zip(adapters, weights)], dim=0)
        B[path] = torch.cat([a.B[path].float() for a in adapters], dim=1)
    r = sum(a.rank for a in adapters)
    return _merged(adapters[0], A, B, float(r), {"method": "concat", "weights": list(weights)})


def merge_linear(adapters: Sequence[Adapter], weights: Sequence[float], order: Sequence[str] | None = None) -> Adapter:
    """Linear merge as PEFT's (and the official code's) ``linear``: (Σ b_t B_t)(Σ a_t A_t), scale 1."""
    return merge_factors(adapters, weights, "linear", order=order)


def merge_linear_eq8(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """The paper's eq. 8 as printed: s (Σ w_t B_t)(Σ w_t A_t); equal rank and scale required."""
    check_mergeable(adapters, weights, same_rank=True, same_scale=True)
    A = {p: sum(w * a.A[p].float() for a, w in zip(adapters, weights)) for p in adapters[0].A}
    B = {p: sum(w * a.B[p].float() for a, w in zip(adapters, weights)) for p in adapters[0].A}
    first = adapters[0]
    return _merged(first, A, B, first.config.alpha, {"method": "linear_eq8", "weights": list(weights)})


# ---- the operators (PEFT's definitions) --------------------------------------------------------
def magnitude_prune(t: Tensor, density: float) -> Tensor:
    """Keep the k = int(density · numel) entries of largest magnitude (exactly k), zero the rest."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
    return t * keep.view_as(t)


def random_prune(t: Tensor, density: float, generator: torch.Generator | None, rescale: bool = True) -> Tensor:
    """DARE's drop: keep each entry with probability ``density`` (one Bernoulli draw per entry),
    then divide by ``density`` if ``rescale``; ``generator`` None = torch's default generator."""
    if density >= 1:
        return t
    kept = t * torch.bernoulli(torch.full_like(t, density), generator=generator)
    return kept / density if rescale else kept


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    """(T, ...) bool: sign(X_t) equals the elected sign (of Σ_t X_t, or of Σ_t sign(X_t))."""
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {list(SIGN_METHODS)}, got {method!r}")
    sign = stacked.sign()
    votes = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == torch.where(votes >= 0, 1.0, -1.0).to(sign.dtype)


def _weighted(stacked: Tensor, weights: Sequence[float]) -> Tensor:
    c = torch.tensor(list(weights), dtype=torch.float32, device=stacked.device).to(stacked.dtype)
    return stacked * c.view((-1,) + (1,) * (stacked.dim() - 1))


def _disjoint_mean(stacked: Tensor, weights: Sequence[float], sign_method: str) -> Tensor:
    agree = majority_sign_mask(stacked, sign_method)
    return (_weighted(stacked, weights) * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def combine(
    tensors: Sequence[Tensor], weights: Sequence[float], method: str, density: float = 1.0,
    generator: torch.Generator | None = None, rescale: bool = True, majority_sign_method: str = "total",
) -> Tensor:
    """One merge operator (module docstring) on same-shaped tensors.

    Args:
        tensors: X_1..X_T, all of one shape.
        weights: c_1..c_T.
        method: ``concat`` / ``linear`` (weighted sum), ``magnitude``, ``ties``, ``dare``,
            ``dare_ties`` (PEFT's names accepted).
        density: kept fraction for the pruning methods.
        generator: DARE's random source (None = torch's default generator).
        rescale: DARE divides the kept entries by ``density`` (False = PEFT 0.12.0).
        majority_sign_method: TIES's sign election, ``total`` (PEFT's default) or ``frequency``.
    """
    method = canonical_method(method)
    if method in ("concat", "linear"):
        trimmed = list(tensors)
    elif method in ("magnitude", "ties"):
        trimmed = [magnitude_prune(t, density) for t in tensors]
    elif method in ("dare", "dare_ties"):
        trimmed = [random_prune(t, density, generator, rescale) for t in tensors]
    else:
        raise ValueError(f"{method!r} is not an operator on tensors; choose one of {list(PEFT_TYPES)}")
    stacked = torch.stack(trimmed)  # (T, ...)
    if method in ("ties", "dare_ties"):
        return _disjoint_mean(stacked, weights, majority_sign_method)
    return _weighted(stacked, weights).sum(0)


def _check_density(method: str, density: float) -> None:
    if method in PRUNING and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1] for {method}, got density={density!r}")


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def factor_weights(adapters: Sequence[Adapter], weights: Sequence[float]) -> tuple[list[float], list[float]]:
    """PEFT's (a_t, b_t): sign(w_t s_t) sqrt(|w_t s_t|) for A, sqrt(|w_t s_t|) for B."""
    ws = [w * a.config.scale for a, w in zip(adapters, weights)]
    return [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws], [math.sqrt(abs(x)) for x in ws]


def merge_factors(
    adapters: Sequence[Adapter], weights: Sequence[float], method: str, density: float = 1.0,
    seed: int | None = 0, rescale: bool = True, majority_sign_method: str = "total",
    order: Sequence[str] | None = None,
) -> Adapter:
    """A merge in factor space with PEFT ``add_weighted_adapter`` semantics (module docstring).

    Args:
        adapters: the task adapters (equal ranks, except for ``concat``).
        weights: one merge weight per adapter.
        method: ``concat``, ``linear``, ``magnitude``, ``ties``, ``dare``, ``dare_ties`` (or
            PEFT's ``cat``, ``magnitude_prune``, ``dare_linear``).
        density: kept fraction for the pruning methods, in (0, 1].
        seed: DARE's generator seed; None = torch's default generator (PEFT's draws).
        rescale: DARE divides by ``density`` (False = PEFT 0.12.0, the official code's version).
        majority_sign_method: ``total`` (PEFT's default) or ``frequency``.
        order: module paths in the order DARE draws (the base model's ``named_modules`` paths for
            PEFT's order); None = the first adapter's order.

    Returns:
        The merged adapter: rank r (Σ r_t for concat), scale 1.
    """
    method = canonical_method(method)
    _check_density(method, density)
    if method == "concat":
        return merge_concat(adapters, weights, order)
    if method == "linear_eq8":
        return merge_linear_eq8(adapters, weights)
    check_mergeable(adapters, weights, same_rank=True)
    weights_A, weights_B = factor_weights(adapters, weights)
    generator = _generator(seed)
    A, B = {}, {}
    for p in module_order(adapters, order):
        kwargs = {"density": density, "generator": generator, "rescale": rescale,
                  "majority_sign_method": majority_sign_method}
        A[p] = combine([a.A[p].float() for a in adapters], weights_A, method, **kwargs)
        B[p] = combine([a.B[p].float() for a in adapters], weights_B, method, **kwargs)
    meta = {"method": method, "combination_type": PEFT_TYPES[method], "weights": list(weights)}
    if method in PRUNING:
        meta |= {"density": density, "seed": seed}
    if method in ("dare", "dare_ties"):
        meta["rescale"] = rescale
    if method in ("ties", "dare_ties"):
        meta["majority_sign_method"] = majority_sign_method
    return _merged(adapters[0], A, B, float(adapters[0].rank), meta)


def iter_merged_deltas(
    adapters: Sequence[Adapter], weights: Sequence[float], method: str, density: float = 1.0,
    seed: int | None = 0, rescale: bool = True, majority_sign_method: str = "total",
    order: Sequence[str] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """(path, ΔW) module by module: the operator on the ΔW_t = s_t B_t A_t with weights w_t.

    One module's ΔW_t at a time (a full set of dense ΔW is a model's worth of memory); the
    arguments as ``merge_factors``.
    """
    method = canonical_method(method)
    if method == "linear_eq8":
        raise ValueError("linear_eq8 is a factor-space merge; in ΔW space linear and concat are Σ w_t ΔW_t")
    _check_density(method, density)
    check_mergeable(adapters, weights, same_rank=False)
    generator = _generator(seed)
    for p in module_order(adapters, order):
        deltas = [a.delta(p) for a in adapters]
        yield p, combine(deltas, weights, method, density, generator, rescale, majority_sign_method)


def merge_deltas(
    adapters: Sequence[Adapter], weights: Sequence[float], method: str, density: float = 1.0,
    seed: int | None = 0, rescale: bool = True, majority_sign_method: str = "total",
    order: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """A merge in ΔW space: one fp32 ΔW (d_out x d_in) per module (``iter_merged_deltas``)."""
    return dict(iter_merged_deltas(adapters, weights, method, density, seed, rescale, majority_sign_method, order))


class DeltaMerge:
    """ΔW tensors added into a model's base weights, reversibly; ``merge`` twice is a no-op."""

    def __init__(self, model: nn.Module, deltas: dict[str, Tensor]) -> None:
        self.model, self.deltas, self.merged = model, deltas, False
        for path, delta in deltas.items():
            weight = self._weight(path)
            check_float_weight(weight, path)
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
