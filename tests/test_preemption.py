"""Preemption (lori.training.preemption): SIGTERM / SIGUSR1 checkpoint at the step, say so in one line, exit
128 + signal; the rerun ends with the uninterrupted run's summary and bit-identical adapters.

The ``lori pipeline`` processes run in the background beside the suite (tests/preemption_runs.py);
``lori fit``, ``lori continual`` and the calibrate_at_step case run in this process, signalling it.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from pipeline_helpers import tiny_config, write_config
from preemption_runs import SLURM, fake_scontrol, signal_config
from test_continual import continual_config

import background_runs
import lori.commands.pipeline_command as cli
from lori.commands.main import main
from lori.core import load_adapter
from lori.training import preemption

TIMING = ("train_seconds", "reused")  # what a resumed run may report differently


@pytest.fixture(scope="module")
def preemption_runs():
    done = background_runs.wait("preemption_runs")
    assert done.returncode == 0, done.stderr[-3000:]
    runs_dir = done.workdir / "runs"
    return runs_dir, json.loads((runs_dir / "runs.json").read_text())


def last_line(run: dict) -> str:
    return run["stderr"].strip().splitlines()[-1]


def preempted_line(signal_name: str, where: str, ckpt: Path, extra: str = "") -> str:
    return (f"lori: preempted ({signal_name}) at {where}; checkpoint {ckpt}{extra}; "
            "rerun the same command to resume")


def test_lori_fit_sigusr1_checkpoints_names_the_resume_option_and_resumes(tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_config(tmp_path))
    root = tmp_path / "fit"
    argv = ["fit", "--config", str(cfg), "--trainer.max_steps", "6", "--trainer.default_root_dir", str(root)]
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(SystemExit) as info:
        main([*argv, "--config", str(signal_config(tmp_path, "signal", fit=1, step=3, signal="SIGUSR1"))])
    assert info.value.code == 138
    assert signal.getsignal(signal.SIGUSR1) is before  # the handlers are given back
    line = capsys.readouterr().err.strip().splitlines()[-1]
    ckpt = Path(line.split("checkpoint ")[1].split(";")[0])
    assert line == (f"lori: preempted (SIGUSR1) at fit step 3/6; checkpoint {ckpt}; "
                    f"rerun with --ckpt_path {ckpt} to resume")
    assert ckpt.name == "last.ckpt" and root in ckpt.parents
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    main([*argv, "--ckpt_path", str(ckpt)])
    steps = [torch.load(p, weights_only=True)["global_step"] for p in root.rglob("*.ckpt")]
    assert max(steps) == 6  # the resumed fit reached max_steps (its checkpoints: the logger's next version)


def test_lori_fit_under_slurm_writes_lightnings_checkpoint_that_the_requeued_job_resumes(tmp_path, capsys,
                                                                                         monkeypatch):
    from lori.commands.lightning_cli import LoRICLI
    from lori.data.datamodule import TaskDataModule
    from lori.training.module import LoRIModule

    for name, value in SLURM.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", f"{fake_scontrol(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    root = tmp_path / "fit"
    argv = ["fit", "--config", str(write_config(tmp_path, tiny_config(tmp_path))), "--trainer.max_steps", "6",
            "--trainer.default_root_dir", str(root),
            "--config", str(signal_config(tmp_path, "signal", fit=1, step=3, signal="SIGUSR1"))]
    with pytest.raises(SystemExit) as info:
        LoRICLI(LoRIModule, TaskDataModule, args=argv, save_config_kwargs={"overwrite": True})
    assert info.value.code == 138
    hpc = root / "hpc_ckpt_1.ckpt"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lori: preempted (SIGUSR1) at fit step 3/6; checkpoint {hpc}; SLURM job 4242 requeued; "
        "the requeued job resumes from it")
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    resumed = LoRICLI(LoRIModule, TaskDataModule, args=argv, save_config_kwargs={"overwrite": True})  # requeued
    assert resumed.trainer.ckpt_path == str(hpc) and resumed.trainer.global_step == 6


def test_lori_continual_sigterm_checkpoints_the_phase_and_releases_the_lock(tmp_path, capsys):
    from lori.commands.continual_command import continual

    cfg = continual_config(tmp_path, "run")
    with pytest.raises(SystemExit) as info:
        continual(["--config", str(cfg), "--config", str(signal_config(tmp_path, "signal", fit=1, step=1))])
    assert info.value.code == 143
    ckpt = tmp_path / "run" / "safety" / "lori_d_ckpt" / "last.ckpt"
    assert capsys.readouterr().err.strip().splitlines()[-1] == preempted_line("SIGTERM", "LoRI-D step 1/3", ckpt)
    assert torch.load(ckpt, weights_only=True)["global_step"] == 1
    assert not (tmp_path / ".run.lock").exists()
    assert not (tmp_path / "run" / "safety" / "lori_d").exists()  # no adapter from the interrupted phase


def test_preempted_at_calibrate_at_step_resumes_without_training_past_it(tmp_path):
    cfg = write_config(tmp_path, tiny_config(tmp_path, dense_steps=6, calibrate_at_step=3, sparse_steps=2,
                                             checkpoint_every=5, held_out_loss=False))
    with pytest.raises(SystemExit):
        cli.pipeline(["--config", str(cfg), "--config", str(signal_config(tmp_path, "signal", fit=1, step=3))])
    assert torch.load(tmp_path / "run" / "lori_d_ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3
    summary = cli.pipeline(["--config", str(cfg)])
    assert summary["lori_d"]["steps"] == 3 and summary["lori_d"]["calibration"]["step"] == 3


def test_signal_after_the_last_step_lets_the_run_finish(capsys):
    with preemption.handling():
        os.kill(os.getpid(), signal.SIGUSR1)
    assert capsys.readouterr().err == "lori: SIGUSR1 arrived after the last training step; the run finished\n"
    assert preemption.pending() is None


def test_lightnings_sigterm_exception_becomes_a_preemption_exit(capsys):
    with pytest.raises(preemption.Preempted) as info, preemption.handling():
        os.kill(os.getpid(), signal.SIGTERM)
        raise SIGTERMException  # what Lightning's loops raise, e.g. mid held-out loss
    assert info.value.code == 143
    assert capsys.readouterr().err.startswith("lori: preempted (SIGTERM) outside a training step;")


# the lori pipeline processes (run in the background since collection ended)
def test_sigterm_during_lori_d_step_8_checkpoints_step_8_says_so_and_exits_143(preemption_runs):
    runs_dir, runs = preemption_runs
    run, out = runs["sigterm_d8"], runs_dir / "interrupted" / "run"
    assert run["returncode"] == 143
    assert last_line(run) == preempted_line("SIGTERM", "LoRI-D step 8/10", out / "lori_d_ckpt" / "last.ckpt")
    assert run["stderr"].count("lori: preempted") == 1
    ckpt = run["checkpoints"]["lori_d"]
    assert ckpt["global_step"] == 8  # not the periodic step 5
    # the base loss measured before LoRI-D travels with the stage's checkpoint
    base = runs["uninterrupted"]["checkpoints"]["lori_d"]["measured"]["val_loss_before"]
    assert ckpt["measured"] == {"val_loss_before": base}
    assert not run["lock_left"]  # the output directory's lock is released
    assert "lori_s" not in run["checkpoints"]


def test_signal_during_calibration_lets_it_finish_and_stops_at_the_first_lori_s_step(preemption_runs):
    runs_dir, runs = preemption_runs
    run, out = runs["calibration"], runs_dir / "interrupted" / "run"
    assert run["returncode"] == 143
    assert "resuming from" in run["stderr"] and "calibration at step 10" in run["stderr"]
    assert last_line(run) == preempted_line("SIGTERM", "LoRI-S step 1/6", out / "lori_s_ckpt" / "last.ckpt")
    assert run["checkpoints"]["lori_d"]["global_step"] == 10 and run["checkpoints"]["lori_s"]["global_step"] == 1
    assert not run["lock_left"]


def test_sigusr1_under_slurm_checkpoints_and_requeues_the_job(preemption_runs):
    runs_dir, runs = preemption_runs
    run, out = runs["sigusr1_s3"], runs_dir / "interrupted" / "run"
    assert run["returncode"] == 138  # 128 + SIGUSR1
    assert "LoRI-D: finished in an earlier run" in run["stderr"]
    assert last_line(run) == preempted_line("SIGUSR1", "LoRI-S step 3/6", out / "lori_s_ckpt" / "last.ckpt",
                                            "; SLURM job 4242 requeued")
    assert runs["scontrol"] == "requeue 4242\n"  # once, by the fake scontrol on PATH
    assert run["checkpoints"]["lori_s"]["global_step"] == 3
    assert not run["lock_left"]


def _comparable(summary: dict, out: Path) -> dict:
    text = json.dumps(summary).replace(str(out), "<out>")
    summary = json.loads(text)
    for stage in ("lori_d", "lori_s"):
        for key in TIMING:
            summary[stage].pop(key, None)
    return summary


def test_resumed_run_has_the_uninterrupted_summary_and_bit_identical_adapters(preemption_runs):
    runs_dir, runs = preemption_runs
    full, resumed = runs_dir / "uninterrupted" / "run", runs_dir / "interrupted" / "run"
    assert runs["uninterrupted"]["returncode"] == 0 and runs["resumed"]["returncode"] == 0
    assert "not measured" not in runs["resumed"]["stdout"]
    assert runs["resumed"]["stdout"].replace(str(resumed), "<out>") == \
        runs["uninterrupted"]["stdout"].replace(str(full), "<out>")
    expected = _comparable(json.loads((full / "summary.json").read_text()), full)
    got = _comparable(json.loads((resumed / "summary.json").read_text()), resumed)
    assert got == expected
    for stage in ("lori_d", "lori_s"):
        a, b = load_adapter(full / stage), load_adapter(resumed / stage)
        assert a.B.keys() == b.B.keys()
        for path in a.B:
            assert torch.equal(a.A[path], b.A[path]) and torch.equal(a.B[path], b.B[path]), (stage, path)
            assert (a.masks is None) == (b.masks is None)
            assert a.masks is None or torch.equal(a.masks[path], b.masks[path])
        # every checkpoint went to last.ckpt (Lightning's ModelCheckpoint did not start a last-v1.ckpt)
        assert sorted(p.name for p in (resumed / f"{stage}_ckpt").iterdir()) == ["last.ckpt", "last.prev.ckpt"]
