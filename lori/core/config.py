"""LoRIConfig: the hyperparameters of one LoRI adapter, validated when built.

The adapter of a frozen linear layer W0 (d_out x d_in) is

    W = W0 + (alpha / r) * (B ⊙ M) A          (paper eq. 2-3)

with A (r x d_in) Kaiming-uniform and frozen, drawn from ``seed`` and the module path,
B (d_out x r) zero at init and trained, and M a bool mask keeping a ``1 - sparsity``
fraction of B chosen by magnitude within each ``granularity`` group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lori.core.errors import LoRIError

DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
GRANULARITIES: tuple[str, ...] = ("model", "module", "projection", "layer", "matrix")


class LoRIConfigError(LoRIError, ValueError):
    """A LoRI hyperparameter outside its allowed range."""


@dataclass
class LoRIConfig:
    """Hyperparameters of a LoRI adapter.

    Args:
        r: rank of the adapter (rows of A, columns of B); > 0.
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout probability on the adapter input, in [0, 1).
        target_modules: module-name suffixes to adapt (``q_proj`` matches
            ``model.layers.3.self_attn.q_proj``); every name must match a module.
        sparsity: fraction of B entries dropped by calibration, in [0, 1); 0 = LoRI-D.
        granularity: scope of the magnitude threshold: one of ``GRANULARITIES``.
        seed: seed of the frozen A (with the module path it fixes every A). Tasks that will be
            merged can take different seeds (independent A, paper Property 1) or one seed (one
            A for every task, as the official code; configs/paper/ use seed 0 throughout, and
            ``lori continual`` needs a task mask calibrated under the safety adapter's A).
    """

    r: int = 32
    alpha: float = 64.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    sparsity: float = 0.9
    granularity: str = "model"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        _check(isinstance(self.r, int) and self.r > 0, f"r must be a positive int, got r={self.r!r}")
        _check(self.alpha > 0, f"alpha must be > 0, got alpha={self.alpha!r}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got dropout={self.dropout!r}")
        _check(
            0.0 <= self.sparsity < 1.0,
            f"sparsity must be in [0, 1), got sparsity={self.sparsity!r}",
        )
        _check(
            self.granularity in GRANULARITIES,
            f"unknown granularity {self.granularity!r}; choose one of {list(GRANULARITIES)}",
        )
        _check(len(self.target_modules) > 0, "target_modules is empty")
        _check(isinstance(self.seed, int), f"seed must be an int, got seed={self.seed!r}")

    @property
    def scale(self) -> float:
        """The multiplier alpha / r of the update."""
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRIConfig:
        """Build from a dict, refusing unknown keys by name."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        _check(not unknown, f"unknown LoRIConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise LoRIConfigError(message)
