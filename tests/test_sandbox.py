"""The code-execution sandbox: every hostile program is judged failed in time; the host is untouched.

Hostile programs run with the prelude guard on (the default) and, where the kernel layer that
would stop them is available here, again with ``guard=False`` so that layer is tested on its own.
A kernel-layer test is skipped (never run unprotected) when its layer is missing.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from lori.eval.sandbox import ExecResult, _status, isolation_report, run_many, run_program

CAPS = isolation_report()
SLACK = 3.0  # seconds allowed beyond the timeout (process start, kill, cleanup)


def _guard_modes(layer: str | None) -> list:
    """[True] plus, if the kernel ``layer`` exists here, [False] (unguarded, kernel only)."""
    unguarded = pytest.param(False, id="kernel-only", marks=pytest.mark.skipif(
        layer is not None and not CAPS[layer], reason=f"{layer} isolation unavailable here"))
    return [pytest.param(True, id="guarded"), unguarded]


def _no_stray_sandbox_processes() -> bool:
    for _ in range(50):
        stray = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"lori_sbx_" in cmd and b"launcher.py" in cmd:
                stray.append(pid)
        if not stray:
            return True
        time.sleep(0.1)
    return False


def test_correct_program_passes():
    res = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')")
    assert isinstance(res, ExecResult)
    assert res.passed and res.status == "passed" and res.returncode == 0
    assert res.stdout.strip() == "ok"


def test_wrong_assert_fails():
    res = run_program("assert 1 + 1 == 3, 'bad math'")
    assert not res.passed and res.status == "failed"
    assert "AssertionError" in res.stderr and "bad math" in res.stderr


def test_syntax_error_and_stdin_fail():
    assert run_program("def f(:\n  pass").status == "failed"
    assert run_program("input()").status == "failed"  # stdin is /dev/null


@pytest.mark.parametrize("code", ["import os\nos._exit(0)", "import sys\nsys.exit(0)",
                                  "raise SystemExit", "import os\nos.close(1)"])
def test_early_clean_exit_is_a_failure(code):
    res = run_program(code)
    assert res.status == "failed" and not res.passed


def test_infinite_loop_times_out():
    start = time.monotonic()
    res = run_program("while True:\n    pass", timeout=1.0)
    assert res.status == "timeout" and not res.passed
    assert time.monotonic() - start < 1.0 + SLACK
    assert _no_stray_sandbox_processes()


def test_sleeping_past_the_wall_clock_is_a_timeout():
    start = time.monotonic()
    res = run_program("import time\ntime.sleep(60)", timeout=1.0)
    assert res.status == "timeout" and not res.passed and res.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 1.0 + SLACK


def test_cpu_limit_is_soft_below_hard():
    res = run_program("import resource\nprint(*resource.getrlimit(resource.RLIMIT_CPU))",
                      timeout=2.5)
    assert res.passed and res.stdout.split() == ["4", "5"]  # soft ceil(2.5) + 1, hard one more
    res = run_program("import resource\nprint(*resource.getrlimit(resource.RLIMIT_CPU))",
                      cpu_seconds=7)
    assert res.stdout.split() == ["7", "8"]


@pytest.mark.parametrize(("prelude", "signum"), [
    ("", signal.SIGXCPU),  # the soft limit ends it
    ("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\n", signal.SIGKILL),  # hard
], ids=["sigxcpu", "sigxcpu-ignored"])
def test_spinning_past_the_cpu_limit_is_a_timeout(prelude, signum):
    """The CPU limit (1 s here, long before the 20 s wall clock) stops it: a timeout, not failed."""
    res = run_program(prelude + "while True:\n    pass", timeout=20.0, cpu_seconds=1)
    assert res.returncode == -signum  # the CPU limit stopped it, not the wall clock
    assert res.status == "timeout" and not res.passed
    assert res.duration_s < 20.0


@pytest.mark.parametrize(("rc", "timed_out", "token", "cpu_spent", "expected"), [
    (0, False, True, False, "passed"),
    (0, False, False, False, "failed"),  # exited 0 without the token
    (1, False, True, False, "failed"),
    (-signal.SIGKILL, False, False, False, "failed"),  # killed, not by a limit (e.g. OOM killer)
    (-signal.SIGKILL, False, False, True, "timeout"),  # hard CPU limit
    (-signal.SIGXCPU, False, False, False, "timeout"),  # soft CPU limit
    (-signal.SIGKILL, True, False, False, "timeout"),  # wall clock
    (0, True, True, False, "timeout"),  # finished as the wall clock ran out: still a timeout
    (-signal.SIGSEGV, False, False, True, "failed"),  # crashed after a long computation
])
def test_status_names_the_cause(rc, timed_out, token, cpu_spent, expected):
    assert _status(rc, timed_out, token, cpu_spent) == expected


@pytest.mark.parametrize("guard", _guard_modes("pids_cgroup_root" if CAPS["is_root"] else None))
def test_fork_bomb_is_contained(guard):
    code = ("import os\nwhile True:\n    try:\n        os.fork()\n"
            "    except Exception:\n        pass\n")
    start = time.monotonic()
    res = run_program(code, timeout=1.5, guard=guard, max_procs=16)
    assert not res.passed and res.status in ("failed", "timeout")
    assert time.monotonic() - start < 1.5 + SLACK
    assert _no_stray_sandbox_processes()


@pytest.mark.parametrize("code", ["import subprocess\nsubprocess.run(['true'])",
                                  "import os\nos.system('true')", "import os\nos.kill(1, 0)",
                                  "import ctypes"])
def test_process_and_signal_functions_are_disabled(code):
    res = run_program(code)
    assert res.status == "failed"
    assert "sandbox" in res.stderr or "ImportError" in res.stderr


@pytest.mark.parametrize("guard", _guard_modes(None))
def test_allocating_10_gb_fails(guard):
    start = time.monotonic()
    res = run_program("x = bytearray(10 * 1024 ** 3)\nprint(len(x))", timeout=5.0, guard=guard)
    assert res.status == "failed" and "MemoryError" in res.stderr
    assert time.monotonic() - start < 5.0 + SLACK


@pytest.mark.parametrize("action", [
    "os.remove(TARGET)", "os.unlink(TARGET)", "shutil.rmtree(os.path.dirname(TARGET))",
    "open(TARGET, 'w').write('pwned')", "open(TARGET, 'a').write('pwned')",
    "os.rename(TARGET, TARGET + '.moved')", "os.chmod(TARGET, 0)",
    "pathlib.Path(TARGET).write_text('pwned')", "os.truncate(TARGET, 0)",
])
@pytest.mark.parametrize("guard", _guard_modes("mountns"))
def test_files_outside_the_sandbox_are_untouched(tmp_path, action, guard):
    target = tmp_path / "victim" / "precious.txt"
    target.parent.mkdir()
    target.write_text("keep me")
    mode = target.stat().st_mode
    code = f"import os, shutil, pathlib\nTARGET = {str(target)!r}\n{action}\n"
    res = run_program(code, guard=guard)
    assert res.status == "failed"
    assert target.read_text() == "keep me" and target.stat().st_mode == mode
    assert sorted(p.name for p in target.parent.iterdir()) == ["precious.txt"]


def test_cwd_is_a_fresh_writable_temp_dir_removed_afterwards():
    code = ("import os\nopen('scratch.txt', 'w').write('x')\nos.remove('scratch.txt')\n"
            "os.mkdir('sub')\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\n")
    res = run_program(code)
    assert res.passed, res.stderr
    cwd, listing = res.stdout.strip().splitlines()
    assert listing == "['sub']"
    assert not os.path.exists(cwd)


def test_environment_is_cleared(monkeypatch):
    monkeypatch.setenv("LORI_TEST_SECRET", "hunter2")
    res = run_program("import os\nprint(sorted(os.environ))")
    assert res.passed
    assert "LORI_TEST_SECRET" not in res.stdout and "TOKEN" not in res.stdout


@pytest.mark.parametrize("guard", _guard_modes("netns"))
def test_network_is_blocked(guard):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.3)
    port = server.getsockname()[1]
    code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'leak')\n")
    try:
        res = run_program(code, guard=guard)
        assert res.status == "failed"
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_output_is_bounded():
    res = run_program("print('x' * (4 << 20))", max_file_mb=1, max_output_bytes=1000)
    assert res.status == "failed"
    assert len(res.stdout) <= 1000


def test_run_many_keeps_order_and_runs_in_parallel():
    programs = [f"import time\ntime.sleep(0.5)\nassert {i} % 2 == 0" for i in range(4)]
    start = time.monotonic()
    results = run_many(programs, workers=2, timeout=5.0)
    elapsed = time.monotonic() - start
    assert [r.passed for r in results] == [True, False, True, False]
    assert elapsed < 4 * 0.5 + 1.0  # two at a time, not one after another


def test_isolation_report_lists_mechanisms():
    assert set(CAPS) >= {"is_root", "nproc_enforced", "pids_cgroup_root", "netns", "mountns",
                         "drop_caps"}


def test_atexit_output_after_completion_still_passes():
    res = run_program("import atexit\natexit.register(print, 'bye')\nassert True")
    assert res.passed and "bye" in res.stdout


@pytest.fixture
def guard_only(monkeypatch):
    """Pretend no kernel layer exists (as on a machine without root): the guard alone must hold."""
    from lori.eval import sandbox
    from lori.eval._isolation import Capabilities

    none = Capabilities(is_root=False, nproc_enforced=False, pids_cgroup_root=None, netns=False,
                        mountns=False, drop_caps=False)
    monkeypatch.setattr(sandbox, "capabilities", lambda: none)


@pytest.mark.parametrize("action", ["os.remove(TARGET)", "shutil.rmtree(os.path.dirname(TARGET))",
                                    "open(TARGET, 'w')", "os.symlink(TARGET, 'l')",
                                    "os.link(TARGET, 'h')"])
def test_guard_alone_protects_files(guard_only, tmp_path, action):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    res = run_program(f"import os, shutil\nTARGET = {str(target)!r}\n{action}\n")
    assert res.status == "failed" and "sandbox" in res.stderr
    assert target.read_text() == "keep me"


def test_guard_alone_blocks_fork_and_network(guard_only):
    assert "os.fork is disabled" in run_program("import os\nos.fork()").stderr
    res = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert res.status == "failed" and "sandbox" in res.stderr
    assert run_program("print('fine')").passed


# ---- the confinement steps of lori.eval._isolation, each checked by the calls it makes ----------
# They run in the forked child (preexec_fn), where a test sees only their end result; here each is
# called in-process against a recording stand-in for libc / setrlimit, so every argument is checked.


class _FakeLibc:
    """Records unshare/mount/prctl calls; the ``fail_at``-th call (1-based) fails."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple] = []
        self.fail_at = fail_at

    def _call(self, name: str, *args) -> int:
        self.calls.append((name, *args))
        return -1 if len(self.calls) == self.fail_at else 0

    def unshare(self, flags):
        return self._call("unshare", flags)

    def mount(self, source, target, fstype, flags, data):
        return self._call("mount", source, target, fstype, flags, data)

    def prctl(self, option, arg2, arg3, arg4, arg5):
        return self._call("prctl", option, arg2, arg3, arg4, arg5)


