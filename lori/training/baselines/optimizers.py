"""Optimizers of the methods (a registry entry's ``optimizer``): AdamW for all but LoRA+ and LoRA-FA,
which are optimizers themselves.

    loraplus  PEFT's create_loraplus_optimizer(AdamW): A at lr, B at lr x loraplus_lr_ratio
    lora_fa   PEFT's LoraFAOptimizer: A frozen; B's gradient projected onto A's row space,
              g_B <- (1 / s^2) g_B (A A^T)^-1 (LoRA-FA, Zhang et al. 2023, the PEFT version),
              then an AdamW step on B
    others    torch AdamW over the trainable tensors (LoRI's optimizer)

lr, weight decay and betas are LoRI's (``model.lr`` ...) for every method; eps is torch AdamW's
1e-8 everywhere (LoraFAOptimizer's own default is 1e-6).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lori.core import trainable_parameters

ADAM_EPS = 1e-8


def adamw(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], options: dict[str, Any]
) -> torch.optim.Optimizer:
    """torch AdamW over ``model``'s trainable tensors (LoRI's optimizer, and most baselines').

    Args:
        model: the adapted model.
        lr: learning rate.
        weight_decay: decoupled weight decay.
        betas: Adam betas.
        options: the method's resolved ``model.baseline`` options (unused here).
    """
    return torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                             eps=ADAM_EPS)


def loraplus_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], options: dict[str, Any]
) -> torch.optim.Optimizer:
    """PEFT's ``create_loraplus_optimizer`` (AdamW): A at ``lr``, B at ``lr x options["loraplus_lr_ratio"]``."""
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=options["loraplus_lr_ratio"],
        loraplus_weight_decay=weight_decay, betas=tuple(betas), eps=ADAM_EPS,
    )


def lora_fa(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], options: dict[str, Any]
) -> torch.optim.Optimizer:
    """``lora_fa_optimizer`` in the registry's optimizer signature (LoRA-FA has no options)."""
    return lora_fa_optimizer(model, lr, weight_decay, betas)


def lora_fa_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.Optimizer:
    """PEFT's ``LoraFAOptimizer`` over every (A, B) pair of the model's PEFT LoRA layers.

    The optimizer reads A (frozen) to project B's gradient, so it holds both; only B moves. It
    keeps its state under string keys, which ``Optimizer.load_state_dict`` leaves on the device
    they were saved from: a hook moves them to B's device after a resume.
    """
    from peft.optimizers.lorafa import LoraFAOptimizer
    from peft.tuners.lora import LoraLayer

    names, params, scales = [], [], []
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            names += [f"{path}.lora_A.default.weight", f"{path}.lora_B.default.weight"]
            params += [a, b]
            scales += [module.scaling["default"]] * 2
    if not params:
        raise ValueError("lora_fa needs PEFT LoRA layers; none found in the model")
    group = {"params": params, "names": names, "scaling_factors": scales,
             "scaling_factor": scales[0],  # PEFT < 0.21 reads one factor for all layers
             "lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
    optimizer = LoraFAOptimizer([group], lr=lr, eps=ADAM_EPS)
    b_of = {n[: n.find("lora")] + "lora": p for n, p in zip(names, params) if ".lora_B." in n}

    def state_to_b_device(opt: torch.optim.Optimizer) -> None:
        for key, state in opt.state.items():
            if isinstance(key, str) and key in b_of:
                for k, v in state.items():
                    if torch.is_tensor(v):
                        state[k] = v.to(b_of[key].device)

    optimizer.register_load_state_dict_post_hook(state_to_b_device)
    return optimizer
