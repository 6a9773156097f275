"""``model.baseline``: the options of the methods that have more than LoRIConfig's, their defaults and ranges.

A method's registry entry (``lori.training.baselines.methods``) names the options it reads; this file
says what each option is (a ``BaselineOptions`` field, the YAML type), its default (``DEFAULTS``: some
follow ``model.lori``) and its allowed range (``RULES``). A new option is a field here, a default, a
rule, and its name in the entry of the method that reads it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from lori.core import LoRIConfig, LoRIConfigError

LORI_ONLY: tuple[str, ...] = ("sparsity", "granularity")  # model.lori fields only a sparsifying method may set


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


DEFAULTS: dict[str, Callable[[LoRIConfig], Any]] = {  # option -> its default, from model.lori
    "loraplus_lr_ratio": lambda lori: 16.0,
    "d_initial": lambda lori: 0.1,
    "projection_prng_key": lambda lori: lori.seed,
    "feedforward_modules": lambda lori: [m for m in ("down_proj",) if m in lori.target_modules],
    "target_r": lambda lori: max(1, round(lori.r / 1.5)),
    "tinit": lambda lori: 0,
    "tfinal": lambda lori: 0,
    "delta_t": lambda lori: 1,
    "beta1": lambda lori: 0.85,
    "beta2": lambda lori: 0.85,
    "orth_reg_weight": lambda lori: 0.5,
    "pissa_niter": lambda lori: None,
}


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


def check_range(name: str, value: Any, lori: LoRIConfig) -> None:
    """Refuse an option value outside its range (``RULES``; two depend on ``model.lori``)."""
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


def resolve(names: tuple[str, ...], lori: LoRIConfig, options: BaselineOptions) -> dict[str, Any]:
    """The options ``names`` with their defaults filled in (what the run uses and records)."""
    given = options.given()
    return {k: given[k] if k in given else DEFAULTS[k](lori) for k in names}
