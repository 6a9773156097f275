"""Adapter directories: PEFT LoRA format plus LoRI masks and metadata, safetensors only.

    <dir>/adapter_config.json          PEFT LoraConfig (peft_type LORA)
    <dir>/adapter_model.safetensors    base_model.model.<path>.lora_A.weight / .lora_B.weight
    <dir>/lori_masks.safetensors       bool masks keyed by module path (LoRI-S only), with a MaskRecord
    <dir>/lori_meta.json               seed, sparsity, granularity, base model, calibration details

``PeftModel.from_pretrained(base, dir)`` reads the first two and gives lori's logits (B saved is
the effective B, zero outside the mask for LoRI-S). Writes are atomic: the directory is built
beside the target and swapped in by rename, so a crash leaves the old directory or the new one
(a full disk raises ``DiskFullError`` naming the target and the free space). Reads refuse a file
holding NaN or inf, naming the file and the tensor (``lori.core.finite``).

A mask fits only the A it was calibrated under (M keeps the largest entries of a B trained
against that A). lori's mask files record that A in their safetensors metadata (``MaskRecord``:
A seed and digest, base fingerprint, r, sparsity, granularity); the original code's
``<adapter>/masks/<s>_mask.pt`` files carry no record, so their A cannot be checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from lori.core.adapter import A_DIGEST_MODULES, SAVED_EMBEDDINGS, Adapter, a_digest
from lori.core.atomic_files import disk_full_error, fsync_directory, is_disk_full
from lori.core.config import LoRIConfig
from lori.core.errors import LoRIError
from lori.core.finite import check_finite

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MASKS_FILE = "lori_masks.safetensors"
META_FILE = "lori_meta.json"
FORMAT_VERSION = 1
_DAMAGED = "; the file is damaged or comes from a diverged run"
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
# whole embedding weights PEFT's save_pretrained adds when the vocabulary was resized (EMBEDDING_LAYER_NAMES)
_EMBEDDING_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>(?:.+\.)?(?:embed_tokens|lm_head))\.weight$")
# where the original code's extract_mask.py writes each granularity's masks: <adapter>/<folder>/<s>_mask.pt
OFFICIAL_MASK_DIRS = {"model": "masks", "module": "modulewise_masks", "projection": "projectionwise_masks",
                      "layer": "layerwise_masks", "matrix": "matrixwise_masks"}


class AdapterFileError(LoRIError, ValueError):
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
            record = MaskRecord.of(adapter.A, adapter.config.seed, adapter.base_fingerprint,
                                   adapter.config.sparsity, adapter.config.granularity)
            save_file({p: m.to(torch.bool).contiguous() for p, m in adapter.masks.items()}, str(tmp / MASKS_FILE),
                      metadata=record.to_metadata())
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


def _unexpected_key(key: str) -> AdapterFileError:
    return AdapterFileError(
        f"unexpected key {key!r}: not a PEFT lora_A/lora_B weight nor a saved embed_tokens/lm_head weight; "
        "lori reads LoRA adapters only (no modules_to_save, no other PEFT method)"
    )


def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), "pt")
    except (OSError, SafetensorError, ValueError) as err:
        raise AdapterFileError(f"corrupt or unreadable safetensors file {path}: {err}") from None


def read_peft_weights(
    path: str | Path, only_A: int | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, list[int]]]:
    """A, B and the shapes of saved embedding weights from a PEFT ``adapter_model.safetensors``.

    PEFT 0.12's ``save_pretrained`` (save_embedding_layers="auto") also writes the whole
    ``embed_tokens`` and ``lm_head`` weights when the vocabulary was resized, as the original LoRI
    code does for its '<PAD>' token (vocab + 1 rows). They are frozen base rows, not adapter
    weights: only their shapes are read (``check_fits`` compares them with the base).

    Args:
        path: the safetensors file.
        only_A: read just the A of the first ``only_A`` modules in sorted path order (no B).

    Returns:
        A and B by module path, and ``{embedding module path: [rows, cols]}``.
    """
    path = Path(path)
    A: dict[str, Tensor] = {}
    B: dict[str, Tensor] = {}
    embeddings: dict[str, list[int]] = {}
    with _open(path) as f:
        lora: dict[str, tuple[str, str]] = {}
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            match, embedding = _PEFT_KEY.match(key), _EMBEDDING_KEY.match(key)
            if match is not None:
                lora[key] = (match["ab"], match["path"])
            elif embedding is not None:
                embeddings[embedding["path"]] = list(f.get_slice(key).get_shape())
            else:
                raise _unexpected_key(key)
        if only_A is not None:
            first = sorted(p for ab, p in lora.values() if ab == "A")[:only_A]
            lora = {k: v for k, v in lora.items() if v[0] == "A" and v[1] in first}
        try:
            read = {key: f.get_tensor(key) for key in lora}
        except (OSError, SafetensorError, ValueError) as err:
            raise AdapterFileError(f"corrupt or unreadable safetensors file {path}: {err}") from None
    check_finite(read.items(), f"{path}", AdapterFileError, _DAMAGED)
    for key, (ab, module) in lora.items():
        (A if ab == "A" else B)[module] = read[key]
    return A, B, embeddings


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
    A, B, embeddings = read_peft_weights(directory / WEIGHTS_FILE)
    meta = _read_json(directory / META_FILE) if (directory / META_FILE).is_file() else {}
    config = _config_from(peft, meta, A)
    if mask_file is None and (directory / MASKS_FILE).is_file():
        mask_file = directory / MASKS_FILE
    masks = load_masks(mask_file) if mask_file is not None else None
    extra = dict(meta.get("meta", {}))
    if embeddings:
        extra[SAVED_EMBEDDINGS] = {"shapes": embeddings, "reason": (
            "not loaded: PEFT's save_pretrained wrote the whole frozen embedding weights because the vocabulary "
            "was resized (the original LoRI code adds a '<PAD>' token, train_lori.py l.77-81); the base's rows "
            "are unchanged and lori needs no pad row")}
    return Adapter(
        config, A, B, masks,
        base_model=meta.get("base_model", peft.get("base_model_name_or_path")),
        base_fingerprint=meta.get("base_fingerprint"),
        meta=extra,
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


# ---- what a mask was calibrated under ---------------------------------------------------------
def _seed(value: Any) -> int | None:
    """A lori seed, or None for an A lori did not draw (imported or merged adapters carry seed -1)."""
    return int(value) if value is not None and int(value) >= 0 else None


@dataclass(frozen=True)
class AIdentity:
    """Which A an adapter holds: lori's seed (None if lori did not draw it) and ``a_digest`` of A itself.

    Attributes:
        seed: ``LoRIConfig.seed`` of a lori-drawn A; None for an imported or merged A.
        digest: ``lori.core.adapter.a_digest``; None when unknown (an A not drawn yet).
        base_fingerprint: ``base_fingerprint`` of the base it belongs to, when known.
        r: adapter rank, when known.
    """

    seed: int | None
    digest: str | None
    base_fingerprint: str | None = None
    r: int | None = None

    def describe(self) -> str:
        seed = "an imported A (no lori seed)" if self.seed is None else f"A seed {self.seed}"
        return f"{seed} (digest {self.digest or 'unknown'})"


@dataclass(frozen=True)
class MaskRecord(AIdentity):
    """The A (and base) a mask was calibrated under, kept in its safetensors metadata (str -> str).

    Attributes:
        sparsity: calibration sparsity.
        granularity: calibration granularity.
    """

    sparsity: float | None = None
    granularity: str | None = None

    _PREFIX = "lori_mask."

    @classmethod
    def of(cls, A: dict[str, Tensor], seed: int | None, base_fingerprint: str | None,
           sparsity: float | None, granularity: str | None) -> MaskRecord:
        """The record of masks calibrated from a B trained against ``A`` (by module path)."""
        r = next(iter(A.values())).shape[0] if A else None
        return cls(_seed(seed), a_digest(A), base_fingerprint, r, sparsity, granularity)

    def to_metadata(self) -> dict[str, str]:
        """Safetensors metadata: ``lori_mask.<field>`` -> str, unknown fields left out."""
        fields = {"a_seed": self.seed, "a_digest": self.digest, "base_fingerprint": self.base_fingerprint,
                  "r": self.r, "sparsity": self.sparsity, "granularity": self.granularity}
        return {"format": "pt", f"{self._PREFIX}version": "1"} | {
            f"{self._PREFIX}{k}": str(v) for k, v in fields.items() if v is not None
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None) -> MaskRecord | None:
        """The record in a mask file's metadata; None when the file has none (older files)."""
        metadata = metadata or {}
        if f"{cls._PREFIX}version" not in metadata:
            return None

        def get(name: str, kind: Any) -> Any:
            value = metadata.get(f"{cls._PREFIX}{name}")
            return None if value is None else kind(value)

        return cls(get("a_seed", int), get("a_digest", str), get("base_fingerprint", str), get("r", int),
                   get("sparsity", float), get("granularity", str))

    def mismatch(self, other: AIdentity) -> str | None:
        """Why these masks do not fit an adapter with A ``other`` (None when they fit or cannot be told apart).

        Digests decide when both are known, else seeds; the base fingerprint and r must agree when known.
        """
        if self.r is not None and other.r is not None and self.r != other.r:
            return f"calibrated for r={self.r}, the adapter has r={other.r}"
        if self.digest and other.digest and "meta" not in (self.digest, other.digest):
            differ = self.digest != other.digest
        else:
            differ = self.seed != other.seed
        if differ:
            return f"calibrated under {self.describe()}, the adapter has {other.describe()}"
        known = (self.base_fingerprint, other.base_fingerprint)
        if None not in known and "meta" not in known and known[0] != known[1]:
            return f"calibrated on base fingerprint {known[0]}, the adapter's base has fingerprint {known[1]}"
        return None


