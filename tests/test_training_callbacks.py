"""The callbacks' phase changes in isolation (no Trainer): what SparsePhase does to B and masks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama

from lori.core import LoRIConfig, calibrate, get_A, get_B, get_masks, inject_lori, lori_layers
from lori.training.callbacks import SparsePhase


def _dense_module() -> SimpleNamespace:
    """A LoRI-D model with non-zero B, held the way LoRIModule holds it (``.model``, ``.phase``)."""
    model = make_tiny_llama()
    inject_lori(model, LoRIConfig(r=4, alpha=8))
    torch.manual_seed(0)
    for layer in lori_layers(model).values():
        layer.lori_B.data.normal_()
    return SimpleNamespace(model=model, phase="dense")


@pytest.mark.parametrize("reset", [None, True, False], ids=["default", "reset", "keep"])
def test_sparse_phase_installs_masks_and_resets_B_by_default(reset):
    module = _dense_module()
    B, A = get_B(module.model), get_A(module.model)
    masks = calibrate(B, 0.9)
    phase = SparsePhase(masks) if reset is None else SparsePhase(masks, reset=reset)
    phase.setup(None, module, "fit")
    assert module.phase == "sparse"
    assert all(torch.equal(get_masks(module.model)[p], masks[p]) for p in masks)
    assert all(torch.equal(get_A(module.model)[p], A[p]) for p in A)  # the calibration run's A
    after = get_B(module.model)
    if reset is False:  # continual learning: B kept, inside and outside the new mask
        assert all(torch.equal(after[p], B[p]) for p in B)
    else:  # LoRI-S: B restarts from zero
        assert all(torch.count_nonzero(b) == 0 for b in after.values())


def test_sparse_phase_does_nothing_outside_fit():
    module = _dense_module()
    B = get_B(module.model)
    SparsePhase(calibrate(B, 0.9)).setup(None, module, "validate")
    assert module.phase == "dense" and not get_masks(module.model)
    assert all(torch.equal(get_B(module.model)[p], B[p]) for p in B)
