"""Continual learning with LoRI (paper Sec. 2.3, Fig. 3): a safety adapter, then fine-tuning of that
same adapter on task t under task t's mask, as chained ``Trainer.fit`` calls from one config.

    lori continual --config configs/experiment/continual_safety_gsm8k.yaml

    <output_dir>/safety/          phase 1: LoRI-D -> calibration -> LoRI-S on the safety data
                                  (skipped when ``continual.safety_adapter`` names a trained one)
    <output_dir>/task_mask/       task t's mask M_t: a LoRI-D run on the task from the safety
                                  adapter's A, calibrated (skipped when ``continual.task_mask``
                                  names a mask file)
    <output_dir>/task/            phase 2: the safety adapter trained on task t inside M_t
                                  (minus the safety mask with ``protect_safety``); every other
                                  entry of B keeps its safety value bit for bit
    <output_dir>/results.json     refusal and task metrics after every phase
    <output_dir>/continual.png    the paper's Fig. 3 as bars, per phase

A rerun with the same output_dir reuses finished phases. The directory holds one run at a time
(``lori.training.run_lock``); results are written atomically.

M_t must be calibrated under the safety adapter's A: it keeps the largest entries of a B trained
against one A, and phase 2 trains the safety adapter's B against the safety A. lori's mask files
record their A (``MaskRecord``: seed and digest, base fingerprint); ``ContinualConfig.check_pairing``
refuses a mask of another A before the model loads. The original code pairs them by giving every
task of a base model the same A (torch's default generator after the same set-up, train_lori.py),
so its ``masks/0.9_mask.pt`` of the task's own LoRI-D run fits; such files carry no record and are
taken with a note. lori's paper configs use one ``model.lori.seed`` for every task to match.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lori.core import (
    LoRIConfig,
    LoRIConfigError,
    adapter_from_model,
    apply_adapter,
    get_A,
    get_masks,
    load_adapter,
    load_masks,
    mask_density,
    set_masks,
)
from lori.core.adapter import a_digest
from lori.core.atomic_files import atomic_write, write_text_atomic
from lori.core.io import CONFIG_FILE, AIdentity, find_mask_file, read_a_identity, read_mask_record
from lori.core.masks import mask_overlap
from lori.data.datamodule import TaskDataModule
from lori.eval.evaluator import EvalSettings, evaluate_model, headline, load_eval_sets
from lori.eval.official import check_float32, evaluation_weights
from lori.training import run_lock
from lori.training.callbacks import SparsePhase
from lori.training.loggers import RunLoggers, scoped
from lori.training.pipeline import (
    PipelineConfig,
    _fit_stage,
    _save_stage,
    refuse_renamed,
    run_dense,
    run_pipeline,
)
from lori.training.preemption import handles_signals

PHASES = ("base", "safety", "task")


class ContinualConfigError(LoRIConfigError):
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
        task_mask: mask file of task t (lori's masks.safetensors or the original code's
            ``masks/<s>_mask.pt``), or a directory holding one (``lori.core.io.find_mask_file``);
            it must be calibrated under the safety adapter's A (``check_pairing``). None = calibrate
            one with a LoRI-D run of ``task_mask_steps`` on the task from the safety adapter's A.
        task_mask_steps: LoRI-D steps of that calibration run.
        task_steps: phase-2 steps on the task.
        task_epochs: phase-2 epochs instead of ``task_steps`` (the paper counts epochs).
        masked_task: train phase 2 inside the task mask (LoRI-S continual). False trains all of B
            from the safety values (the paper's LoRI-D continual setting; no mask is calibrated).
        task_lr: phase-2 learning rate (None = the model's ``lr``).
        protect_safety: train only M_t minus the safety mask, so every safety entry is kept.
        evaluate_base: also evaluate the base model (the reference bars of Fig. 3).
        checkpoint_every: steps between Lightning checkpoints within a phase.
        held_out_loss: held-out loss before and after each fit.
        validate: the old name of ``held_out_loss``: set, it stops with one line naming the new one.
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
    held_out_loss: bool = False
    validate: bool | None = None  # renamed: held_out_loss (lori.training.pipeline.RENAMED_KEYS)

    def __post_init__(self) -> None:
        refuse_renamed(vars(self), "continual")

    def check(self) -> None:
        """Raise ContinualConfigError for files that do not exist or budgets that cannot run, and
        AdapterFileError for a safety adapter or task mask that cannot be read (or holds NaN / inf)."""
        if self.safety_adapter is not None and not (Path(self.safety_adapter) / CONFIG_FILE).is_file():
            raise ContinualConfigError(f"safety_adapter {self.safety_adapter} is not an adapter directory")
        if self.task_mask is not None and not Path(self.task_mask).exists():
            raise ContinualConfigError(f"task_mask file {self.task_mask} does not exist")
        if self.safety_adapter is not None:
            load_adapter(self.safety_adapter)  # read now: a corrupt file stops before the base evaluation
        if self.task_mask is not None and Path(self.task_mask).is_file():
            load_masks(self.task_mask)  # a directory is searched (and its file read) by check_pairing
        if self.protect_safety and not self.masked_task:
            raise ContinualConfigError("protect_safety needs masked_task: true (a dense phase 2 trains every entry)")
        if self.task_steps < 1 or self.safety_dense_steps < 1 or self.task_mask_steps < 1:
            raise ContinualConfigError("task_steps, safety_dense_steps and task_mask_steps must be >= 1")

    def task_mask_file(self, lori: LoRIConfig) -> Path | None:
        """The mask file ``task_mask`` names (a directory is searched for the model's sparsity), or None."""
        if self.task_mask is None or not self.masked_task:
            return None
        return find_mask_file(self.task_mask, lori.sparsity, lori.granularity)

    def check_pairing(self, lori: LoRIConfig, model_A: Mapping[str, torch.Tensor] | None = None,
                      fingerprint: str | None = None) -> list[str]:
        """Refuse a task mask calibrated under another A (or base, or rank) than the safety adapter's.

        Reads file headers, lori_meta.json and 4 A tensors only, so it runs before the model loads.
        The safety A is the given ``safety_adapter``'s, else the one this run draws from
        ``lori.seed`` (its digest when ``model_A``, the model's A, is given).

        Returns:
            Notes for the user: a mask without a record (the original code's .pt files) cannot be checked.

        Raises:
            ContinualConfigError: the mask's record names another A, base or rank.
        """
        mask_file = self.task_mask_file(lori)
        if mask_file is None:
            return []
        load_masks(mask_file)  # unreadable, or holding NaN / inf: refused here
        record = read_mask_record(mask_file)
        if record is None:
            return [(f"task_mask {mask_file} carries no record of the A it was calibrated under (the original LoRI "
                     "code's .pt masks, or an older lori file): lori cannot check that it fits the safety adapter's "
                     "A; it must come from a LoRI-D run with that A (the original code gives every task the same A)")]
        if self.safety_adapter is not None:
            safety = read_a_identity(self.safety_adapter)
            source = f"the safety adapter {self.safety_adapter}"
        else:
            digest = a_digest(model_A) if model_A is not None else None
            safety = AIdentity(lori.seed if lori.seed >= 0 else None, digest, None, lori.r)
            source = "the safety adapter this run trains"
        if safety.base_fingerprint is None:
            safety = replace(safety, base_fingerprint=fingerprint)
        why = record.mismatch(safety)
        if why is not None:
            seed = f": model.lori.seed: {safety.seed}" if safety.seed is not None else " (it has no lori seed)"
            raise ContinualConfigError(
                f"task_mask {mask_file} does not fit {source}: {why}; calibrate M_t with a LoRI-D run that uses "
                f"the safety adapter's A{seed}, on its base model, or set continual.task_mask: null to calibrate "
                "it in this run"
            )
        return []


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
        # A and alpha are now the safety adapter's: the masks and adapters this run writes must say so
        module.lori_config = replace(module.lori_config, seed=adapter.config.seed, alpha=adapter.config.alpha)
        summary["safety"] = {"adapter": cfg.safety_adapter, "given": True, "seed": adapter.config.seed}
        return adapter
    out = Path(cfg.output_dir) / "safety"
    pipe = PipelineConfig(output_dir=str(out), dense_steps=cfg.safety_dense_steps,
                          sparse_steps=max(cfg.safety_sparse_steps, 1), sparse_lr=cfg.safety_sparse_lr,
                          checkpoint_every=cfg.checkpoint_every, held_out_loss=cfg.held_out_loss)
    if cfg.safety_sparse_steps > 0:
        summary["safety"] = run_pipeline(module, datamodule, scoped(make_trainer, "safety"), pipe, config_text)
    else:
        run_dense(module, datamodule, scoped(make_trainer, "safety"), pipe, summary.setdefault("safety", {}),
                  config_text)
    # the adapter the module now holds (what rank 0 saved), read on every rank without waiting for the file
    return adapter_from_model(module.model, module.lori_config, module.hparams.model, fingerprint=module.fingerprint)


def _task_mask(module: Any, task_data: TaskDataModule, make_trainer: Any, cfg: ContinualConfig,
               safety: Any, summary: dict[str, Any]) -> dict[str, torch.Tensor]:
    mask_file = cfg.task_mask_file(module.lori_config)
    if mask_file is not None:
        return load_masks(mask_file)
    pipe = PipelineConfig(output_dir=str(Path(cfg.output_dir) / "task_mask"), dense_steps=cfg.task_mask_steps,
                          checkpoint_every=cfg.checkpoint_every, held_out_loss=cfg.held_out_loss)
    set_masks(module.model, None, reset=True)  # a fresh LoRI-D on the task: B = 0, dense
    module.phase = "dense"
    masks = run_dense(module, task_data, scoped(make_trainer, "task_mask"), pipe, summary.setdefault("task_mask", {}),
                      None)
    apply_adapter(module.model, safety)  # back to the safety adapter
    return masks


@handles_signals  # SIGTERM / SIGUSR1: checkpoint at the next step, one line, exit 128 + signal (preemption.py)
@run_lock.locks_output_dir("cfg")
def run_continual(
    module: Any, safety_data: TaskDataModule, task_data: TaskDataModule, make_trainer: Any,
    cfg: ContinualConfig, settings: EvalSettings, config_text: str | None = None, loggers: RunLoggers | None = None,
) -> dict[str, Any]:
    """Safety adapter -> task t under M_t, evaluating after every phase (``cfg.output_dir`` locked).

    The evaluations go to ``loggers`` (the command's ``trainer.logger``; default TensorBoard in
    <output_dir>/tb/continual) as ``continual/<task>/<metric>`` at the phase's index.
    """
    cfg.check()
    if settings.protocol == "official":  # before any training
        check_float32(module.model, "set model.dtype: float32")
    # the model's A is the one an in-run safety adapter trains with: its digest settles the pairing
    drawn_A = get_A(module.model) if cfg.safety_adapter is None and cfg.task_mask is not None else None
    notes = cfg.check_pairing(module.lori_config, drawn_A, module.fingerprint)
    summary_items: dict[str, Any] = {}
    eval_sets = load_eval_sets(settings, summary_items)  # before any training: bad tasks stop here
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"continual": asdict(cfg), "model": module.hparams.model, "eval_items": summary_items}
    mask_file = cfg.task_mask_file(module.lori_config)
    if mask_file is not None:
        summary["task_mask_file"] = {"path": str(mask_file), "a_checked": not notes, "notes": notes}
    results: dict[str, Any] = {}
    writer = None
    if rank_zero_only.rank == 0:
        writer = (loggers if loggers is not None else RunLoggers(None, out)).evaluation_writer("continual")
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
        pipe = PipelineConfig(output_dir=str(out), checkpoint_every=cfg.checkpoint_every, held_out_loss=cfg.held_out_loss)
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
        write_text_atomic(out / "results.json", json.dumps(summary, indent=2, default=str))
        plot_phases(results, out / "continual.png")
        if writer is not None:
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
    with atomic_write(path) as f:
        fig.savefig(f, dpi=120, format="png")
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
