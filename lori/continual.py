"""Continual learning with LoRI (paper Sec. 2.3, Fig. 3): a safety adapter, then fine-tuning of that
same adapter on task t under task t's mask, as chained ``Trainer.fit`` calls from one config.

    lori continual --config configs/experiment/continual_safety_gsm8k.yaml

    <output_dir>/safety/          phase 1: LoRI-D -> calibration -> LoRI-S on the safety data
                                  (skipped when ``continual.safety_adapter`` names a trained one)
    <output_dir>/task_mask/       task t's mask M_t: a LoRI-D run on the task, calibrated
                                  (skipped when ``continual.task_mask`` names a mask file)
    <output_dir>/task/            phase 2: the safety adapter trained on task t inside M_t
                                  (minus the safety mask with ``protect_safety``); every other
                                  entry of B keeps its safety value bit for bit
    <output_dir>/results.json     refusal and task metrics after every phase
    <output_dir>/continual.png    the paper's Fig. 3 as bars, per phase

A rerun with the same output_dir reuses finished phases.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lori.callbacks import SparsePhase
from lori.core import (
    adapter_from_model,
    apply_adapter,
    get_masks,
    load_adapter,
    load_masks,
    mask_density,
    set_masks,
)
from lori.core.io import CONFIG_FILE
from lori.core.masks import mask_overlap
from lori.data.datamodule import TaskDataModule
from lori.eval.official import check_float32, evaluation_weights
from lori.evaluate import EvalSettings, evaluate_model, headline, load_eval_sets
from lori.pipeline import PipelineConfig, _fit_stage, _save_stage, run_dense, run_pipeline

PHASES = ("base", "safety", "task")


class ContinualConfigError(ValueError):
    """A continual-learning config that cannot run (missing adapter or mask file, ...)."""


@dataclass
class ContinualConfig:
    """Phases of a continual-learning run.

    Args:
        output_dir: where every phase's adapter, the results and the plot go.
        safety_adapter: a trained safety adapter directory to start from; None = train one here
            (LoRI-D -> calibration -> LoRI-S on ``data``, the safety DataModule).
        safety_dense_steps: LoRI-D steps of the safety adapter.
        safety_sparse_steps: LoRI-S steps of the safety adapter (0 = keep the dense safety
            adapter, the paper's LoRI-D continual setting).
        safety_sparse_lr: learning rate of the safety LoRI-S (None = the model's ``lr``).
        task_mask: mask file of task t (lori's masks.safetensors or the original code's file);
            None = calibrate one with a LoRI-D run of ``task_mask_steps`` on the task.
        task_mask_steps: LoRI-D steps of that calibration run.
        task_steps: phase-2 steps on the task.
        task_epochs: phase-2 epochs instead of ``task_steps`` (the paper counts epochs).
        masked_task: train phase 2 inside the task mask (LoRI-S continual). False trains all of B
            from the safety values (the paper's LoRI-D continual setting; no mask is calibrated).
        task_lr: phase-2 learning rate (None = the model's ``lr``).
        protect_safety: train only M_t minus the safety mask, so every safety entry is kept.
        evaluate_base: also evaluate the base model (the reference bars of Fig. 3).
        checkpoint_every: steps between Lightning checkpoints within a phase.
        validate: held-out loss before and after each fit.
    """

    output_dir: str = "runs/continual"
    safety_adapter: str | None = None
    safety_dense_steps: int = 20
    safety_sparse_steps: int = 20
    safety_sparse_lr: float | None = None
    task_mask: str | None = None
    task_mask_steps: int = 20
    task_steps: int = 20
    task_epochs: int | None = None
    masked_task: bool = True
    task_lr: float | None = None
    protect_safety: bool = False
    evaluate_base: bool = True
    checkpoint_every: int = 10
    validate: bool = False

    def check(self) -> None:
        """Raise ContinualConfigError for files that do not exist or budgets that cannot run."""
        if self.safety_adapter is not None and not (Path(self.safety_adapter) / CONFIG_FILE).is_file():
            raise ContinualConfigError(f"safety_adapter {self.safety_adapter} is not an adapter directory")
        if self.task_mask is not None and not Path(self.task_mask).is_file():
            raise ContinualConfigError(f"task_mask file {self.task_mask} does not exist")
        if self.protect_safety and not self.masked_task:
            raise ContinualConfigError("protect_safety needs masked_task: true (a dense phase 2 trains every entry)")
        if self.task_steps < 1 or self.safety_dense_steps < 1 or self.task_mask_steps < 1:
            raise ContinualConfigError("task_steps, safety_dense_steps and task_mask_steps must be >= 1")


def training_mask(task_mask: dict[str, torch.Tensor], safety_mask: dict[str, torch.Tensor] | None,
                  protect: bool) -> dict[str, torch.Tensor]:
    """M_t, or M_t minus the safety mask when the safety entries are protected."""
    if not protect or not safety_mask:
        return task_mask
    return {p: m & ~safety_mask[p] for p, m in task_mask.items()}


def _evaluate(module: Any, settings: EvalSettings, eval_sets: dict[str, Any], phase: str,
              results: dict[str, Any], writer: Any) -> None:
    # protocol official: on the live model's weights with the adapter merged (float32), as the official
    # code evaluates each phase's adapter (src/eval_model.py:272-284); the live weights are restored after
    with evaluation_weights(module.model, settings):
        metrics = evaluate_model(module.model, module.tokenizer, settings, eval_sets=eval_sets)
    results[phase] = metrics
    if writer is not None:
        for task, values in metrics.items():
            for name, value in values.items():
                if name != "n":
                    writer.add_scalar(f"continual/{task}/{name}", value, PHASES.index(phase))


def _safety_phase(module: Any, datamodule: TaskDataModule, make_trainer: Any, cfg: ContinualConfig,
                  config_text: str | None, summary: dict[str, Any]) -> Any:
    if cfg.safety_adapter is not None:
        adapter = load_adapter(cfg.safety_adapter)
        apply_adapter(module.model, adapter)
        summary["safety"] = {"adapter": cfg.safety_adapter, "given": True}
        return adapter
    out = Path(cfg.output_dir) / "safety"
    pipe = PipelineConfig(output_dir=str(out), dense_steps=cfg.safety_dense_steps,
                          sparse_steps=max(cfg.safety_sparse_steps, 1), sparse_lr=cfg.safety_sparse_lr,
                          checkpoint_every=cfg.checkpoint_every, validate=cfg.validate)
    if cfg.safety_sparse_steps > 0:
        summary["safety"] = run_pipeline(module, datamodule, make_trainer, pipe, config_text)
    else:
        run_dense(module, datamodule, make_trainer, pipe, summary.setdefault("safety", {}), config_text)
    # the adapter the module now holds (what rank 0 saved), read on every rank without waiting for the file
    return adapter_from_model(module.model, module.lori_config, module.hparams.model, fingerprint=module.fingerprint)


def _task_mask(module: Any, task_data: TaskDataModule, make_trainer: Any, cfg: ContinualConfig,
               safety: Any, summary: dict[str, Any]) -> dict[str, torch.Tensor]:
    if cfg.task_mask is not None:
        return load_masks(cfg.task_mask)
    pipe = PipelineConfig(output_dir=str(Path(cfg.output_dir) / "task_mask"), dense_steps=cfg.task_mask_steps,
                          checkpoint_every=cfg.checkpoint_every, validate=cfg.validate)
    set_masks(module.model, None, reset=True)  # a fresh LoRI-D on the task: B = 0, dense
    module.phase = "dense"
    masks = run_dense(module, task_data, make_trainer, pipe, summary.setdefault("task_mask", {}), None)
    apply_adapter(module.model, safety)  # back to the safety adapter
    return masks


def run_continual(
    module: Any, safety_data: TaskDataModule, task_data: TaskDataModule, make_trainer: Any,
    cfg: ContinualConfig, settings: EvalSettings, config_text: str | None = None,
) -> dict[str, Any]:
    """Safety adapter -> task t under M_t, evaluating after every phase."""
    cfg.check()
    if settings.protocol == "official":  # before any training
        check_float32(module.model, "set model.dtype: float32")
    summary_items: dict[str, Any] = {}
    eval_sets = load_eval_sets(settings, summary_items)  # before any training: bad tasks stop here
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"continual": asdict(cfg), "model": module.hparams.model, "eval_items": summary_items}
    results: dict[str, Any] = {}
    writer = None
    if rank_zero_only.rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb" / "continual"))
    if cfg.evaluate_base:
        _evaluate(module, settings, eval_sets, "base", results, writer)

    safety = _safety_phase(module, safety_data, make_trainer, cfg, config_text, summary)
    _evaluate(module, settings, eval_sets, "safety", results, writer)

    task_dir = out / "task"
    if (task_dir / CONFIG_FILE).is_file():
        apply_adapter(module.model, load_adapter(task_dir))
        summary["task"] = {"reused": True}
    else:
        if cfg.task_lr is not None:
            module.hparams.lr = cfg.task_lr
        pipe = PipelineConfig(output_dir=str(out), checkpoint_every=cfg.checkpoint_every, validate=cfg.validate)
        stats: dict[str, Any] = {}
        if cfg.masked_task:
            task_mask = _task_mask(module, task_data, make_trainer, cfg, safety, summary)
            train_mask = training_mask(task_mask, safety.masks, cfg.protect_safety)
            set_masks(module.model, train_mask, reset=False)  # keep the safety B; train inside the mask only
            module.phase, callback = "sparse", SparsePhase(train_mask, reset=False)
            stats["task_mask_density"] = mask_density(task_mask)
            if safety.masks:
                stats["overlap_with_safety_mask"] = mask_overlap(task_mask, safety.masks)
        else:
            set_masks(module.model, None, reset=False)  # dense B from the safety values
            module.phase, callback = "dense", L.Callback()
        step, fit_stats = _fit_stage(module, task_data, make_trainer, pipe, "task", cfg.task_steps, callback,
                                     max_epochs=cfg.task_epochs)
        stats |= fit_stats
        stats["trained_density"] = mask_density(get_masks(module.model)) if cfg.masked_task else 1.0
        _save_stage(module, "task", step, stats, task_dir, summary, config_text)
    _evaluate(module, settings, eval_sets, "task", results, writer)

    summary["results"] = results
    if rank_zero_only.rank == 0:
        (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
        plot_phases(results, out / "continual.png")
        writer.close()
    return summary


def plot_phases(results: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    """Bars per evaluation task, one bar per phase (paper Fig. 3 layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p in PHASES if p in results]
    tasks = [t for t in results[phases[0]] if t != "nlu_average"]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.2))
    width = 0.8 / len(phases)
    for i, phase in enumerate(phases):
        values = [100 * headline(t, results[phase][t])[1] for t in tasks]
        ax.bar([x + i * width for x in range(len(tasks))], values, width, label=phase)
    ax.set_xticks([x + width * (len(phases) - 1) / 2 for x in range(len(tasks))])
    ax.set_xticklabels([f"{t}\n({headline(t, results[phases[0]][t])[0]})" for t in tasks], fontsize=8)
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    ax.set_title("continual learning: safety -> task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_results(summary: dict[str, Any]) -> str:
    lines = ["phase    " + "  ".join(f"{t:>22}" for t in next(iter(summary["results"].values())))]
    for phase, metrics in summary["results"].items():
        cells = []
        for task, values in metrics.items():
            if task == "nlu_average":
                cells.append(f"{'avg':>14} {next(iter(values.values())):7.4f}")
                continue
            name, value = headline(task, values)
            cells.append(f"{name:>14} {value:7.4f}")
        lines.append(f"{phase:<8} " + "  ".join(cells))
    return "\n".join(lines)
