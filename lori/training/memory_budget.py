"""The training settings that fit a GPU-memory budget, cheapest in speed first.

From a config's plan (``lori.training.memory_model.Plan``) the settings are tried in order of what
they cost in speed, each keeping the global batch (micro-batch x accumulation x devices):

    1. as configured
    2. activation checkpointing (every decoder layer recomputed in backward: ~1.3x step time)
    3. a smaller micro-batch with more gradient accumulation (a divisor of the micro-batch,
       largest first; without, then with checkpointing)
    4. an int8 base (LLM.int8: slower matmuls), then the same ladder
    5. a 4-bit (NF4) base, then the same ladder

A quantized base is not tried under FSDP or ZeRO-3 (``lori.training.quantize`` refuses it there).

Each setting gets ``memory_terms``'s total for LoRI-D and LoRI-S (the pipeline runs both with the
same setting, so the larger must fit) and, for comparison, PEFT LoRA's by the same terms (QLoRA
when the base is quantized).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lori.core import LoRIConfig
from lori.training.memory_model import AdapterShape, Plan, memory_terms

QUANTIZE_RANK = {None: 0, "int8": 1, "nf4": 2, "fp4": 2}  # speed cost of a stored base format
LADDER_QUANTIZE = ("int8", "nf4")  # what the search tries beyond the configured format


@dataclass(frozen=True)
class Setting:
    """One way to lay out a step: activation checkpointing, micro-batch, accumulation, base format."""

    checkpointing: bool
    micro_batch: int
    accumulate: int
    quantize: str | None

    def label(self, configured: Setting) -> str:
        """``as configured``, or what differs from ``configured``: e.g. ``nf4, checkpointing, batch 1 x 32``."""
        parts = []
        if self.quantize != configured.quantize:
            parts.append(self.quantize or "16-bit base")
        if self.checkpointing != configured.checkpointing:
            parts.append("checkpointing" if self.checkpointing else "no checkpointing")
        if self.micro_batch != configured.micro_batch:
            parts.append(f"batch {self.micro_batch} x {self.accumulate}")
        return ", ".join(parts) or "as configured"


@dataclass(frozen=True)
class Fit:
    """A setting with its estimates (bytes per device) and whether it fits the budget."""

    setting: Setting
    lori_d: float
    lori_s: float
    lora: float  # PEFT LoRA (QLoRA on a quantized base), same setting, same terms
    fits: bool
    note: str = ""  # what the setting needs besides (``lori dryrun``: protocol: lori for a quantized base)


def ladder(plan: Plan, accumulate: int) -> list[Setting]:
    """Settings from ``plan`` (accumulating ``accumulate`` micro-batches), cheapest in speed first."""
    rank = QUANTIZE_RANK.get(plan.quantize, 2)
    formats = [plan.quantize] + [q for q in LADDER_QUANTIZE if QUANTIZE_RANK[q] > rank and not plan.shards_weights]
    batches = [b for b in range(plan.micro_batch, 0, -1) if plan.micro_batch % b == 0]
    checkpointing = [plan.checkpointing] if plan.checkpointing else [False, True]
    return [Setting(ckpt, b, accumulate * plan.micro_batch // b, q)
            for q in formats for b in batches for ckpt in checkpointing]


def plan_for(plan: Plan, setting: Setting) -> Plan:
    """``plan`` with a setting's checkpointing, micro-batch and base format."""
    return dataclasses.replace(plan, checkpointing=setting.checkpointing, micro_batch=setting.micro_batch,
                               quantize=setting.quantize)


def fits(shape: AdapterShape, lori: LoRIConfig, trainable: tuple[int, int], plan: Plan, accumulate: int,
         budget_bytes: float) -> list[Fit]:
    """Every setting of ``ladder`` with its LoRI-D, LoRI-S and PEFT LoRA estimates, in ladder order.

    Args:
        shape: the architecture and adapter sizes (``adapter_shape``).
        lori: the LoRI config (rank, dropout).
        trainable: (LoRI-D, LoRI-S) trainable entries.
        plan: the configured plan.
        accumulate: the configured gradient accumulation.
        budget_bytes: memory of one device.
    """
    lora_trainable = shape.a_entries + sum(n for _, n in shape.b_by_path)  # LoRA trains A and B
    out = []
    for setting in ladder(plan, accumulate):
        p = plan_for(plan, setting)
        d = memory_terms(shape, lori, trainable[0], False, p)["total"]
        s = memory_terms(shape, lori, trainable[1], True, p)["total"]
        lora = memory_terms(shape, lori, lora_trainable, False, p, lora=True)["total"]
        out.append(Fit(setting, d, s, lora, max(d, s) <= budget_bytes))
    return out


def cheapest(found: list[Fit]) -> Fit | None:
    """The first setting that fits (``fits`` keeps ladder order), or None."""
    return next((f for f in found if f.fits), None)
