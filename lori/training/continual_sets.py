"""One safety run and one task, LoRI-D or LoRI-S: what ``--adaptation`` picks from a ``lori continual``
config's ``continual_set:`` (``lori.commands.continual_command`` calls ``apply_continual_set``).

    lori continual --config configs/paper/continual/llama3_8b_r32_safety_then_gsm8k.yaml --adaptation lori_s

Fig. 3 continues the Saferpaca adapter of a ``lori pipeline`` run on one task, as LoRI-D (all of B
trains) or LoRI-S (B trains inside the task's calibrated mask M_t). The set names the runs once; the
adaptation derives the rest, as a merge's adapter set does (``lori.training.merge_sets``):

    continual.safety_adapter    <safety_run>/<adaptation>              (runs/paper/llama3_8b_r32_saferpaca/lori_s)
    continual.masked_task       adaptation == lori_s
    continual.task_mask         lori_s: <task_run>/calibration/masks.safetensors; lori_d: none
    continual.task_lr, model.lr lr[adaptation]                          (Appendix D, that column)
    continual.output_dir        <output_prefix>_<adaptation>

Each is filled only where the config (or command line) leaves it at its default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lori.core import LoRIConfigError
from lori.training.fit_settings import CALIBRATION_MASKS, PIPELINE_STAGES


class ContinualSetError(LoRIConfigError):
    """A continual_set without the adaptation asked for, or an adaptation asked for without a set."""


@dataclass
class ContinualSet:
    """The runs of one continual-learning setting (paper Fig. 3) and each adaptation's learning rate.

    Args:
        safety_run: the Saferpaca ``lori pipeline`` run (its ``pipeline.output_dir``); phase 1 is its
            ``lori_d/`` or ``lori_s/`` adapter.
        task_run: the task's ``lori pipeline`` run; LoRI-S trains inside its calibrated mask.
        output_prefix: each adaptation writes ``<output_prefix>_<adaptation>``.
        lr: adaptation -> phase-2 learning rate.
    """

    safety_run: str
    task_run: str
    output_prefix: str
    lr: dict[str, float] = field(default_factory=dict)


def continual_settings(value: ContinualSet | dict[str, Any], adaptation: str | None) -> dict[str, Any]:
    """``{section: {key: value}}`` of ``adaptation`` (see the module docstring); refused in one line
    when the set gives no learning rate for it."""
    cset = value if isinstance(value, ContinualSet) else ContinualSet(**(value.as_dict() if hasattr(value, "as_dict") else dict(value)))
    if adaptation not in PIPELINE_STAGES or adaptation not in cset.lr:
        raise ContinualSetError(
            f"a config with continual_set runs one adaptation: pick it with --adaptation "
            f"(got {adaptation}; this set has {', '.join(cset.lr)})"
        )
    lr = float(cset.lr[adaptation])
    masked = adaptation == "lori_s"
    continual = {"safety_adapter": f"{cset.safety_run.rstrip('/')}/{adaptation}", "masked_task": masked,
                 "task_mask": f"{cset.task_run.rstrip('/')}/{CALIBRATION_MASKS}" if masked else None,
                 "task_lr": lr, "output_dir": f"{cset.output_prefix}_{adaptation}"}
    return {"continual": continual, "model": {"lr": lr}}


def apply_continual_set(parser: Any, cfg: Any) -> Any:
    """``cfg`` with the settings of ``cfg.adaptation`` laid over every key that is at its default.

    Args:
        parser: the ``lori continual`` parser (its defaults say which keys the config left unset).
        cfg: the parsed config (a jsonargparse Namespace with ``adaptation`` and ``continual_set``).
    """
    if cfg.get("continual_set") is None:
        if cfg.get("adaptation") is not None:
            raise ContinualSetError("--adaptation picks from a config's continual_set:, and this config has none")
        return cfg
    defaults = parser.get_defaults()
    derived = {section: {k: v for k, v in values.items() if cfg[section].get(k) == defaults[section].get(k)}
               for section, values in continual_settings(cfg["continual_set"], cfg.get("adaptation")).items()}
    return parser.parse_object(derived, cfg)
