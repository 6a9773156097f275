"""One run per output directory: a live holder is refused in one line naming it, a lock left by a
killed run is taken over (and the message says so), a finished run leaves no lock, and the other
ranks of a multi-process run neither lock nor refuse."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_helpers import tiny_config, write_config

from lori.commands.main import main
from lori.training import run_lock
from lori.training.run_lock import RunLockedError, lock_path

HOLD = """
import sys, time
from lori.training import run_lock
run_lock.acquire(sys.argv[1])
print("holding", flush=True)
time.sleep(120)
"""


def holder(directory: Path) -> subprocess.Popen:
    """Another process holding the lock of ``directory`` (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "holding"
    return proc


def hold_in_this_process(directory: Path, pid: int = 4242) -> int:
    """A held lock as another run would hold it (a second open file description: flock conflicts)."""
    path = lock_path(directory)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    info = {"pid": pid, "host": "node7", "command": "lori pipeline --config other.yaml", "started": "2025-01-01T12:00:00"}
    os.write(fd, json.dumps(info).encode())
    return fd


def test_a_live_holder_is_refused_naming_it_and_a_killed_one_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    proc = holder(run)
    try:
        with pytest.raises(RunLockedError) as info:
            run_lock.acquire(run)
        message = str(info.value)
        assert f"output directory {run} is in use by another run (pid {proc.pid} on " in message
        assert str(lock_path(run)) in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock_path(run).is_file()  # a killed run cannot clean up: the file stays, unheld
    capsys.readouterr()
    path = run_lock.acquire(run)
    note = capsys.readouterr().err.strip()
    assert note.startswith(f"lori: took over the lock of {run} left by a run that ended without releasing it")
    assert f"pid {proc.pid} on" in note
    assert json.loads(lock_path(run).read_text())["pid"] == os.getpid()
    run_lock.release(path)
    assert not lock_path(run).exists()  # released: nothing left beside the directory


def test_nested_holds_release_with_the_outermost(tmp_path):
    with run_lock.holding(tmp_path / "run"):
        with run_lock.holding(tmp_path / "run"):
            pass
        assert lock_path(tmp_path / "run").is_file()
    assert not lock_path(tmp_path / "run").exists()


@pytest.mark.parametrize("variable", ["LOCAL_RANK", "RANK", "SLURM_PROCID"])
def test_other_ranks_of_a_multiprocess_run_neither_lock_nor_refuse(tmp_path, monkeypatch, variable):
    fd = hold_in_this_process(tmp_path / "run")  # rank 0 holds it
    try:
        monkeypatch.setenv(variable, "1")
        assert not run_lock.is_launching_process()
        with run_lock.holding(tmp_path / "run"):  # no RunLockedError
            pass
        monkeypatch.setenv(variable, "0")
        with pytest.raises(RunLockedError):
            run_lock.acquire(tmp_path / "run")
    finally:
        os.close(fd)


def test_the_lock_is_inside_when_the_parent_cannot_be_written(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    assert lock_path(run) == run / ".lori.lock"
    assert lock_path(tmp_path / "other") == tmp_path / ".other.lock"  # not there yet: beside


def refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("lori: error: output directory") and "pid 4242 on node7" in err[-1], err[-3:]
    return err[-1]


def test_lori_eval_merge_continual_and_diagnose_refuse_a_directory_in_use(tmp_path, capsys):
    from test_bad_input import tiny_adapter

    a, b = tiny_adapter(tmp_path / "a"), tiny_adapter(tmp_path / "b")
    out = tmp_path / "out"
    fd = hold_in_this_process(out)
    try:
        refused(capsys, ["eval", "--model", "tiny-llama", "--adapter", str(a), "--output_dir", str(out),
                         "--eval.max_examples", "1", "--eval.progress", "false"])
        merge = {"base_model": "tiny-llama", "adapters": [str(a), str(b)], "method": "linear",
                 "weights": [0.5, 0.5], "evaluate": [], "output_dir": str(out)}
        (tmp_path / "merge.yaml").write_text(yaml.safe_dump(merge))
        refused(capsys, ["merge", "--config", str(tmp_path / "merge.yaml")])
        refused(capsys, ["diagnose", "--adapters", str(a), str(b), "--output", str(out)])
        cfg = tiny_config(tmp_path)
        del cfg["pipeline"]
        cfg["task_data"] = dict(cfg["data"])
        cfg["continual"] = {"output_dir": str(out), "safety_adapter": str(a)}
        cfg["eval"] = {"tasks": ["gsm8k"], "max_examples": 1}
        refused(capsys, ["continual", "--config", str(write_config(tmp_path, cfg))])
    finally:
        os.close(fd)
    assert not out.exists()


def test_a_lock_left_by_a_killed_run_is_taken_over_and_said(tmp_path, capsys):
    from test_bad_input import tiny_adapter

    a, b = tiny_adapter(tmp_path / "a"), tiny_adapter(tmp_path / "b")
    out = tmp_path / "out"
    os.close(hold_in_this_process(out, pid=99999))  # as a killed run leaves it: written, unheld
    main(["diagnose", "--adapters", str(a), str(b), "--output", str(out), "--tensorboard", "false"])
    err = capsys.readouterr().err
    assert f"lori: took over the lock of {out} left by a run that ended without releasing it (pid 99999" in err
    assert (out / "diagnostics.json").is_file() and not lock_path(out).exists()


def test_a_finished_pipeline_leaves_no_lock_and_a_second_one_is_refused_while_it_runs(tmp_path, capsys):
    cfg = tiny_config(tmp_path, held_out_loss=False, dense_steps=2, sparse_steps=2)
    path = write_config(tmp_path, cfg)
    fd = hold_in_this_process(tmp_path / "run")
    try:
        line = refused(capsys, ["pipeline", "--config", str(path)])
        assert "lori pipeline --config other.yaml" in line and "started 2025-01-01T12:00:00" in line
    finally:
        os.close(fd)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    main(["pipeline", "--config", str(path)])
    assert (tmp_path / "run" / "summary.json").is_file() and not lock_path(tmp_path / "run").exists()


def test_lori_fit_locks_its_checkpoint_directory_and_writes_through_the_atomic_plugin(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    cfg.pop("pipeline")
    ckpt = tmp_path / "ckpt"
    cfg["trainer"] |= {
        "max_steps": 2, "logger": False, "default_root_dir": str(tmp_path),
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
            "dirpath": str(ckpt), "save_last": True, "save_top_k": 0, "every_n_train_steps": 1}}],
    }
    path = write_config(tmp_path, cfg)
    fd = hold_in_this_process(ckpt)
    try:
        refused(capsys, ["fit", "--config", str(path)])
    finally:
        os.close(fd)
    assert not ckpt.exists()
    main(["fit", "--config", str(path)])
    steps = [torch.load(ckpt / n, weights_only=True)["global_step"] for n in ("last.ckpt", "last.prev.ckpt")]
    assert steps == [2, 1] and not lock_path(ckpt).exists()
