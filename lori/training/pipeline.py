"""LoRI-D -> mask calibration -> LoRI-S as chained ``Trainer.fit`` calls (paper Alg. 1).

    <output_dir>/lori_d/           dense adapter (core format) + resolved_config.yaml + README.md (its card)
    <output_dir>/calibration/      masks.safetensors, sparsity_heatmap.png
    <output_dir>/lori_s/           sparse adapter with its masks + resolved_config.yaml + README.md
    <output_dir>/<stage>_ckpt/     Lightning checkpoints (last.ckpt and the one before it, last.prev.ckpt):
                                   adapter state, masks, phase, optimizer (lori.training.checkpoint_io)
    <output_dir>/tb/<stage>/       tensorboard logs (the default; ``trainer.logger`` names any Lightning
                                   logger instead: one run, metrics under the stage's name, lori.training.loggers)
    <output_dir>/summary.json      held-out losses, trainable counts, sparsity, paths
    <parent>/.<output_dir>.lock    held while the run lasts (lori.training.run_lock): one run per directory

Each stage gets its own Trainer from ``make_trainer_factory`` (the YAML's ``trainer:`` settings plus
checkpointing, the RNG state, the progress bar and FSDP unsharding); ``lori continual`` uses it too.

A rerun with the same ``output_dir`` continues: a finished stage is loaded, an unfinished one
resumes from its last checkpoint (from the one before it when last.ckpt cannot be read; that
file is set aside as last.ckpt.unreadable). Every file is written atomically.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lori.core import (
    LoRIConfigError,
    apply_adapter,
    count_trainable,
    get_masks,
    load_adapter,
    load_masks,
    mask_density,
    save_adapter,
    set_masks,
)
from lori.core.atomic_files import write_text_atomic
from lori.core.finite import first_non_finite
from lori.core.io import CONFIG_FILE
from lori.training import console, progress, run_lock
from lori.training.callbacks import MaskCalibration, SparsePhase, Unshard, module_adapter
from lori.training.checkpoint_io import resume_checkpoint, with_atomic_checkpoints
from lori.training.console import say
from lori.training.fit_settings import CALIBRATION_MASKS
from lori.training.loggers import RunLoggers
from lori.training.measured_losses import MeasuredLosses
from lori.training.model_card import write_module_card
from lori.training.module import LoRIModule, check_checkpoint
from lori.training.preemption import PreemptionCheckpoint, handles_signals
from lori.training.rng_state import RNGState


@dataclass
class PipelineConfig:
    """Stages of one LoRI run.

    Args:
        output_dir: where adapters, masks, checkpoints, logs and the summary go.
        dense_steps: optimizer steps of LoRI-D (the calibration run).
        sparse_steps: optimizer steps of LoRI-S.
        calibrate_at_step: calibrate after this many dense steps and end LoRI-D there (paper
            Fig. 4a ablation); None = at the end of LoRI-D.
        dense_epochs: train LoRI-D for this many epochs instead of ``dense_steps`` (the paper's
            configs count epochs).
        sparse_epochs: train LoRI-S for this many epochs instead of ``sparse_steps``.
        sparse_lr: learning rate of LoRI-S (None = the model's ``lr``).
        sparse_alpha: alpha of LoRI-S when it differs from LoRI-D's (None = the same); the paper's
            Mistral-7B r=64 GSM8K setting uses 32 for LoRI-D and 64 for LoRI-S.
        checkpoint_every: steps between Lightning checkpoints (last.ckpt) within a stage.
        held_out_loss: measure the held-out loss before and after each stage.
        validate: the old name of ``held_out_loss``: set, it stops with one line naming the new one.
    """

    output_dir: str = "runs/default"
    dense_steps: int = 40
    sparse_steps: int = 40
    calibrate_at_step: int | None = None
    dense_epochs: int | None = None
    sparse_epochs: int | None = None
    sparse_lr: float | None = None
    sparse_alpha: float | None = None
    checkpoint_every: int = 20
    held_out_loss: bool = True
    validate: bool | None = None  # renamed: held_out_loss (RENAMED_KEYS)

    def __post_init__(self) -> None:
        """Refuse budgets that cannot train and renamed keys (raises LoRIConfigError naming the value)."""
        refuse_renamed(vars(self), "pipeline")
        for name, steps, epochs in (("dense", self.dense_steps, self.dense_epochs),
                                    ("sparse", self.sparse_steps, self.sparse_epochs)):
            if epochs is not None and epochs < 1:
                raise LoRIConfigError(f"pipeline.{name}_epochs must be >= 1 (or null to count steps), got {epochs}")
            if epochs is None and steps < 1:
                why = ("LoRI-D must train B before a mask can be calibrated from it (B starts at zero)"
                       if name == "dense" else "LoRI-S trains B from zero inside the mask")
                raise LoRIConfigError(f"pipeline.{name}_steps must be >= 1, got {steps}: {why}")
        at = self.calibrate_at_step
        if at is not None and (at < 1 or self.dense_epochs is None and at > self.dense_steps):
            raise LoRIConfigError(f"pipeline.calibrate_at_step must be in [1, dense_steps={self.dense_steps}] "
                                  f"(or null: at the end of LoRI-D), got {at}")
        if self.checkpoint_every < 1:
            raise LoRIConfigError(f"pipeline.checkpoint_every must be >= 1 step, got {self.checkpoint_every}")
        for name in ("sparse_lr", "sparse_alpha"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise LoRIConfigError(f"pipeline.{name} must be > 0 (or null: LoRI-D's), got {value}")
        if not str(self.output_dir).strip():
            raise LoRIConfigError("pipeline.output_dir is empty: name a directory for the run's files")


# keys of ``pipeline:`` / ``continual:`` that were renamed: old -> new (the old one stops with one line)
RENAMED_KEYS = {"validate": "held_out_loss"}


def refuse_renamed(options: Any, section: str) -> None:
    """Raise LoRIConfigError ``<section>.<old> is now <section>.<new>`` for a renamed key set in ``options``."""
    for old, new in RENAMED_KEYS.items():
        if options is not None and options.get(old) is not None:
            raise LoRIConfigError(f"{section}.{old} is now {section}.{new}")


TrainerFactory = Callable[..., L.Trainer]


def make_trainer_factory(trainer_config: dict[str, Any], output_dir: Path, checkpoint_every: int,
                         loggers: RunLoggers | None = None) -> TrainerFactory:
    """A function building one Trainer per stage from the YAML's ``trainer:`` settings.

    ``loggers`` (default: from ``trainer.logger``) gives each stage its logger, named ``log_name``
    (default: the stage; ``lori.training.loggers``).
    """
    loggers = loggers if loggers is not None else RunLoggers(trainer_config.get("logger"), output_dir)

    def make(
        stage: str, max_steps: int, callbacks: list, logger: bool = True, checkpoint: bool = True,
        max_epochs: int | None = None, log_name: str | None = None, checkpoint_dir: Path | None = None,
    ) -> L.Trainer:
        kwargs = dict(trainer_config)
        kwargs.pop("logger", None)
        if not isinstance(kwargs.get("strategy"), str | None):  # a strategy object serves one Trainer
            kwargs["strategy"] = copy.deepcopy(kwargs["strategy"])
        if max_epochs is not None:  # an epoch budget replaces the step budget
            kwargs.update(max_steps=-1, max_epochs=max_epochs)
        else:
            kwargs.update(max_steps=max_steps, max_epochs=-1 if max_steps > 0 else kwargs.get("max_epochs"))
        # the pipeline measures held-out loss itself, before and after each stage
        kwargs.update(limit_val_batches=1.0 if stage == "eval" else 0.0, num_sanity_val_steps=0)
        extra = list(kwargs.pop("callbacks", None) or [])
        extra.append(Unshard())  # FSDP: the next stage's Trainer gets a plain module with whole B
        if checkpoint:
            extra.append(ModelCheckpoint(
                dirpath=checkpoint_dir or output_dir / f"{stage}_ckpt", save_last=True, save_top_k=0,
                every_n_train_steps=checkpoint_every,
            ))
            extra.append(RNGState())  # a resumed stage draws the same dropout masks
            extra.append(PreemptionCheckpoint(progress.stage_name(stage)))  # SIGTERM / SIGUSR1: save, stop
        kwargs["enable_checkpointing"] = checkpoint
        kwargs["plugins"] = with_atomic_checkpoints(kwargs.get("plugins"), kwargs.get("strategy"))
        kwargs["logger"] = loggers.for_stage(log_name or stage) if logger else False
        extra += progress.for_trainer(stage, kwargs, extra + list(callbacks))  # steps of this stage, its loss
        kwargs.update(console.trainer_overrides(kwargs))
        return L.Trainer(callbacks=extra + list(callbacks), **kwargs)

    return make


def _last_ckpt(directory: Path, module: LoRIModule) -> tuple[str | None, dict[str, Any] | None]:
    """The checkpoint a stage resumes from and its contents (an unreadable last.ckpt is set aside for the
    one before it, see ``resume_checkpoint``); one of another model is refused before any training starts."""
    path, ckpt = resume_checkpoint(directory, directory.name.removesuffix("_ckpt"))
    if ckpt is not None:
        check_checkpoint(ckpt, module)
    return path, ckpt


def _validate(make_trainer: TrainerFactory, module: LoRIModule, datamodule: L.LightningDataModule) -> float:
    trainer = make_trainer(stage="eval", max_steps=-1, callbacks=[], logger=False, checkpoint=False)
    result = trainer.validate(module, datamodule=datamodule, verbose=False)
    return float(result[0]["val/loss"])


def _write_config(directory: Path, config_text: str | None) -> None:
    if config_text is not None:
        write_text_atomic(directory / "resolved_config.yaml", config_text)


def _reuse_stage(module: LoRIModule, directory: Path, summary: dict[str, Any], stage: str) -> bool:
    """Load a finished stage's adapter into the module (same A, B, masks); False if not finished."""
    if not (directory / CONFIG_FILE).is_file():
        return False
    adapter = load_adapter(directory)
    apply_adapter(module.model, adapter)
    summary[stage] = adapter.meta.get("summary", {}) | {"reused": True}
    say(f"{progress.stage_name(stage)}: finished in an earlier run, reusing {directory}")
    return True


def _dtypes(module: LoRIModule) -> str:
    """``float32 base, float32 adapter``: the dtypes of the frozen and the trained weights."""
    frozen = next((p.dtype for p in module.model.parameters() if not p.requires_grad), None)
    trained = next((p.dtype for p in module.model.parameters() if p.requires_grad), None)
    quantized = getattr(module.model, "lori_quantize", None)  # ``nf4 base``: lori.training.quantize
    return ", ".join(f"{quantized['mode'] if quantized and what == 'base' else str(dtype).removeprefix('torch.')} {what}"
                     for dtype, what in ((frozen, "base"), (trained, "adapter")) if dtype is not None)


def _stage_line(module: LoRIModule, datamodule: L.LightningDataModule, stage: str, max_steps: int,
               max_epochs: int | None, ckpt: str | None, trainable: int) -> str:
    """``LoRI-D: 20 steps on 1,287 examples, 2,488,320 trainable (float32 base, float32 adapter)``."""
    budget = f"{max_epochs} epoch{'s' * (max_epochs != 1)}" if max_epochs is not None else f"{max_steps} steps"
    data = getattr(datamodule, "train_dataset", None)
    examples = f" on {len(data):,} examples" if data is not None else ""
    resume = f"; resuming from {ckpt}" if ckpt else ""
    return f"{progress.stage_name(stage)}: {budget}{examples}, {trainable:,} trainable ({_dtypes(module)}){resume}"


def _done_line(stage: str, stats: dict[str, Any]) -> str:
    """``LoRI-D done in 41 s: held-out loss 1.5012 -> 0.9388``."""
    loss = ""
    if "val_loss_after" in stats:
        before = stats.get("val_loss_before")
        loss = f": held-out loss {before:.4f} -> {stats['val_loss_after']:.4f}" if before is not None else (
            f": held-out loss {stats['val_loss_after']:.4f}")
    return f"{progress.stage_name(stage)} done in {stats['train_seconds']:.0f} s ({stats['steps']} steps){loss}"


def _fit_stage(
    module: LoRIModule, datamodule: L.LightningDataModule, make_trainer: TrainerFactory, cfg: PipelineConfig,
    stage: str, max_steps: int, callback: L.Callback, base_loss: float | None = None,
    max_epochs: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """One stage's fit (resumed from its last checkpoint if any), with held-out loss around it."""
    ckpt_dir = Path(cfg.output_dir) / f"{stage}_ckpt"  # where it resumes from is where it saves (continual's phases)
    ckpt, saved = _last_ckpt(ckpt_dir, module)
    stats: dict[str, Any] = {"trainable": count_trainable(module.model)}
    say(_stage_line(module, datamodule, stage, max_steps, max_epochs, ckpt, stats["trainable"]))
    measured = MeasuredLosses.saved_in(saved)  # a resumed stage reports the loss its first run measured
    if cfg.held_out_loss and "val_loss_before" in measured:
        stats["val_loss_before"] = measured["val_loss_before"]
    elif cfg.held_out_loss and ckpt is None:
        stats["val_loss_before"] = base_loss if base_loss is not None else _validate(make_trainer, module, datamodule)
    record = MeasuredLosses({k: v for k, v in stats.items() if k == "val_loss_before"})
    trainer = make_trainer(stage=stage, max_steps=max_steps, callbacks=[callback, record], max_epochs=max_epochs,
                           checkpoint_dir=ckpt_dir)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    if trainer.world_size > 1:
        stats["world_size"] = trainer.world_size
    stats.update(steps=trainer.global_step, train_seconds=round(time.perf_counter() - t0, 1))
    if cfg.held_out_loss:
        stats["val_loss_after"] = _validate(make_trainer, module, datamodule)
    say(_done_line(stage, stats))
    return trainer.global_step, stats


def _save_stage(
    module: LoRIModule, stage: str, step: int, stats: dict[str, Any], directory: Path,
    summary: dict[str, Any], config_text: str | None,
) -> None:
    summary[stage] = stats
    adapter = module_adapter(module, stage, step, {"summary": stats})
    bad = first_non_finite((f"B of {path}", b) for path, b in adapter.B.items())
    if bad is not None:  # the last optimizer step diverged after the last checkpoint
        raise FloatingPointError(f"{stage} ended with {bad} (global step {step}); the adapter is not saved, "
                                 "the last good checkpoint is kept")
    if rank_zero_only.rank == 0:  # under DDP every rank holds the same adapter; one writes it
        save_adapter(adapter, directory)
        _write_config(directory, config_text)
        write_module_card(directory, module, stage)  # README.md: the adapter's card (lori.training.model_card)


def run_dense(
    module: LoRIModule, datamodule: L.LightningDataModule, make_trainer: TrainerFactory,
    cfg: PipelineConfig, summary: dict[str, Any], config_text: str | None,
) -> dict[str, torch.Tensor]:
    """LoRI-D and calibration; returns the masks (loads them when the stage is already done)."""
    out = Path(cfg.output_dir)
    d_dir, mask_file = out / "lori_d", out / CALIBRATION_MASKS
    if mask_file.is_file() and _reuse_stage(module, d_dir, summary, "lori_d"):
        return load_masks(mask_file)
    lori = module.lori_config
    calib = MaskCalibration(lori.sparsity, lori.granularity, cfg.calibrate_at_step, str(mask_file.parent))
    step, stats = _fit_stage(
        module, datamodule, make_trainer, cfg, "lori_d", cfg.dense_steps, calib, max_epochs=cfg.dense_epochs
    )
    if calib.masks is None:  # resumed from a checkpoint of the last step: calibrate the restored B
        calib.calibrate(make_trainer(stage="eval", max_steps=-1, callbacks=[], logger=False, checkpoint=False), module)
    stats["calibration"] = {"sparsity": lori.sparsity, "granularity": lori.granularity, "step": step,
                            "density": mask_density(calib.masks)}
    kept, total = sum(int(m.sum()) for m in calib.masks.values()), sum(m.numel() for m in calib.masks.values())
    say(f"calibration at step {step}: kept {kept:,} of {total:,} B entries ({kept / max(1, total):.1%}; sparsity "
        f"{lori.sparsity}, granularity {lori.granularity}) -> {mask_file}")
    _save_stage(module, "lori_d", step, stats, d_dir, summary, config_text)
    return calib.masks


def set_alpha(module: LoRIModule, alpha: float) -> None:
    """Give every adapter layer (and the config saved with the adapter) a new alpha."""
    module.set_alpha(alpha)


def run_sparse(
    module: LoRIModule, datamodule: L.LightningDataModule, make_trainer: TrainerFactory,
    cfg: PipelineConfig, masks: dict[str, torch.Tensor], summary: dict[str, Any], config_text: str | None,
) -> None:
    """LoRI-S: B := 0 under the masks, same A, train the kept entries only."""
    s_dir = Path(cfg.output_dir) / "lori_s"
    if _reuse_stage(module, s_dir, summary, "lori_s"):
        return
    if cfg.sparse_lr is not None:
        module.hparams.lr = cfg.sparse_lr
    if cfg.sparse_alpha is not None:
        set_alpha(module, cfg.sparse_alpha)
    set_masks(module.model, masks, reset=True)
    module.phase = "sparse"
    # B = 0 after the reset, so the model is exactly the base: reuse LoRI-D's starting loss
    base_loss = summary.get("lori_d", {}).get("val_loss_before")
    step, stats = _fit_stage(
        module, datamodule, make_trainer, cfg, "lori_s", cfg.sparse_steps, SparsePhase(masks, reset=True), base_loss,
        max_epochs=cfg.sparse_epochs,
    )
    stats["mask_sparsity"] = 1.0 - mask_density(get_masks(module.model))
    _save_stage(module, "lori_s", step, stats, s_dir, summary, config_text)


@handles_signals  # SIGTERM / SIGUSR1: checkpoint at the next step, one line, exit 128 + signal (preemption.py)
@run_lock.locks_output_dir("cfg")
def run_pipeline(
    module: LoRIModule, datamodule: L.LightningDataModule, make_trainer: TrainerFactory,
    cfg: PipelineConfig, config_text: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) LoRI-D -> calibration -> LoRI-S and write ``summary.json``.

    Holds the lock of ``cfg.output_dir`` throughout (``lori.training.run_lock``; a second live run on it
    raises RunLockedError).
    """
    method = module.hparams.get("method", "lori")
    if not module.method_entry.runs_pipeline:
        raise LoRIConfigError(f"lori pipeline runs LoRI-D -> calibration -> LoRI-S; model.method is {method!r}: "
                              "train baselines with `lori fit --config ...`")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"pipeline": asdict(cfg), "model": module.hparams.model,
                               "lori": module.lori_config.to_dict()}
    lori = module.lori_config
    say(f"LoRI-D -> calibration -> LoRI-S on {module.hparams.model}: r={lori.r}, alpha={lori.alpha}, "
        f"sparsity {lori.sparsity} ({lori.granularity}); files in {out}")
    masks = run_dense(module, datamodule, make_trainer, cfg, summary, config_text)
    run_sparse(module, datamodule, make_trainer, cfg, masks, summary, config_text)
    summary["precision"] = module.precision_info()  # base / adapter / compute dtypes that ran
    summary["paths"] = {
        "lori_d": str(out / "lori_d"), "lori_s": str(out / "lori_s"),
        "masks": str(out / CALIBRATION_MASKS), "tensorboard": str(out / "tb"),
    }
    if rank_zero_only.rank == 0:
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable end-of-run report."""
    d, s, paths = summary["lori_d"], summary["lori_s"], summary["paths"]

    def losses(stats: dict[str, Any]) -> str:
        if "val_loss_before" not in stats or "val_loss_after" not in stats:
            return "held-out loss: not measured (resumed or held_out_loss=false)"
        b, a = stats["val_loss_before"], stats["val_loss_after"]
        return f"held-out loss {b:.4f} -> {a:.4f} ({100 * (a - b) / b:+.1f}%)"

    lines = [
        "LoRI run summary",
        f"  model: {summary['model']}   r={summary['lori']['r']} alpha={summary['lori']['alpha']}"
        + (f" (LoRI-S alpha={summary['pipeline']['sparse_alpha']})" if summary["pipeline"].get("sparse_alpha") else ""),
        f"  LoRI-D: {losses(d)}; trainable params {d.get('trainable', 0):,}",
        f"  LoRI-S: {losses(s)}; trainable params {s.get('trainable', 0):,}"
        f" ({s.get('trainable', 0) / max(1, d.get('trainable', 1)):.3f}x of LoRI-D)",
        f"  mask sparsity: {s.get('mask_sparsity', float('nan')):.4f}"
        f" (target {summary['lori']['sparsity']}, granularity {summary['lori']['granularity']})",
        *([_precision_line(summary["precision"])] if "precision" in summary else []),
        f"  adapters: {paths['lori_d']}  {paths['lori_s']}",
        f"  masks: {paths['masks']}",
        *([f"  tensorboard: tensorboard --logdir {paths['tensorboard']}"]  # (not with trainer.logger: another)
          if Path(paths["tensorboard"]).is_dir() else []),
    ]
    return "\n".join(lines)


def _precision_line(p: dict[str, Any]) -> str:
    auto = " (model.dtype auto)" if p.get("auto") else ""
    checkpointing = "; activation checkpointing on" if p.get("gradient_checkpointing") else ""
    return (f"  precision: base {p['base']}{auto}, adapter {p['adapter']}, compute {p['compute']}"
            f" (trainer.precision {p.get('trainer_precision')}){checkpointing}"
            + (f"\n  base storage: {p['storage']}" if p.get("storage") else ""))
