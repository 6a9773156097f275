"""``lori pipeline``: LoRI-D -> mask calibration -> LoRI-S from one config (paper Alg. 1).

    lori pipeline --config configs/experiment/default.yaml [--config configs/trainer/ddp.yaml] [--<key> value]

The config is parsed and checked by ``LoRICLI`` (``lori.commands.lightning_cli``), the stages run
as chained ``Trainer.fit`` calls (``lori.training.pipeline``), one Trainer each.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lori.commands.lightning_cli import LoRICLI, dump_config
from lori.data.datamodule import TaskDataModule
from lori.training import run_lock
from lori.training.loggers import RunLoggers
from lori.training.module import LoRIModule
from lori.training.pipeline import (
    PipelineConfig,
    format_summary,
    make_trainer_factory,
    run_pipeline,
)


@run_lock.scoped  # output_dir is locked while the arguments are parsed, before the model loads
def pipeline(argv: list[str]) -> dict[str, Any]:
    """Parse ``lori pipeline`` arguments and run the three stages."""
    cli = LoRICLI(
        LoRIModule, TaskDataModule, run=False, args=argv, save_config_callback=None,
        parser_kwargs={"prog": "lori pipeline", "description": "LoRI-D -> mask calibration -> LoRI-S"},
    )
    cfg = PipelineConfig(**cli.config["pipeline"])
    trainer_config = cli.config_init["trainer"]
    out = Path(cfg.output_dir)
    hparams = {"pipeline": asdict(cfg)}  # logged with the module's and the data's, once per run
    loggers = RunLoggers(trainer_config.get("logger"), out, hparams)
    make = make_trainer_factory({**trainer_config}, out, cfg.checkpoint_every, loggers)
    config_text = dump_config(cli)
    summary = run_pipeline(cli.model, cli.datamodule, make, cfg, config_text)
    loggers.finalize()
    if rank_zero_only.rank == 0:
        print(format_summary(summary))
    return summary
