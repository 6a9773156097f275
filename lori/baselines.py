"""The paper's single-task baselines, built on the same base model and LoRIConfig as LoRI.

    method    trainable                          adapter                          saved as
    lori      B (then B ⊙ M after calibration)   LoRILinear, A frozen from seed   lori adapter dir
    lora_fa   B, dense (LoRI with s = 0)         LoRILinear, A frozen from seed   lori adapter dir
    lora      A and B                            PEFT LoRA, A Kaiming from seed   PEFT adapter dir
    dora      A, B and the magnitude vector      PEFT LoRA with use_dora          PEFT adapter dir
    full      every base weight                  none                             HF model dir

Every method reads r, alpha, dropout, target modules and seed from the same ``LoRIConfig``, so a
config differs from another only in ``method``. PEFT adapter dirs carry a ``lori_meta.json`` with
the base fingerprint, so ``lori.core.io.load_adapter`` (and merging) can check the base.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lori.core import InjectionError, LoRIConfig, inject_lori
from lori.core.io import FORMAT_VERSION, META_FILE, WEIGHTS_FILE, atomic_directory

METHODS: tuple[str, ...] = ("lori", "lora", "dora", "lora_fa", "full")
LORI_METHODS: tuple[str, ...] = ("lori", "lora_fa")
PEFT_METHODS: tuple[str, ...] = ("lora", "dora")


def check_method(method: str) -> None:
    """Refuse an unknown method by name."""
    if method not in METHODS:
        raise InjectionError(f"unknown method {method!r}; choose one of {list(METHODS)}")


def target_paths(model: nn.Module, targets: list[str]) -> list[str]:
    """Paths of the ``nn.Linear`` modules whose name ends with a target (inject_lori's rule).

    Raises:
        InjectionError: a target matches no linear layer (the message lists the linear names).
    """
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    hits = {t: [p for p in linears if p == t or p.endswith("." + t)] for t in targets}
    missing = [t for t, found in hits.items() if not found]
    if missing:
        names = sorted({p.rsplit(".", 1)[-1] for p in linears})
        raise InjectionError(
            f"target_modules {missing} match no nn.Linear in {type(model).__name__}; "
            f"linear layer names there: {names}"
        )
    return sorted({p for found in hits.values() for p in found})


def peft_lora_config(config: LoRIConfig, dora: bool) -> Any:
    """The PEFT LoraConfig with LoRI's r, alpha, dropout and targets."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=list(config.target_modules), use_dora=dora, bias="none", task_type="CAUSAL_LM",
    )


def attach(model: nn.Module, method: str, config: LoRIConfig) -> LoRIConfig:
    """Make ``model`` trainable the way ``method`` says, in place.

    The trained tensors are fp32 whatever the base's dtype: LoRI's A and B are created in fp32,
    PEFT's LoRA / DoRA weights are upcast as ``get_peft_model(autocast_adapter_dtype=True)`` does;
    ``full`` trains the base itself (``LoRIModule`` keeps it fp32 then).

    Returns:
        The effective config (``lora_fa`` is LoRI with sparsity 0).
    """
    check_method(method)
    target_paths(model, config.target_modules)  # same error for every method on a bad target
    if method in LORI_METHODS:
        config = replace(config, sparsity=0.0) if method == "lora_fa" else config
        inject_lori(model, config)
    elif method in PEFT_METHODS:
        from peft import inject_adapter_in_model
        from peft.tuners.tuners_utils import cast_adapter_dtype

        with torch.random.fork_rng(devices=[]):  # A's Kaiming init from the config's seed
            torch.manual_seed(config.seed)
            inject_adapter_in_model(peft_lora_config(config, dora=method == "dora"), model)
        cast_adapter_dtype(model, "default")  # a 16-bit base's adapter in fp32 (get_peft_model's default)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return config


def is_saved_key(method: str, key: str, trainable: set[str]) -> bool:
    """Whether a LightningModule state-dict key belongs in a checkpoint of ``method``.

    LoRI keeps every ``lori_`` tensor (A, B, mask: the phase must survive a resume); LoRA/DoRA keep
    their trainable tensors; full fine-tuning keeps everything.
    """
    if method in LORI_METHODS:
        return ".lori_" in key
    if method in PEFT_METHODS:
        return key in trainable
    return True


def peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The PEFT adapter's tensors under the names ``PeftModel.from_pretrained`` reads."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}


def _meta(base_model: str | None, fingerprint: str | None, meta: dict[str, Any]) -> str:
    return json.dumps({"format_version": FORMAT_VERSION, "base_model": base_model,
                       "base_fingerprint": fingerprint, "meta": meta}, indent=2, default=str)


def save_peft_adapter(
    model: nn.Module, directory: str | Path, base_model: str | None, fingerprint: str | None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a PEFT LoRA/DoRA adapter dir (adapter_config.json + safetensors) atomically."""
    config = replace(model.peft_config["default"], base_model_name_or_path=base_model, inference_mode=True)
    with atomic_directory(directory) as tmp:
        config.save_pretrained(str(tmp))
        save_file(peft_state(model), str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(_meta(base_model, fingerprint, dict(meta or {})))
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
