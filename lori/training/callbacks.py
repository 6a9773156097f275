"""Callbacks that own LoRI's phase changes (paper Alg. 1) and its diagnostics.

    LoRI-D fit ──(MaskCalibration: end of fit, or after N steps)──> masks
    LoRI-S fit ──(SparsePhase.setup: install masks, B := 0, same A)──> train B ⊙ M
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lori.core import (
    Adapter,
    AdapterMismatchError,
    NonFiniteError,
    adapter_from_model,
    calibrate,
    count_trainable,
    full_parameters,
    get_A,
    get_B,
    load_masks,
    lori_layers,
    mask_density,
    set_masks,
    sparsity_by,
    unwrap_fsdp,
)
from lori.core.adapter import a_digest
from lori.core.atomic_files import write_bytes_atomic
from lori.core.io import MaskRecord, read_mask_record
from lori.core.layer import ADAPTER_DTYPE
from lori.eval.plots import heatmap_figure, save_heatmap
from lori.training.model_card import write_module_card


def broadcast_masks(trainer: L.Trainer, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's masks on every rank (so masks are identical even if B drifted by float noise)."""
    if trainer.world_size <= 1:
        return masks
    return trainer.strategy.broadcast(masks, src=0)


class MaskCalibration(Callback):
    """Calibrate masks from the dense B at the end of the LoRI-D fit, or after ``at_step`` steps.

    Args:
        sparsity: fraction of B entries dropped, in [0, 1).
        granularity: ``model``, ``module``, ``projection``, ``layer`` or ``matrix``.
        at_step: calibrate after this many optimizer steps and stop the dense fit there
            (the paper's calibration-steps ablation); None = at the end of the fit.
        output_dir: where ``masks.safetensors`` and the sparsity heatmap are written (optional);
            the file's metadata records what the masks were calibrated under (``MaskRecord``: the
            module's A seed and digest, base fingerprint, r, sparsity, granularity).
    """

    def __init__(
        self, sparsity: float = 0.9, granularity: str = "model", at_step: int | None = None,
        output_dir: str | None = None,
    ) -> None:
        from lori.core.config import LoRIConfig

        LoRIConfig(sparsity=sparsity, granularity=granularity)  # validate early, with named values
        self.sparsity, self.granularity, self.at_step = sparsity, granularity, at_step
        self.output_dir = Path(output_dir) if output_dir else None
        self.masks: dict[str, torch.Tensor] | None = None
        self.record: MaskRecord | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_step is not None and trainer.global_step >= self.at_step and self.masks is None:
            self.calibrate(trainer, pl_module)  # resumed from a checkpoint of step at_step: no step more
            trainer.should_stop = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.at_step is not None and trainer.global_step >= self.at_step and self.masks is None:
            self.calibrate(trainer, pl_module)
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.masks is None and not trainer.sanity_checking:
            self.calibrate(trainer, pl_module)

    def calibrate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """Masks from the current B (on every rank), logged and written by rank 0.

        Raises:
            FloatingPointError: some B holds NaN or inf (the last optimizer step diverged).
        """
        with full_parameters(trainer.strategy.model or pl_module):  # FSDP / ZeRO-3: whole B on every rank
            try:
                masks = calibrate(get_B(pl_module.model), self.sparsity, self.granularity)
            except NonFiniteError as err:  # a diverged run, like a non-finite loss: exit 1, checkpoints kept
                raise FloatingPointError(f"{err} (global step {trainer.global_step}); the last good checkpoint "
                                         "is kept") from None
        self.masks = broadcast_masks(trainer, {p: m.cpu() for p, m in masks.items()})
        config = getattr(pl_module, "lori_config", None)  # A is a buffer: whole on every rank, no gather
        self.record = MaskRecord.of(get_A(pl_module.model), getattr(config, "seed", None),
                                    getattr(pl_module, "fingerprint", None), self.sparsity, self.granularity)
        stats = {"calibration/density": mask_density(self.masks), "calibration/step": trainer.global_step}
        stats.update({f"sparsity/layer/{k}": v for k, v in sparsity_by(self.masks, "layer").items()})
        stats.update({f"sparsity/projection/{k}": v for k, v in sparsity_by(self.masks, "projection").items()})
        for logger in trainer.loggers:  # every logger the user named (trainer.logger: a list)
            logger.log_metrics(stats, step=trainer.global_step)
        if trainer.loggers:
            _log_heatmap(trainer, self.masks)
        if self.output_dir is not None and trainer.is_global_zero:
            from safetensors.torch import save

            # temporary file, fsync, rename: a kill or a full disk mid-write leaves no bad file
            self.output_dir.mkdir(parents=True, exist_ok=True)
            data = save(self.masks, metadata=self.record.to_metadata())
            write_bytes_atomic(self.output_dir / "masks.safetensors", data)
            save_heatmap(self.masks, self.output_dir / "sparsity_heatmap.png")
        return self.masks


