"""``lori continual``: a safety adapter, then task t inside task t's mask (paper Sec. 2.3, Fig. 3).

    lori continual --config configs/experiment/continual_safety_gsm8k.yaml

``ContinualCLI`` is the pipeline's parser (``lori.commands.lightning_cli.LoRICLI``) with the
``continual:`` phases, the task's ``task_data:`` and the ``eval:`` settings; the phases run in
``lori.training.continual``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lori.commands.lightning_cli import LoRICLI, add_protocol_argument, dump_config
from lori.core import LoRIConfig
from lori.data.datamodule import TaskDataModule
from lori.eval.evaluator import EvalSettings
from lori.training import run_lock
from lori.training.continual import ContinualConfig, run_continual
from lori.training.continual import format_results as format_continual
from lori.training.continual_sets import ContinualSet, apply_continual_set
from lori.training.loggers import RunLoggers
from lori.training.module import LoRIModule
from lori.training.pipeline import make_trainer_factory


class ContinualCLI(LoRICLI):
    """The pipeline's parser with the continual phases, the task's data and evaluation settings."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_protocol_argument(parser)
        parser.add_class_arguments(ContinualConfig, "continual")
        parser.add_class_arguments(TaskDataModule, "task_data", instantiate=False)
        parser.add_class_arguments(EvalSettings, "eval")
        parser.add_argument("--continual_set", type=ContinualSet | None, default=None,
                            help="the safety and task runs, one lr per adaptation (lori.training.continual_sets)")
        parser.add_argument("--adaptation", type=Literal["lori_d", "lori_s"] | None, default=None,
                            help="with continual_set: LoRI-D (dense phase 2) or LoRI-S (inside the task's mask)")

    def before_instantiate_classes(self) -> None:
        self.config = apply_continual_set(self.parser, self.config)  # --adaptation's settings, before any check
        super().before_instantiate_classes()
        EvalSettings(**self.config["eval"].as_dict())  # eval.protocol official conflicts stop here, before the model
        if self.runs_stages:  # missing files and a task mask of another A stop here, before the model loads
            cfg = self.config
            continual = ContinualConfig(**cfg["continual"])
            continual.check()
            lori = cfg["model"]["lori"]
            lori = lori if isinstance(lori, LoRIConfig) else LoRIConfig.from_dict(dict(lori))
            for note in continual.check_pairing(lori):
                if rank_zero_only.rank == 0:
                    print(f"lori: note: {note}", file=sys.stderr)


@run_lock.scoped
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
    task_data.check_data()  # the task's data is checked before the safety phase trains
    trainer_config = cli.config_init["trainer"]
    hparams = {"continual": asdict(cfg)}  # logged with the module's and the data's, once per run
    loggers = RunLoggers(trainer_config.get("logger"), Path(cfg.output_dir), hparams)
    make = make_trainer_factory({**trainer_config}, Path(cfg.output_dir), cfg.checkpoint_every, loggers)
    config_text = dump_config(cli)
    summary = run_continual(cli.model, cli.datamodule, task_data, make, cfg, settings, config_text, loggers)
    loggers.finalize()
    if rank_zero_only.rank == 0:
        print(format_continual(summary))
        print(f"results: {Path(cfg.output_dir) / 'results.json'}   plot: {Path(cfg.output_dir) / 'continual.png'}")
    return summary


class _ParseOnlyContinualCLI(ContinualCLI):
    runs_stages = False

    def instantiate_classes(self) -> None:
        pass


def parse_continual_config(path: str | Path, *options: str) -> Any:
    """Parse and check a ``lori continual`` YAML (and ``options``, e.g. ``--adaptation lori_s``) without
    loading anything."""
    return _ParseOnlyContinualCLI(
        LoRIModule, TaskDataModule, run=False, args=["--config", str(path), *options], save_config_callback=None
    ).config
