"""The PEFT baselines: one PEFT config per method, injected into the model in place.

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

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lori.core import LoRIConfig
from lori.training.baselines.methods import BaselineOptions, resolved_options

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


def peft_config(method: str, lori: LoRIConfig, options: BaselineOptions) -> Any:
    """The PEFT config of ``method`` with LoRI's targets and, where the method has them, r / alpha / dropout."""
    from peft import AdaLoraConfig, IA3Config, LoraConfig, VeraConfig

    opts = resolved_options(method, lori, options)
    targets = list(lori.target_modules)
    if method == "vera":
        return VeraConfig(r=lori.r, target_modules=targets, projection_prng_key=opts["projection_prng_key"],
                          save_projection=True, vera_dropout=lori.dropout, d_initial=opts["d_initial"],
                          bias="none", task_type="CAUSAL_LM")
    if method == "ia3":
        return IA3Config(target_modules=targets, feedforward_modules=opts["feedforward_modules"],
                         task_type="CAUSAL_LM")
    if method == "adalora":
        return AdaLoraConfig(
            init_r=lori.r, target_r=opts["target_r"], lora_alpha=lori.alpha, lora_dropout=lori.dropout,
            target_modules=targets, tinit=opts["tinit"], tfinal=opts["tfinal"], deltaT=opts["delta_t"],
            beta1=opts["beta1"], beta2=opts["beta2"], orth_reg_weight=opts["orth_reg_weight"],
            total_step=opts["tinit"] + opts["tfinal"] + ADALORA_PLACEHOLDER_STEPS, bias="none",
            task_type="CAUSAL_LM",
        )
    init: bool | str = True
    if method == "pissa":
        init = "pissa" if opts["pissa_niter"] is None else f"pissa_niter_{opts['pissa_niter']}"
    return LoraConfig(
        r=lori.r, lora_alpha=lori.alpha, lora_dropout=lori.dropout, target_modules=targets,
        use_dora=method == "dora", use_rslora=method == "rslora", init_lora_weights=init,
        bias="none", task_type="CAUSAL_LM",
    )


def attach_peft(
    model: nn.Module, method: str, lori: LoRIConfig, options: BaselineOptions, shapes_only: bool = False
) -> PeftHandle:
    """Inject ``method``'s PEFT adapter into ``model`` in place and keep PEFT's wrapper beside it.

    Random initial values (LoRA's Kaiming A, AdaLoRA's P and Q, PiSSA's randomized SVD) come from
    ``lori.seed``, never from the global generator's state.

    Args:
        model: the base model; every parameter but the adapter's is frozen.
        method: one of ``PEFT_METHODS``.
        lori: r, alpha, dropout, targets and seed.
        options: the method's ``model.baseline`` options.
        shapes_only: build the adapter on the meta device (sizes, no values; PiSSA's SVD is not
            run: its shapes are LoRA's), for dry runs.
    """
    from peft import PeftModel

    config = peft_config(method, lori, options)
    if shapes_only and method == "pissa":
        config.init_lora_weights = True  # the same tensors; the SVD needs values
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lori.seed)
        if shapes_only:
            with torch.device("meta"):
                wrapper = PeftModel(model, config, autocast_adapter_dtype=True)  # a 16-bit base keeps an fp32 adapter
        else:
            wrapper = PeftModel(model, config, autocast_adapter_dtype=True)  # a 16-bit base keeps an fp32 adapter
    handle = PeftHandle(wrapper, method)
    if method == "lora_fa":  # A stays at its seeded init (LoRA-FA: frozen A)
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    if method == "pissa" and not shapes_only:
        handle.initial = initial_factors(wrapper)
    model.__dict__[HANDLE] = handle  # beside the model, not a submodule (no duplicate state-dict names)
    return handle


def initial_factors(wrapper: Any) -> dict[str, Tensor]:
    """A0 and B0 as PEFT saves them (``base_model.model.<path>.lora_A.weight``), on the CPU."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(wrapper, save_embedding_layers=False)
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
