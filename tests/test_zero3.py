"""DeepSpeed ZeRO-3 (GPU only: skips without CUDA and deepspeed): a `lori fit` whose B is partitioned
calibrates on the whole B and saves the whole adapter (lori.core.full_parameters gathers them)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipeline_helpers import tiny_config, write_config

from lori.core import calibrate, load_adapter, load_masks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("deepspeed") is None,
    reason="ZeRO-3 needs a CUDA GPU and deepspeed",
)]


def test_zero3_fit_calibrates_and_saves_the_whole_B(tmp_path: Path):
    cfg = tiny_config(tmp_path)
    cfg.pop("pipeline")
    out = tmp_path / "zero3"
    cfg["trainer"] = {
        "accelerator": "gpu", "devices": 1, "max_steps": 3, "enable_progress_bar": False, "logger": False,
        "enable_checkpointing": False,
        "strategy": {"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"stage": 3}},
        "callbacks": [
            {"class_path": "lori.training.callbacks.MaskCalibration", "init_args": {"sparsity": 0.9, "output_dir": str(out)}},
            {"class_path": "lori.training.callbacks.SaveAdapter", "init_args": {"directory": str(out / "adapter")}},
        ],
    }
    path = write_config(tmp_path, cfg)
    done = subprocess.run([sys.executable, "-m", "lori", "fit", "--config", str(path)],
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = load_adapter(out / "adapter")
    masks = load_masks(out / "masks.safetensors")
    assert all(b.shape[1] == 4 and torch.count_nonzero(b) for b in adapter.B.values())
    expected = calibrate(adapter.B, 0.9, "model")
    for p in expected:
        assert torch.equal(masks[p], expected[p]), p
