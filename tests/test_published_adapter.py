"""Released LoRI adapters load as published: PEFT 0.12 LoRA folders + the original code's mask files.

The original code (github.com/juzhengz/LoRI) saves adapters with PEFT 0.12's
``policy.save_pretrained(dir, state_dict=...)`` (mask_trainers.py l.464/480): adapter_config.json +
adapter_model.safetensors with ``...lora_A.weight`` / ``...lora_B.weight`` keys, and, because
train_lori.py l.77-81 adds a '<PAD>' token and resizes the embeddings (Llama-3 and Mistral have no
pad token), PEFT's save_embedding_layers="auto" also writes the whole ``embed_tokens`` and
``lm_head`` weights (vocab + 1 rows) whenever it can read the base's config.json. Its
extract_mask.py writes a LoRI-D run's masks with ``torch.save`` to ``<adapter>/masks/<s>_mask.pt``:
a dict of bool CPU tensors of B's shape keyed by PeftModel parameter names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight``), the mask being
``|B| >= the k-th largest |B|`` over all B, k = int((1 - s) N). These tests write exactly that
layout for a tiny Llama (the mask file from a real PeftModel's parameter names), load it with lori
and compare the logits with the explicit formula

    y = W0 x + (alpha / r) * (B ⊙ M) A x        (LoRI-S; M = 1 for LoRI-D)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn

from lori.core import (
    AdapterFileError,
    AdapterMismatchError,
    apply_adapter,
    count_trainable,
    get_A,
    get_B,
    get_masks,
    load_adapter,
    load_masks,
)
from lori.core.adapter import SAVED_EMBEDDINGS, a_digest
from lori.core.io import MaskRecord, find_mask_file, official_mask_path, read_mask_record
from lori.training.base_model import tiny_llama
from lori.training.callbacks import SparsePhase

R, ALPHA = 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OFFICIAL_ORDER = ["k_proj", "gate_proj", "v_proj", "up_proj", "q_proj", "o_proj", "down_proj"]  # train_lori.py l.90
VOCAB = tiny_llama().config.vocab_size


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


def _lori_d_tensors(dtype: torch.dtype = torch.float32) -> Release:
    """(A, B, M = 1) per module path: a dense LoRI-D adapter."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for path, linear in _adapted(tiny_llama()).items():
        A = (torch.rand(R, linear.in_features, generator=g) - 0.5).to(dtype)
        B = torch.randn(linear.out_features, R, generator=g).to(dtype)
        out[path] = (A, B, torch.ones(B.shape, dtype=torch.bool))
    return out


def _lori_s_tensors(lori_d: Release, masks: dict[str, torch.Tensor], dtype: torch.dtype) -> Release:
    """The LoRI-S adapter of that run: the same A, B trained from 0 inside M (zero outside)."""
    g = torch.Generator().manual_seed(2)
    return {p: (A.to(dtype), (torch.randn(B.shape, generator=g) * masks[p]).to(dtype), masks[p])
            for p, (A, B, _) in lori_d.items()}


def peft_model_of(tensors: Release) -> PeftModel:
    """The original code's PeftModel (LoraConfig of train_lori.py l.84-92) holding these A and B."""
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                        target_modules=OFFICIAL_ORDER)
    model = get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for path, (A, B, _) in tensors.items():
            layer = model.base_model.model.get_submodule(path)
            layer.lora_A["default"].weight.copy_(A.float())
            layer.lora_B["default"].weight.copy_(B.float())
    return model


def write_official_masks(peft_model: PeftModel, adapter_dir: Path, sparsity: float = 0.9) -> Path:
    """A mask file as extract_mask.py get_model_mask writes it (l.65-100), from a real PeftModel."""
    named = {n: p.detach() for n, p in peft_model.named_parameters() if "lora_B.default.weight" in n}
    flat = torch.cat([b.abs().reshape(-1) for b in named.values()])
    threshold = torch.topk(flat, int((1 - sparsity) * flat.numel())).values[-1]
    masks = {n: (b.abs() >= threshold).to("cpu") for n, b in named.items()}
    path = adapter_dir / "masks" / f"{sparsity}_mask.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(masks, path)
    return path


