"""LoRI under FSDP (FULL_SHARD) with 2 CPU processes on gloo.

Lightning's FSDPStrategy and torch's FSDP do the wrapping and sharding (tests/fsdp_cpu.py only lets
them run on CPU). Each rank holds half of every flat parameter between steps, and the tiny model's
shard boundaries cut through B matrices; calibration and saving must still see the whole B:
the masks are the global top-k of the dense B, identical on both ranks and to one process's
masks; the trained B match one process on the same global batches; a run killed mid-LoRI-S resumes
from its last (full-state-dict) checkpoint to the same adapter.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_helpers import by_kind, multiprocess_config, run_lori
from safetensors.torch import load_file

from lori.core import calibrate, load_adapter

DECODER_LAYER = ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"]
# one FSDP unit over the whole tiny model: its shard boundary cuts layer 1's q_proj B (16 | 112 entries)
ONE_UNIT = {"class_path": "fsdp_cpu.CPUFSDPStrategy", "init_args": {
    "sharding_strategy": "FULL_SHARD", "state_dict_type": "full"}}
# the preset's wrapping (configs/trainer/fsdp.yaml): a unit and activation checkpointing per decoder layer
PER_LAYER = {"class_path": "fsdp_cpu.CPUFSDPStrategy", "init_args": {
    "auto_wrap_policy": DECODER_LAYER, "activation_checkpointing_policy": DECODER_LAYER,
    "sharding_strategy": "FULL_SHARD", "state_dict_type": "full"}}


def run_pipeline(
    tmp_path: Path, name: str, devices: int, crash: tuple[str, int] | None = None, strategy: dict = ONE_UNIT,
) -> subprocess.CompletedProcess:
    crashing = [{"class_path": "ddp_dump.CrashAt", "init_args": {"phase": crash[0], "step": crash[1]}}] if crash else None
    config = multiprocess_config(tmp_path, name, devices, strategy, crashing, checkpoint_every=2)
    return run_lori("pipeline", "--config", str(config))


def finished(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]


def dump(run: Path, phase: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "dump" / f"{phase}_rank{rank}_of{world}.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    finished(run_pipeline(tmp, "one", devices=1))
    finished(run_pipeline(tmp, "two", devices=2))
    return tmp / "one", tmp / "two"


def test_shards_split_B_matrices(runs):
    """The setting the official code gets wrong: some B is cut by a shard boundary."""
    _, two = runs
    full = {p: b.numel() for p, b in by_kind(dump(two, "dense", 0, 2), "B").items()}
    local = [by_kind(dump(two, "dense", r, 2), "local_numel") for r in (0, 1)]
    split = [p for p in full if 0 < int(local[0][p]) < full[p]]
    assert split, "no B straddles a shard boundary: the test no longer exercises sharded calibration"
    for p in full:  # together the two ranks hold each B once
        assert int(local[0][p]) + int(local[1][p]) == full[p], p


def test_gathering_reads_whole_B_but_leaves_the_frozen_weights_sharded(runs):
    one, two = runs
    full = int(dump(one, "dense", 0, 1)["frozen_numel/all"])
    held = [int(dump(two, "dense", r, 2)["frozen_numel/all"]) for r in (0, 1)]
    assert sum(held) == full and max(held) < full  # each rank kept its shard of the base weights


def test_masks_are_the_global_calibration_and_the_same_on_every_rank(runs):
    _, two = runs
    dense = by_kind(dump(two, "dense", 0, 2), "B")
    expected = calibrate(dense, 0.9, "model")
    for rank in (0, 1):
        masks = by_kind(dump(two, "sparse", rank, 2), "mask")
        assert masks.keys() == expected.keys()
        for p in expected:
            assert torch.equal(masks[p], expected[p]), (rank, p)
    r0, r1 = dump(two, "sparse", 0, 2), dump(two, "sparse", 1, 2)
    for key in by_kind(r0, "B"):
        assert torch.equal(r0[f"B/{key}"], r1[f"B/{key}"]), key


def test_fsdp_matches_one_process(runs):
    one, two = runs
    for phase in ("dense", "sparse"):
        b1, b2 = by_kind(dump(one, phase, 0, 1), "B"), by_kind(dump(two, phase, 0, 2), "B")
        assert any(torch.count_nonzero(v) for v in b2.values())
        for p in b1:
            torch.testing.assert_close(b2[p], b1[p], rtol=0, atol=1e-4, msg=f"{phase} {p}")
    m1, m2 = by_kind(dump(one, "sparse", 0, 1), "mask"), by_kind(dump(two, "sparse", 0, 2), "mask")
    assert all(torch.equal(m1[p], m2[p]) for p in m1)


def test_saved_adapters_hold_the_whole_B(runs):
    _, two = runs
    state = dump(two, "sparse", 0, 2)
    adapter = load_adapter(two / "lori_s")
    masks, B = by_kind(state, "mask"), by_kind(state, "B")
    assert adapter.masks is not None and adapter.B.keys() == B.keys()
    for p in B:
        assert torch.equal(adapter.B[p], B[p]) and torch.equal(adapter.masks[p], masks[p]), p
        assert not torch.any(adapter.B[p][~adapter.masks[p]]), p  # LoRI-S: zero outside the mask
    dense = load_adapter(two / "lori_d")
    for p, b in by_kind(dump(two, "dense", 0, 2), "B").items():
        assert torch.equal(dense.B[p], b), p


def test_per_layer_units_killed_mid_lori_s_resume_to_the_same_adapter(runs, tmp_path):
    """The preset's wrapping (units and activation checkpointing per decoder layer), killed at LoRI-S
    step 3 and resumed from the step-2 full-state-dict checkpoint, ends where one process ends."""
    one, _ = runs
    crashed = run_pipeline(tmp_path, "layers", devices=2, crash=("sparse", 3), strategy=PER_LAYER)
    assert crashed.returncode != 0 and "killed at sparse step 3" in crashed.stderr, crashed.stderr[-3000:]
    assert (tmp_path / "layers" / "lori_s_ckpt" / "last.ckpt").is_file()  # saved at step 2
    assert not (tmp_path / "layers" / "lori_s").exists()  # no half adapter
    finished(run_pipeline(tmp_path, "layers", devices=2, strategy=PER_LAYER))
    resumed, single = load_adapter(tmp_path / "layers" / "lori_s"), load_adapter(one / "lori_s")
    for p in single.B:
        assert torch.equal(resumed.masks[p], single.masks[p]), p
        torch.testing.assert_close(resumed.B[p], single.B[p], rtol=0, atol=1e-4, msg=p)


def test_continual_under_fsdp_keeps_every_entry_outside_the_task_mask(tmp_path):
    """`lori continual` chains five fits over one module under FSDP: safety LoRI-D and LoRI-S, the task's
    LoRI-D for its mask, the task phase inside M_t minus M_safety; evaluation runs on every rank."""
    from test_continual import continual_config

    path = continual_config(tmp_path, "run", protect_safety=True)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"].update(devices=2, strategy=ONE_UNIT)
    cfg["model"]["lori"]["dropout"] = 0.0
    cfg["eval"]["tasks"] = ["harmbench"]
    path.write_text(yaml.safe_dump(cfg))
    finished(run_lori("continual", "--config", str(path)))
    safety, task = load_adapter(tmp_path / "run" / "safety" / "lori_s"), load_adapter(tmp_path / "run" / "task")
    changed = 0
    for p, trained in task.masks.items():
        assert not (trained & safety.masks[p]).any(), p  # M_t minus M_safety
        assert torch.equal(task.B[p][~trained], safety.B[p][~trained]), p  # bit-identical outside
        changed += int((task.B[p][trained] != safety.B[p][trained]).sum())
    assert changed > 0
    assert "refusal_rate" in json.loads((tmp_path / "run" / "results.json").read_text())["results"]["task"]["harmbench"]
