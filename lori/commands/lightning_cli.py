"""LoRICLI: the LightningCLI that parses and checks a training config, and runs LightningCLI's own
subcommands.

    lori fit      --config configs/experiment/default.yaml    one Trainer.fit (LightningCLI)
    lori fit      --config ... --model.method dora            a baseline: budget, adapter dir and logs
                                                              derived from pipeline: (baseline_fit)
    lori validate | test | predict --config ...               LightningCLI's other subcommands

The same YAML serves every training subcommand: ``model:`` (LoRIModule), ``data:``
(TaskDataModule), ``trainer:`` (Lightning Trainer) and ``pipeline:`` (PipelineConfig, read by
``lori pipeline`` only, ``lori.commands.pipeline_command``). ``parse_config`` / ``parse_configs``
parse and check a YAML as ``lori pipeline`` would, loading nothing (``lori dryrun`` and the
notebooks use them); every check runs before the model loads.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lori.core import LoRIConfigError
from lori.core.protocol import apply_official, check_protocol
from lori.data.datamodule import TaskDataModule, accumulation_steps
from lori.data.sources import DataError
from lori.training import console, preemption, progress, run_lock
from lori.training.callbacks import SaveAdapter
from lori.training.checkpoint_io import with_atomic_checkpoints
from lori.training.continual import ContinualConfig
from lori.training.fit_settings import apply_fit_settings
from lori.training.module import LoRIModule
from lori.training.pipeline import PipelineConfig, refuse_renamed
from lori.training.preemption import PreemptionCheckpoint

FIT_RESUME = "rerun with --ckpt_path {path} to resume"  # lori fit resumes from the checkpoint it is given

# sections of a training config that carry a `protocol` of their own, set from the top-level switch
PROTOCOL_SECTIONS = ("model", "data", "task_data", "eval")


def _check_trainer_options(trainer: Any) -> None:
    """Trainer values that Lightning would refuse (or divide by) only once a Trainer is built."""
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if isinstance(accumulate, int) and accumulate < 1:
        raise LoRIConfigError(f"trainer.accumulate_grad_batches must be >= 1, got {accumulate}")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and clip < 0:
        raise LoRIConfigError(f"trainer.gradient_clip_val must be >= 0 (or null: no clipping), got {clip}")
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and (devices == 0 or devices < -1):
        raise LoRIConfigError(f"trainer.devices must be >= 1, -1 (all) or auto, got {devices}")
    for name in ("max_steps", "max_epochs"):
        value = trainer.get(name)
        if value is not None and value < -1:
            raise LoRIConfigError(f"trainer.{name} must be >= 0 or -1 (no limit), got {value}")


def check_run_options(cfg: Any, subcommand: str | None, runs: bool = True) -> None:
    """Every cheap check of a parsed config that no class checks where it is defined, before anything
    loads: data, trainer and the pipeline's stage budgets (``model:`` is ``LoRIModule.check_options``');
    with ``runs`` (not a parse-only check of a config whose inputs may not exist yet) also the continual
    phases' files. Raises a LoRIError naming the bad value."""
    TaskDataModule.check_options(cfg["data"])
    if cfg.get("task_data") is not None:
        TaskDataModule.check_options(cfg["task_data"])
    _check_trainer_options(cfg.get("trainer") or {})
    if subcommand is None and cfg.get("pipeline") is not None:
        pipe = PipelineConfig(**cfg["pipeline"])
        if runs and pipe.held_out_loss and cfg["data"].get("held_out") == 0:  # (a `lori fit` config parses here too)
            raise DataError("data.held_out is 0 but pipeline.held_out_loss is true: the held-out loss needs held-out "
                            "examples (set data.held_out > 0, or pipeline.held_out_loss: false)")
    if subcommand is None and cfg.get("continual") is not None and runs:
        ContinualConfig(**cfg["continual"]).check()


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
        add_protocol_argument(parser)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # parse errors raise (reported as one line by main) instead of printing the whole usage
        kwargs["parser_kwargs"] = {"exit_on_error": False, **kwargs.get("parser_kwargs", {})}
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        parser = self._subcommand_parsers[self.subcommand] if self.subcommand else self.parser
        for section in ("pipeline", "continual"):  # a renamed key (pipeline.validate): one line naming the new one
            refuse_renamed(cfg.get(section), section)
        if self.subcommand == "fit":  # a baseline's budget, adapter dir and logs from pipeline: (baseline_fit)
            cfg = self.config[self.subcommand] = apply_fit_settings(parser, cfg)
        apply_protocol(cfg, parser.get_defaults())
        try:  # bad values stop here, before the model loads
            LoRIModule.check_options(cfg["model"], cfg.get("trainer"))
        except ValueError as err:
            raise LoRIConfigError(str(err)) from None
        if self.subcommand is None and self.runs_stages and _is_zero3(cfg.get("trainer") or {}):
            raise LoRIConfigError(
                "DeepSpeed ZeRO-3 partitions the model in a way lori cannot hand from one stage to the next: "
                "run lori pipeline / lori continual with configs/trainer/fsdp.yaml (ZeRO-3 serves lori fit)"
            )
        check_run_options(cfg, self.subcommand, runs=self.runs_stages)
        world = _configured_world_size(cfg.get("trainer") or {})
        if cfg["data"].get("global_batch_size") is not None and world is not None:
            accumulation_steps(cfg["data"]["global_batch_size"], cfg["data"]["batch_size"], world)  # before any output
        if self.subcommand is None and self.runs_stages:  # one run per output_dir, refused before the model loads
            run_lock.acquire_in_scope((cfg.get("continual") or cfg["pipeline"])["output_dir"])

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.datamodule.set_tokenizer(self.model.tokenizer)
        self.datamodule.check_data()  # missing data / fields stop here, before training
        if self.subcommand in (None, "fit"):  # tokenise now (once): examples all too long stop here too
            self.datamodule.setup("fit")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer | None:
        if self.subcommand is None:  # pipeline / continual: make_trainer_factory builds one Trainer per stage
            return None  # (a Trainer built here would bind the YAML's strategy object to itself)
        trainer = (self.config_init.get(self.subcommand) or self.config_init).get("trainer") or {}
        kwargs.setdefault("plugins", with_atomic_checkpoints(trainer.get("plugins"), trainer.get("strategy")))
        callbacks = trainer.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        kwargs.setdefault("callbacks", callbacks + progress.for_trainer(self.subcommand, trainer, callbacks))
        if self.subcommand == "fit":  # SIGTERM / SIGUSR1: checkpoint after the step, one line, exit 128 + signal
            kwargs["callbacks"] = [*kwargs["callbacks"], PreemptionCheckpoint("fit", FIT_RESUME, slurm_checkpoint=True)]
        kwargs.update(console.trainer_overrides(trainer))
        return super().instantiate_trainer(**kwargs)

    def fit(self, **kwargs: Any) -> None:
        """``lori fit``: Trainer.fit holding the lock of every directory the config fixes for
        checkpoints (ModelCheckpoint ``dirpath``) or adapters (SaveAdapter ``directory``)."""
        directories = [cb.dirpath for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        directories += [cb.directory for cb in self.trainer.callbacks if isinstance(cb, SaveAdapter)]
        with contextlib.ExitStack() as stack:
            for directory in dict.fromkeys(str(d) for d in directories):
                stack.enter_context(run_lock.holding(directory))
            stack.enter_context(preemption.handling())
            self.trainer.fit(**kwargs)

    def validate(self, **kwargs: Any) -> Any:
        """``lori validate``: Trainer.validate, also of a checkpoint of ``lori pipeline`` / ``fit``."""
        with _without_callback_advice():
            return self.trainer.validate(**kwargs)

    def test(self, **kwargs: Any) -> Any:
        """``lori test``: Trainer.test (a checkpoint as ``validate``)."""
        with _without_callback_advice():
            return self.trainer.test(**kwargs)


@contextlib.contextmanager
def _without_callback_advice() -> Any:
    """Evaluating a checkpoint needs none of the callbacks that trained it (its ModelCheckpoint, RNG
    state): Lightning's advice to add them (for a resumed fit) is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`", module=r"lightning\.pytorch")
        yield


def add_protocol_argument(parser: LightningArgumentParser) -> None:
    """The top-level ``protocol`` switch of a training config (``lori.core.protocol``)."""
    parser.add_argument(
        "--protocol", type=str, default="lori",
        help="lori (lori's defaults) or official (data, tokenisation, optimiser and evaluation as the "
             "official LoRI code: docs/reproducing_the_paper.md)",
    )


def apply_protocol(cfg: Any, defaults: Any) -> list[str]:
    """Apply the top-level ``protocol`` to a parsed training config, before anything is built.

    ``official`` puts the settings ``lori.core.protocol`` fixes at their official values (reported in one
    line on stderr when it changes any) and sets ``protocol`` in every section that has one.
    """
    protocol = check_protocol(cfg.get("protocol") or "lori")
    if protocol != "official":
        return []
    sections = tuple(k for k in ("model", "data", "trainer") if cfg.get(k) is not None)
    changed = apply_official(cfg, defaults, sections)
    if cfg.get("task_data") is not None:  # continual: the task's data follows the same rules
        changed += apply_official({"data": cfg["task_data"]}, {"data": defaults.get("task_data")}, ("data",))
    for section in PROTOCOL_SECTIONS:
        node = cfg.get(section)
        if node is not None and "protocol" in node:
            node["protocol"] = protocol
    if changed and rank_zero_only.rank == 0:
        print("lori: protocol official set " + ", ".join(changed), file=sys.stderr)
    return changed


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


def parse_fit_config(*args: str) -> Any:
    """Parse and check ``lori fit`` arguments (``--config`` files, ``--key value`` overrides) as
    ``lori fit`` would, with the settings a baseline derives (``baseline_fit``), loading nothing."""
    cli = _ParseOnlyCLI(LoRIModule, TaskDataModule, run=False, args=list(args), save_config_callback=None)
    return apply_fit_settings(cli.parser, cli.config)


def dump_config(cli: LightningCLI) -> str:
    """The resolved config as YAML, None values included (saved beside each stage's adapter)."""
    if "skip_unset" in inspect.signature(cli.parser.dump).parameters:  # jsonargparse >= 4.49
        return cli.parser.dump(cli.config, skip_unset=False)
    return cli.parser.dump(cli.config, skip_none=False)
