"""Long subprocess runs that tests read, started as soon as collection ends (``conftest.py``) so that
they run beside the rest of the suite, which leaves a core idle much of the time on a 2-core
machine; the test that needs one waits for it. A run that no collected test needs never starts.

    start("gpu_check_tiny")      # from pytest_collection_finish
    done = wait("gpu_check_tiny")  # in the fixture: returncode, stdout, stderr, work directory
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str
    workdir: Path


def _gpu_check_tiny(workdir: Path) -> list[str]:
    """experiments/gpu_check.py --tiny (the CPU test of the GPU script), JSON at workdir/gpu_check_tiny.json."""
    return [sys.executable, str(REPO / "experiments" / "gpu_check.py"), "--tiny",
            "--out", str(workdir / "gpu_check_tiny.json"), "--workdir", str(workdir / "work")]


def _preemption_runs(workdir: Path) -> list[str]:
    """tests/preemption_runs.py: lori pipeline interrupted by signals and resumed, beside an uninterrupted run."""
    return [sys.executable, str(REPO / "tests" / "preemption_runs.py"), str(workdir / "runs")]


COMMANDS = {"gpu_check_tiny": _gpu_check_tiny, "preemption_runs": _preemption_runs}
# the fixture whose tests read each run: a collected test using it starts the run early
FIXTURES = {"gpu_check_tiny": "tiny_run", "preemption_runs": "preemption_runs"}
_running: dict[str, tuple[subprocess.Popen, Path]] = {}


def start(name: str) -> None:
    """Start run ``name`` in the background (once); stdout and stderr go to files beside it."""
    if name in _running:
        return
    workdir = Path(tempfile.mkdtemp(prefix=f"lori_{name}_"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # toy sizes: one thread, beside the suite's own
    with (workdir / "stdout").open("w") as out, (workdir / "stderr").open("w") as err:
        proc = subprocess.Popen(COMMANDS[name](workdir), cwd=REPO, env=env, stdout=out, stderr=err)
    _running[name] = (proc, workdir)


def wait(name: str, timeout: float = 900) -> Done:
    """The finished run ``name`` (started now if it was not)."""
    start(name)
    proc, workdir = _running[name]
    proc.wait(timeout=timeout)
    return Done(proc.returncode, (workdir / "stdout").read_text(), (workdir / "stderr").read_text(), workdir)


@atexit.register
def _stop_and_clean() -> None:
    for proc, workdir in _running.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