@pytest.fixture
def fake_libc(monkeypatch):
    from lori.eval import _isolation as iso

    libc = _FakeLibc()
    monkeypatch.setattr(iso, "_LIBC", libc)
    monkeypatch.setattr(iso.os, "chdir", lambda path: libc.calls.append(("chdir", path)))
    return libc


def test_check_raises_with_errno_and_what_failed():
    import ctypes
    import errno

    from lori.eval._isolation import _check

    assert _check(0, "unshare") is None
    ctypes.set_errno(errno.EPERM)
    with pytest.raises(OSError, match="^.*unshare: Operation not permitted") as info:
        _check(-1, "unshare")
    assert info.value.errno == errno.EPERM


@pytest.mark.parametrize("memory", [None, 1 << 30])
def test_set_limits_sets_each_rlimit(monkeypatch, memory):
    import resource

    from lori.eval import _isolation as iso

    set_to = {}
    monkeypatch.setattr(iso.resource, "setrlimit", lambda which, pair: set_to.__setitem__(which, pair))
    iso._set_limits(iso.Limits(cpu_seconds=3, memory_bytes=memory, max_procs=9, file_bytes=4096,
                               open_files=64), nproc=40)
    want = {resource.RLIMIT_CPU: (3, 3 + iso.CPU_GRACE_S), resource.RLIMIT_CORE: (0, 0),
            resource.RLIMIT_FSIZE: (4096, 4096), resource.RLIMIT_NPROC: (40, 40),
            resource.RLIMIT_NOFILE: (64, 64)}
    if memory is not None:
        want[resource.RLIMIT_AS] = (memory, memory)
    assert set_to == want and iso.CPU_GRACE_S >= 1


