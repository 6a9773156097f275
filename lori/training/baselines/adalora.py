"""AdaLoRA's training-time parts: the rank budget schedule and the orthogonality penalty.

AdaLoRA (Zhang et al. 2023) writes each update as W0 + P diag(E) Q (PEFT: lora_B, lora_E,
lora_A) and prunes the entries of E with the lowest importance to meet a budget that falls
cubically from ``init_r`` (= ``model.lori.r``) to ``target_r`` per matrix, from step ``tinit`` to
step ``T - tfinal`` (T = the fit's optimizer steps). PEFT's ``RankAllocator`` (held by the tuner
object that ``attach_peft`` keeps) does the scoring and masking; here:

* ``AdaLoraBudget``: a Callback (added by ``LoRIModule.configure_callbacks``) that tells the
  allocator the fit's T at train start and calls ``update_and_allocate`` after every optimizer
  step, while the gradients are still there; its checkpoint state is the allocator's importance
  averages and the rank pattern, so a resumed run prunes as an uninterrupted one.
* ``orthogonality_penalty``: PEFT's regulariser, orth_reg_weight x mean over P and Q of
  ||P^T P - I||_F and ||Q Q^T - I||_F, added to the training loss by the LightningModule.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lori.training.baselines.options import BaselineOptionsError
from lori.training.baselines.peft_methods import peft_handle


def orthogonality_penalty(model: nn.Module) -> Tensor:
    """orth_reg_weight x the mean of ||Q Q^T - I||_F (lora_A) and ||P^T P - I||_F (lora_B) over all matrices."""
    handle = peft_handle(model)
    terms = []
    for name, p in model.named_parameters():
        if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
            cov = p @ p.T if ".lora_A." in name else p.T @ p  # (r, r)
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
    if not terms:
        return torch.zeros((), device=next(model.parameters()).device)
    return handle.config.orth_reg_weight * torch.stack(terms).mean()


def kept_ranks(model: nn.Module) -> dict[str, int]:
    """Nonzero entries of each E (the rank each adapted matrix keeps), by module path."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_E." in name:
            out[name.split(".lora_E.")[0]] = int(torch.count_nonzero(p.detach()))
    return out


class AdaLoraBudget(L.Callback):
    """Run AdaLoRA's rank allocation inside a Lightning fit (see the module docstring)."""

    def __init__(self) -> None:
        self._handle: Any = None  # the module's PeftHandle, from setup
        self._restored: dict[str, Any] | None = None  # checkpoint state, applied at train start
        self._last_step = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._handle = peft_handle(pl_module.model)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        handle = peft_handle(pl_module.model)
        config, total = handle.config, max(1, int(trainer.estimated_stepping_batches))
        if config.tinit >= total - config.tfinal:
            raise BaselineOptionsError(
                f"AdaLoRA schedule leaves no pruning phase: tinit={config.tinit} + tfinal={config.tfinal} "
                f">= the fit's {total} optimizer steps; lower model.baseline.tinit / tfinal"
            )
        config.total_step = total
        self._last_step = trainer.global_step
        if self._restored is not None:
            self._apply(handle, self._restored, next(pl_module.model.parameters()).device)
            self._restored = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._last_step:  # accumulating: no optimizer step yet
            return
        self._last_step = trainer.global_step
        handle = peft_handle(pl_module.model)
        handle.wrapper.base_model.update_and_allocate(trainer.global_step - 1)  # the step just taken
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and pl_module.logger is not None:
            ranks = kept_ranks(pl_module.model)
            pl_module.logger.log_metrics({"adalora/mean_rank": sum(ranks.values()) / max(1, len(ranks))},
                                         step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        if self._handle is None:
            return {}
        allocator = self._handle.wrapper.base_model.rankallocator
        return {"ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
                "rank_pattern": self._handle.config.rank_pattern}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict or None

    @staticmethod
    def _apply(handle: Any, state: dict[str, Any], device: torch.device) -> None:
        allocator = handle.wrapper.base_model.rankallocator
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(allocator, key, {k: v.to(device) for k, v in state.get(key, {}).items()})
        if state.get("rank_pattern") is not None:
            handle.config.rank_pattern = state["rank_pattern"]
