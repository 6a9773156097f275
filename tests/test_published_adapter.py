"""Released LoRI adapters load as published: PEFT LoRA folder + the original code's mask file.

The public adapters (tomg-group-umd/LoRI-*) are plain PEFT LoRA directories (PEFT 0.12:
adapter_config.json + adapter_model.safetensors with ``...lora_A.weight`` / ``...lora_B.weight``
keys); the original code saved LoRI-S masks with ``torch.save`` as a dict of bool tensors keyed by
PEFT parameter names (``base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight``).
These tests write exactly that layout for a tiny Llama, load it with lori and compare the logits
with the explicit formula

    y = W0 x + (alpha / r) * (B ⊙ M) A x        (LoRI-S; M = 1 for LoRI-D)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn

from lori.core import (
    AdapterFileError, apply_adapter, count_trainable, get_masks, load_adapter, load_masks,
)
from lori.models import tiny_llama

R, ALPHA = 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_012_config(base: str = "meta-llama/Meta-Llama-3-8B") -> dict:
    """adapter_config.json as PEFT 0.12's LoraConfig.save_pretrained writes it (sorted keys)."""
    targets = list(TARGETS)
    random.Random(0).shuffle(targets)  # PEFT stores target_modules from a set: any order
    return {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": ALPHA, "lora_dropout": 0.05, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA", "r": R,
        "rank_pattern": {}, "revision": None, "target_modules": targets, "task_type": "CAUSAL_LM",
        "use_dora": False, "use_rslora": False,
    }


def _adapted(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        p: m for p, m in model.named_modules()
        if isinstance(m, nn.Linear) and p.rsplit(".", 1)[-1] in TARGETS
    }


Release = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # path -> (A, B, M)


def _released_tensors(dtype: torch.dtype, sparse: bool) -> Release:
    """(A, B, M) per module path, B zero outside M as LoRI-S training leaves it."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for path, linear in _adapted(tiny_llama()).items():
        A = (torch.rand(R, linear.in_features, generator=g) - 0.5).to(dtype)
        mask = torch.rand(linear.out_features, R, generator=g) < (0.1 if sparse else 2.0)
        B = (torch.randn(linear.out_features, R, generator=g) * mask).to(dtype)
        out[path] = (A, B, mask)
    return out


def write_release(directory: Path, tensors: Release, mask_file: Path | None) -> None:
    """The released layout: PEFT files, and (LoRI-S) the original code's torch-saved mask dict."""
    directory.mkdir(parents=True)
    config = json.dumps(_peft_012_config(), indent=2, sort_keys=True)
    (directory / "adapter_config.json").write_text(config)
    state = {}
    for path, (A, B, _) in tensors.items():
        state[f"base_model.model.{path}.lora_A.weight"] = A.contiguous()
        state[f"base_model.model.{path}.lora_B.weight"] = B.contiguous()
    save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    if mask_file is not None:
        masks = {f"base_model.model.{p}.lora_B.default.weight": M for p, (_, _, M) in tensors.items()}
        torch.save(masks, mask_file)


def explicit_logits(tensors: Release, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the base with scale (B ⊙ M) A x added to W0 x by hooks on its nn.Linear layers."""
    model = tiny_llama().eval()
    scale = ALPHA / R
    for path, linear in _adapted(model).items():
        A, B, M = (t.float() for t in tensors[path])
        linear.register_forward_hook(
            lambda mod, inp, out, A=A, BM=B * M: out + scale * F.linear(F.linear(inp[0], A), BM)
        )
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def lori_logits(directory: Path, mask_file: Path | None, input_ids: torch.Tensor):
    """Logits (and the model) of a fresh base with the release loaded by lori."""
    model = tiny_llama()
    apply_adapter(model, load_adapter(directory, mask_file=mask_file))
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits, model


INPUT = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_released_lori_s_adapter_with_its_mask_file(tmp_path, dtype):
    tensors = _released_tensors(dtype, sparse=True)
    write_release(tmp_path / "LoRI-S_task", tensors, tmp_path / "masks.pt")
    got, model = lori_logits(tmp_path / "LoRI-S_task", tmp_path / "masks.pt", INPUT)
    torch.testing.assert_close(got, explicit_logits(tensors, INPUT))
    assert not torch.allclose(got, tiny_llama().eval()(input_ids=INPUT).logits)  # the adapter acts
    masks = get_masks(model)
    assert set(masks) == set(tensors)
    assert all(torch.equal(masks[p], tensors[p][2]) for p in tensors)
    # LoRI-S trains the mask entries only
    assert count_trainable(model) == sum(int(M.sum()) for _, _, M in tensors.values())


def test_released_lori_d_adapter_without_masks(tmp_path):
    tensors = _released_tensors(torch.float32, sparse=False)
    write_release(tmp_path / "LoRI-D_task", tensors, None)
    got, model = lori_logits(tmp_path / "LoRI-D_task", None, INPUT)
    torch.testing.assert_close(got, explicit_logits(tensors, INPUT))
    assert count_trainable(model) == sum(B.numel() for _, B, _ in tensors.values())
    adapter = load_adapter(tmp_path / "LoRI-D_task")
    assert (adapter.config.r, adapter.config.alpha, adapter.config.scale) == (R, ALPHA, ALPHA / R)
    assert sorted(adapter.config.target_modules) == sorted(TARGETS)
    assert adapter.base_model == "meta-llama/Meta-Llama-3-8B"


def test_peft_reads_the_written_release_the_same(tmp_path):
    """The hand-written files are a real PEFT adapter: PeftModel gives lori's logits."""
    tensors = _released_tensors(torch.float32, sparse=True)
    write_release(tmp_path / "LoRI-S_task", tensors, tmp_path / "masks.pt")
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "LoRI-S_task")).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=INPUT).logits
    ours, _ = lori_logits(tmp_path / "LoRI-S_task", tmp_path / "masks.pt", INPUT)
    torch.testing.assert_close(peft_logits, ours)


def test_released_mask_keys_become_module_paths(tmp_path):
    tensors = _released_tensors(torch.float32, sparse=True)
    write_release(tmp_path / "a", tensors, tmp_path / "masks.pt")
    raw = torch.load(tmp_path / "masks.pt", weights_only=True)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight" in raw
    masks = load_masks(tmp_path / "masks.pt")
    assert set(masks) == set(tensors) and "model.layers.0.self_attn.q_proj" in masks
    assert all(m.dtype == torch.bool for m in masks.values())


class _Payload:
    """Not a tensor: unpickling it would need code from this module."""


def test_mask_file_is_read_without_running_pickle_code(tmp_path):
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight": _Payload()},
               tmp_path / "evil.pt")
    with pytest.raises(AdapterFileError, match="cannot read mask file"):
        load_masks(tmp_path / "evil.pt")


def test_mask_file_of_another_model_is_refused(tmp_path):
    tensors = _released_tensors(torch.float32, sparse=True)
    write_release(tmp_path / "a", tensors, None)
    wrong = {f"base_model.model.{p}.lora_B.default.weight": M[:, :2] for p, (_, _, M) in tensors.items()}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="mask of"):
        load_adapter(tmp_path / "a", mask_file=tmp_path / "wrong.pt")
