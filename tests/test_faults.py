"""Faults: a diverging run stops with a message naming the step and keeps its last good checkpoint;
a run killed anywhere resumes without losing masks or leaving a half-written adapter."""

from __future__ import annotations

import pytest
import torch
from pipeline_helpers import tiny_config, write_config

import lori.commands.pipeline_command as cli
from lori.commands.main import main
from lori.core import load_adapter


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    cfg = tiny_config(tmp_path, checkpoint_every=1, held_out_loss=False, dense_steps=30)
    cfg["model"]["lr"] = 1.0e30  # diverges within a few steps
    with pytest.raises(SystemExit) as info:
        main(["pipeline", "--config", str(write_config(tmp_path, cfg))])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lori: error: non-finite training loss") and "global step" in err
    step = int(err.split("global step ")[1].split()[0])
    ckpt = torch.load(tmp_path / "run" / "lori_d_ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == step  # the last step that finished
    assert all(torch.isfinite(v).all() for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    assert not (tmp_path / "run" / "lori_d").exists()  # no adapter from a diverged run


class Killed(RuntimeError):
    pass


def test_kill_during_the_adapter_save_leaves_no_half_adapter_and_resumes(tmp_path, monkeypatch):
    cfg = write_config(tmp_path, tiny_config(tmp_path, held_out_loss=False))
    import lori.core.io as io

    real = io.save_file

    def dying_save(tensors, path, *args, **kwargs):
        real(dict(list(tensors.items())[:1]), path, *args, **kwargs)  # a partial file, then death
        raise Killed("killed while writing")

    with monkeypatch.context() as m:
        m.setattr(io, "save_file", dying_save)
        with pytest.raises(Killed):
            cli.pipeline(["--config", str(cfg)])
    run = tmp_path / "run"
    assert not (run / "lori_d").exists()  # the half-written directory never replaced anything
    assert not [p for p in run.iterdir() if p.name.startswith(".lori_d")]  # no temporary left
    assert (run / "calibration" / "masks.safetensors").is_file()
    summary = cli.pipeline(["--config", str(cfg)])  # resumes: LoRI-D from its checkpoint, then LoRI-S
    assert summary["lori_s"]["steps"] == 4
    assert load_adapter(run / "lori_d").masks is None and load_adapter(run / "lori_s").masks is not None
