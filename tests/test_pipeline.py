"""The LoRI-D -> calibration -> LoRI-S pipeline end to end on a tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_helpers import tiny_config, write_config
from safetensors.torch import load_file

from lori.commands.main import main
from lori.commands.pipeline_command import pipeline
from lori.core import load_adapter


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    cfg = write_config(tmp, tiny_config(tmp))
    summary = pipeline(["--config", str(cfg)])
    return tmp, summary


def test_pipeline_writes_every_stage(finished_run):
    tmp, summary = finished_run
    run = tmp / "run"
    for name in ("lori_d", "lori_s"):
        assert (run / name / "adapter_model.safetensors").is_file()
        assert (run / name / "resolved_config.yaml").is_file()
        assert (run / f"{name}_ckpt" / "last.ckpt").is_file()
        assert list((run / "tb" / name).glob("events.out.tfevents.*"))
    assert (run / "calibration" / "sparsity_heatmap.png").is_file()
    assert json.loads((run / "summary.json").read_text())["lori_s"]["steps"] == 4
    d, s = summary["lori_d"], summary["lori_s"]
    assert s["trainable"] == round(0.1 * d["trainable"])  # kept entries only
    assert abs(s["mask_sparsity"] - 0.9) < 1e-3
    assert d["val_loss_after"] < d["val_loss_before"]
    assert s["val_loss_after"] < s["val_loss_before"]


def test_lori_s_keeps_A_and_trains_inside_the_mask_only(finished_run):
    tmp, _ = finished_run
    d, s = load_adapter(tmp / "run" / "lori_d"), load_adapter(tmp / "run" / "lori_s")
    masks = load_file(str(tmp / "run" / "calibration" / "masks.safetensors"))
    assert s.masks is not None
    for path in d.A:
        assert torch.equal(d.A[path], s.A[path])  # the same A as the calibration run
        assert torch.equal(s.masks[path], masks[path])
        assert torch.count_nonzero(s.B[path][~masks[path]]) == 0
    assert any(torch.count_nonzero(s.B[p]) > 0 for p in s.B)
    # masks equal a fresh calibration of the saved dense B
    from lori.core import calibrate

    again = calibrate(d.B, 0.9, "model")
    assert all(torch.equal(again[p], masks[p]) for p in masks)


def test_rerun_reuses_finished_stages(finished_run):
    tmp, summary = finished_run
    before = (tmp / "run" / "lori_s" / "adapter_model.safetensors").read_bytes()
    again = pipeline(["--config", str(tmp / "cfg.yaml")])
    assert again["lori_d"]["reused"] and again["lori_s"]["reused"]
    assert again["lori_s"]["val_loss_after"] == summary["lori_s"]["val_loss_after"]
    assert (tmp / "run" / "lori_s" / "adapter_model.safetensors").read_bytes() == before


def test_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    text = capsys.readouterr().out
    for option in ("--pipeline.dense_steps", "--pipeline.sparse_steps", "--model.lori.sparsity",
                   "--model.lori.granularity", "--model.lr", "--data.task", "--trainer.max_steps"):
        assert option in text, option
    assert "default: 40" in text and "default: 0.9" in text


def test_epoch_budgets_and_a_separate_lori_s_alpha(tmp_path):
    """The paper's configs count epochs, and one of them gives LoRI-S another alpha."""
    cfg = write_config(tmp_path, tiny_config(tmp_path, dense_epochs=1, sparse_epochs=2, sparse_alpha=16.0,
                                             held_out_loss=False))
    summary = pipeline(["--config", str(cfg)])
    assert summary["lori_d"]["steps"] == 4  # 8 training examples, batch 2
    assert summary["lori_s"]["steps"] == 8
    d, s = load_adapter(tmp_path / "run" / "lori_d"), load_adapter(tmp_path / "run" / "lori_s")
    assert d.config.alpha == 8 and s.config.alpha == 16.0
    assert s.config.scale == 4.0
