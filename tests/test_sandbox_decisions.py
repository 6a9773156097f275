"""The sandbox's decisions, checked in-process: what the parent passes to the child, how it waits,
reads and classifies the outcome, and what the isolation probes conclude.

tests/test_sandbox.py runs real programs (the end-to-end proof); there a test sees only the final
``ExecResult``, and the probes run once per process behind a cache.  Here each step is called
with recording stand-ins (a fake clock, ``wait4``, ``Popen``, ``subprocess.run``, ``/proc`` texts)
so its arguments and its conclusions are checked exactly, and the probe cache is cleared first.
"""

from __future__ import annotations

import errno
import locale
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from lori.eval import _isolation as iso
from lori.eval import sandbox as sbx
from lori.eval._isolation import Capabilities, Limits

ALL = Capabilities(is_root=True, nproc_enforced=False, pids_cgroup_root="/cg", netns=True,
                   mountns=True, drop_caps=True)
NONE = Capabilities(is_root=False, nproc_enforced=True, pids_cgroup_root=None, netns=False,
                    mountns=False, drop_caps=False)


class _Clock:
    """A fake ``time`` module: ``sleep`` advances ``monotonic`` and is recorded (never by <= 0)."""

    def __init__(self, start: float = 0.0, step: float | None = None) -> None:
        self.now, self.sleeps, self.step = start, [], step

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0, "slept for nothing: a busy loop"
        assert len(self.sleeps) < 1000, "never stops"
        self.sleeps.append(seconds)
        self.now += seconds if self.step is None else self.step


