"""Baselines through the same LightningModule: only the intended tensors train, and are saved."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from pipeline_helpers import tiny_config, write_config
from torch.utils.data import DataLoader

import lori.module
from lori.baselines import METHODS
from lori.cli import main, parse_config
from lori.core import AdapterFileError, load_adapter
from lori.models import tiny_llama
from lori.module import CheckpointMismatchError, LoRIModule

LORI = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"], "seed": 3}
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "experiment"


@pytest.fixture
def tiny(monkeypatch):
    """LoRIModule builds a 2-layer random Llama (vocab 128) without loading any tokenizer."""
    monkeypatch.setattr(lori.module, "build_model", lambda *args, **kwargs: (tiny_llama(), None))


def _module(method: str, **kwargs) -> LoRIModule:
    return LoRIModule(model="tiny", method=method, lori=LORI, lr=0.01, **kwargs)


def _batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (2, 10), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _trainer(steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )


def _fit(module: LoRIModule, steps: int = 3) -> None:
    _trainer(steps).fit(module, DataLoader(_batches(), batch_size=None))


def _state(module: LoRIModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("method", METHODS)
def test_only_the_intended_tensors_train(tiny, method):
    module = _module(method)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    before = _state(module)
    _fit(module)
    changed = _changed(before, _state(module))
    if method in ("lori", "lora_fa"):
        assert trainable and all(n.endswith(".lori_B") for n in trainable)
        assert changed == trainable  # A (a buffer) and the base bit-identical
        assert not any(k.endswith(".lori_A") for k in changed)
    elif method in ("lora", "dora"):
        assert changed == trainable  # the base bit-identical
        assert any(".lora_A." in k for k in changed) and any(".lora_B." in k for k in changed)
        assert any("magnitude" in k for k in changed) == (method == "dora")
    else:
        assert "model.layers.0.self_attn.q_proj.weight" in changed
        assert "model.layers.1.mlp.gate_proj.weight" in changed  # not a LoRI target: trained too
    optimizer = module.trainer.optimizers[0]
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in module.model.parameters() if p.requires_grad
    )


def test_lora_fa_is_lori_with_sparsity_zero(tiny):
    module = _module("lora_fa")
    assert module.lori_config.sparsity == 0.0 and module.hparams.lori["sparsity"] == 0.0
    ref = _module("lori")
    assert all(torch.equal(a, b) for a, b in zip(module.model.buffers(), ref.model.buffers()))


def test_lora_init_is_seeded_not_global_rng(tiny):
    torch.manual_seed(1)
    first = _state(_module("lora"))
    torch.manual_seed(2)
    second = _state(_module("lora"))
    assert not _changed(first, second)
    assert not _changed(first, _state(LoRIModule(model="tiny", method="lora", lori=LORI)))
    other = _state(LoRIModule(model="tiny", method="lora", lori=LORI | {"seed": 4}))
    assert any(".lora_A." in k for k in _changed(first, other))


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_keeps_what_the_method_trains(tiny, method):
    module = _module(method)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    keys = set(checkpoint["state_dict"])
    assert checkpoint["lori"]["method"] == method
    if method in ("lori", "lora_fa"):
        assert keys and all(".lori_" in k for k in keys)
    elif method in ("lora", "dora"):
        assert keys == {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    else:
        assert keys == set(module.state_dict())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpoint_round_trip_and_method_check(tiny, tmp_path, method):
    module = _module(method)
    trainer = _trainer(2)
    trainer.fit(module, DataLoader(_batches(), batch_size=None))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    fresh = _module(method)
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=fresh.strict_loading)
    assert not _changed(_state(module), _state(fresh))
    with pytest.raises(CheckpointMismatchError, match=f"method '{method}'"):
        _module("dora" if method == "lora" else "lora").on_load_checkpoint(ckpt)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_adapter_reloads_with_peft(tiny, tmp_path, method):
    from peft import PeftModel

    module = _module(method)
    _fit(module)
    module.save_adapter(tmp_path / "adapter", stage="test")
    module.model.eval()
    ids = _batches(1)[0]["input_ids"]
    with torch.no_grad():
        want = module.model(input_ids=ids).logits
        got = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-5)
    if method == "lora":  # lori reads it back as an adapter with the base identity, for merging
        adapter = load_adapter(tmp_path / "adapter")
        assert adapter.base_fingerprint == module.fingerprint
        assert adapter.meta["method"] == "lora" and adapter.meta["stage"] == "test"
        layer = module.model.get_submodule("model.layers.0.self_attn.q_proj")
        assert torch.allclose(adapter.delta("model.layers.0.self_attn.q_proj"), layer.get_delta_weight("default"))


def test_lori_adapter_from_save_adapter(tiny, tmp_path):
    module = _module("lora_fa")
    _fit(module, 2)
    module.save_adapter(tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.config.sparsity == 0.0 and adapter.masks is None
    assert adapter.meta["method"] == "lora_fa" and adapter.base_fingerprint == module.fingerprint


def test_full_model_reloads_with_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    module = _module("full")
    _fit(module, 2)
    module.save_adapter(tmp_path / "model")
    module.model.eval()
    ids = _batches(1)[0]["input_ids"]
    with torch.no_grad():
        want = module.model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-6)


def test_unknown_method_and_bad_target_are_one_line_errors(tiny):
    with pytest.raises(ValueError, match="unknown method 'qlora'"):
        _module("qlora")
    with pytest.raises(ValueError, match="query_key_value"):
        LoRIModule(model="tiny", method="lora", lori=LORI | {"target_modules": ["query_key_value"]})


def test_fit_command_writes_the_peft_adapter(tmp_path):
    """`lori fit` with a baseline config trains and writes the adapter through SaveAdapter."""
    cfg = tiny_config(tmp_path)
    cfg.pop("pipeline")
    cfg["model"]["method"] = "lora"
    cfg["trainer"] |= {
        "max_steps": 2, "logger": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path),
        "callbacks": [{"class_path": "lori.callbacks.SaveAdapter",
                       "init_args": {"directory": str(tmp_path / "adapter"), "stage": "lora"}}],
    }
    main(["fit", "--config", str(write_config(tmp_path, cfg))])
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.meta["method"] == "lora" and adapter.meta["global_step"] == 2
    assert any(torch.count_nonzero(b) for b in adapter.B.values())


@pytest.mark.parametrize("name,method", [("lora", "lora"), ("dora", "dora"), ("lora_fa", "lora_fa"),
                                         ("full_ft", "full")])
def test_baseline_configs_differ_from_default_only_in_method(name, method):
    cfg = parse_config(CONFIGS / f"{name}.yaml")
    assert cfg["model"]["method"] == method
    default, mine = (yaml.safe_load((CONFIGS / f"{n}.yaml").read_text()) for n in ("default", name))
    assert mine["model"].pop("method") == method
    assert mine["data"] == default["data"] and mine["model"] == default["model"]
    assert mine["seed_everything"] == default["seed_everything"]
    extra = {k: v for k, v in mine["trainer"].items() if k not in default["trainer"]}
    assert set(extra) == {"max_steps", "callbacks", "logger"}
    assert extra["callbacks"][0]["class_path"] == "lori.callbacks.SaveAdapter"
    assert {k: mine["trainer"][k] for k in default["trainer"]} == default["trainer"]


def test_a_dora_adapter_is_not_read_as_lora(tiny, tmp_path):
    _module("dora").save_adapter(tmp_path / "dora")
    with pytest.raises(AdapterFileError, match="magnitude"):
        load_adapter(tmp_path / "dora")
