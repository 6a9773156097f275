"""A callback for the DDP and FSDP tests: every rank writes its masks and B at the end of each fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from lori.core import full_parameters, get_B, get_masks, lori_layers


class DumpState(L.Callback):
    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # entries of each trainable B this rank holds between steps (FSDP: its shard; a split B has 0 < n < all)
        local = {f"local_numel/{p}": torch.tensor((m.lori_B if m.lori_B_values is None else m.lori_B_values).numel())
                 for p, m in lori_layers(pl_module.model).items()}
        with full_parameters(trainer.strategy.model):  # FSDP: whole B on every rank
            tensors = {f"B/{p}": b.detach().clone().contiguous() for p, b in get_B(pl_module.model).items()}
            # frozen base weights are not gathered (FSDP: this rank's shard only, inside the context too)
            tensors["frozen_numel/all"] = torch.tensor(sum(m.base_layer.weight.numel()
                                                           for m in lori_layers(pl_module.model).values()))
        tensors |= {f"mask/{p}": m.contiguous() for p, m in get_masks(pl_module.model).items()}
        tensors |= local
        name = f"{pl_module.phase}_rank{trainer.global_rank}_of{trainer.world_size}.safetensors"
        save_file(tensors, str(self.directory / name))


class CrashAt(L.Callback):
    """Every rank raises after ``step`` optimizer steps of the given phase (a run killed mid-stage)."""

    def __init__(self, phase: str, step: int) -> None:
        self.phase, self.step = phase, step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if pl_module.phase == self.phase and trainer.global_step >= self.step:
            raise RuntimeError(f"killed at {self.phase} step {self.step}")
