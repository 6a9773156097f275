"""Adapter directories: PEFT LoRA format plus LoRI masks and metadata, safetensors only.

    <dir>/adapter_config.json          PEFT LoraConfig (peft_type LORA)
    <dir>/adapter_model.safetensors    base_model.model.<path>.lora_A.weight / .lora_B.weight
    <dir>/lori_masks.safetensors       bool masks keyed by module path (LoRI-S only)
    <dir>/lori_meta.json               seed, sparsity, granularity, base model, calibration details

``PeftModel.from_pretrained(base, dir)`` reads the first two and gives lori's logits (B saved is
the effective B, zero outside the mask for LoRI-S). Writes are atomic: the directory is built
beside the target and swapped in by rename, so a crash leaves the old directory or the new one
(a full disk raises ``DiskFullError`` naming the target and the free space). Reads refuse a file
holding NaN or inf, naming the file and the tensor (``lori.core.finite``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lori.core.adapter import Adapter
from lori.core.atomic_files import disk_full_error, fsync_directory, is_disk_full
from lori.core.config import LoRIConfig
from lori.core.finite import check_finite

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MASKS_FILE = "lori_masks.safetensors"
META_FILE = "lori_meta.json"
FORMAT_VERSION = 1
_DAMAGED = "; the file is damaged or comes from a diverged run"
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


class AdapterFileError(ValueError):
    """An adapter directory or mask file that is missing, corrupt or inconsistent."""


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` when the block exits cleanly.

    The old directory is renamed aside, the new one renamed in, then the old one deleted; at every
    instant ``target`` is either absent-with-backup, the complete old, or the complete new
    directory. ``load_adapter`` restores an orphaned backup.

    Raises:
        DiskFullError: the file system filled up; ``target`` is as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        backup = target.parent / f".{target.name}.old"
        if target.exists():
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(target, backup)
        os.replace(tmp, target)
        fsync_directory(target.parent)
        shutil.rmtree(backup, ignore_errors=True)
    except Exception as err:
        if is_disk_full(err):
            shutil.rmtree(tmp, ignore_errors=True)  # first, so the free space reported is what is left
            raise disk_full_error(target, "the previous contents are kept" if target.exists() else None) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _recover(path: Path) -> None:
    backup = path.parent / f".{path.name}.old"
    if not path.exists() and backup.is_dir():
        os.replace(backup, path)


def peft_key(path: str, which: str) -> str:
    """PEFT's saved key for a module's lora_A / lora_B weight."""
    return f"base_model.model.{path}.lora_{which}.weight"


def peft_config(adapter: Adapter) -> dict[str, Any]:
    """The adapter_config.json PEFT's LoraConfig reads."""
    cfg = adapter.config
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model,
        "r": adapter.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in adapter.A}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def save_adapter(adapter: Adapter, directory: str | Path) -> Path:
    """Write an adapter directory atomically (PEFT files, masks, LoRI metadata)."""
    tensors: dict[str, Tensor] = {}
    for path in adapter.A:
        tensors[peft_key(path, "A")] = adapter.A[path].contiguous()
        tensors[peft_key(path, "B")] = adapter.B[path].contiguous()
    meta = {
        "format_version": FORMAT_VERSION,
        "lori": adapter.config.to_dict(),
        "base_model": adapter.base_model,
        "base_fingerprint": adapter.base_fingerprint,
        "shapes": {p: list(s) for p, s in adapter.shapes.items()},
        "meta": adapter.meta,
    }
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(adapter), indent=2))
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        if adapter.masks is not None:
            save_file({p: m.to(torch.bool).contiguous() for p, m in adapter.masks.items()}, str(tmp / MASKS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return Path(directory)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"cannot read {path}: {err}") from None


def _read_tensors(path: Path) -> dict[str, Tensor]:
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as err:
        raise AdapterFileError(f"corrupt or unreadable safetensors file {path}: {err}") from None
    check_finite(tensors.items(), f"{path}", AdapterFileError, _DAMAGED)
    return tensors


def split_peft_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A and B by module path from PEFT-named keys (with or without an adapter name)."""
    A: dict[str, Tensor] = {}
    B: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise AdapterFileError(f"unexpected key {key!r}: not a PEFT lora_A/lora_B weight")
        (A if match["ab"] == "A" else B)[match["path"]] = value
    return A, B


def load_adapter(directory: str | Path, mask_file: str | Path | None = None) -> Adapter:
    """Read an adapter directory written by lori, or a plain PEFT LoRA adapter.

    Args:
        directory: the adapter directory.
        mask_file: masks to use instead of ``lori_masks.safetensors`` (a lori safetensors file or
            a mask file as released by the original LoRI code, see ``load_masks``).
    """
    directory = Path(directory)
    _recover(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise AdapterFileError(f"{directory} is not an adapter directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    peft = _read_json(directory / CONFIG_FILE)
    if peft.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(f"{directory}: peft_type {peft.get('peft_type')!r} is not LORA")
    A, B = split_peft_state(_read_tensors(directory / WEIGHTS_FILE))
    meta = _read_json(directory / META_FILE) if (directory / META_FILE).is_file() else {}
    config = _config_from(peft, meta, A)
    if mask_file is None and (directory / MASKS_FILE).is_file():
        mask_file = directory / MASKS_FILE
    masks = load_masks(mask_file) if mask_file is not None else None
    return Adapter(
        config, A, B, masks,
        base_model=meta.get("base_model", peft.get("base_model_name_or_path")),
        base_fingerprint=meta.get("base_fingerprint"),
        meta=meta.get("meta", {}),
    )


def _config_from(peft: dict[str, Any], meta: dict[str, Any], A: dict[str, Tensor]) -> LoRIConfig:
    if "lori" in meta:
        return LoRIConfig.from_dict(meta["lori"])
    if peft.get("use_dora") or peft.get("use_rslora"):
        raise AdapterFileError("DoRA / rsLoRA adapters are not LoRI adapters and cannot be imported")
    targets = peft.get("target_modules") or sorted({p.rsplit(".", 1)[-1] for p in A})
    if isinstance(targets, str):
        targets = sorted({p.rsplit(".", 1)[-1] for p in A})
    return LoRIConfig(
        r=int(peft["r"]), alpha=float(peft["lora_alpha"]), dropout=float(peft.get("lora_dropout", 0.0)),
        target_modules=list(targets), sparsity=0.0, granularity="model", seed=-1,
    )


def load_masks(path: str | Path) -> dict[str, Tensor]:
    """Masks by module path from a lori safetensors file or an original-LoRI torch file.

    The original code saved ``torch.save({peft_param_name: bool tensor})`` with names like
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight``; that file is read
    with ``torch.load(weights_only=True)`` (no pickle code runs) and its keys are converted.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"mask file {path} does not exist")
    if path.suffix == ".safetensors":
        raw = _read_tensors(path)
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
            raise AdapterFileError(f"cannot read mask file {path}: {err}") from None
        if not isinstance(raw, dict):
            raise AdapterFileError(f"mask file {path} holds a {type(raw).__name__}, not a dict of tensors")
        if not all(isinstance(v, Tensor) for v in raw.values()):
            raise AdapterFileError(f"mask file {path} holds values that are not tensors")
        check_finite(raw.items(), f"{path}", AdapterFileError, _DAMAGED)  # a NaN float mask would read as True
    masks: dict[str, Tensor] = {}
    for key, value in raw.items():
        match = _PEFT_KEY.match(key)
        if match is not None and match["ab"] == "A":
            continue
        masks[match["path"] if match else key] = value.to(torch.bool)
    return masks
