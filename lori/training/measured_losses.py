"""``MeasuredLosses``: what a stage measured before it trained, kept in its Lightning checkpoints.

The held-out loss before a stage (the base model's, for LoRI-D) is measured once, before the first
step. A stage resumed from a checkpoint (after a crash or a preemption) reads it back from there
instead of reporting it as not measured, so the rerun's summary is the uninterrupted run's.

    ckpt["callbacks"]["MeasuredLosses"] = {"val_loss_before": 10.8918}
"""

from __future__ import annotations

from typing import Any

import lightning as L


class MeasuredLosses(L.Callback):
    """Carry ``values`` (name -> float) in every checkpoint of the Trainer it is given to."""

    def __init__(self, values: dict[str, float] | None = None) -> None:
        self.values = dict(values or {})

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.values = dict(state_dict)

    @classmethod
    def saved_in(cls, checkpoint: dict[str, Any] | None) -> dict[str, float]:
        """The values a checkpoint carries ({} for one written without this callback)."""
        return dict(((checkpoint or {}).get("callbacks") or {}).get(cls.__qualname__) or {})
