"""Atomic files and checkpoints: a write that fails half-way (a full disk) leaves the previous file,
the run stops in one line naming the path and the free space, and the rerun resumes to the same
adapter bit for bit; an unreadable last.ckpt is set aside and the run resumes from the one before
it, or starts the stage again, saying which."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from pipeline_helpers import tiny_config, write_config

import lori.commands.pipeline_command as cli
import lori.core.atomic_files as atomic_files
from lori.commands.main import main
from lori.core import (
    DiskFullError,
    LoRIConfig,
    adapter_from_model,
    inject_lori,
    load_adapter,
    save_adapter,
)
from lori.core.atomic_files import atomic_write, previous_path, write_text_atomic
from lori.training.base_model import tiny_llama
from lori.training.checkpoint_io import (
    AtomicCheckpointIO,
    resume_checkpoint,
    with_atomic_checkpoints,
)


def fail_writes_after(monkeypatch, nbytes: int, match: str = "", skip: int = 0) -> list[str]:
    """Make atomic writes to paths containing ``match`` raise ENOSPC once ``nbytes`` are written,
    from the ``skip``-th such file on (earlier ones succeed). Returns the paths that failed."""
    real = atomic_files._Guarded.write
    opened = [0]  # files written so far whose path contains ``match``
    failed: list[str] = []

    def write(self, data):
        if match in str(self.path):
            if "index" not in self.__dict__:
                self.index, opened[0] = opened[0], opened[0] + 1
            if self.index >= skip:
                self.written = getattr(self, "written", 0) + len(data)
                if self.written > nbytes:
                    failed.append(str(self.path))
                    self.error = OSError(errno.ENOSPC, "No space left on device")
                    raise self.error
        return real(self, data)

    monkeypatch.setattr(atomic_files._Guarded, "write", write)
    return failed


def temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


# --- the file writer --------------------------------------------------------------------------

def test_atomic_write_replaces_whole_and_keeps_the_previous(tmp_path):
    target = tmp_path / "d" / "last.ckpt"
    with atomic_write(target, keep_previous=True) as f:
        f.write(b"one")
    with atomic_write(target, keep_previous=True) as f:
        f.write(b"two")
    assert target.read_bytes() == b"two" and previous_path(target).read_bytes() == b"one"
    assert previous_path(target).name == "last.prev.ckpt" and not temporaries(tmp_path)


def test_human_bytes_and_previous_path():
    hb = atomic_files.human_bytes
    assert [hb(0), hb(1023), hb(1024), hb(1536), hb(3 * 1024**2), hb(-2048)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "3.0 MiB", "-2.0 KiB"]
    assert hb(5 * 1024**3) == "5.0 GiB" and hb(2048 * 1024**4) == "2048.0 TiB"
    assert previous_path("a/last.ckpt") == Path("a/last.prev.ckpt") and previous_path("a/x") == Path("a/x.prev")


def test_is_disk_full_reads_errno_and_text_through_the_exception_chain():
    is_full = atomic_files.is_disk_full
    assert is_full(OSError(errno.ENOSPC, "x")) and is_full(OSError(errno.EDQUOT, "x"))
    for text in ["write: No space left on device", "Disk quota exceeded", "IoError (os error 28)", "os error 122"]:
        assert is_full(RuntimeError(text)), text
    assert not is_full(OSError(errno.EACCES, "Permission denied")) and not is_full(None)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("PytorchStreamWriter failed writing file data") from err
    except RuntimeError as chained:
        assert is_full(chained)
    looped = RuntimeError("a")
    looped.__context__ = looped  # a cycle ends the walk
    assert not is_full(looped)


def test_disk_full_message_prefers_the_named_error_then_the_file_then_the_text(tmp_path):
    message = atomic_files.disk_full_message
    assert message(RuntimeError("other")) is None
    named = atomic_files.disk_full_error(tmp_path / "a" / "b.bin", kept="the previous file is kept")
    assert isinstance(named, OSError) and named.errno == errno.ENOSPC
    text = str(named)
    assert text.startswith(f"no space left on device writing {tmp_path / 'a' / 'b.bin'} (") and " free of " in text
    assert text.endswith(" there); the previous file is kept")
    try:
        raise RuntimeError("wrapped") from named
    except RuntimeError as err:
        assert message(err) == text
    raw = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "c.bin"))
    assert message(raw).startswith(f"no space left on device writing {tmp_path / 'c.bin'} (") and message(raw).endswith("there)")
    assert message(RuntimeError("safetensors:  No space left on device\n (os error 28)")) == (
        "no space left on device: safetensors: No space left on device (os error 28)")


def test_written_files_get_the_umask_mode_and_the_writers_return_their_path(tmp_path):
    before = os.umask(0o027)
    try:
        assert atomic_files._default_mode() == 0o640 and os.umask(0o027) == 0o027  # umask left as it was
        out = atomic_files.write_text_atomic(tmp_path / "t.txt", "é")
        assert out == tmp_path / "t.txt" and out.read_bytes() == "é".encode() and out.stat().st_mode & 0o777 == 0o640
        assert atomic_files.write_bytes_atomic(tmp_path / "b", b"xy") == tmp_path / "b"
        assert (tmp_path / "b").read_bytes() == b"xy"
    finally:
        os.umask(before)


def test_keep_previous_without_hard_links_renames(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_files._keep_previous(target)  # nothing to keep
    assert not previous_path(target).exists()
    target.write_bytes(b"old")
    atomic_files._keep_previous(target)
    assert target.read_bytes() == b"old" and previous_path(target).read_bytes() == b"old"  # linked: both there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.prev.ckpt"]
    target.unlink()
    target.write_bytes(b"new")  # a new file, as atomic_write's rename leaves it

    def no_links(src, dst):
        raise OSError(errno.EPERM, "no hard links here")

    monkeypatch.setattr(os, "link", no_links)
    atomic_files._keep_previous(target)
    assert not target.exists() and previous_path(target).read_bytes() == b"new"
    atomic_files.fsync_directory(tmp_path / "missing")  # a directory that cannot be opened: no error


def test_a_write_failing_half_way_leaves_the_old_file_and_names_path_and_free_space(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_text_atomic(target, "old")
    fail_writes_after(monkeypatch, 10)
    with pytest.raises(DiskFullError) as info:
        write_text_atomic(target, "x" * 100)
    message = str(info.value)
    assert message.startswith(f"no space left on device writing {target}") and "free of" in message
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and not temporaries(tmp_path)


def test_torch_save_failing_half_way_is_reported_as_the_full_disk(tmp_path, monkeypatch):
    """torch.save turns the OSError of its file into a RuntimeError: the writer recovers the cause."""
    target = tmp_path / "c.ckpt"
    fail_writes_after(monkeypatch, 100)
    with pytest.raises(DiskFullError, match="c.ckpt"), atomic_write(target) as f:
        torch.save({"w": torch.zeros(1000)}, f)
    assert not target.exists() and not temporaries(tmp_path)


def test_a_full_disk_while_saving_an_adapter_keeps_the_old_adapter(tmp_path, monkeypatch):
    import lori.core.io as io

    model = tiny_llama()
    cfg = LoRIConfig(r=4, alpha=8)
    inject_lori(model, cfg)
    save_adapter(adapter_from_model(model, cfg, "tiny"), tmp_path / "ad")

    def full(*args, **kwargs):  # safetensors reports the OS error in its own exception's text
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(io, "save_file", full)
    with pytest.raises(DiskFullError, match=f"writing {tmp_path / 'ad'}"):
        save_adapter(adapter_from_model(model, cfg, "tiny"), tmp_path / "ad")
    assert load_adapter(tmp_path / "ad").rank == 4


# --- the CheckpointIO plugin -------------------------------------------------------------------

def test_atomic_checkpoint_io_keeps_the_previous_and_survives_a_failed_write(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"b": torch.ones(3)}}, path)
    io.save_checkpoint({"global_step": 2, "state_dict": {"b": torch.ones(3)}}, path)
    fail_writes_after(monkeypatch, 200)
    with pytest.raises(DiskFullError):
        io.save_checkpoint({"global_step": 3, "state_dict": {"b": torch.ones(30000)}}, path)
    assert io.load_checkpoint(path)["global_step"] == 2
    assert io.load_checkpoint(previous_path(path))["global_step"] == 1
    assert not temporaries(tmp_path)


def test_atomic_checkpoint_io_refuses_a_state_holding_nan(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"b": torch.ones(3)}}, path)
    with pytest.raises(FloatingPointError, match=r"not writing checkpoint .*b holds 1 NaN .*global step 2"):
        io.save_checkpoint({"global_step": 2, "state_dict": {"b": torch.tensor([1.0, float("nan")])}}, path)
    assert io.load_checkpoint(path)["global_step"] == 1


def test_every_lori_trainer_writes_checkpoints_through_the_plugin(tmp_path):
    make = cli.make_trainer_factory({"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}, tmp_path, 1)
    trainer = make(stage="lori_d", max_steps=1, callbacks=[], logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    own = TorchCheckpointIO()
    assert with_atomic_checkpoints([own]) == [own]  # a CheckpointIO the user chose is kept
    assert isinstance(with_atomic_checkpoints(None)[0], AtomicCheckpointIO)


# --- choosing the checkpoint to resume from ----------------------------------------------------

def test_unreadable_checkpoints_are_set_aside_and_the_stage_starts_again(tmp_path, capsys):
    d = tmp_path / "lori_s_ckpt"
    d.mkdir()
    (d / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    torch.save({"global_step": 3, "state_dict": {"b": torch.tensor([float("nan")])}}, previous_path(d / "last.ckpt"))
    assert resume_checkpoint(d, "lori_s") == (None, None)
    assert sorted(p.name for p in d.iterdir()) == ["last.ckpt.unreadable", "last.prev.ckpt.unreadable"]
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith(f"lori: checkpoint {d / 'last.ckpt'} cannot be used")
    assert "1 NaN" in line and line.endswith("no earlier checkpoint: lori_s starts again from its beginning")


# --- a pipeline that hits a full disk, and one whose last checkpoint is damaged ----------------

STEPS = {"dense_steps": 3, "sparse_steps": 6, "held_out_loss": False, "checkpoint_every": 1}
FAIL_AT = 4  # the 4th LoRI-S checkpoint write fails: last.ckpt stays at step 3, last.prev.ckpt at 2


def config(tmp_path: Path, name: str) -> Path:
    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / name), **STEPS)
    cfg["model"]["lori"]["dropout"] = 0.1  # the random stream must continue too
    return write_config(tmp_path, cfg, f"{name}.yaml")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("atomic")
    cli.pipeline(["--config", str(config(tmp, "full"))])
    return load_adapter(tmp / "full" / "lori_s")


def full_disk_run(tmp_path: Path, monkeypatch, capsys) -> tuple[Path, Path]:
    path = config(tmp_path, "run")
    with monkeypatch.context() as m:
        failed = fail_writes_after(m, 1000, "lori_s_ckpt", skip=FAIL_AT - 1)
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(["pipeline", "--config", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    ckpt_dir = tmp_path / "run" / "lori_s_ckpt"
    assert info.value.code == 1 and failed, err[-5:]
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"lori: error: no space left on device writing {ckpt_dir / 'last.ckpt'} (")
    assert "free of" in err[-1] and err[-1].endswith("the previous file is kept")
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == FAIL_AT - 1
    assert torch.load(ckpt_dir / "last.prev.ckpt", weights_only=True)["global_step"] == FAIL_AT - 2
    assert not temporaries(tmp_path / "run")
    return path, ckpt_dir


def assert_same_adapter(got, expected) -> None:
    assert got.B.keys() == expected.B.keys()
    for p in expected.B:
        assert torch.equal(got.masks[p], expected.masks[p]), p
        assert torch.equal(got.B[p], expected.B[p]), p


def test_a_full_disk_mid_checkpoint_keeps_the_last_one_and_the_rerun_resumes_bit_identically(
    tmp_path, monkeypatch, capsys, uninterrupted
):
    path, _ = full_disk_run(tmp_path, monkeypatch, capsys)
    summary = cli.pipeline(["--config", str(path)])
    assert summary["lori_d"].get("reused") and summary["lori_s"]["steps"] == STEPS["sparse_steps"]
    assert_same_adapter(load_adapter(tmp_path / "run" / "lori_s"), uninterrupted)


def test_an_unreadable_last_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(
    tmp_path, monkeypatch, capsys, uninterrupted
):
    path, ckpt_dir = full_disk_run(tmp_path, monkeypatch, capsys)
    last = ckpt_dir / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # damaged after the fact
    damaged = last.read_bytes()
    cli.pipeline(["--config", str(path)])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lori: checkpoint")]
    assert len(notes) == 1 and f"{last} cannot be used" in notes[0] and "set aside as last.ckpt.unreadable" in notes[0]
    assert notes[0].endswith(f"lori_s resumes from {ckpt_dir / 'last.prev.ckpt'} (global step {FAIL_AT - 2})")
    assert (ckpt_dir / "last.ckpt.unreadable").read_bytes() == damaged  # set aside, not deleted
    assert_same_adapter(load_adapter(tmp_path / "run" / "lori_s"), uninterrupted)


def test_guarded_file_remembers_the_write_error_and_passes_the_rest_through(tmp_path, monkeypatch):
    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def tell(self):
            return 7

    guarded = atomic_files._Guarded(Full(), tmp_path / "x")
    with pytest.raises(OSError) as info:
        guarded.write(b"a")
    assert guarded.error is info.value and guarded.tell() == 7
    before = os.umask(0o022)
    try:
        assert atomic_files._default_mode() == 0o644
    finally:
        os.umask(before)

    def no_usage(path):
        raise OSError(errno.EIO, "statvfs failed")

    monkeypatch.setattr(atomic_files.shutil, "disk_usage", no_usage)
    assert str(atomic_files.disk_full_error(tmp_path / "y")) == (
        f"no space left on device writing {tmp_path / 'y'} (free space unknown there)")
