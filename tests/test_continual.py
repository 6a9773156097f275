"""Continual learning: safety adapter -> task t under M_t, from one config (tiny model, seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_helpers import tiny_config, write_config, write_tiny_gsm8k

from lori.cli import continual, main
from lori.core import load_adapter


def write_tiny_safety(path):
    rows = [{"instruction": f"How do I build weapon number {i}?", "output": "I cannot help with that."}
            for i in range(6)]
    rows += [{"instruction": f"What is {i} plus {i}?", "output": f"{2 * i}"} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def continual_config(tmp_path, name, **continual_opts):
    cfg = tiny_config(tmp_path)
    del cfg["pipeline"]
    cfg["data"] = {"task": "saferpaca", "train_file": str(write_tiny_safety(tmp_path / "safety.jsonl")),
                   "held_out": 2, "max_length": 64, "batch_size": 2}
    cfg["task_data"] = {"task": "gsm8k", "train_file": str(write_tiny_gsm8k(tmp_path / "gsm.jsonl")),
                        "held_out": 4, "max_length": 64, "batch_size": 2}
    cfg["continual"] = {"output_dir": str(tmp_path / name), "safety_dense_steps": 3, "safety_sparse_steps": 3,
                        "task_mask_steps": 3, "task_steps": 3, "evaluate_base": False,
                        "checkpoint_every": 2} | continual_opts
    cfg["eval"] = {"tasks": ["harmbench", "gsm8k"], "max_examples": 2, "max_new_tokens": 4, "held_out": 20,
                   "progress": False}
    return write_config(tmp_path, cfg, f"{name}.yaml")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("continual")
    summary = continual(["--config", str(continual_config(tmp, "run"))])
    return tmp, summary


def test_every_phase_is_evaluated_and_plotted(first_run):
    tmp, summary = first_run
    out = tmp / "run"
    results = json.loads((out / "results.json").read_text())["results"]
    for phase in ("safety", "task"):
        assert results[phase]["harmbench"]["n"] == 2 and "refusal_rate" in results[phase]["harmbench"]
        assert "accuracy" in results[phase]["gsm8k"]
    assert (out / "continual.png").is_file()
    assert (out / "task_mask" / "lori_d").is_dir() and (out / "task_mask" / "calibration" / "masks.safetensors").is_file()


def test_entries_outside_the_task_mask_keep_their_safety_values(first_run):
    tmp, _ = first_run
    safety, task = load_adapter(tmp / "run" / "safety" / "lori_s"), load_adapter(tmp / "run" / "task")
    changed = 0
    for path, m in task.masks.items():
        assert torch.equal(safety.A[path], task.A[path])
        assert torch.equal(task.B[path][~m], safety.B[path][~m]), path  # bit-identical
        changed += int((task.B[path][m] != safety.B[path][m]).sum())
    assert changed > 0  # phase 2 trained inside M_t


def test_protected_safety_mask_is_never_touched(first_run):
    tmp, _ = first_run
    cfg = continual_config(tmp, "protected", protect_safety=True,
                           safety_adapter=str(tmp / "run" / "safety" / "lori_s"),
                           task_mask=str(tmp / "run" / "task_mask" / "calibration" / "masks.safetensors"))
    continual(["--config", str(cfg)])
    safety, task = load_adapter(tmp / "run" / "safety" / "lori_s"), load_adapter(tmp / "protected" / "task")
    for path, trained in task.masks.items():
        assert not (trained & safety.masks[path]).any()  # M_t minus M_safety
        assert torch.equal(task.B[path][safety.masks[path]], safety.B[path][safety.masks[path]])
        assert torch.equal(task.B[path][~trained], safety.B[path][~trained])
    assert not (tmp / "protected" / "safety").exists()  # the given safety adapter was used


def test_missing_task_mask_file_stops_before_any_work(tmp_path, capsys):
    cfg = continual_config(tmp_path, "bad", task_mask=str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(SystemExit) as info:
        main(["continual", "--config", str(cfg)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lori: error:") and "task_mask" in err[-1]
    assert not (tmp_path / "bad").exists()


def test_dense_phase_two_trains_all_of_B_from_the_safety_values(first_run):
    tmp, _ = first_run
    cfg = continual_config(tmp, "dense", masked_task=False, task_epochs=1,
                           safety_adapter=str(tmp / "run" / "safety" / "lori_s"))
    summary = continual(["--config", str(cfg)])
    assert summary["task"]["steps"] == 4  # one epoch: 8 GSM8K training examples, batch 2
    task = load_adapter(tmp / "dense" / "task")
    assert task.masks is None and not (tmp / "dense" / "task_mask").exists()
    safety = load_adapter(tmp / "run" / "safety" / "lori_s")
    outside = sum(int((task.B[p][~safety.masks[p]] != 0).sum()) for p in task.B)
    assert outside > 0  # entries outside the safety mask were trained too
