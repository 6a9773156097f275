"""The one error base: every error class of lori is a LoRIError (and keeps its built-in base), which
``lori`` reports as one line and exit code 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lori.commands.main as cli
from lori.core import AdapterFileError, LoRIConfigError, LoRIError
from lori.core.atomic_files import DiskFullError, disk_full_error
from lori.core.protocol import ProtocolError
from lori.eval.errors import EvalError
from lori.training.base_model import ModelNotFoundError
from lori.training.continual import ContinualConfigError
from lori.training.run_lock import RunLockedError

LORI = Path(__file__).resolve().parents[1] / "lori"
OUTSIDE = {"DiskFullError"}  # an OSError: a full disk ends with exit code 1, not 2


def _classes() -> dict[str, list[tuple[str, list[str]]]]:
    """Every class defined under lori/: name -> its definitions as (file, names of its bases)."""
    classes: dict[str, list[tuple[str, list[str]]]] = {}
    for path in sorted(LORI.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases]
                classes.setdefault(node.name, []).append((str(path.relative_to(LORI.parent)), bases))
    return classes


def _derives_from_lori_error(name: str, classes: dict[str, list[tuple[str, list[str]]]]) -> bool:
    """Whether every definition of ``name`` reaches LoRIError through lori's own classes."""
    if name == "LoRIError":
        return True
    return name in classes and all(any(_derives_from_lori_error(b, classes) for b in bases)
                                   for _, bases in classes[name])


def test_every_error_class_is_a_lori_error():
    classes = _classes()
    errors = {name for name in classes if name.endswith("Error")}
    assert {"LoRIConfigError", "DataError", "QuantizeError", "CheckpointMismatchError", "AblationError"} <= errors
    bad = sorted(f"{file}: {n}({', '.join(bases)})" for n in errors - OUTSIDE if not _derives_from_lori_error(n, classes)
                 for file, bases in classes[n])
    assert not bad, "derive these from lori.core.errors.LoRIError (keep the built-in base): " + "; ".join(bad)
    assert not _derives_from_lori_error("DiskFullError", classes)


def _subclasses(cls: type) -> set[type]:
    return {s for c in cls.__subclasses__() for s in {c, *_subclasses(c)}}


def test_a_lori_error_keeps_its_built_in_base():
    """Library callers (notebooks, ``except ValueError``) see the same exceptions as before."""
    found = {c for c in _subclasses(LoRIError) if c.__module__.startswith("lori.")}
    assert {AdapterFileError, ProtocolError, ContinualConfigError, EvalError, RunLockedError} <= found
    assert all(issubclass(c, ValueError) for c in found), sorted(c.__name__ for c in found
                                                                 if not issubclass(c, ValueError))
    assert issubclass(ProtocolError, LoRIConfigError) and issubclass(ContinualConfigError, LoRIConfigError)
    assert issubclass(ModelNotFoundError, FileNotFoundError) and not issubclass(DiskFullError, LoRIError)


def _raising(error: BaseException):
    def command(argv: list[str]) -> None:
        raise error

    return command


@pytest.mark.parametrize("error", [
    LoRIError("bad value 3; use 4"),
    ProtocolError("unknown protocol 'paper'; choose one of ['lori', 'official']"),
    EvalError("unknown task 'x'; choose one of [gsm8k]"),
    RunLockedError("out is in use by pid 42"),
    ModelNotFoundError("no model at /nowhere"),
], ids=lambda e: type(e).__name__)
def test_a_lori_error_in_a_subcommand_is_one_line_and_exit_2(error, monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "dryrun", _raising(error))
    with pytest.raises(SystemExit) as stop:
        cli.main(["dryrun", "--config", "x.yaml"])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == ""
    assert err == f"lori: error: {error}\n" and err.count("\n") == 1


def test_every_subcommand_is_in_the_table():
    usage = cli.USAGE.splitlines()[0]
    names = usage[usage.index("{") + 1:usage.index("}")].split(",")
    assert set(cli.COMMANDS) == set(names) - {"fit", "validate", "test", "predict"}


def test_a_plain_value_error_keeps_its_traceback(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "merge", _raising(ValueError("a bug, not bad input")))
    with pytest.raises(ValueError, match="^a bug, not bad input$"):
        cli.main(["merge"])
    assert "lori: error" not in capsys.readouterr().err


def test_a_full_disk_stays_exit_1(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(cli.COMMANDS, "eval", _raising(disk_full_error(tmp_path / "adapter.safetensors")))
    with pytest.raises(SystemExit) as stop:
        cli.main(["eval"])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.startswith("lori: error: ") and err.count("\n") == 1
    assert "adapter.safetensors" in err