def read_mask_record(path: str | Path) -> MaskRecord | None:
    """The record of a lori mask file from its header alone (no tensor is read); None for a torch file."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"mask file {path} does not exist")
    if path.suffix != ".safetensors":
        return None  # the original code's torch.save files carry no record
    with _open(path) as f:
        return MaskRecord.from_metadata(f.metadata())


def read_mask_file(path: str | Path) -> tuple[dict[str, Tensor], MaskRecord | None]:
    """Masks by module path (``load_masks``) and the record of the A they were calibrated under (or None)."""
    return load_masks(path), read_mask_record(path)


def read_a_identity(directory: str | Path) -> AIdentity:
    """The A of an adapter directory, read cheaply: lori_meta.json and the A of the 4 modules ``a_digest`` covers.

    Works for lori's adapter directories and plain PEFT ones (seed None, base fingerprint unknown).
    """
    directory = Path(directory)
    _recover(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise AdapterFileError(f"{directory} is not an adapter directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    meta = _read_json(directory / META_FILE) if (directory / META_FILE).is_file() else {}
    lori = meta.get("lori") or {}
    A, _, _ = read_peft_weights(directory / WEIGHTS_FILE, only_A=A_DIGEST_MODULES)
    r = lori.get("r") or _read_json(directory / CONFIG_FILE).get("r")
    return AIdentity(_seed(lori.get("seed")), a_digest(A), meta.get("base_fingerprint"), r)


def official_mask_path(adapter_dir: str | Path, sparsity: float, granularity: str = "model") -> Path:
    """Where the original code's extract_mask.py writes a mask: ``<adapter>/masks/0.9_mask.pt`` (str of the float)."""
    return Path(adapter_dir) / OFFICIAL_MASK_DIRS[granularity] / f"{float(sparsity)}_mask.pt"


def find_mask_file(path: str | Path, sparsity: float, granularity: str = "model") -> Path:
    """A mask file, given the file itself or a directory holding one.

    A directory is searched for, in order: ``lori_masks.safetensors`` (a LoRI-S adapter),
    ``calibration/masks.safetensors`` (a ``lori pipeline`` output directory) and the original
    code's ``masks/<sparsity>_mask.pt`` (``official_mask_path``; other granularities in their folders).
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise AdapterFileError(f"mask file {path} does not exist")
    candidates = [path / MASKS_FILE, path / "calibration" / "masks.safetensors",
                  official_mask_path(path, sparsity, granularity)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise AdapterFileError(f"no mask file in {path}: looked for {', '.join(str(c) for c in candidates)}")