def write_peft_012_dir(directory: Path, tensors: Release, embeddings: dict[str, torch.Tensor] | None = None,
                       extra: dict[str, torch.Tensor] | None = None) -> Path:
    """An adapter dir as PEFT 0.12's save_pretrained writes it (plus saved embedding weights, if given)."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps(_peft_012_config(), indent=2, sort_keys=True))
    state = {}
    for path, (A, B, _) in tensors.items():
        state[f"base_model.model.{path}.lora_A.weight"] = A.contiguous()
        state[f"base_model.model.{path}.lora_B.weight"] = B.contiguous()
    state |= embeddings or {}
    state |= extra or {}
    save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


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


@pytest.fixture(scope="module")
def lori_d_release(tmp_path_factory) -> tuple[Path, Release, Path]:
    """A LoRI-D adapter dir with its extracted masks/0.9_mask.pt, as the original scripts leave it."""
    tensors = _lori_d_tensors()
    directory = write_peft_012_dir(tmp_path_factory.mktemp("release") / "LoRI-D_task", tensors)
    return directory, tensors, write_official_masks(peft_model_of(tensors), directory)


# ---- the official mask file ---------------------------------------------------------------
def test_official_mask_file_is_what_extract_mask_writes(lori_d_release):
    directory, tensors, mask_file = lori_d_release
    assert mask_file == directory / "masks" / "0.9_mask.pt" == official_mask_path(directory, 0.9)
    raw = torch.load(mask_file, weights_only=True)
    expected = {f"base_model.model.{p}.lora_B.default.weight" for p in tensors}
    assert set(raw) == expected and "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight" in raw
    for key, m in raw.items():
        path = key.removeprefix("base_model.model.").removesuffix(".lora_B.default.weight")
        assert m.dtype == torch.bool and m.device.type == "cpu" and m.shape == tensors[path][1].shape == (m.shape[0], R)
    n = sum(B.numel() for _, B, _ in tensors.values())
    assert sum(int(m.sum()) for m in raw.values()) >= int(0.1 * n)  # ties kept: at least k
    masks = load_masks(mask_file)
    assert set(masks) == set(tensors) and "model.layers.0.self_attn.q_proj" in masks
    assert all(torch.equal(masks[p], raw[f"base_model.model.{p}.lora_B.default.weight"]) for p in tensors)


def test_official_mask_has_no_record_and_is_found_by_sparsity(lori_d_release):
    directory, _, mask_file = lori_d_release
    assert read_mask_record(mask_file) is None  # its A cannot be checked
    assert find_mask_file(directory, 0.9) == mask_file
    with pytest.raises(AdapterFileError, match="0.5_mask.pt"):
        find_mask_file(directory, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_released_lori_s_adapter_with_its_mask_file(tmp_path, lori_d_release, dtype):
    _, lori_d, mask_file = lori_d_release
    tensors = _lori_s_tensors(lori_d, load_masks(mask_file), dtype)
    write_peft_012_dir(tmp_path / "LoRI-S_task", tensors)
    got, model = lori_logits(tmp_path / "LoRI-S_task", mask_file, INPUT)
    torch.testing.assert_close(got, explicit_logits(tensors, INPUT))
    assert not torch.allclose(got, tiny_llama().eval()(input_ids=INPUT).logits)  # the adapter acts
    masks = get_masks(model)
    assert set(masks) == set(tensors)
    assert all(torch.equal(masks[p], tensors[p][2]) for p in tensors)
    # LoRI-S trains the mask entries only
    assert count_trainable(model) == sum(int(M.sum()) for _, _, M in tensors.values())


def test_released_lori_d_adapter_without_masks(lori_d_release):
    directory, tensors, _ = lori_d_release
    got, model = lori_logits(directory, None, INPUT)
    torch.testing.assert_close(got, explicit_logits(tensors, INPUT))
    assert count_trainable(model) == sum(B.numel() for _, B, _ in tensors.values())
    adapter = load_adapter(directory)
    assert (adapter.config.r, adapter.config.alpha, adapter.config.scale) == (R, ALPHA, ALPHA / R)
    assert sorted(adapter.config.target_modules) == sorted(TARGETS)
    assert adapter.base_model == "meta-llama/Meta-Llama-3-8B"
    assert SAVED_EMBEDDINGS not in adapter.meta


def test_peft_reads_the_written_release_the_same(tmp_path, lori_d_release):
    """The hand-written files are a real PEFT adapter: PeftModel gives lori's logits."""
    _, lori_d, mask_file = lori_d_release
    tensors = _lori_s_tensors(lori_d, load_masks(mask_file), torch.float32)
    write_peft_012_dir(tmp_path / "LoRI-S_task", tensors)
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "LoRI-S_task")).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=INPUT).logits
    ours, _ = lori_logits(tmp_path / "LoRI-S_task", mask_file, INPUT)
    torch.testing.assert_close(peft_logits, ours)


def test_lori_s_stage_takes_the_official_mask_file(lori_d_release):
    """SparsePhase (the LoRI-S stage's callback) installs the .pt masks and restarts B from zero."""
    directory, tensors, mask_file = lori_d_release
    model = tiny_llama()
    apply_adapter(model, load_adapter(directory))
    module = SimpleNamespace(model=model, phase="dense")
    phase = SparsePhase(mask_file, reset=True)
    assert phase.record is None
    phase.setup(None, module, "fit")
    masks = load_masks(mask_file)
    assert module.phase == "sparse" and all(torch.equal(get_masks(model)[p], masks[p]) for p in tensors)
    assert all(not b.any() for b in get_B(model).values())  # LoRI-S: B := 0, the same A
    assert all(torch.equal(get_A(model)[p], tensors[p][0]) for p in tensors)


