"""What the baselines write: PEFT adapter dirs, Hugging Face model dirs, and checkpoint contents.

    PEFT methods    <dir>/adapter_config.json + adapter_model.safetensors (PEFT's own format:
                    ``PeftModel.from_pretrained(base, dir)`` gives the trained logits) + lori_meta.json
    pissa           converted to a plain LoRA of rank 2r on the ORIGINAL base (PiSSA trains on a
                    residual base W0 - s B0 A0): A' = [A; A0], B' = [B, -B0], alpha' = 2 alpha, so
                    s' B' A' = s (B A - B0 A0)   (PEFT's ``path_initial_model_for_weight_conversion``)
    full            a Hugging Face model dir (+ tokenizer) + lori_meta.json

``lori_meta.json`` holds the base fingerprint, so ``lori.core.io.load_adapter`` (and merging) can
check the base of the LoRA-format dirs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lori.core import LoRIConfig, adapter_from_model, save_adapter
from lori.core.io import FORMAT_VERSION, META_FILE, WEIGHTS_FILE, atomic_directory
from lori.training.baselines.peft_methods import PeftHandle, peft_handle


def keeps_lori_keys(key: str, trainable: set[str]) -> bool:
    """LoRI's checkpoints keep every ``lori_`` tensor (A, B, mask: the phase must survive a resume)."""
    return ".lori_" in key


def keeps_trainable(key: str, trainable: set[str]) -> bool:
    """A PEFT method's checkpoints keep its trainable tensors (frozen ones, e.g. LoRA-FA's A, VeRA's
    projections, PiSSA's residual base, are rebuilt from the seed and the base)."""
    return key in trainable


def keeps_all(key: str, trainable: set[str]) -> bool:
    """Full fine-tuning's checkpoints keep everything."""
    return True


def peft_state(model: nn.Module) -> dict[str, Tensor]:
    """The PEFT adapter's tensors under the names ``PeftModel.from_pretrained`` reads (CPU)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_handle(model).wrapper, save_embedding_layers=False)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def pissa_as_lora(handle: PeftHandle, state: dict[str, Tensor], config: Any) -> tuple[dict[str, Tensor], Any]:
    """A trained PiSSA adapter as a rank-2r LoRA on the original base (see the module docstring)."""
    out = {}
    for key, value in state.items():
        initial = handle.initial[key].to(value.dtype)
        out[key] = torch.cat([value, initial], 0) if ".lora_A." in key else torch.cat([value, -initial], 1)
    config.r, config.lora_alpha, config.init_lora_weights = 2 * config.r, 2 * config.lora_alpha, True
    return {k: v.contiguous() for k, v in out.items()}, config


def _meta(base_model: str | None, fingerprint: str | None, meta: dict[str, Any]) -> str:
    return json.dumps({"format_version": FORMAT_VERSION, "base_model": base_model,
                       "base_fingerprint": fingerprint, "meta": meta}, indent=2, default=str)


def save_peft_adapter(
    model: nn.Module, directory: str | Path, base_model: str | None, fingerprint: str | None,
    meta: dict[str, Any] | None = None, as_lora: bool = False,
) -> Path:
    """Write a PEFT adapter dir (adapter_config.json + safetensors + lori_meta.json) atomically.

    ``as_lora``: a PiSSA adapter, written as a plain LoRA on the original base (``pissa_as_lora``).
    """
    handle = peft_handle(model)
    state = peft_state(model)  # first: AdaLoRA's state dict writes the rank pattern into the config
    config = copy.deepcopy(handle.config)
    config.base_model_name_or_path, config.inference_mode = base_model, True
    meta = dict(meta or {})
    if as_lora:
        state, config = pissa_as_lora(handle, state, config)
        meta["saved_as"] = "lora of rank 2r on the original base (PiSSA converted)"
    with atomic_directory(directory) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(_meta(base_model, fingerprint, meta))
    return Path(directory)


def save_full_model(
    model: nn.Module, tokenizer: Any, directory: str | Path, base_model: str | None,
    fingerprint: str | None, meta: dict[str, Any] | None = None,
) -> Path:
    """Write a fully fine-tuned model (and tokenizer) as a Hugging Face dir, atomically."""
    with atomic_directory(directory) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / META_FILE).write_text(_meta(base_model, fingerprint, dict(meta or {})))
    return Path(directory)


# ---- a registry entry's ``save``: (model, tokenizer, lori, directory, base_model, fingerprint, meta) ------
def save_lori(
    model: nn.Module, tokenizer: Any, lori: LoRIConfig, directory: str | Path, base_model: str | None,
    fingerprint: str | None, meta: dict[str, Any],
) -> Path:
    """A lori adapter dir (``lori.core.io.save_adapter``): A, B, mask, config, meta."""
    return save_adapter(adapter_from_model(model, lori, base_model, meta, fingerprint), directory)


def save_peft(
    model: nn.Module, tokenizer: Any, lori: LoRIConfig, directory: str | Path, base_model: str | None,
    fingerprint: str | None, meta: dict[str, Any], as_lora: bool = False,
) -> Path:
    """A PEFT adapter dir (``save_peft_adapter``)."""
    return save_peft_adapter(model, directory, base_model, fingerprint, meta, as_lora=as_lora)


def save_full(
    model: nn.Module, tokenizer: Any, lori: LoRIConfig, directory: str | Path, base_model: str | None,
    fingerprint: str | None, meta: dict[str, Any],
) -> Path:
    """A Hugging Face model dir with the tokenizer (``save_full_model``)."""
    return save_full_model(model, tokenizer, directory, base_model, fingerprint, meta)
