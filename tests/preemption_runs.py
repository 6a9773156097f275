"""The ``lori pipeline`` runs that tests/test_preemption.py reads, each a fresh ``python -m lori`` process:

    uninterrupted   the reference run
    sigterm_d8      SIGTERM during LoRI-D step 8 (checkpoints every 5)          -> exit 143
    calibration     rerun; SIGTERM as LoRI-D's calibration starts                 -> LoRI-S step 1, exit 143
    sigusr1_s3      rerun under a simulated SLURM job (SLURM_* variables, a fake ``scontrol`` on PATH
                    that records its arguments); SIGUSR1 during LoRI-S step 3    -> requeue, exit 138
    resumed         rerun without signals                                        -> the uninterrupted run's result

After each run it records the exit code, stdout, stderr, the global step of each stage's last.ckpt
and whether the lock file is left, in <workdir>/runs.json (``python tests/preemption_runs.py <workdir>``;
tests/background_runs.py starts it beside the suite).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from pipeline_helpers import tiny_config, write_config  # noqa: E402

STAGES = ("lori_d", "lori_s")
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "lori-test", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def signal_config(workdir: Path, name: str, **init_args) -> Path:
    path = workdir / f"{name}.yaml"
    callback = {"class_path": "signal_at.SignalAt", "init_args": init_args}
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    return path


def fake_scontrol(workdir: Path) -> Path:
    bin_dir = workdir / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {workdir / "scontrol.log"}\n')
    script.chmod(0o755)
    return bin_dir


def config(workdir: Path, name: str) -> Path:
    cfg = tiny_config(workdir, output_dir=str(workdir / name / "run"), dense_steps=10, sparse_steps=6,
                      checkpoint_every=5)
    cfg["model"]["lori"]["dropout"] = 0.1  # the random stream must continue across the interruptions
    return write_config(workdir, cfg, f"{name}.yaml")


def lori(workdir: Path, out: Path, *argv: str, env: dict[str, str] | None = None) -> dict:
    environ = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "lori", "pipeline", *argv], env=environ, cwd=workdir,
                          capture_output=True, text=True, timeout=900)
    steps = {}
    for stage in STAGES:
        ckpt = out / f"{stage}_ckpt" / "last.ckpt"
        if ckpt.is_file():
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
            steps[stage] = {"global_step": saved["global_step"], "callbacks": sorted(saved.get("callbacks", {})),
                            "measured": saved.get("callbacks", {}).get("MeasuredLosses")}
    return {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr, "checkpoints": steps,
            "lock_left": (out.parent / f".{out.name}.lock").exists()}


def main(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    runs = {"uninterrupted": lori(workdir, workdir / "uninterrupted" / "run", "--config",
                                  str(config(workdir, "uninterrupted")))}
    cfg, out = config(workdir, "interrupted"), workdir / "interrupted" / "run"
    slurm = {**SLURM, "PATH": f"{fake_scontrol(workdir)}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name, signal_args, env in (
        ("sigterm_d8", {"fit": 1, "step": 8, "signal": "SIGTERM"}, None),
        ("calibration", {"fit": 1, "step": 0, "signal": "SIGTERM"}, None),
        ("sigusr1_s3", {"fit": 1, "step": 3, "signal": "SIGUSR1"}, slurm),
    ):
        runs[name] = lori(workdir, out, "--config", str(cfg), "--config",
                          str(signal_config(workdir, name, **signal_args)), env=env)
    runs["resumed"] = lori(workdir, out, "--config", str(cfg))
    log = workdir / "scontrol.log"
    runs["scontrol"] = log.read_text() if log.is_file() else None
    (workdir / "runs.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