class SparsePhase(Callback):
    """Start LoRI-S: install the masks and reset B to zero, keeping the calibration run's A.

    Runs in ``setup``, before the optimizer is built, so the optimizer sees only the kept
    entries. A checkpoint restored afterwards (resume) overwrites B with the saved values.

    A mask file whose record names another A than the model's is refused (a mask fits the A it
    was calibrated under); the original code's ``.pt`` files carry no record and are taken as given.

    Args:
        masks: masks by module path, or the path of a mask file (lori safetensors or original LoRI).
        reset: zero B first (LoRI-S). False keeps B (continual learning on a new task's mask).
    """

    def __init__(self, masks: dict[str, torch.Tensor] | str | Path, reset: bool = True) -> None:
        self.record = read_mask_record(masks) if isinstance(masks, (str, Path)) else None
        self.source = str(masks) if isinstance(masks, (str, Path)) else None
        self.masks = load_masks(masks) if isinstance(masks, (str, Path)) else masks
        self.reset = reset

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            if self.record is not None and self.record.digest not in (None, "meta"):
                mine = a_digest(get_A(pl_module.model))
                if mine not in ("meta", self.record.digest):
                    raise AdapterMismatchError(
                        f"mask file {self.source} was calibrated under {self.record.describe()}, the model's A has "
                        f"digest {mine}: calibrate the masks with a LoRI-D run of this A (same model.lori.seed)"
                    )
            set_masks(pl_module.model, self.masks, reset=self.reset)
            pl_module.phase = "sparse"


def module_adapter(pl_module: L.LightningModule, stage: str, step: int, extra: dict[str, Any] | None = None) -> Adapter:
    """The module's adapter as tensors, with the stage, step and trainable count in its metadata."""
    meta = {"stage": stage, "global_step": step, "trainable": count_trainable(pl_module.model)}
    meta.update(extra or {})
    return adapter_from_model(pl_module.model, pl_module.lori_config, pl_module.hparams.model, meta,
                              pl_module.fingerprint)


class SaveAdapter(Callback):
    """Write what the fit trained at its end, on rank 0 (``LoRIModule.save_adapter``).

    A lori adapter dir for ``lori`` / ``lori_d``, a PEFT adapter dir for the PEFT baselines and a
    Hugging Face model dir for ``full``; in a YAML, under ``trainer.callbacks``::

        - class_path: lori.training.callbacks.SaveAdapter
          init_args: {directory: runs/lora/adapter, stage: lora}

    Args:
        directory: the directory to write (replaced atomically).
        stage: a label saved in the adapter's metadata.
    """

    def __init__(self, directory: str | Path, stage: str = "fit") -> None:
        self.directory, self.stage = Path(directory), stage

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with full_parameters(trainer.strategy.model or pl_module):  # every rank gathers, rank 0 writes
            if trainer.is_global_zero:
                pl_module.save_adapter(self.directory, self.stage)
                write_module_card(self.directory, pl_module, self.stage, trainer.datamodule)


class Unshard(Callback):
    """End a Trainer's FSDP wrapping: the LightningModule gets back plain modules with whole parameters.

    Multi-stage commands (``lori pipeline``, ``lori continual``) chain several Trainers over one
    module; between them the module is changed (masks installed, B reset) and wrapped again, which
    needs ordinary tensors. A no-op without FSDP. Every Trainer those commands build carries it.
    """

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        wrapped = trainer.strategy.model
        if wrapped is not None and wrapped is not pl_module:
            plain = unwrap_fsdp(wrapped)
            if plain is not wrapped:
                assert plain is pl_module, "the FSDP root should wrap the LightningModule"
                trainer.strategy.model = pl_module
                adapter_buffers_to_fp32(pl_module)


def adapter_buffers_to_fp32(module: torch.nn.Module) -> None:
    """Give LoRI's floating buffers (A; LoRI-S's frozen B entries) back their fp32 dtype.

    FSDP mixed precision (``trainer.precision: bf16-mixed``, ``buffer_dtype`` bf16) casts every
    buffer to bf16 in place and leaves it so after unwrapping, while the trained parameters come
    back in fp32: LoRI-S's B (bf16 buffer + fp32 kept values) could not be formed and A would be
    saved in bf16. A keeps its bf16-rounded values, which are the values the bf16 compute used.
    """
    for layer in lori_layers(module).values():
        for name, buffer in list(layer.named_buffers(recurse=False)):
            if name.startswith("lori_") and buffer.is_floating_point() and buffer.dtype != ADAPTER_DTYPE:
                setattr(layer, name, buffer.to(ADAPTER_DTYPE))


def _log_heatmap(trainer: L.Trainer, masks: dict[str, torch.Tensor]) -> None:
    experiment = getattr(trainer.logger, "experiment", None)
    if experiment is not None and hasattr(experiment, "add_figure") and trainer.is_global_zero:
        experiment.add_figure("calibration/sparsity_heatmap", heatmap_figure(masks), trainer.global_step)
