"""The methods ``model.method`` names, what each reads, and its options (``model.baseline``).

Every method reads its rank, alpha, dropout, targets and seed from ``model.lori`` (LoRIConfig), so
two configs differ only in ``method`` (and, for the methods that have them, ``model.baseline``).
An option that does not apply to the method is refused before anything loads:

* a ``model.baseline`` key the method has no use for (``target_r`` for LoRA);
* a LoRI-only field (``sparsity``, ``granularity``) other than LoRIConfig's default, for any method
  but ``lori`` (every shipped config carries the defaults, which stay accepted; ``sparsity: 0`` is
  accepted too: no method other than LoRI sparsifies).

The ``model.lori`` fields a method has no use for are not checked, since the embedded configs
share one ``model.lori`` block across methods: IA3 reads only ``target_modules`` (no rank, alpha or
dropout), VeRA has no ``alpha``, full fine-tuning reads none; every other method reads r, alpha,
dropout, target_modules and seed (AdaLoRA: r is the initial rank; PiSSA: the seed only matters for
the randomized SVD).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn

from lori.core import InjectionError, LoRIConfig, LoRIConfigError

LORI_METHODS: tuple[str, ...] = ("lori", "lora_frozen_a")
PEFT_METHODS: tuple[str, ...] = (
    "lora", "dora", "lora_fa", "vera", "ia3", "adalora", "rslora", "pissa", "loraplus",
)
METHODS: tuple[str, ...] = (*LORI_METHODS, *PEFT_METHODS, "full")

LORI_ONLY: tuple[str, ...] = ("sparsity", "granularity")


class BaselineOptionsError(LoRIConfigError):
    """A ``model.baseline`` option out of range or for another method."""


@dataclass
class BaselineOptions:
    """Options of the baselines that have more than LoRIConfig's (None: the method's default).

    PEFT's names, so PEFT's documentation applies (``delta_t`` is PEFT's ``deltaT``).

    Args:
        loraplus_lr_ratio: ``loraplus``: learning rate of B over that of A (default 16, the LoRA+
            paper's recommendation for LLMs; PEFT's ``create_loraplus_optimizer``).
        d_initial: ``vera``: initial value of every lambda_d entry (default 0.1, PEFT's).
        projection_prng_key: ``vera``: seed of the shared frozen projections (default
            ``model.lori.seed``); they are saved with the adapter as well.
        feedforward_modules: ``ia3``: targets whose input (not output) is scaled (default
            ``[down_proj]`` when targeted, PEFT's choice for Llama); each must be a target.
        target_r: ``adalora``: average rank after pruning (default round(r / 1.5): the AdaLoRA
            paper's initial budget of 1.5x the final one); ``model.lori.r`` is the initial rank.
        tinit: ``adalora``: steps at the initial budget before pruning starts (default 0).
        tfinal: ``adalora``: steps at the final budget at the end of the fit (default 0).
        delta_t: ``adalora``: steps between two budget reallocations (default 1).
        beta1: ``adalora``: EMA factor of the sensitivity (default 0.85).
        beta2: ``adalora``: EMA factor of the uncertainty (default 0.85).
        orth_reg_weight: ``adalora``: weight of the orthogonality penalty on P and Q (default 0.5).
        pissa_niter: ``pissa``: subspace iterations of a fast randomized SVD (default None: the
            exact SVD, PEFT's ``init_lora_weights="pissa"``).
    """

    loraplus_lr_ratio: float | None = None
    d_initial: float | None = None
    projection_prng_key: int | None = None
    feedforward_modules: list[str] | None = None
    target_r: int | None = None
    tinit: int | None = None
    tfinal: int | None = None
    delta_t: int | None = None
    beta1: float | None = None
    beta2: float | None = None
    orth_reg_weight: float | None = None
    pissa_niter: int | None = None

    @classmethod
    def from_value(cls, value: Any) -> BaselineOptions:
        """From a BaselineOptions, a dict (a parsed YAML section) or None; unknown keys are refused."""
        if value is None or isinstance(value, cls):
            return value or cls()
        data = dict(value)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise BaselineOptionsError(f"unknown model.baseline keys {unknown}; known keys are {sorted(cls.names())}")
        return cls(**data)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def given(self) -> dict[str, Any]:
        """The options set (not None)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


OPTIONS: dict[str, tuple[str, ...]] = {  # the model.baseline keys each method reads
    "loraplus": ("loraplus_lr_ratio",),
    "vera": ("d_initial", "projection_prng_key"),
    "ia3": ("feedforward_modules",),
    "adalora": ("target_r", "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg_weight"),
    "pissa": ("pissa_niter",),
}


def check_method(method: str) -> None:
    """Refuse an unknown method by name."""
    if method not in METHODS:
        raise InjectionError(f"unknown method {method!r}; choose one of {list(METHODS)}")


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
        InjectionError: unknown method.
        BaselineOptionsError: the first option that does not apply or is out of range, named.
    """
    check_method(method)
    default = LoRIConfig()
    if method != "lori":
        for name in LORI_ONLY:
            value = getattr(lori, name)
            if value != getattr(default, name) and not (name == "sparsity" and value == 0.0):
                raise BaselineOptionsError(
                    f"model.lori.{name}={value!r} does not apply to method {method!r} (only LoRI "
                    f"sparsifies B); leave it at {getattr(default, name)!r} or drop it"
                )
    for name in options.given():
        if name not in OPTIONS.get(method, ()):
            users = [m for m, keys in OPTIONS.items() if name in keys]
            raise BaselineOptionsError(
                f"model.baseline.{name} is an option of {users}, not of method {method!r} "
                f"(its options: {list(OPTIONS.get(method, ())) or 'none'})"
            )
    for name, value in options.given().items():
        _check_range(name, value, lori)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _count(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


RULES: dict[str, tuple[Any, str]] = {  # option -> (is the value allowed?, what it must be)
    "loraplus_lr_ratio": (lambda v: _number(v) and v > 0, "> 0"),
    "d_initial": (_number, "a finite number"),
    "projection_prng_key": (lambda v: _count(v, -(2**63)), "an int"),
    "target_r": (lambda v: _count(v, 1), "a positive int"),
    "tinit": (lambda v: _count(v, 0), "an int >= 0"),
    "tfinal": (lambda v: _count(v, 0), "an int >= 0"),
    "delta_t": (lambda v: _count(v, 1), "a positive int"),
    "beta1": (lambda v: _number(v) and 0 < v < 1, "in (0, 1)"),
    "beta2": (lambda v: _number(v) and 0 < v < 1, "in (0, 1)"),
    "orth_reg_weight": (lambda v: _number(v) and v >= 0, ">= 0"),
    "pissa_niter": (lambda v: _count(v, 1), "a positive int"),
}


def _check_range(name: str, value: Any, lori: LoRIConfig) -> None:
    if name == "feedforward_modules":
        if not value or not set(value) <= set(lori.target_modules):
            raise BaselineOptionsError(
                f"model.baseline.feedforward_modules must be a non-empty subset of target_modules "
                f"{list(lori.target_modules)}, got {value!r}"
            )
        return
    allowed, rule = RULES[name]
    if not allowed(value):
        raise BaselineOptionsError(f"model.baseline.{name} must be {rule}, got {value!r}")
    if name == "target_r" and value > lori.r:
        raise BaselineOptionsError(f"model.baseline.target_r={value} exceeds the initial rank model.lori.r={lori.r}")


def resolved_options(method: str, lori: LoRIConfig, options: BaselineOptions) -> dict[str, Any]:
    """Every option of ``method`` with its default filled in (what the run uses and records)."""
    defaults: dict[str, Any] = {
        "loraplus_lr_ratio": 16.0,
        "d_initial": 0.1,
        "projection_prng_key": lori.seed,
        "feedforward_modules": [m for m in ("down_proj",) if m in lori.target_modules],
        "target_r": max(1, round(lori.r / 1.5)),
        "tinit": 0, "tfinal": 0, "delta_t": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5,
        "pissa_niter": None,
    }
    given = options.given()
    return {k: given.get(k, defaults[k]) for k in OPTIONS.get(method, ())}
