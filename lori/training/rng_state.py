"""``RNGState``: random-number-generator state in Lightning checkpoints.

Lightning checkpoints do not carry the RNG state, so a resumed run would draw different dropout
masks than an uninterrupted one. With this callback, resuming mid-stage continues the same random
stream and ends with the same weights (CPU, fixed seed).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import torch


class RNGState(L.Callback):
    """Save the Python and torch (CPU and CUDA) generators with each checkpoint; restore on resume."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "torch" in state_dict:
            torch.set_rng_state(state_dict["torch"])
        if "python" in state_dict:
            random.setstate(_as_python_state(state_dict["python"]))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def _as_python_state(state: Any) -> tuple:
    """``random.getstate()`` comes back from a checkpoint with lists where tuples were."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
