"""One run per output directory: a lock file beside it, held with ``fcntl.flock``.

    runs/.default.lock      {"pid": 4242, "host": "node1", "command": "lori pipeline --config ...",
                             "started": "2025-01-01T12:00:00", "directory": "/abs/runs/default"}

The lock sits beside the directory (inside it when the parent is not writable), so commands that
replace their output directory as a whole (``lori eval``, ``lori merge``) keep it. The kernel
drops an flock when its process ends, however it ends:

- a second run on the same directory finds the lock held and refuses (``RunLockedError``,
  one line naming the holder's pid, host, command and start time);
- a lock file left by a killed run is not held by anyone: the next run takes it over and says
  so on stderr, naming the run that left it;
- a run that ends (finished or failed) deletes its lock file.

Multi-process runs share one directory: only the launching process (global rank 0) locks.
Lightning's DDP launcher starts the other ranks with ``LOCAL_RANK`` > 0 (torchrun and SLURM set
``RANK`` / ``SLURM_PROCID``); those processes neither lock nor refuse. A process that already
holds a directory's lock may take it again (nested stages); it is released by the outermost
holder.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lori.core.errors import LoRIError

_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class RunLockedError(LoRIError, ValueError):
    """The output directory is in use by another live run (the message names it)."""


@dataclass
class _Held:
    fd: int
    path: Path
    depth: int


_HELD: dict[Path, _Held] = {}  # lock file -> the lock this process holds
_SCOPES: list[list[Path]] = []  # locks taken inside each open ``scope()``


def is_launching_process() -> bool:
    """False in a non-zero rank of a multi-process run (by the launcher's environment variables)."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "0").strip() or "0"
        if value.lstrip("-").isdigit() and int(value) != 0:
            return False
    return True


def lock_path(directory: str | Path) -> Path:
    """Where the lock of ``directory`` lives: ``<parent>/.<name>.lock``, or inside when the parent
    is not writable (the directory then exists: nothing could have created it there)."""
    directory = Path(directory).resolve()
    beside = directory.parent / f".{directory.name or 'root'}.lock"
    parent_writable = directory.parent.is_dir() and os.access(directory.parent, os.W_OK)
    if not parent_writable and directory.is_dir():
        return directory / ".lori.lock"
    return beside


def _holder_text(info: dict[str, Any]) -> str:
    if not info:
        return "a process that has not written its details yet"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
            f"{info.get('command')}")


def _read_info(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        info = json.loads(raw.decode("utf-8", "replace")) if raw.strip() else {}
    except json.JSONDecodeError:
        info = {"command": raw.decode("utf-8", "replace").strip()[:200]}
    return info if isinstance(info, dict) else {}


def _open_locked(path: Path, directory: Path) -> tuple[int, dict[str, Any]]:
    """Open and flock the lock file; (fd, what a previous holder left in it). Refuses a live holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            info = _read_info(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunLockedError(
                f"output directory {directory} is in use by another run ({_holder_text(info)}; lock file {path}): "
                "wait for it to end or choose another output directory"
            ) from None
        try:  # the file we locked may have been deleted by its holder's release meanwhile
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, _read_info(fd)
        os.close(fd)


def _command() -> str:
    """This process's command line, as ``lori ...`` when it is the lori CLI."""
    if sys.argv and Path(sys.argv[0]).name in ("lori", "cli.py"):
        return " ".join(["lori", *sys.argv[1:]])
    return " ".join(sys.argv) or sys.executable


def _write_info(fd: int, directory: Path) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "directory": str(directory)}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode())


def acquire(directory: str | Path) -> Path | None:
    """Take the lock of ``directory`` for this process (no-op on non-zero ranks); returns the lock file.

    Raises:
        RunLockedError: another live process holds it.
    """
    if not is_launching_process():
        return None
    directory = Path(directory).resolve()
    path = lock_path(directory)
    if path in _HELD:
        _HELD[path].depth += 1
    else:
        fd, left = _open_locked(path, directory)
        _write_info(fd, directory)
        _HELD[path] = _Held(fd, path, 1)
        if left:
            print(f"lori: took over the lock of {directory} left by a run that ended without releasing it "
                  f"({_holder_text(left)})", file=sys.stderr, flush=True)
    return path


def release(path: Path | None) -> None:
    """Release one hold on a lock file returned by ``acquire``; the last one deletes the file."""
    held = _HELD.get(path) if path is not None else None
    if held is None:
        return
    held.depth -= 1
    if held.depth > 0:
        return
    del _HELD[path]
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)  # while still holding it: a waiting process re-checks the inode
    os.close(held.fd)


@contextlib.contextmanager
def holding(directory: str | Path) -> Iterator[None]:
    """Hold the lock of ``directory`` for the block."""
    path = acquire(directory)
    try:
        yield
    finally:
        release(path)


def locks_output_dir(config: str) -> Callable[[Callable], Callable]:
    """Decorate a run function to hold the lock of ``<its argument named config>.output_dir`` while it runs."""

    def decorate(run: Callable) -> Callable:
        signature = inspect.signature(run)

        @functools.wraps(run)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with holding(signature.bind(*args, **kwargs).arguments[config].output_dir):
                return run(*args, **kwargs)

        return locked

    return decorate


def scoped(command: Callable) -> Callable:
    """Decorate a command to run inside ``scope()`` (the locks it takes are released when it returns)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        with scope():
            return command(*args, **kwargs)

    return run


def acquire_in_scope(directory: str | Path) -> None:
    """Take the lock of ``directory`` until the innermost open ``scope()`` ends (a command's lock,
    taken where its output directory becomes known, e.g. while the CLI parses, before the model
    loads). Outside any scope nothing is taken (the run's own ``holding`` still locks)."""
    if _SCOPES:
        path = acquire(directory)
        if path is not None:
            _SCOPES[-1].append(path)


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Release, at the end of the block, every lock ``acquire_in_scope`` took inside it."""
    _SCOPES.append([])
    try:
        yield
    finally:
        for path in reversed(_SCOPES.pop()):
            release(path)
