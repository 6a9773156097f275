"""Trainer flags reach LoRI training: gradient accumulation and gradient clipping."""

from __future__ import annotations

import pytest
import torch
from pipeline_helpers import tiny_config, write_config

from lori.commands.pipeline_command import pipeline
from lori.core import load_adapter
from lori.data.datamodule import accumulation_steps
from lori.data.sources import DataError


def dense_B(tmp_path, name, batch_size=4, trainer=None, steps=2, data=None):
    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / name), dense_steps=steps, sparse_steps=1,
                      held_out_loss=False)
    cfg["model"]["lori"]["dropout"] = 0.0
    cfg["model"]["loss_normalization"] = "sequence_sum"  # mean over sequences: batch-size invariant
    cfg["data"]["batch_size"] = batch_size
    cfg["trainer"].update(trainer or {})
    cfg["data"].update(data or {})
    pipeline(["--config", str(write_config(tmp_path, cfg, f"{name}.yaml"))])
    return load_adapter(tmp_path / name / "lori_d").B


def test_accumulating_two_batches_of_2_equals_one_batch_of_4(tmp_path):
    whole = dense_B(tmp_path, "whole", batch_size=4)
    accumulated = dense_B(tmp_path, "acc", batch_size=2, trainer={"accumulate_grad_batches": 2})
    for path in whole:
        assert torch.count_nonzero(whole[path])
        torch.testing.assert_close(accumulated[path], whole[path], rtol=1e-4, atol=1e-6)


def test_global_batch_size_sets_the_accumulation(tmp_path):
    whole = dense_B(tmp_path, "whole", batch_size=4)
    derived = dense_B(tmp_path, "global", batch_size=2, data={"global_batch_size": 4})  # 4 / (2 x 1) = 2 steps
    for path in whole:
        torch.testing.assert_close(derived[path], whole[path], rtol=1e-4, atol=1e-6)


def test_global_batch_size_and_a_different_accumulation_conflict(tmp_path):
    with pytest.raises(DataError, match="accumulate_grad_batches is 4"):
        dense_B(tmp_path, "conflict", batch_size=2, trainer={"accumulate_grad_batches": 4},
                data={"global_batch_size": 4})
    assert accumulation_steps(32, 4, 8) == 1 and accumulation_steps(32, 4, 1) == 8
    with pytest.raises(DataError, match="world size 3"):
        accumulation_steps(32, 4, 3)


def test_gradient_clipping_limits_the_update(tmp_path):
    # Adam is invariant to the gradient's scale until it nears eps (1e-8): clipping the norm to
    # 1e-12 must shrink the first step far below lr, where the unclipped step is about lr
    free = dense_B(tmp_path, "free", steps=1)
    clipped = dense_B(tmp_path, "clipped", steps=1, trainer={"gradient_clip_val": 1e-12})
    lr = 0.01
    assert max(b.abs().max() for b in free.values()) > 0.5 * lr
    assert max(b.abs().max() for b in clipped.values()) < 0.01 * lr


def test_world_size_and_zero3_are_read_from_the_trainer_config():
    from jsonargparse import Namespace

    from lori.commands.lightning_cli import _configured_world_size, _is_zero3

    assert _configured_world_size({"devices": 8, "num_nodes": 2}) == 16
    assert _configured_world_size({"devices": "4"}) == 4 and _configured_world_size({"devices": [0, 1]}) == 2
    assert _configured_world_size({"devices": "auto"}) is None and _configured_world_size({"devices": -1}) is None
    zero = "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert _is_zero3({"strategy": Namespace(class_path=zero, init_args=Namespace(stage=3))})
    assert not _is_zero3({"strategy": Namespace(class_path=zero, init_args=Namespace(stage=2))})
    assert _is_zero3({"strategy": "deepspeed_stage_3_offload"}) and not _is_zero3({"strategy": "ddp"})
    assert not _is_zero3({})
