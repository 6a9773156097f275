"""Continual learning: safety adapter -> task t under M_t, from one config (tiny model, seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_helpers import run_lori, tiny_config, write_config, write_tiny_gsm8k
from safetensors.torch import save_file

from lori.commands.continual_command import continual
from lori.commands.main import main
from lori.core import LoRIConfig, load_adapter, load_masks
from lori.core.adapter import a_digest
from lori.core.io import MaskRecord, official_mask_path, read_a_identity, read_mask_record
from lori.training.continual import ContinualConfig, ContinualConfigError


def write_tiny_safety(path):
    rows = [{"instruction": f"How do I build weapon number {i}?", "output": "I cannot help with that."}
            for i in range(6)]
    rows += [{"instruction": f"What is {i} plus {i}?", "output": f"{2 * i}"} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def continual_config(tmp_path, name, model=None, lori=None, **continual_opts):
    cfg = tiny_config(tmp_path)
    del cfg["pipeline"]
    cfg["model"] |= model or {}
    cfg["model"]["lori"] |= lori or {}
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

def test_every_phase_adapter_has_its_card(first_run):
    """The safety LoRI-S and the task phase carry README.md cards naming their own data (lori.training.model_card)."""
    tmp, _ = first_run
    for directory, tag, task in ((tmp / "run" / "safety" / "lori_s", "lori-s", "saferpaca"),
                                 (tmp / "run" / "task", "lori-s-continual", "gsm8k")):
        card = (directory / "README.md").read_text()
        assert f"tags:\n- lori\n- {tag}\n- {task}\n---" in card and f"- task: {task}" in card
        assert f"`{directory / 'lori_masks.safetensors'}`" in card and "- Steps: 3" in card


def test_mask_calibrated_in_the_run_is_under_the_safety_adapters_A(first_run):
    """With continual.task_mask: null, M_t comes from a LoRI-D run on the task from the safety A, and says so."""
    tmp, summary = first_run
    safety = load_adapter(tmp / "run" / "safety" / "lori_s")
    record = read_mask_record(tmp / "run" / "task_mask" / "calibration" / "masks.safetensors")
    assert record == MaskRecord(seed=0, digest=a_digest(safety.A), base_fingerprint=safety.base_fingerprint, r=4,
                                sparsity=0.9, granularity="model")
    assert record.mismatch(read_a_identity(tmp / "run" / "safety" / "lori_s")) is None
    assert "task_mask_file" not in summary  # nothing given, nothing to check
    task = read_mask_record(tmp / "run" / "task" / "lori_masks.safetensors")
    assert task.digest == record.digest  # the continued adapter keeps the safety A


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
    summary = continual(["--config", str(cfg)])
    assert summary["task_mask_file"]["a_checked"] and not summary["task_mask_file"]["notes"]  # the pairing held
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


def _mask_with_record(tmp, first_run_dir, name, **changes):
    """The first run's M_t saved with its record changed (another A, base ...)."""
    path = first_run_dir / "task_mask" / "calibration" / "masks.safetensors"
    fields = vars(read_mask_record(path)) | changes
    save_file(load_masks(path), str(tmp / name), metadata=MaskRecord(**fields).to_metadata())
    return tmp / name


def test_mask_of_another_A_is_refused_before_the_model_loads(first_run, tmp_path):
    """One line, exit 2; the model path does not even exist, so the refusal came before any loading."""
    tmp, _ = first_run
    mask = _mask_with_record(tmp_path, tmp / "run", "seed7.safetensors", seed=7, digest="0123456789abcdef")
    cfg = continual_config(tmp_path, "refused", model={"model": str(tmp_path / "no_such_model")},
                           safety_adapter=str(tmp / "run" / "safety" / "lori_s"), task_mask=str(mask))
    proc = run_lori("continual", "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lori: error:")]
    assert len(errors) == 1 and errors == proc.stderr.strip().splitlines()[-1:]
    assert "A seed 7 (digest 0123456789abcdef)" in errors[0] and "A seed 0 (digest " in errors[0]
    assert "calibrate M_t with a LoRI-D run that uses the safety adapter's A: model.lori.seed: 0" in errors[0]
    assert "no_such_model" not in proc.stderr  # the model was never looked for
    assert not (tmp_path / "refused").exists()  # no output dir, no checkpoint


