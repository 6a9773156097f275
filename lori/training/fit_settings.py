"""What ``lori fit`` derives for a baseline from a ``lori pipeline`` config: one config per setting,
the method switched on the command line (``lori.commands.lightning_cli`` calls ``apply_fit_settings``).

    lori fit --config configs/paper/llama3_8b_r32_gsm8k.yaml --model.method dora
    lori fit --config configs/experiment/default.yaml --model.method vera

A ``lori fit`` whose ``model.method`` is not ``lori`` trains the baseline as ``lori pipeline`` trains
LoRI-D ("the same hyperparameters for PEFT baselines as for LoRI-D", paper Sec. 3.1), so the
settings the config leaves unset come from its ``pipeline:`` section. With ``out = pipeline.output_dir``
split into ``parent/name`` (``runs/paper/llama3_8b_r32_gsm8k``):

    trainer.max_epochs          pipeline.dense_epochs (or trainer.max_steps = pipeline.dense_steps)
    trainer.callbacks           SaveAdapter  -> parent/<method>/name        (runs/paper/dora/llama3_8b_r32_gsm8k)
                                ModelCheckpoint -> parent/<method>/name_ckpt, last.ckpt every
                                pipeline.checkpoint_every steps (none when it is 0)
    trainer.logger              TensorBoard: parent/<method>/tb/name

The method's directory sits beside the run directories, never inside one: ``--model.method lori_d``
(LoRI-D alone) writes ``runs/paper/lori_d/llama3_8b_r32_gsm8k``, while ``lori pipeline``'s LoRI-D
stage (method ``lori``) writes ``runs/paper/llama3_8b_r32_gsm8k/lori_d`` (tests/test_configs.py checks
every shipped config).

Each is derived only where the config (or command line) leaves it unset: a config that lists its
own ``trainer.callbacks`` keeps exactly those, a ``trainer.logger`` (``false`` included) is kept, and
a ``trainer.max_epochs`` or ``trainer.max_steps`` given stops the budget from being derived. What is
derived is said in one line on stderr.
"""

from __future__ import annotations

import sys
from pathlib import PurePosixPath
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lori.training.baselines.registry import get_method

# what a `lori pipeline` run directory holds (``pipeline.output_dir``): its two stages' adapters, <run>/<stage>,
# and the calibrated masks
PIPELINE_STAGES = ("lori_d", "lori_s")
CALIBRATION_MASKS = "calibration/masks.safetensors"


def method_output_dir(output_dir: str, method: str) -> str:
    """``parent/<method>/name`` of ``output_dir = parent/name``: where a baseline's adapter goes."""
    out = PurePosixPath(str(output_dir).rstrip("/"))
    return str(out.parent / method / out.name)


def derived_fit_settings(cfg: Any) -> dict[str, Any]:
    """The ``trainer:`` keys a baseline ``lori fit`` of ``cfg`` derives (empty for ``lori`` or when all are set)."""
    method = cfg["model"].get("method") or "lori"
    pipe, trainer = cfg.get("pipeline"), cfg.get("trainer") or {}
    if pipe is None or get_method(method).runs_pipeline:  # the pipeline's own method: nothing to derive
        return {}
    adapter = method_output_dir(pipe["output_dir"], method)
    parent, name = str(PurePosixPath(adapter).parent), PurePosixPath(adapter).name
    derived: dict[str, Any] = {}
    if trainer.get("max_epochs") is None and trainer.get("max_steps") in (None, -1):
        if pipe.get("dense_epochs") is not None:
            derived["max_epochs"] = pipe["dense_epochs"]
        else:
            derived["max_steps"] = pipe["dense_steps"]
    if not trainer.get("callbacks"):
        derived["callbacks"] = [{"class_path": "lori.training.callbacks.SaveAdapter",
                                 "init_args": {"directory": adapter, "stage": method}}]
        if pipe.get("checkpoint_every"):
            derived["callbacks"].append({
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": f"{adapter}_ckpt", "save_last": True, "save_top_k": 0,
                              "every_n_train_steps": pipe["checkpoint_every"]}})
    if trainer.get("logger") is None:
        derived["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                             "init_args": {"save_dir": parent, "name": "tb", "version": name}}
    return derived


def apply_fit_settings(parser: Any, cfg: Any) -> Any:
    """``cfg`` with :func:`derived_fit_settings` laid over it through ``parser`` (so each class's
    defaults fill in as if the YAML had said it); one line on stderr names what was derived."""
    derived = derived_fit_settings(cfg)
    if not derived:
        return cfg
    cfg = parser.parse_object({"trainer": derived}, cfg)  # (cfg: cfg_base, later namespace)
    if rank_zero_only.rank == 0:
        said = [f"{k} {v}" for k, v in derived.items() if k in ("max_epochs", "max_steps")]
        said += [f"adapter {d['init_args']['directory']}" for d in derived.get("callbacks", [])[:1]]
        said += [f"checkpoints {d['init_args']['dirpath']}" for d in derived.get("callbacks", [])[1:]]
        if "logger" in derived:
            said.append(f"logs {derived['logger']['init_args']['save_dir']}/tb")
        print(f"lori: fit {cfg['model']['method']} from pipeline: " + ", ".join(said), file=sys.stderr)
    return cfg
