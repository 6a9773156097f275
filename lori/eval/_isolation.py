"""Kernel-level isolation for :mod:`lori.eval.sandbox`: rlimits, pids cgroup, namespaces, caps.

Everything here runs in the parent or in ``preexec_fn`` (the forked child before ``exec``).  The
``preexec_fn`` only makes plain system calls (``setrlimit``, ``open``/``write``, libc through
``ctypes``), which keeps it safe to use from the thread pool of :func:`sandbox.run_many`.

Mechanisms, each used when :func:`capabilities` finds it working on this machine:

* ``RLIMIT_CPU``/``AS``/``FSIZE``/``CORE``/``NOFILE``/``NPROC`` (always).  ``RLIMIT_CPU`` has its
  soft limit :data:`CPU_GRACE_S` below the hard one, so the kernel first sends ``SIGXCPU`` (and
  only a program that ignores it meets ``SIGKILL`` at the hard limit).  ``RLIMIT_NPROC`` counts
  every process of the user and the kernel ignores it for root (uid 0 is exempt), hence:
* a pids cgroup (v1 ``pids`` hierarchy or a v2 folder with ``pids.max``) per run: a hard cap on
  processes/threads that also holds for root, and a reliable way to kill every descendant;
* ``unshare(CLONE_NEWNET)``: a network namespace without interfaces (no network at all);
* ``unshare(CLONE_NEWNS)``: a private mount namespace where every mount is remounted read-only
  except the run's working directory (so the host file system cannot be changed);
* ``PR_SET_NO_NEW_PRIVS`` and dropping the capability bounding set, so a root child has no
  capabilities after ``exec`` (it cannot undo the mounts, raise hard limits, or use raw sockets).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = (
    1024, 2048, 4096, 16384, 1 << 18, 1 << 21)
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
_KEEP_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                     "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
_LIBC = ctypes.CDLL(None, use_errno=True)
CPU_GRACE_S = 1  # hard RLIMIT_CPU - soft: SIGXCPU at the soft limit, SIGKILL at the hard one


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run (``None`` = leave unlimited).

    ``cpu_seconds`` is the soft ``RLIMIT_CPU`` (``SIGXCPU``); the hard one is ``CPU_GRACE_S`` more.
    """

    cpu_seconds: int
    memory_bytes: int | None
    max_procs: int
    file_bytes: int
    open_files: int = 256


@dataclass(frozen=True)
class Capabilities:
    """Which isolation mechanisms work on this machine (probed once per process)."""

    is_root: bool
    nproc_enforced: bool
    pids_cgroup_root: str | None
    netns: bool
    mountns: bool
    drop_caps: bool


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unescape(field: str) -> str:
    """Decode the octal escapes (``\\040`` for a space) of a mountinfo field."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def read_mounts() -> list[tuple[str, int]]:
    """``(mount point, flags to keep)`` for every mount of this process."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        keep = MS_NOSUID
        for opt in fields[5].split(","):
            keep |= _KEEP_MOUNT_FLAGS.get(opt, 0)
        mounts.append((_unescape(fields[4]), keep))
    return mounts