def test_namespaces_untouched_when_not_asked(fake_libc):
    from lori.eval._isolation import _isolate_namespaces

    _isolate_namespaces("/w", net=False, fs=False, mounts=[("/", 0)])
    assert fake_libc.calls == []


def test_network_namespace_alone_mounts_nothing(fake_libc):
    from lori.eval._isolation import CLONE_NEWNET, _isolate_namespaces

    _isolate_namespaces("/w", net=True, fs=False, mounts=[("/", 0)])
    assert fake_libc.calls == [("unshare", CLONE_NEWNET)]


def test_mount_namespace_makes_all_read_only_but_the_workdir(fake_libc):
    from lori.eval import _isolation as iso

    iso._isolate_namespaces("/w d", net=True, fs=True, mounts=[("/", iso.MS_NOSUID),
                                                              ("/proc", iso.MS_NOEXEC)])
    ro = iso.MS_REMOUNT | iso.MS_BIND | iso.MS_RDONLY
    assert fake_libc.calls == [
        ("unshare", iso.CLONE_NEWNET | iso.CLONE_NEWNS),
        ("mount", b"none", b"/", None, iso.MS_REC | iso.MS_PRIVATE, None),
        ("mount", b"/w d", b"/w d", None, iso.MS_BIND, None),
        ("mount", None, b"/", None, ro | iso.MS_NOSUID, None),
        ("mount", None, b"/proc", None, ro | iso.MS_NOEXEC, None),
        ("mount", None, b"/w d", None, iso.MS_REMOUNT | iso.MS_BIND | iso.MS_NOSUID | iso.MS_NODEV,
         None),
        ("chdir", "/w d"),
    ]