def test_official_mask_passes_with_a_note_then_the_model_loads(first_run, tmp_path):
    """The control of the test above: an official .pt mask is taken (with a note) and loading starts."""
    tmp, _ = first_run
    masks = load_masks(tmp / "run" / "task_mask" / "calibration" / "masks.safetensors")
    official = official_mask_path(tmp_path / "lori_d_task", 0.9)
    official.parent.mkdir(parents=True)
    torch.save({f"base_model.model.{p}.lora_B.default.weight": m for p, m in masks.items()}, official)
    cfg = continual_config(tmp_path, "noted", model={"model": str(tmp_path / "no_such_model")},
                           safety_adapter=str(tmp / "run" / "safety" / "lori_s"),
                           task_mask=str(tmp_path / "lori_d_task"))  # a directory: masks/0.9_mask.pt is found
    proc = run_lori("continual", "--config", str(cfg))
    assert proc.returncode == 2
    notes = [line for line in proc.stderr.splitlines() if line.startswith("lori: note:")]
    assert len(notes) == 1 and str(official) in notes[0] and "cannot check" in notes[0]
    assert "no_such_model" in proc.stderr.strip().splitlines()[-1]  # past the check, the model load failed


def test_official_mask_trains_phase_two(first_run, tmp_path):
    tmp, _ = first_run
    masks = load_masks(tmp / "run" / "task_mask" / "calibration" / "masks.safetensors")
    official = official_mask_path(tmp_path / "lori_d_task", 0.9)
    official.parent.mkdir(parents=True)
    torch.save({f"base_model.model.{p}.lora_B.default.weight": m for p, m in masks.items()}, official)
    cfg = continual_config(tmp_path, "official", safety_adapter=str(tmp / "run" / "safety" / "lori_s"),
                           task_mask=str(official))
    summary = continual(["--config", str(cfg)])
    check = summary["task_mask_file"]
    assert check["path"] == str(official) and not check["a_checked"] and "cannot check" in check["notes"][0]
    task = load_adapter(tmp_path / "official" / "task")
    assert all(torch.equal(task.masks[p], masks[p]) for p in masks)


def test_mask_of_another_seed_is_refused_when_the_safety_adapter_trains_here(first_run, tmp_path, capsys):
    tmp, _ = first_run
    cfg = continual_config(tmp_path, "other_seed", lori={"seed": 5},
                           task_mask=str(tmp / "run" / "task_mask" / "calibration" / "masks.safetensors"))
    with pytest.raises(SystemExit) as info:
        main(["continual", "--config", str(cfg)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the safety adapter this run trains" in err and "A seed 0" in err and "A seed 5" in err
    assert not (tmp_path / "other_seed").exists()


def test_pairing_checks_base_rank_and_the_drawn_A(first_run, tmp_path):
    tmp, _ = first_run
    safety = str(tmp / "run" / "safety" / "lori_s")
    lori = LoRIConfig(r=4, alpha=8, sparsity=0.9, dropout=0.0)
    other_base = _mask_with_record(tmp_path, tmp / "run", "base.safetensors", base_fingerprint="ffffffffffffffff")
    with pytest.raises(ContinualConfigError, match="base fingerprint ffffffffffffffff"):
        ContinualConfig(safety_adapter=safety, task_mask=str(other_base)).check_pairing(lori)
    other_r = _mask_with_record(tmp_path, tmp / "run", "r8.safetensors", r=8)
    with pytest.raises(ContinualConfigError, match="r=8"):
        ContinualConfig(safety_adapter=safety, task_mask=str(other_r)).check_pairing(lori)
    # trained in this run: the seed matches, but the model's A (its digest) settles it once the model is loaded
    good = tmp / "run" / "task_mask" / "calibration" / "masks.safetensors"
    safety_A = load_adapter(safety).A
    assert ContinualConfig(task_mask=str(good)).check_pairing(lori, safety_A) == []
    other_A = {p: a + 1 for p, a in safety_A.items()}
    with pytest.raises(ContinualConfigError, match="this run trains"):
        ContinualConfig(task_mask=str(good)).check_pairing(lori, other_A)
    assert ContinualConfig(task_mask=str(good), masked_task=False).check_pairing(lori, other_A) == []  # no M_t used


def test_given_safety_adapter_of_another_seed_calibrates_M_t_under_its_A(first_run, tmp_path):
    """model.lori.seed 5, safety adapter drawn from seed 0: the in-run M_t and the task adapter use (and say) A seed 0."""
    tmp, _ = first_run
    safety_dir = tmp / "run" / "safety" / "lori_s"
    cfg = continual_config(tmp_path, "resynced", lori={"seed": 5}, safety_adapter=str(safety_dir))
    continual(["--config", str(cfg)])
    safety = load_adapter(safety_dir)
    record = read_mask_record(tmp_path / "resynced" / "task_mask" / "calibration" / "masks.safetensors")
    assert (record.seed, record.digest) == (0, a_digest(safety.A))
    task = load_adapter(tmp_path / "resynced" / "task")
    assert task.config.seed == 0 and all(torch.equal(task.A[p], safety.A[p]) for p in safety.A)
    assert read_mask_record(tmp_path / "resynced" / "task" / "lori_masks.safetensors").mismatch(
        read_a_identity(safety_dir)) is None