class _Texts:
    """A stand-in for ``pathlib.Path`` that reads given texts (``/proc`` files)."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts

    def __call__(self, *parts):
        return SimpleNamespace(read_text=lambda: self.texts[os.path.join(*parts)])


# ---- lori.eval.sandbox: the parent side ---------------------------------------------------------


def test_isolation_report_is_the_probed_capabilities(monkeypatch):
    monkeypatch.setattr(sbx, "capabilities", lambda: ALL)
    assert sbx.isolation_report() == {"is_root": True, "nproc_enforced": False,
                                      "pids_cgroup_root": "/cg", "netns": True, "mountns": True,
                                      "drop_caps": True}


@pytest.mark.parametrize("guard", [True, False])
def test_environment_is_exactly_the_safe_variables(guard):
    assert sbx._environment("/h/work", "f00d", guard) == {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/h/work", "TMPDIR": "/h/work",
        "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1", "LORI_SANDBOX_TOKEN": "f00d", "LORI_SANDBOX_GUARD": "1" if guard else "0",
    }


def test_read_keeps_the_first_bytes_and_replaces_bad_utf8(tmp_path):
    path = tmp_path / "out"
    path.write_bytes(b"ab\xffcd\xc3\xa9")
    assert sbx._read(path, 4) == "ab\ufffdc"
    assert sbx._read(path, 100) == "ab\ufffdcdé"


def test_token_line_is_looked_for_in_the_last_window_of_stdout(tmp_path):
    path = tmp_path / "stdout"
    path.write_bytes(b"\nT0K\n")  # the token line at the very start of the file
    assert sbx._token_seen(path, "T0K")
    path.write_bytes(b"x" * 100 + b"\nT0K\n" + b"y" * 10)
    assert sbx._token_seen(path, "T0K", window=15) and not sbx._token_seen(path, "T0K", window=14)
    assert not sbx._token_seen(path, "T0", window=1000)  # a whole line, not a prefix
    path.write_bytes(b"T0K\n")  # no newline before it: the program printed it without one
    assert not sbx._token_seen(path, "T0K")
    for tail, seen in ((1 << 16) - 5, True), ((1 << 16) - 4, False):  # default window: 64 KiB
        path.write_bytes(b"\nT0K\n" + b"z" * tail)
        assert sbx._token_seen(path, "T0K") == seen


@pytest.mark.parametrize("error", [None, ProcessLookupError, PermissionError])
def test_kill_group_sigkills_the_session_and_ignores_a_gone_group(monkeypatch, error):
    calls = []

    def killpg(pid, sig):
        calls.append((pid, sig))
        if error is not None:
            raise error

    monkeypatch.setattr(sbx.os, "killpg", killpg)
    assert sbx._kill_group(SimpleNamespace(pid=4321)) is None
    assert calls == [(4321, signal.SIGKILL)]


def test_launch_starts_a_new_session_without_stdin_or_inherited_fds(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(sbx.subprocess, "Popen", lambda *a, **k: seen.update(args=a, kwargs=k) or 7)

    def preexec():
        return None

    assert sbx._launch(["py", "x"], tmp_path, {"A": "1"}, preexec, "OUT", "ERR") == 7
    assert seen == {"args": (["py", "x"],), "kwargs": {
        "cwd": tmp_path, "env": {"A": "1"}, "stdin": subprocess.DEVNULL, "stdout": "OUT",
        "stderr": "ERR", "start_new_session": True, "close_fds": True, "preexec_fn": preexec}}


def test_reap_reads_the_exit_status_and_cpu_time_from_wait4(monkeypatch):
    answers, asked = [], []

    def wait4(pid, options):
        asked.append((pid, options))
        return answers.pop(0)

    monkeypatch.setattr(sbx.os, "wait4", wait4)
    proc = SimpleNamespace(pid=99, returncode=None)
    answers.append((0, 0, None))  # WNOHANG: still running
    assert sbx._reap(proc, block=False) is None and proc.returncode is None
    answers.append((99, 3 << 8, SimpleNamespace(ru_utime=1.25, ru_stime=0.5)))  # exit(3)
    assert sbx._reap(proc, block=False) == 1.75 and proc.returncode == 3
    answers.append((99, signal.SIGXCPU, SimpleNamespace(ru_utime=2.0, ru_stime=0.0)))  # killed
    assert sbx._reap(proc, block=True) == 2.0 and proc.returncode == -signal.SIGXCPU
    assert asked == [(99, os.WNOHANG), (99, os.WNOHANG), (99, 0)]


def _fake_reaps(monkeypatch, polls: int, blocking_cpu: float = 0.0):
    """``_reap`` answering "running" ``polls`` times (non-blocking), then 1.5 s of CPU."""
    calls = []

    def reap(proc, block):
        calls.append(block)
        if block:
            return blocking_cpu
        return None if calls.count(False) <= polls else 1.5

    monkeypatch.setattr(sbx, "_reap", reap)
    kills = []
    monkeypatch.setattr(sbx, "_kill_group", kills.append)
    return calls, kills


def test_wait_polls_with_doubling_sleeps_capped_at_50_ms(monkeypatch):
    clock = _Clock(start=100.0)
    monkeypatch.setattr(sbx, "time", clock)
    calls, kills = _fake_reaps(monkeypatch, polls=9)
    assert sbx._wait("proc", timeout=10.0) == (False, 1.5)
    assert clock.sleeps == pytest.approx([0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.05, 0.05,
                                          0.05])
    assert calls == [False] * 10 and kills == []


@pytest.mark.parametrize("blocking_cpu", [0.0, 2.5])
def test_wait_kills_the_group_at_the_deadline_and_reaps_it(monkeypatch, blocking_cpu):
    clock = _Clock()
    monkeypatch.setattr(sbx, "time", clock)
    calls, kills = _fake_reaps(monkeypatch, polls=100, blocking_cpu=blocking_cpu)
    timeout = 0.001 + 0.002 + 0.004  # exactly the first three sleeps: no time left after them
    assert sbx._wait("proc", timeout) == (True, blocking_cpu)
    assert clock.sleeps == [0.001, 0.002, 0.004] and kills == ["proc"]
    assert calls == [False] * 4 + [True]


def test_wait_never_sleeps_past_the_deadline(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(sbx, "time", clock)
    _, kills = _fake_reaps(monkeypatch, polls=100)
    assert sbx._wait("proc", 0.0025)[0] is True
    assert clock.sleeps[:2] == pytest.approx([0.001, 0.0015]) and kills == ["proc"]
    assert sum(clock.sleeps) == pytest.approx(0.0025)


class _FakeGroup:
    """A stand-in for PidsCgroup; ``made`` lists (group, root, max_procs) of each one made."""

    made: ClassVar[list] = []

    def __init__(self, root: str, max_procs: int) -> None:
        self.path, self.closed = f"{root}/run-1", False
        _FakeGroup.made.append((self, root, max_procs))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def execute_parts(monkeypatch):
    """Record what ``_execute`` hands to make_preexec, PidsCgroup, _launch, _wait, _kill_group."""
    seen = {"kills": []}
    _FakeGroup.made = []
    monkeypatch.setattr(sbx, "PidsCgroup", _FakeGroup)
    monkeypatch.setattr(sbx, "make_preexec",
                        lambda *a, **k: seen.update(preexec=(a, k)) or "PREEXEC")
    proc = SimpleNamespace(pid=5, returncode=None)

    def launch(cmd, work, env, preexec, out, err):
        seen["launch"] = (cmd, work, env, preexec, out.name, out.mode, err.name, err.mode)
        return proc

    def wait(p, timeout):
        seen["wait"] = (p, timeout)
        p.returncode = -9
        return True, 1.5

    monkeypatch.setattr(sbx, "_launch", launch)
    monkeypatch.setattr(sbx, "_wait", wait)
    monkeypatch.setattr(sbx, "_kill_group", seen["kills"].append)
    seen["proc"] = proc
    return seen


def test_execute_passes_the_launcher_limits_and_isolation_the_run_asked_for(execute_parts,
                                                                          tmp_path):
    limits = Limits(cpu_seconds=3, memory_bytes=None, max_procs=12, file_bytes=1 << 20)
    options = {"guard": False, "network": True, "fs": False}
    out = sbx._execute(tmp_path, "tok", limits, ALL, 2.5, options)
    assert out == (-9, True, 1.5, "")
    (group, root, max_procs), = _FakeGroup.made
    assert (root, max_procs, group.closed) == ("/cg", 12, True)
    work = tmp_path / "work"
    assert execute_parts["preexec"] == ((limits, str(work)), {
        "cgroup": "/cg/run-1", "net": True, "fs": False, "drop_caps": True})
    assert execute_parts["launch"] == (
        [sys.executable, "-I", "-B", str(tmp_path / "launcher.py"), str(tmp_path / "program.py")],
        work, sbx._environment(str(work), "tok", False), "PREEXEC",
        str(tmp_path / "stdout"), "wb", str(tmp_path / "stderr"), "wb")
    assert execute_parts["wait"] == (execute_parts["proc"], 2.5)
    assert execute_parts["kills"] == [execute_parts["proc"]]  # stray members of the group


def test_execute_uses_only_the_mechanisms_available_and_asked_for(execute_parts, tmp_path):
    limits = Limits(cpu_seconds=3, memory_bytes=None, max_procs=12, file_bytes=1 << 20)
    sbx._execute(tmp_path, "tok", limits, NONE, 1.0, {"guard": True, "network": True, "fs": True})
    assert _FakeGroup.made == []
    assert execute_parts["preexec"][1] == {"cgroup": None, "net": False, "fs": False,
                                           "drop_caps": False}
    sbx._execute(tmp_path, "tok", limits, ALL, 1.0, {"guard": True, "network": False, "fs": True})
    assert execute_parts["preexec"][1] == {"cgroup": "/cg/run-1", "net": False, "fs": True,
                                           "drop_caps": True}
    assert execute_parts["launch"][2]["LORI_SANDBOX_GUARD"] == "1"


@pytest.mark.parametrize("error", [OSError(errno.EAGAIN, "no forks"),
                                   subprocess.SubprocessError("preexec")])
def test_execute_reports_a_program_that_could_not_start(execute_parts, monkeypatch, tmp_path,
                                                        error):
    def launch(*args):
        raise error

    monkeypatch.setattr(sbx, "_launch", launch)
    limits = Limits(cpu_seconds=3, memory_bytes=None, max_procs=12, file_bytes=1 << 20)
    out = sbx._execute(tmp_path, "tok", limits, ALL, 1.0, {"guard": True, "network": True,
                                                           "fs": True})
    assert out == (None, False, 0.0, f"sandbox could not start the program: {error!r}")
    assert execute_parts["kills"] == [] and _FakeGroup.made[0][0].closed


@pytest.fixture
def fake_execute(monkeypatch):
    """``run_program`` with ``_execute`` replaced: it records its inputs and writes the outputs
    set in ``result`` (stdout with the token line where ``{token}`` stands)."""
    seen = {"result": (0, False, 0.5, ""), "stdout": "out\n{token}\n", "stderr": "err"}

    def execute(harness, token, limits, caps, timeout, options):
        seen.update(harness=harness, token=token, limits=limits, caps=caps, timeout=timeout,
                    options=options, files=sorted(p.name for p in harness.iterdir()),
                    launcher=(harness / "launcher.py").read_text(encoding="utf-8"),
                    program=(harness / "program.py").read_bytes().decode("utf-8"))
        (harness / "stdout").write_text(seen["stdout"].format(token=token))
        (harness / "stderr").write_text(seen["stderr"])
        return seen["result"]

    monkeypatch.setattr(sbx, "_execute", execute)
    monkeypatch.setattr(sbx, "capabilities", lambda: ALL)
    return seen


def test_run_program_prepares_the_harness_and_passes_limits_and_options(fake_execute):
    res = sbx.run_program("print(1)", timeout=2.5, memory_mb=3, max_procs=9, max_file_mb=2,
                          guard=False, isolate_network=False, isolate_fs=True)
    assert res == sbx.ExecResult(True, "passed", "out", "err", 0, res.duration_s)
    harness = fake_execute["harness"]
    assert harness.parent == Path(tempfile.gettempdir()) and harness.name.startswith("lori_sbx_")
    assert not harness.exists()  # removed afterwards
    assert fake_execute["files"] == ["launcher.py", "program.py", "work"]
    assert fake_execute["launcher"] == Path(sbx._guard.__file__).read_text(encoding="utf-8")
    assert fake_execute["launcher"].isascii()  # the same bytes in any locale's encoding
    assert fake_execute["program"] == "print(1)"
    assert len(fake_execute["token"]) == 32 and int(fake_execute["token"], 16) >= 0
    assert fake_execute["limits"] == Limits(cpu_seconds=4, memory_bytes=3 << 20, max_procs=9,
                                            file_bytes=2 << 20)
    assert fake_execute["caps"] is ALL and fake_execute["timeout"] == 2.5
    assert fake_execute["options"] == {"guard": False, "network": False, "fs": True}


@pytest.fixture
def ascii_locale():
    """The C locale (ASCII) for this test, as on a host without a UTF-8 locale."""
    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, old)


def test_run_program_writes_the_program_as_utf8_whatever_the_locale(fake_execute, ascii_locale):
    assert locale.getpreferredencoding(False) != "UTF-8"
    assert sbx.run_program("print('é ✓')").status == "passed"
    assert fake_execute["program"] == "print('é ✓')"


def test_run_program_returns_its_result_when_the_harness_cannot_be_removed(fake_execute,
                                                                          monkeypatch):
    real_rmdir = os.rmdir

    def rmdir(path, *args, **kwargs):  # the harness folder itself stays busy
        if os.path.basename(os.fspath(path)).startswith("lori_sbx_"):
            raise OSError(errno.EBUSY, "busy", path)
        return real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(sbx.shutil.os, "rmdir", rmdir)
    res = sbx.run_program("pass")
    harness = fake_execute["harness"]
    left = sorted(p.name for p in harness.iterdir())
    real_rmdir(harness)
    assert res.status == "passed" and left == []  # emptied, only the folder left


def test_run_program_defaults(fake_execute):
    sbx.run_program("pass")
    assert fake_execute["limits"] == Limits(cpu_seconds=6, memory_bytes=512 << 20, max_procs=32,
                                            file_bytes=16 << 20, open_files=256)
    assert fake_execute["timeout"] == 5.0
    assert fake_execute["options"] == {"guard": True, "network": True, "fs": True}
    sbx.run_program("pass", memory_mb=None, cpu_seconds=7.9, timeout=1.0)
    assert fake_execute["limits"].memory_bytes is None and fake_execute["limits"].cpu_seconds == 7


@pytest.mark.parametrize(("result", "status"), [
    ((0, False, 0.5, ""), "passed"),
    ((-signal.SIGKILL, False, 3.99, ""), "failed"),  # killed before its CPU allowance was spent
    ((-signal.SIGKILL, False, 4.0, ""), "timeout"),  # exactly the soft CPU limit (4 s) spent
    ((0, True, 0.5, ""), "timeout"),
])
def test_run_program_classifies_with_the_cpu_time_against_the_soft_limit(fake_execute, result,
                                                                         status):
    fake_execute["result"] = result
    res = sbx.run_program("pass", timeout=2.5)
    assert (res.status, res.passed, res.returncode) == (status, status == "passed", result[0])


def test_run_program_needs_the_token_line_and_truncates_the_outputs(fake_execute):
    fake_execute["stdout"] = "abc\n{token}\nbye"  # atexit output after the token line
    res = sbx.run_program("pass")
    assert (res.status, res.stdout) == ("passed", "abcbye")
    fake_execute["stdout"] = "abc\n"
    assert sbx.run_program("pass").status == "failed"
    fake_execute.update(stdout="abcdef\n{token}\n", stderr="uvwxyz")
    res = sbx.run_program("pass", max_output_bytes=4)
    assert (res.status, res.stdout, res.stderr) == ("passed", "abcd", "uvwx")


def test_run_program_reports_a_sandbox_error_after_the_captured_stderr(fake_execute):
    fake_execute.update(result=(None, False, 0.0, "sandbox could not start the program: X"),
                        stdout="\n{token}\n", stderr="partial\n")
    res = sbx.run_program("pass")
    assert (res.passed, res.status, res.returncode) == (False, "error", None)
    assert res.stderr == "partial\nsandbox could not start the program: X"


def test_run_program_duration_is_wall_seconds_rounded_to_4_places(fake_execute, monkeypatch):
    times = iter([10.0, 12.3456789])
    monkeypatch.setattr(sbx, "time", SimpleNamespace(monotonic=lambda: next(times)))
    assert sbx.run_program("pass").duration_s == 2.3457


def test_run_many_probes_first_then_runs_in_order_in_parallel_only_when_useful(monkeypatch):
    probes, runs = [], []
    monkeypatch.setattr(sbx, "capabilities", lambda: probes.append(1))

    def run_program(code, **kwargs):
        runs.append((code, kwargs, threading.current_thread() is threading.main_thread()))
        return code.upper()

    monkeypatch.setattr(sbx, "run_program", run_program)
    pools = []
    real_pool = sbx.ThreadPoolExecutor
    monkeypatch.setattr(sbx, "ThreadPoolExecutor",
                        lambda max_workers: pools.append(max_workers) or real_pool(max_workers))
    assert sbx.run_many(["a", "b", "c"], workers=1, timeout=3.0) == ["A", "B", "C"]
    assert runs == [(c, {"timeout": 3.0}, True) for c in "abc"] and pools == [] and probes == [1]
    runs.clear()
    assert sbx.run_many(["a"], workers=4) == ["A"] and runs == [("a", {}, True)] and pools == []
    runs.clear()
    assert sbx.run_many(["a", "b"], memory_mb=None) == ["A", "B"] and pools == [2]  # 2 workers
    assert sorted(runs) == [(c, {"memory_mb": None}, False) for c in "ab"]
    assert sbx.run_many([], workers=3) == [] and len(probes) == 4


# ---- lori.eval._isolation: the probes and the preexec_fn built from them ------------------------


def test_unescape_decodes_three_digit_octal_escapes_only():
    assert iso._unescape(r"/mnt/a\040b\011c\134") == "/mnt/a b\tc\\"
    assert iso._unescape(r"/mnt/x\08\12") == r"/mnt/x\08\12"


def test_read_mounts_keeps_the_flags_a_read_only_remount_must_repeat(monkeypatch):
    monkeypatch.setattr(iso, "Path", _Texts({"/proc/self/mountinfo": (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "23 22 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw\n"
        "24 22 8:2 / /mnt/my\\040disk ro,noatime,nodiratime - ext4 /dev/sdb1 rw\n")}))
    assert iso.read_mounts() == [
        ("/", iso.MS_NOSUID | iso.MS_RELATIME),
        ("/proc", iso.MS_NOSUID | iso.MS_NODEV | iso.MS_NOEXEC | iso.MS_RELATIME),
        ("/mnt/my disk", iso.MS_NOSUID | iso.MS_NOATIME | iso.MS_NODIRATIME),
    ]


_DASH = "29 25 0:25 / /mnt/x rw - tmpfs - rw\n"  # mounted from the source "-": " - " twice
_V1 = (_DASH + "30 25 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
       "31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
       "32 25 0:28 / /sys/fs/c\\040g/pids rw,nosuid - cgroup cgroup rw,nosuid,pids\n")
_V2 = _DASH + "35 25 0:30 / /sys/fs/c\\040g rw,nosuid - cgroup2 - rw,nsdelegate\n"


@pytest.mark.parametrize(("cgroup", "mountinfo", "expected"), [
    ("12:pids:/user.slice\n11:cpu,cpuacct:/x\n0::/init.scope\n", _V1, "/sys/fs/c g/pids/user.slice"),
    ("4:blkio,pids:/a:b\n", _V1, "/sys/fs/c g/pids/a:b"),  # a joint hierarchy, ':' in the path
    ("11:cpu,cpuacct:/x\n0::/init.scope\n", _V1, None),  # pids mounted, this process not in it
    ("0::/user.slice/s:1.scope\n", "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n" + _V2,
     "/sys/fs/c g/user.slice/s:1.scope"),  # unified hierarchy (v2)
    ("11:cpu,cpuacct:/x\n", _V2, None),  # v2 mounted, this process only in v1 hierarchies
    ("11:cpu,cpuacct:/x\n0::/\n", "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n" + _DASH, None),  # none
    ("0::/\n", _DASH + "36 25 0:31 / /sys/fs/cgroup rw - cgroup2 none rw\n", "/sys/fs/cgroup/"),
])
def test_pids_hierarchy_prefers_a_v1_pids_hierarchy_then_the_unified_one(monkeypatch, cgroup,
                                                                        mountinfo, expected):
    monkeypatch.setattr(iso, "Path", _Texts({"/proc/self/cgroup": cgroup,
                                             "/proc/self/mountinfo": mountinfo}))
    assert iso._pids_hierarchy() == expected


def test_pids_cgroup_is_a_fresh_folder_with_the_cap(tmp_path):
    group = iso.PidsCgroup(str(tmp_path), 7)
    assert Path(group.path).parent == tmp_path and len(Path(group.path).name) == len("run-") + 32
    assert Path(group.path).name.startswith("run-") and int(Path(group.path).name[4:], 16) >= 0
    assert (Path(group.path) / "pids.max").read_text() == "7"
    assert iso.PidsCgroup(str(tmp_path), 7).path != group.path


def test_pids_cgroup_that_cannot_take_the_cap_is_removed(monkeypatch, tmp_path):
    def no_write(*parts):
        def write_text(text):
            raise PermissionError(errno.EACCES, "read-only")
        return SimpleNamespace(write_text=write_text)

    monkeypatch.setattr(iso, "Path", no_write)
    with pytest.raises(PermissionError):
        iso.PidsCgroup(str(tmp_path), 7)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def members(monkeypatch, tmp_path):
    """A PidsCgroup in a plain folder whose ``cgroup.procs`` lists fake members; ``os.kill``
    records and (unless ``stubborn``) removes the member; ``time`` is a fake clock of 1 s steps."""
    group = iso.PidsCgroup(str(tmp_path), 7)
    procs = Path(group.path, "cgroup.procs")
    state = SimpleNamespace(group=group, procs=procs, kills=[], stubborn=False,
                            clock=_Clock(step=1.0))

    def kill(pid, sig):
        state.kills.append((pid, sig))
        if not state.stubborn:
            left = [p for p in procs.read_text().split() if p != str(pid)]
            procs.write_text("\n".join(left))
        if pid == 12:
            raise ProcessLookupError

    monkeypatch.setattr(iso.os, "kill", kill)
    monkeypatch.setattr(iso, "time", state.clock)
    return state


def test_kill_all_sigkills_every_member_until_none_is_left(members):
    members.procs.write_text("11\n12\n13\n")  # 12 is gone by the time it is killed
    members.group.kill_all()
    assert members.kills == [(pid, signal.SIGKILL) for pid in (11, 12, 13)]
    assert members.clock.sleeps == [0.01]
    assert members.procs.read_text() == ""


def test_kill_all_gives_up_at_the_deadline(members):
    members.stubborn = True
    members.procs.write_text("11\n")
    members.group.kill_all()  # 5 s by default: rounds at 0, 1, 2, 3, 4 s on the fake clock
    assert members.kills == [(11, signal.SIGKILL)] * 5
    members.kills.clear()
    members.group.kill_all(deadline_s=2.0)
    assert len(members.kills) == 2


@pytest.mark.parametrize(("failures", "tries", "sleeps"), [
    ([], 1, 0),
    ([FileNotFoundError], 1, 0),  # already gone
    ([OSError(errno.EBUSY, "busy")] * 2, 3, 2),  # the kernel is still reaping the members
    ([OSError(errno.EBUSY, "busy")] * 300, 200, 200),  # gives up after 200 tries, never raises
])
def test_close_kills_the_members_then_removes_the_folder(members, monkeypatch, failures, tries,
                                                         sleeps):
    members.procs.write_text("11\n")
    tried = []

    def rmdir(path):
        tried.append(path)
        if len(tried) <= len(failures):
            raise failures[len(tried) - 1]

    monkeypatch.setattr(iso.os, "rmdir", rmdir)
    assert members.group.close() is None
    assert members.kills == [(11, signal.SIGKILL)]
    assert tried == [members.group.path] * tries
    assert members.clock.sleeps == [0.01] * (1 + sleeps)  # one after the kill round


def test_probe_runs_a_trivial_child_that_must_write_its_file():
    assert iso._probe() is True
    assert iso._probe(cgroup="/nonexistent/lori") is False  # preexec_fn cannot join it


@pytest.mark.parametrize(("returncode", "writes", "raises", "expected"), [
    (0, True, None, True),
    (0, False, None, False),  # exited 0 but could not write in its working directory
    (1, True, None, False),
    (0, True, OSError(errno.EPERM, "unshare"), False),
    (0, True, subprocess.TimeoutExpired("py", 30), False),
    (0, True, subprocess.SubprocessError("Exception occurred in preexec_fn."), False),
])
def test_probe_decision(monkeypatch, returncode, writes, raises, expected):
    seen = {}
    monkeypatch.setattr(iso, "make_preexec", lambda limits, work, **kw: seen.update(
        limits=limits, work=work, kw=kw) or "PRE")

    def run(cmd, **kwargs):
        seen.update(cmd=cmd, kwargs=kwargs)
        if raises is not None:
            raise raises
        if writes:
            Path(kwargs["cwd"], "ok").write_text("1")
        return subprocess.CompletedProcess(cmd, returncode)

    monkeypatch.setattr(iso.subprocess, "run", run)
    assert iso._probe(net=True, fs=False) is expected
    assert seen["limits"] == Limits(cpu_seconds=10, memory_bytes=None, max_procs=16,
                                    file_bytes=1 << 20, open_files=256)
    assert seen["kw"] == {"net": True, "fs": False}
    assert seen["cmd"] == [sys.executable, "-I", "-c", "open('ok', 'w').write('1')"]
    work = seen["kwargs"].pop("cwd")
    assert seen["kwargs"] == {"preexec_fn": "PRE", "capture_output": True, "timeout": 30,
                              "check": False}
    assert Path(work).name.startswith("lori_probe_") and not Path(work).exists()
    assert seen["work"] == work  # the child's working directory is the one confined


def test_probe_without_a_preexec_fn_is_false(monkeypatch):
    def make_preexec(*args, **kwargs):
        raise OSError(errno.ENOENT, "no /proc")

    monkeypatch.setattr(iso, "make_preexec", make_preexec)
    assert iso._probe(fs=True) is False


@pytest.mark.parametrize("existing", [True, False])
@pytest.mark.parametrize("works", [True, False])
def test_probe_cgroup_tries_a_throw_away_group_under_lori_sandbox(monkeypatch, tmp_path, works,
                                                                  existing):
    if existing:
        (tmp_path / "lori_sandbox").mkdir()  # left by an earlier process: reused
    monkeypatch.setattr(iso, "_pids_hierarchy", lambda: str(tmp_path))
    _FakeGroup.made, probed = [], []
    monkeypatch.setattr(iso, "PidsCgroup", _FakeGroup)
    monkeypatch.setattr(iso, "_probe", lambda **kw: probed.append(kw) or works)
    root = str(tmp_path / "lori_sandbox")
    assert iso._probe_cgroup() == (root if works else None)
    assert os.path.isdir(root)
    (group, made_in, max_procs), = _FakeGroup.made
    assert (made_in, max_procs, group.closed) == (root, 16, True)
    assert probed == [{"cgroup": f"{root}/run-1"}]


@pytest.mark.parametrize("hierarchy", [None, OSError(errno.ENOENT, "no /proc"), ValueError()])
def test_probe_cgroup_is_none_without_a_pids_hierarchy(monkeypatch, hierarchy):
    def pids_hierarchy():
        if isinstance(hierarchy, Exception):
            raise hierarchy
        return hierarchy

    monkeypatch.setattr(iso, "_pids_hierarchy", pids_hierarchy)
    monkeypatch.setattr(iso, "PidsCgroup", lambda *a: pytest.fail("no group without a hierarchy"))
    assert iso._probe_cgroup() is None


def test_probe_cgroup_is_none_when_the_group_cannot_be_made(monkeypatch, tmp_path):
    def refuse(root, max_procs):
        raise PermissionError(errno.EACCES, "read-only cgroupfs")

    monkeypatch.setattr(iso, "_pids_hierarchy", lambda: str(tmp_path))
    monkeypatch.setattr(iso, "PidsCgroup", refuse)
    assert iso._probe_cgroup() is None


@pytest.fixture
def fresh_capabilities():
    """Clear the once-per-process cache of ``capabilities`` before and after the test."""
    iso.capabilities.cache_clear()
    yield
    iso.capabilities.cache_clear()


@pytest.mark.parametrize("euid", [0, 1000])
def test_capabilities_are_probed_once_each(monkeypatch, fresh_capabilities, euid):
    probed = []
    monkeypatch.setattr(iso.os, "geteuid", lambda: euid)
    monkeypatch.setattr(iso, "_probe_cgroup", lambda: probed.append("cgroup") or "/cg/lori_sandbox")
    monkeypatch.setattr(iso, "_probe", lambda **kw: probed.append(kw) or "net" in kw)
    caps = iso.capabilities()
    assert caps == Capabilities(is_root=euid == 0, nproc_enforced=euid != 0,
                                pids_cgroup_root="/cg/lori_sandbox", netns=True, mountns=False,
                                drop_caps=False)
    assert probed == ["cgroup", {"net": True}, {"fs": True}, {"drop_caps": True}]
    assert iso.capabilities() is caps and len(probed) == 4  # cached


@pytest.fixture
def preexec_steps(monkeypatch):
    """Replace what ``preexec_fn`` calls by recorders, so it can run in the test process."""
    steps = []
    monkeypatch.setattr(iso, "_set_limits", lambda limits, nproc: steps.append(("limits", nproc)))
    monkeypatch.setattr(iso, "_isolate_namespaces", lambda *a: steps.append(("namespaces", *a)))
    monkeypatch.setattr(iso, "_drop_privileges", lambda last: steps.append(("drop", last)))
    monkeypatch.setattr(iso.os, "open", lambda path, flags: steps.append(("open", path, flags)) or 42)
    monkeypatch.setattr(iso.os, "write", lambda fd, data: steps.append(("write", fd, data)))
    monkeypatch.setattr(iso.os, "close", lambda fd: steps.append(("close", fd)))
    monkeypatch.setattr(iso, "read_mounts", lambda: [("/", iso.MS_NOSUID)])
    monkeypatch.setattr(iso, "user_task_count", lambda uid: steps.append(("count", uid)) or 5)
    return steps


def test_preexec_joins_the_cgroup_before_isolating_and_drops_privileges_last(monkeypatch,
                                                                            preexec_steps):
    monkeypatch.setattr(iso.os, "getuid", lambda: 1000)
    limits = Limits(cpu_seconds=3, memory_bytes=None, max_procs=9, file_bytes=1 << 20)
    preexec = iso.make_preexec(limits, "/w", cgroup="/cg/run-1", net=True, fs=True,
                               drop_caps=True)
    assert preexec_steps == [("count", 1000)]  # computed up front, in the parent
    preexec()
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    assert preexec_steps == [
        ("count", 1000), ("limits", 9 + 5),  # headroom: the user's 5 running tasks
        ("open", "/cg/run-1/cgroup.procs", os.O_WRONLY), ("write", 42, str(os.getpid()).encode()),
        ("close", 42), ("namespaces", "/w", True, True, [("/", iso.MS_NOSUID)]),
        ("drop", last_cap)]


def test_preexec_defaults_set_the_limits_only(monkeypatch, preexec_steps):
    monkeypatch.setattr(iso.os, "getuid", lambda: 0)  # root: RLIMIT_NPROC ignores it, no headroom
    monkeypatch.setattr(iso, "Path", _Texts({}))  # reads no /proc file (cap_last_cap) it needs not
    limits = Limits(cpu_seconds=3, memory_bytes=None, max_procs=9, file_bytes=1 << 20)
    iso.make_preexec(limits, "/w")()
    assert preexec_steps == [("limits", 9), ("namespaces", "/w", False, False, [])]


def test_user_task_count_sums_the_threads_of_the_users_processes_and_skips_vanished_ones(
        monkeypatch, tmp_path):
    def stat(pid: str, threads: int) -> str:  # /proc/PID/stat: field 20 is num_threads
        return f"{pid} (a) b) S " + " ".join(map(str, range(4, 20))) + f" {threads} 0 0\n"

    for name, text in [("100", None), ("101", stat("101", 3)), ("102", "102 (x) S 1\n"),
                       ("103", stat("103", 2)), ("abc", stat("abc", 7))]:
        (tmp_path / name).mkdir()
        if text is not None:  # 100: the process ended between the listing and the read
            (tmp_path / name / "stat").write_text(text)
    real_scandir = os.scandir

    def scandir(path):
        assert path == "/proc"
        return sorted(real_scandir(tmp_path), key=lambda entry: entry.name)

    monkeypatch.setattr(iso.os, "scandir", scandir)
    assert iso.user_task_count(os.getuid()) == 3 + 2
    assert iso.user_task_count(os.getuid() + 1) == 0
