"""The PEFT baselines: one PEFT config builder per method (a registry entry's ``peft_config``), injected
into the model in place by ``attach_peft``.

    method    PEFT config                                 trainable
    lora      LoraConfig                                  A, B
    dora      LoraConfig(use_dora=True)                   A, B, magnitude m
    rslora    LoraConfig(use_rslora=True): alpha/sqrt(r)  A, B
    pissa     LoraConfig(init_lora_weights="pissa")       A, B (from the top-r SVD of W0)
    loraplus  LoraConfig + PEFT's LoRA+ optimizer         A, B (B at lr x loraplus_lr_ratio)
    lora_fa   LoraConfig, A frozen + PEFT's LoRA-FA opt.  B (gradient projected, see optimizers)
    adalora   AdaLoraConfig(init_r=r): W0 + P diag(E) Q   P, E, Q (ranks pruned, see adalora)
    vera      VeraConfig: W0 + diag(b) B_s diag(d) A_s    lambda_b (d_out), lambda_d (r)
    ia3       IA3Config: W0 (l ⊙ x) or l ⊙ (W0 x)         l (d_in for feed-forward modules, else d_out)

The model is wrapped by PEFT's ``PeftModel`` (the tuner object that AdaLoRA's RankAllocator,
VeRA's shared projections and PEFT's saving need); the wrapper is kept beside the model as
``model.lori_peft`` (a ``PeftHandle``, not a submodule: the state dict keeps the model's own
names). The model itself stays the module that trains, saves and is checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lori.core import LoRIConfig

HANDLE = "lori_peft"
ADALORA_PLACEHOLDER_STEPS = 1  # AdaLoRA's total_step is set from the Trainer at fit start


@dataclass
class PeftHandle:
    """PEFT's wrapper around an adapted model, kept beside it.

    Args:
        wrapper: the ``peft.PeftModel`` whose ``base_model.model`` is the adapted model.
        method: the lori method name.
        initial: PiSSA only: the initial A0 and B0 by PEFT state-dict key (CPU), so that the saved
            adapter can be converted to a plain LoRA on the original base (see saving).
    """

    wrapper: Any
    method: str
    initial: dict[str, Tensor] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        """The live PEFT config of the adapter (AdaLoRA's rank pattern is written into it)."""
        return self.wrapper.peft_config["default"]


def peft_handle(model: nn.Module) -> PeftHandle:
    """The PEFT wrapper kept beside a model adapted by ``attach_peft``."""
    handle = model.__dict__.get(HANDLE)
    if handle is None:
        raise ValueError(f"{type(model).__name__} carries no PEFT adapter (attach a PEFT method first)")
    return handle


def _common(lori: LoRIConfig) -> dict[str, Any]:
    return {"target_modules": list(lori.target_modules), "task_type": "CAUSAL_LM"}


def lora_config(lori: LoRIConfig, opts: dict[str, Any], **flags: Any) -> Any:
    """PEFT ``LoraConfig`` with LoRI's r / alpha / dropout / targets; ``flags`` (``use_dora``,
    ``use_rslora``, ``init_lora_weights``) make DoRA, rsLoRA, PiSSA."""
    from peft import LoraConfig

    return LoraConfig(r=lori.r, lora_alpha=lori.alpha, lora_dropout=lori.dropout, bias="none",
                      **{"init_lora_weights": True, **flags}, **_common(lori))


def pissa_config(lori: LoRIConfig, opts: dict[str, Any]) -> Any:
    """LoRA initialised from the top-r SVD of W0 (exact, or ``pissa_niter`` randomized iterations)."""
    init = "pissa" if opts["pissa_niter"] is None else f"pissa_niter_{opts['pissa_niter']}"
    return lora_config(lori, opts, init_lora_weights=init)


def vera_config(lori: LoRIConfig, opts: dict[str, Any]) -> Any:
    """PEFT ``VeraConfig``: shared frozen projections from ``projection_prng_key``, saved with the adapter."""
    from peft import VeraConfig

    return VeraConfig(r=lori.r, projection_prng_key=opts["projection_prng_key"], save_projection=True,
                      vera_dropout=lori.dropout, d_initial=opts["d_initial"], bias="none", **_common(lori))


def ia3_config(lori: LoRIConfig, opts: dict[str, Any]) -> Any:
    """PEFT ``IA3Config`` (targets only; ``feedforward_modules`` scale their input)."""
    from peft import IA3Config

    return IA3Config(feedforward_modules=opts["feedforward_modules"], **_common(lori))


def adalora_config(lori: LoRIConfig, opts: dict[str, Any]) -> Any:
    """PEFT ``AdaLoraConfig`` with ``init_r = r``; ``total_step`` is set from the Trainer at fit start."""
    from peft import AdaLoraConfig

    return AdaLoraConfig(
        init_r=lori.r, target_r=opts["target_r"], lora_alpha=lori.alpha, lora_dropout=lori.dropout,
        tinit=opts["tinit"], tfinal=opts["tfinal"], deltaT=opts["delta_t"],
        beta1=opts["beta1"], beta2=opts["beta2"], orth_reg_weight=opts["orth_reg_weight"],
        total_step=opts["tinit"] + opts["tfinal"] + ADALORA_PLACEHOLDER_STEPS, bias="none", **_common(lori),
    )


def attach_peft(
    model: nn.Module, lori: LoRIConfig, opts: dict[str, Any], shapes_only: bool = False, *,
    name: str, build: Callable[[LoRIConfig, dict[str, Any]], Any], freeze_a: bool = False,
    keep_initial: bool = False,
) -> LoRIConfig:
    """Inject the PEFT adapter ``build(lori, opts)`` into ``model`` in place and keep PEFT's wrapper beside it.

    A registry entry's ``attach`` (``functools.partial`` over ``name``, ``build`` and the flags).
    Random initial values (LoRA's Kaiming A, AdaLoRA's P and Q, PiSSA's randomized SVD) come from
    ``lori.seed``, never from the global generator's state.

    Args:
        model: the base model; every parameter but the adapter's is frozen.
        lori: r, alpha, dropout, targets and seed.
        opts: the method's resolved ``model.baseline`` options.
        shapes_only: build the adapter on the meta device (sizes, no values; an initialisation from
            W0's values, PiSSA's SVD, is replaced by LoRA's: the same shapes), for dry runs.
        name: the method's name (kept on the handle).
        build: ``(lori, opts) -> PEFT config``.
        freeze_a: A stays at its seeded init (LoRA-FA).
        keep_initial: keep the initial A0, B0 (PiSSA: the saved adapter is converted with them).

    Returns:
        ``lori`` unchanged.
    """
    from peft import PeftModel

    config = build(lori, opts)
    if shapes_only and isinstance(getattr(config, "init_lora_weights", True), str):
        config.init_lora_weights = True  # the same tensors; an SVD needs values
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lori.seed)
        if shapes_only:
            with torch.device("meta"):
                wrapper = PeftModel(model, config, autocast_adapter_dtype=True)  # a 16-bit base keeps an fp32 adapter
        else:
            wrapper = PeftModel(model, config, autocast_adapter_dtype=True)  # a 16-bit base keeps an fp32 adapter
    handle = PeftHandle(wrapper, name)
    if freeze_a:  # A stays at its seeded init (LoRA-FA: frozen A)
        for param_name, param in model.named_parameters():
            if ".lora_A." in param_name:
                param.requires_grad_(False)
    if keep_initial and not shapes_only:
        handle.initial = initial_factors(wrapper)
    model.__dict__[HANDLE] = handle  # beside the model, not a submodule (no duplicate state-dict names)
    return lori


def initial_factors(wrapper: Any) -> dict[str, Tensor]:
    """A0 and B0 as PEFT saves them (``base_model.model.<path>.lora_A.weight``), on the CPU."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(wrapper, save_embedding_layers=False)
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