@pytest.mark.parametrize(("fail_at", "message"), [
    (1, "unshare"),  # nothing is mounted after a failed unshare
    (2, "make / private"),
    (3, "bind the working directory"),
    (5, "remount /proc read-only"),
    (7, "remount the working directory writable"),
])
def test_a_failed_isolation_step_stops_with_its_name(fake_libc, fail_at, message):
    from lori.eval._isolation import _isolate_namespaces

    fake_libc.fail_at = fail_at
    with pytest.raises(OSError, match=r"^\[Errno \d+\] " + message + ": "):
        _isolate_namespaces("/w", net=False, fs=True, mounts=[("/", 0), ("/proc", 0), ("/sys", 0)])
    assert len(fake_libc.calls) == fail_at


@pytest.mark.parametrize("euid", [0, 1000])
def test_drop_privileges_sets_no_new_privs_and_for_root_empties_the_bounding_set(
        fake_libc, monkeypatch, euid):
    from lori.eval import _isolation as iso

    monkeypatch.setattr(iso.os, "geteuid", lambda: euid)
    iso._drop_privileges(3)
    drops = [("prctl", iso.PR_CAPBSET_DROP, cap, 0, 0, 0) for cap in range(4)] if euid == 0 else []
    assert fake_libc.calls == [("prctl", iso.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), *drops]
    fake_libc.fail_at, fake_libc.calls = 1, []
    with pytest.raises(OSError, match=r"^\[Errno \d+\] no_new_privs: "):
        iso._drop_privileges(3)
    if euid == 0:
        fake_libc.fail_at, fake_libc.calls = 4, []
        with pytest.raises(OSError, match=r"^\[Errno \d+\] drop capability 2: "):
            iso._drop_privileges(3)


@pytest.mark.skipif(os.geteuid() != 0, reason="starts a process under another uid (needs root)")
def test_user_task_count_counts_threads_of_the_users_processes():
    import threading

    from lori.eval._isolation import user_task_count

    uid = 54_321  # a uid nothing else runs under
    assert user_task_count(uid) == 0
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become uid, run three more threads, report, wait to be killed
        try:
            os.setuid(uid)
            for _ in range(3):
                threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
            os.write(write, b"up")
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        assert os.read(read, 2) == b"up"
        assert user_task_count(uid) == 4  # the main thread and three more
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        os.close(write)
