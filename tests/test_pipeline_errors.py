"""Bad input to the pipeline: one clear message naming the problem, before long work, no output."""

from __future__ import annotations

import json
import shutil

import lightning as L
import pytest
from pipeline_helpers import tiny_config, write_config

from lori.commands.main import main
from lori.core import LoRIConfigError, get_B
from lori.training.continual import ContinualConfig
from lori.training.pipeline import PipelineConfig


def _fails(tmp_path, capsys, config, *fragments):
    path = write_config(tmp_path, config)
    with pytest.raises(SystemExit) as exc:
        main(["pipeline", "--config", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, (fragment, err[-2000:])
    return err


def test_missing_model_path(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    cfg["model"]["model"] = str(tmp_path / "no_such_model")
    _fails(tmp_path, capsys, cfg, "no_such_model")
    assert not (tmp_path / "run").exists()


def test_missing_gguf_file(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    (tmp_path / "models").mkdir()
    cfg["model"].update(model=str(tmp_path / "models"), gguf_file="missing.Q4.gguf")
    _fails(tmp_path, capsys, cfg, "missing.Q4.gguf")
    assert not (tmp_path / "run").exists()


def test_dataset_with_missing_field(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "2+2?", "answer": "4\n#### 4"}) + "\n" + json.dumps({"question": "3+3?"}) + "\n")
    cfg["data"]["train_file"] = str(bad)
    _fails(tmp_path, capsys, cfg, "bad.jsonl", "answer")
    assert not (tmp_path / "run").exists()


def test_unknown_config_key(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    cfg["model"]["sparsty"] = 0.9
    _fails(tmp_path, capsys, cfg, "sparsty")
    assert not (tmp_path / "run").exists()


def test_sparsity_out_of_range(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    cfg["model"]["lori"]["sparsity"] = 1.5
    _fails(tmp_path, capsys, cfg, "sparsity", "1.5")
    assert not (tmp_path / "run").exists()


def test_unknown_target_module(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    cfg["model"]["lori"]["target_modules"] = ["q_proj", "query_key_value"]
    _fails(tmp_path, capsys, cfg, "query_key_value")


def test_resume_checkpoint_from_another_adapter_shape(tmp_path, capsys):
    cfg = tiny_config(tmp_path, dense_steps=2, sparse_steps=2, checkpoint_every=1)
    main(["pipeline", "--config", str(write_config(tmp_path, cfg))])
    run = tmp_path / "run"
    for stage in ("lori_d", "lori_s", "calibration"):
        shutil.rmtree(run / stage)  # as if killed after the dense checkpoint
    written = sorted(p.name for p in run.rglob("*"))
    cfg["model"]["lori"]["r"] = 8
    _fails(tmp_path, capsys, cfg, "lori_A", "shape (4, 32)", "(8, 32)")
    assert sorted(p.name for p in run.rglob("*")) == written  # nothing new written


class ZeroBAtTrainEnd(L.Callback):
    """Leaves every B at zero when LoRI-D ends (before calibration runs), as an untrained LoRI-D would."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for b in get_B(pl_module.model).values():
            b.data.zero_()


def test_calibrating_from_an_all_zero_B_stops_with_one_line(tmp_path, capsys):
    cfg = tiny_config(tmp_path, dense_steps=1, sparse_steps=1, held_out_loss=False)
    cfg["trainer"]["callbacks"] = [{"class_path": "test_pipeline_errors.ZeroBAtTrainEnd"}]
    err = _fails(tmp_path, capsys, cfg, "is zero", "by position only")
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("lori: error: ")
    assert not (tmp_path / "run" / "calibration" / "masks.safetensors").exists()


def test_zero_dense_steps_stop_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("lori.training.module.build_model", no_loading)
    cfg = tiny_config(tmp_path, dense_steps=0)
    _fails(tmp_path, capsys, cfg, "pipeline.dense_steps must be >= 1, got 0", "B starts at zero")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config, section", [(PipelineConfig, "pipeline"), (ContinualConfig, "continual")])
def test_the_renamed_validate_key_names_held_out_loss(config, section):
    """``validate`` became ``held_out_loss``: the old key stops in one line naming the new one, in the
    library as on the command line; the new key keeps the old default."""
    with pytest.raises(LoRIConfigError, match=rf"^{section}\.validate is now {section}\.held_out_loss$"):
        config(validate=False)
    assert config().held_out_loss is (section == "pipeline") and config().validate is None