def user_task_count(uid: int) -> int:
    """Tasks (threads included, as ``RLIMIT_NPROC`` counts them) whose owner is ``uid``."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    stat = Path(entry.path, "stat").read_text()
                    count += int(stat.rsplit(")", 1)[1].split()[17])  # field 20: num_threads
            except (OSError, ValueError, IndexError):
                continue
    return count


def _set_limits(limits: Limits, nproc: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + CPU_GRACE_S))
    pairs = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, limits.file_bytes),
             (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_NOFILE, limits.open_files)]
    if limits.memory_bytes is not None:
        pairs.append((resource.RLIMIT_AS, limits.memory_bytes))
    for which, value in pairs:
        resource.setrlimit(which, (value, value))


def _isolate_namespaces(workdir: str, net: bool, fs: bool, mounts: list[tuple[str, int]]) -> None:
    flags = (CLONE_NEWNET if net else 0) | (CLONE_NEWNS if fs else 0)
    if not flags:
        return
    _check(_LIBC.unshare(flags), "unshare")  # only after success may mounts be touched
    if not fs:
        return
    _check(_LIBC.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    work = os.fsencode(workdir)
    _check(_LIBC.mount(work, work, None, MS_BIND, None), "bind the working directory")
    for point, keep in mounts:
        ret = _LIBC.mount(None, os.fsencode(point), None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep,
                          None)
        _check(ret, f"remount {point} read-only")
    rw = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV
    _check(_LIBC.mount(None, work, None, rw, None), "remount the working directory writable")
    os.chdir(workdir)  # the old cwd points below the bind mount


def _drop_privileges(last_cap: int) -> None:
    _check(_LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if os.geteuid() == 0:
        for cap in range(last_cap + 1):
            _check(_LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")


def make_preexec(limits: Limits, workdir: str, *, cgroup: str | None = None, net: bool = False,
                 fs: bool = False, drop_caps: bool = False) -> Callable[[], None]:
    """Build the ``preexec_fn`` that confines the child; all inputs are computed here, up front.

    Args:
        limits: rlimits to set.
        workdir: the run's working directory (the only writable place under ``fs``).
        cgroup: a pids cgroup folder to join, or ``None``.
        net: new network namespace.
        fs: new mount namespace with everything but ``workdir`` read-only.
        drop_caps: set no_new_privs and empty the capability bounding set.
    """
    # uid 0 is exempt from RLIMIT_NPROC; elsewhere it caps ALL tasks of the user, so add headroom
    uid = os.getuid()
    nproc = limits.max_procs + (user_task_count(uid) if uid != 0 else 0)
    mounts = read_mounts() if fs else []
    procs_file = os.path.join(cgroup, "cgroup.procs") if cgroup else None
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text()) if drop_caps else 0

    def preexec() -> None:
        _set_limits(limits, nproc)
        if procs_file is not None:  # join before /sys becomes read-only
            fd = os.open(procs_file, os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
        _isolate_namespaces(workdir, net, fs, mounts)
        if drop_caps:
            _drop_privileges(last_cap)

    return preexec


def _pids_hierarchy() -> str | None:
    """Folder of this process's cgroup in a hierarchy offering the pids controller."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fstype, _, options = right.split()[:3]
        point = _unescape(left.split()[4])
        if fstype == "cgroup" and "pids" in options.split(","):
            key = next((k for k in own if "pids" in k.split(",")), None)
            return point + own[key] if key else None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        if right.split()[0] == "cgroup2" and "" in own:
            return _unescape(left.split()[4]) + own[""]
    return None


class PidsCgroup:
    """A throw-away pids cgroup with a process cap; :meth:`close` kills its members and removes it."""

    def __init__(self, root: str, max_procs: int) -> None:
        self.path = os.path.join(root, f"run-{uuid.uuid4().hex}")
        os.makedirs(self.path)
        try:
            Path(self.path, "pids.max").write_text(str(max_procs))
        except OSError:
            os.rmdir(self.path)
            raise

    def kill_all(self, deadline_s: float = 5.0) -> None:
        """SIGKILL every member until the cgroup is empty (members may still be forking)."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            pids = [int(p) for p in Path(self.path, "cgroup.procs").read_text().split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def close(self) -> None:
        """Kill the members and remove the folder (retrying while the kernel reaps them)."""
        self.kill_all()
        for _ in range(200):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)


def _probe(**kwargs) -> bool:
    """Does a trivial child start with these isolation settings?"""
    limits = Limits(cpu_seconds=10, memory_bytes=None, max_procs=16, file_bytes=1 << 20)
    with tempfile.TemporaryDirectory(prefix="lori_probe_") as work:
        try:
            preexec = make_preexec(limits, work, **kwargs)
            proc = subprocess.run([sys.executable, "-I", "-c", "open('ok', 'w').write('1')"],
                                  cwd=work, preexec_fn=preexec, capture_output=True, timeout=30,
                                  check=False)
        except (OSError, subprocess.SubprocessError):
            return False
        return proc.returncode == 0 and os.path.exists(os.path.join(work, "ok"))


def _probe_cgroup() -> str | None:
    """The folder under which per-run pids cgroups can be created and joined, or ``None``."""
    try:
        hierarchy = _pids_hierarchy()
        if hierarchy is None:
            return None
        root = os.path.join(hierarchy, "lori_sandbox")
        os.makedirs(root, exist_ok=True)
        group = PidsCgroup(root, 16)
    except (OSError, ValueError):
        return None
    try:
        return root if _probe(cgroup=group.path) else None
    finally:
        group.close()


@functools.lru_cache(maxsize=1)
def capabilities() -> Capabilities:
    """Probe (once) which mechanisms work here; every probe runs in a throw-away child."""
    is_root = os.geteuid() == 0
    return Capabilities(
        is_root=is_root,
        nproc_enforced=not is_root,
        pids_cgroup_root=_probe_cgroup(),
        netns=_probe(net=True),
        mountns=_probe(fs=True),
        drop_caps=_probe(drop_caps=True),
    )
