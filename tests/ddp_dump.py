"""A callback for the DDP test: every rank writes its masks and B at the end of each fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from safetensors.torch import save_file

from lori.core import get_B, get_masks


class DumpState(L.Callback):
    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"B/{p}": b.detach().contiguous() for p, b in get_B(pl_module.model).items()}
        tensors |= {f"mask/{p}": m.contiguous() for p, m in get_masks(pl_module.model).items()}
        name = f"{pl_module.phase}_rank{trainer.global_rank}_of{trainer.world_size}.safetensors"
        save_file(tensors, str(self.directory / name))
