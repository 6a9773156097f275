"""Files that appear whole or not at all: write beside, flush, fsync, rename.

    <dir>/.<name>.<random>.tmp   written, flushed and fsynced
    <dir>/<name>.prev<suffix>    the file it replaces (``keep_previous``), e.g. last.prev.ckpt
    <dir>/<name>                 renamed in; the directory is fsynced

At every instant ``<dir>/<name>`` is the complete old file or the complete new one (and with
``keep_previous`` the old one also stays as ``.prev``). A write that fails (a full disk, a kill)
leaves the old file and removes the temporary one. A full disk is reported as ``DiskFullError``,
naming the path and the space left on its file system.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


class DiskFullError(OSError):
    """No space (or quota) left while writing a file; the message names it and the free space."""

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(err: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from / during) is a full disk or quota.

    torch.save reports a failed write as a RuntimeError raised during the OSError, and
    safetensors as a SafetensorError whose text holds the OS error, so both are looked at.
    """
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(text in str(e).lower() for text in _FULL_TEXTS):
            return True
    return False


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def disk_full_message(err: BaseException) -> str | None:
    """One line for a full-disk failure (the first ``DiskFullError`` in the chain, which names the
    path and free space, else the OS error's own text), or None when ``err`` is no full disk."""
    if not is_disk_full(err):
        return None
    named = next((e for e in _chain(err) if isinstance(e, DiskFullError)), None)
    if named is not None:
        return str(named)
    raw = next((e for e in _chain(err) if isinstance(e, OSError) and e.filename), None)
    if raw is not None:
        return str(disk_full_error(raw.filename))
    return "no space left on device: " + " ".join(str(err).split())


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_full_error(path: str | Path, kept: str | None = None) -> DiskFullError:
    """The one-line error for a full disk while writing ``path`` (``kept``: what stays in place)."""
    path = Path(path)
    where = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        usage = shutil.disk_usage(where)
        space = f"{human_bytes(usage.free)} free of {human_bytes(usage.total)}"
    except OSError:
        space = "free space unknown"
    tail = f"; {kept}" if kept else ""
    return DiskFullError(errno.ENOSPC, f"no space left on device writing {path} ({space} there){tail}")


def fsync_directory(directory: str | Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def previous_path(path: str | Path) -> Path:
    """Where ``atomic_write(keep_previous=True)`` keeps the replaced file: last.ckpt -> last.prev.ckpt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


class _Guarded:
    """A binary file that remembers the OSError a write raised (torch.save turns it into a RuntimeError)."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        self.file, self.path, self.error = file, path, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()

    def __getattr__(self, name: str) -> Any:  # tell, seek, fileno, ... of the real file
        return getattr(self.file, name)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _keep_previous(path: Path) -> None:
    """Keep ``path`` as its .prev file, without a moment where ``path`` is missing (a hard link)."""
    if not path.exists():
        return
    prev, link = previous_path(path), path.with_name(f".{path.name}.prev-link")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.remove(link)
        os.link(path, link)
        os.replace(link, prev)
    except OSError:  # no hard links on this file system: rename (path is briefly absent, prev whole)
        os.replace(path, prev)


@contextlib.contextmanager
def atomic_write(path: str | Path, keep_previous: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` when the block exits cleanly.

    Args:
        path: the file to write; its directory is created.
        keep_previous: keep the file being replaced as ``previous_path(path)``.

    Raises:
        DiskFullError: the file system is full; ``path`` is as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            os.fchmod(raw.fileno(), _default_mode())  # mkstemp makes it private; the result is an ordinary file
            guarded = _Guarded(raw, path)
            try:
                yield guarded  # type: ignore[misc]
                raw.flush()
                os.fsync(raw.fileno())
            except Exception as err:
                if guarded.error is not None and guarded.error is not err:
                    raise guarded.error from err
                raise
        if keep_previous:
            _keep_previous(path)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except Exception as err:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)  # first, so the free space reported is what is really left
        if is_disk_full(err):
            kept = "the previous file is kept" if path.exists() else None
            raise disk_full_error(path, kept) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file (UTF-8) atomically; returns its path."""
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write a binary file atomically; returns its path."""
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)
