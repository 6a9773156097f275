"""LoRI under DDP with 2 CPU processes (gloo): the same masks on every rank, and the same masks and
trained B as one process seeing the same global batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pipeline_helpers import by_kind
from pipeline_helpers import multiprocess_config, run_lori
from safetensors.torch import load_file

from lori.core import calibrate

def run_pipeline(tmp_path: Path, name: str, devices: int) -> Path:
    done = run_lori("pipeline", "--config", str(multiprocess_config(tmp_path, name, devices, "ddp")))
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / name / "dump"


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return run_pipeline(tmp, "one", devices=1), run_pipeline(tmp, "two", devices=2)


def test_every_rank_holds_the_same_masks_and_B(dumps):
    _, two = dumps
    r0, r1 = (load_file(str(two / f"sparse_rank{r}_of2.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and any(k.startswith("mask/") for k in r0)
    assert any(torch.count_nonzero(v) for k, v in r0.items() if k.startswith("B/"))  # LoRI-S trained
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key


def test_ddp_masks_are_the_global_calibration_of_the_dense_B(dumps):
    _, two = dumps
    dense = by_kind(load_file(str(two / "dense_rank0_of2.safetensors")), "B")
    masks = by_kind(load_file(str(two / "sparse_rank1_of2.safetensors")), "mask")
    again = calibrate(dense, 0.9, "model")
    assert all(torch.equal(again[p], masks[p]) for p in masks)


def test_ddp_matches_one_process_on_the_same_global_batches(dumps):
    one, two = dumps
    a = load_file(str(one / "sparse_rank0_of1.safetensors"))
    b = load_file(str(two / "sparse_rank0_of2.safetensors"))
    for key in a:
        if key.startswith("mask/"):
            assert torch.equal(a[key], b[key]), key
        else:  # the gradient all-reduce sums in another order: float tolerance
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    dense_a = by_kind(load_file(str(one / "dense_rank0_of1.safetensors")), "B")
    dense_b = by_kind(load_file(str(two / "dense_rank0_of2.safetensors")), "B")
    for p in dense_a:
        torch.testing.assert_close(dense_a[p], dense_b[p], rtol=1e-4, atol=1e-6)