def test_lori_s_stage_refuses_a_mask_file_of_another_A(tmp_path, lori_d_release):
    directory, _, mask_file = lori_d_release
    model = tiny_llama()
    apply_adapter(model, load_adapter(directory))
    masks = load_masks(mask_file)
    wrong = MaskRecord(seed=9, digest="0123456789abcdef", r=R, sparsity=0.9, granularity="model")
    save_file(masks, str(tmp_path / "other.safetensors"), metadata=wrong.to_metadata())
    with pytest.raises(AdapterMismatchError, match="calibrated under A seed 9 .digest 0123456789abcdef."):
        SparsePhase(tmp_path / "other.safetensors").setup(None, SimpleNamespace(model=model, phase="dense"), "fit")
    right = MaskRecord(seed=None, digest=a_digest(get_A(model)), r=R, sparsity=0.9, granularity="model")
    save_file(masks, str(tmp_path / "right.safetensors"), metadata=right.to_metadata())
    SparsePhase(tmp_path / "right.safetensors").setup(None, SimpleNamespace(model=model, phase="dense"), "fit")
    assert get_masks(model).keys() == masks.keys()


# ---- PEFT 0.12 with the resized vocabulary ------------------------------------------------
def _saved_embeddings(rows: int) -> dict[str, torch.Tensor]:
    """embed_tokens / lm_head as PEFT saves them after the '<PAD>' resize: the base rows, then the new ones."""
    base = tiny_llama()
    g = torch.Generator().manual_seed(5)
    out = {}
    for key, weight in (("base_model.model.model.embed_tokens.weight", base.model.embed_tokens.weight),
                        ("base_model.model.lm_head.weight", base.lm_head.weight)):
        new = torch.randn(rows - VOCAB, weight.shape[1], generator=g)
        out[key] = torch.cat([weight.detach(), new]).contiguous()
    return out


def test_peft_012_dir_with_resized_embeddings_loads(tmp_path, lori_d_release):
    _, tensors, _ = lori_d_release
    embeddings = _saved_embeddings(VOCAB + 1)
    directory = write_peft_012_dir(tmp_path / "LoRI-D_resized", tensors, embeddings)
    adapter = load_adapter(directory)
    saved = adapter.meta[SAVED_EMBEDDINGS]
    assert saved["shapes"] == {"model.embed_tokens": [VOCAB + 1, 32], "lm_head": [VOCAB + 1, 32]}
    assert "'<PAD>'" in saved["reason"] and "train_lori.py" in saved["reason"]
    got, _ = lori_logits(directory, None, INPUT)  # on the base as published: VOCAB rows
    torch.testing.assert_close(got, explicit_logits(tensors, INPUT))
    # the original code's evaluation: the base resized to VOCAB + 1, PEFT loading the saved rows too
    base = tiny_llama()
    base.resize_token_embeddings(VOCAB + 1)
    peft_model = PeftModel.from_pretrained(base, str(directory)).eval()
    assert torch.equal(peft_model.get_input_embeddings().weight, embeddings["base_model.model.model.embed_tokens.weight"])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=INPUT).logits[..., :VOCAB], got)
    resized = tiny_llama()  # lori also takes it onto the resized base (the saved rows are then its vocabulary)
    resized.resize_token_embeddings(VOCAB + 1)
    apply_adapter(resized, adapter)


def test_saved_embeddings_of_another_vocabulary_are_refused(tmp_path, lori_d_release):
    _, tensors, _ = lori_d_release
    directory = write_peft_012_dir(tmp_path / "d", tensors, _saved_embeddings(VOCAB + 1))
    adapter = load_adapter(directory)
    with pytest.raises(AdapterMismatchError, match=rf"\({VOCAB + 1} x 32\), this base has \({VOCAB + 5} x 32\).*'<PAD>'"):
        apply_adapter(tiny_llama(vocab_size=VOCAB + 5), adapter)
    two_more = write_peft_012_dir(tmp_path / "e", tensors, _saved_embeddings(VOCAB + 2))
    with pytest.raises(AdapterMismatchError, match="use the base the adapter was trained on"):
        apply_adapter(tiny_llama(), load_adapter(two_more))


def test_other_non_lora_keys_are_refused_with_what_to_do(tmp_path, lori_d_release):
    _, tensors, _ = lori_d_release
    directory = write_peft_012_dir(tmp_path / "d", tensors, extra={"base_model.model.model.norm.weight": torch.ones(32)})
    with pytest.raises(AdapterFileError, match=r"'base_model.model.model.norm.weight'.*LoRA adapters only"):
        load_adapter(directory)


# ---- bad mask files -----------------------------------------------------------------------
class _Payload:
    """Not a tensor: unpickling it would need code from this module."""


def test_mask_file_is_read_without_running_pickle_code(tmp_path):
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight": _Payload()},
               tmp_path / "evil.pt")
    with pytest.raises(AdapterFileError, match="cannot read mask file"):
        load_masks(tmp_path / "evil.pt")


def test_mask_file_of_another_model_is_refused(tmp_path, lori_d_release):
    directory, tensors, _ = lori_d_release
    wrong = {f"base_model.model.{p}.lora_B.default.weight": M[:, :2] for p, (_, _, M) in tensors.items()}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="mask of"):
        load_adapter(directory, mask_file=tmp_path / "wrong.pt")
