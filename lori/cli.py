"""``lori``: the command line, built on LightningCLI.

    lori pipeline --config configs/experiment/default.yaml    LoRI-D -> calibration -> LoRI-S
    lori fit      --config configs/experiment/default.yaml    one Trainer.fit (LightningCLI)
    lori validate | test | predict --config ...               LightningCLI's other subcommands
    lori <subcommand> --help                                  every option with its default

The same YAML serves every subcommand: ``model:`` (LoRIModule), ``data:`` (TaskDataModule),
``trainer:`` (Lightning Trainer) and ``pipeline:`` (PipelineConfig, read by ``pipeline`` only).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lori import diagnostics, dryrun, eval_command, merging
from lori.callbacks import Unshard
from lori.core import AdapterFileError, AdapterMismatchError, InjectionError, LoRIConfigError
from lori.data.datamodule import TaskDataModule, accumulation_steps
from lori.data.sources import DataError
from lori.continual import ContinualConfig, ContinualConfigError, run_continual
from lori.continual import format_results as format_continual
from lori.evaluate import EvalError, EvalSettings
from lori.models import ModelLoadError
from lori.models import _resolve_dtype as resolve_dtype
from lori.module import CheckpointMismatchError, LoRIModule
from lori.pipeline import PipelineConfig, format_summary, run_pipeline
from lori.rng_state import RNGState

USAGE = """usage: lori {pipeline,fit,validate,test,predict,continual,eval,merge,diagnose,dryrun} [--config FILE] [options]

  pipeline   LoRI-D -> mask calibration -> LoRI-S, chained Trainer.fit calls (the main job)
  fit        one Trainer.fit of the configured module (LightningCLI)
  validate   held-out loss (LightningCLI)
  test       test loop (LightningCLI)
  predict    predict loop (LightningCLI)
  continual  safety adapter -> task t under M_t, evaluated after each phase (paper Fig. 3)
  eval       evaluate a base model, an adapter or a merged model on the paper's tasks (lori.eval_command)
  merge      merge T adapters, evaluate on every task, write a Table-3-style table (lori.merging)
  dryrun     trainable parameters and memory of a config on the meta device (no weights, no GPU)
  diagnose   |cos(ΔW)| and mask overlap between adapters, sparsity heatmaps (lori.diagnostics)

`lori <subcommand> --help` lists every option with its default.
"""


# errors in what the user gave (config, paths, files): reported as one line, no traceback
USER_ERRORS = (
    LoRIConfigError, InjectionError, AdapterFileError, AdapterMismatchError, ModelLoadError,
    DataError, CheckpointMismatchError, merging.MergeConfigError, EvalError,
    ContinualConfigError,
)


def _is_zero3(trainer: Any) -> bool:
    """Whether the trainer config asks for DeepSpeed ZeRO stage 3 (by registry name or by class_path)."""
    strategy = trainer.get("strategy")
    if isinstance(strategy, str):
        return strategy.startswith("deepspeed_stage_3")
    if not hasattr(strategy, "get"):  # None, or an object built elsewhere
        return False
    init = strategy.get("init_args") or {}
    return str(strategy.get("class_path", "")).endswith("DeepSpeedStrategy") and init.get("stage", 2) == 3


def _configured_world_size(trainer: Any) -> int | None:
    """devices x num_nodes when the config fixes them (an int, a list or a digit string); None for "auto"."""
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1) or 1
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, list | tuple):
        devices = len(devices)
    if isinstance(devices, int) and devices > 0 and isinstance(nodes, int):
        return devices * nodes
    return None


class LoRICLI(LightningCLI):
    """LightningCLI over LoRIModule and TaskDataModule, with the pipeline's options."""

    runs_stages = True  # without a subcommand: lori pipeline / continual, which chain Trainers

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(PipelineConfig, "pipeline")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # parse errors raise (reported as one line by main) instead of printing the whole usage
        kwargs["parser_kwargs"] = {"exit_on_error": False, **kwargs.get("parser_kwargs", {})}
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        try:  # bad values stop here, before the model loads
            LoRIModule.check_options(cfg["model"], cfg.get("trainer"))
        except ValueError as err:
            raise LoRIConfigError(str(err)) from None
        if cfg["model"].get("dtype") is not None:
            resolve_dtype(cfg["model"]["dtype"])
        if self.subcommand is None and self.runs_stages and _is_zero3(cfg.get("trainer") or {}):
            raise LoRIConfigError(
                "DeepSpeed ZeRO-3 partitions the model in a way lori cannot hand from one stage to the next: "
                "run lori pipeline / lori continual with configs/trainer/fsdp.yaml (ZeRO-3 serves lori fit)"
            )
        world = _configured_world_size(cfg.get("trainer") or {})
        if cfg["data"].get("global_batch_size") is not None and world is not None:
            accumulation_steps(cfg["data"]["global_batch_size"], cfg["data"]["batch_size"], world)  # before any output

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.datamodule.set_tokenizer(self.model.tokenizer)
        self.datamodule.validate()  # missing data / fields stop here, before training
        if self.subcommand in (None, "fit"):  # tokenise now (once): examples all too long stop here too
            self.datamodule.setup("fit")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer | None:
        if self.subcommand is None:  # pipeline / continual: make_trainer_factory builds one Trainer per stage
            return None  # (a Trainer built here would bind the YAML's strategy object to itself)
        return super().instantiate_trainer(**kwargs)


class _ParseOnlyCLI(LoRICLI):
    runs_stages = False  # parsing for checks and dry runs: any strategy preset may be composed

    def instantiate_classes(self) -> None:  # parse and check options, build nothing
        pass


def parse_config(path: str | Path) -> Any:
    """Parse and check a YAML config as ``lori pipeline`` would, without loading anything."""
    return _ParseOnlyCLI(
        LoRIModule, TaskDataModule, run=False, args=["--config", str(path)], save_config_callback=None
    ).config


def parse_configs(*paths: str | Path) -> Any:
    """Parse several YAMLs composed in order (e.g. an experiment + a trainer preset), loading nothing."""
    args = [a for path in paths for a in ("--config", str(path))]
    return _ParseOnlyCLI(LoRIModule, TaskDataModule, run=False, args=args, save_config_callback=None).config


def make_trainer_factory(trainer_config: dict[str, Any], output_dir: Path, checkpoint_every: int):
    """A function building one Trainer per stage from the YAML's ``trainer:`` settings."""

    def make(
        stage: str, max_steps: int, callbacks: list, logger: bool = True, checkpoint: bool = True,
        max_epochs: int | None = None,
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
                dirpath=output_dir / f"{stage}_ckpt", save_last=True, save_top_k=0,
                every_n_train_steps=checkpoint_every,
            ))
            extra.append(RNGState())  # a resumed stage draws the same dropout masks
        kwargs["enable_checkpointing"] = checkpoint
        kwargs["logger"] = TensorBoardLogger(str(output_dir), name="tb", version=stage) if logger else False
        return L.Trainer(callbacks=extra + list(callbacks), **kwargs)

    return make


def pipeline(argv: list[str]) -> dict[str, Any]:
    """Parse ``lori pipeline`` arguments and run the three stages."""
    cli = LoRICLI(
        LoRIModule, TaskDataModule, run=False, args=argv, save_config_callback=None,
        parser_kwargs={"prog": "lori pipeline", "description": "LoRI-D -> mask calibration -> LoRI-S"},
    )
    cfg = PipelineConfig(**cli.config["pipeline"])
    trainer_config = cli.config_init["trainer"]
    out = Path(cfg.output_dir)
    make = make_trainer_factory({**trainer_config}, out, cfg.checkpoint_every)
    config_text = cli.parser.dump(cli.config, skip_none=False)
    summary = run_pipeline(cli.model, cli.datamodule, make, cfg, config_text)
    if rank_zero_only.rank == 0:
        print(format_summary(summary))
    return summary


class ContinualCLI(LoRICLI):
    """The pipeline's parser with the continual phases, the task's data and evaluation settings."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(ContinualConfig, "continual")
        parser.add_class_arguments(TaskDataModule, "task_data", instantiate=False)
        parser.add_class_arguments(EvalSettings, "eval")


def continual(argv: list[str]) -> dict[str, Any]:
    """Parse ``lori continual`` arguments and run safety -> task (paper Fig. 3)."""
    cli = ContinualCLI(
        LoRIModule, TaskDataModule, run=False, args=argv, save_config_callback=None,
        parser_kwargs={"prog": "lori continual", "description": "safety adapter -> task t under M_t"},
    )
    cfg = ContinualConfig(**cli.config["continual"])
    settings = cli.config_init["eval"]
    cfg.check()
    settings.check()
    task_data = TaskDataModule(**cli.config["task_data"])
    task_data.set_tokenizer(cli.model.tokenizer)
    task_data.validate()  # the task's data is checked before the safety phase trains
    make = make_trainer_factory({**cli.config_init["trainer"]}, Path(cfg.output_dir), cfg.checkpoint_every)
    config_text = cli.parser.dump(cli.config, skip_none=False)
    summary = run_continual(cli.model, cli.datamodule, task_data, make, cfg, settings, config_text)
    if rank_zero_only.rank == 0:
        print(format_continual(summary))
        print(f"results: {Path(cfg.output_dir) / 'results.json'}   plot: {Path(cfg.output_dir) / 'continual.png'}")
    return summary


class _ParseOnlyContinualCLI(ContinualCLI):
    runs_stages = False

    def instantiate_classes(self) -> None:
        pass


def parse_continual_config(path: str | Path) -> Any:
    """Parse and check a ``lori continual`` YAML without loading anything."""
    return _ParseOnlyContinualCLI(
        LoRIModule, TaskDataModule, run=False, args=["--config", str(path)], save_config_callback=None
    ).config


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lori`` command; input errors end with one line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    try:
        if argv[0] == "pipeline":
            pipeline(argv[1:])
        elif argv[0] == "dryrun":
            dryrun.main(argv[1:])
        elif argv[0] == "continual":
            continual(argv[1:])
        elif argv[0] == "eval":
            eval_command.main(argv[1:])
        elif argv[0] == "merge":
            merging.main(argv[1:])
        elif argv[0] == "diagnose":
            diagnostics.main(argv[1:])
        else:
            LoRICLI(LoRIModule, TaskDataModule, args=argv, save_config_kwargs={"overwrite": True})
    except USER_ERRORS as err:
        print(f"lori: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except ArgumentError as err:  # a config or command-line option the parser refuses
        print(f"lori: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except FloatingPointError as err:  # a diverged run: say where, keep the checkpoints
        print(f"lori: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
