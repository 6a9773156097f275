"""model.gradient_checkpointing: every decoder layer recomputed in backward (non-reentrant), on a
frozen base with or without a quantized base, gives B the plain run's gradient (the reentrant trap:
no input of a checkpointed segment requires grad, so B would silently get none), and LoRI-S's
entries outside the mask still never change. The strategies (DDP, FSDP) run in tests marked slow."""

from __future__ import annotations

import pytest
import torch
import yaml
from pipeline_helpers import by_kind, multiprocess_config, run_lori
from safetensors.torch import load_file

from lori.core import LoRIConfig, calibrate, get_B, inject_lori, lori_layers, set_masks
from lori.training.activation_checkpointing import (
    CheckpointingError,
    enable_activation_checkpointing,
    is_checkpointing,
)
from lori.training.base_model import tiny_llama
from lori.training.quantize import quantize_base

LORI = LoRIConfig(r=4, alpha=8.0, dropout=0.1, seed=3)


def _adapted(quantize: str | None, phase: str, checkpointing: bool) -> torch.nn.Module:
    model = tiny_llama()
    if quantize is not None:
        quantize_base(model, quantize, torch.float32)
    inject_lori(model, LORI)
    g = torch.Generator().manual_seed(5)
    for layer in lori_layers(model).values():  # B != 0, so the gradient reaching x runs through B too
        layer.lori_B.data.copy_(torch.randn(layer.lori_B.shape, generator=g) * 0.1)
    if phase == "sparse":
        set_masks(model, calibrate(get_B(model), 0.5, "model"))
    if checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def _step(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """B's gradients after one backward (dropout drawn from seed 0), and how often layer 0's attention ran."""
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)


@pytest.mark.parametrize(("quantize", "phase"), [(None, "dense"), ("nf4", "sparse")])
def test_B_gets_the_plain_runs_gradient(quantize, phase):
    plain, plain_calls = _step(_adapted(quantize, phase, False))
    ckpt, ckpt_calls = _step(_adapted(quantize, phase, True))
    assert (plain_calls, ckpt_calls) == (1, 2)  # the layer really is recomputed in backward
    assert plain.keys() == ckpt.keys() and plain
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name  # B gets a gradient at all (the reentrant trap gives None)
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_lori_s_entries_outside_the_mask_never_change_under_checkpointing():
    model = _adapted("nf4", "sparse", True)
    set_masks(model, {p: m.lori_mask for p, m in lori_layers(model).items()}, reset=True)  # LoRI-S restart
    before = {p: b.clone() for p, b in get_B(model).items()}
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lori_" not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    after = get_B(model)
    for path, layer in lori_layers(model).items():
        outside = ~layer.lori_mask
        assert torch.equal(after[path][outside], before[path][outside]), path
        assert not torch.equal(after[path][layer.lori_mask], before[path][layer.lori_mask]), path
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())  # the base, quantized or not


def test_a_model_without_decoder_layers_is_refused_in_one_line():
    with pytest.raises(CheckpointingError, match="gradient_checkpointing: Linear"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_module_setting_turns_checkpointing_on(monkeypatch):
    import lori.training.module as module

    monkeypatch.setattr(module, "build_model", lambda *args, **kwargs: (tiny_llama(), None))
    assert is_checkpointing(module.LoRIModule(model="tiny", gradient_checkpointing=True).model)
    assert not is_checkpointing(module.LoRIModule(model="tiny").model)


# ---- strategies: two CPU processes on gloo ------------------------------------------------
def _run(tmp_path, name: str, devices: int, strategy, model: dict) -> dict:
    path = multiprocess_config(tmp_path, name, devices, strategy)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"].update(model)
    path.write_text(yaml.safe_dump(cfg))
    done = run_lori("pipeline", "--config", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    return by_kind(load_file(str(tmp_path / name / "dump" / f"sparse_rank0_of{devices}.safetensors")), "B")


FSDP_UNITS = {"class_path": "fsdp_cpu.CPUFSDPStrategy", "init_args": {
    "auto_wrap_policy": ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"],
    "sharding_strategy": "FULL_SHARD", "state_dict_type": "full"}}


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "quantize"), [("ddp", "nf4"), (FSDP_UNITS, None)], ids=["ddp-nf4", "fsdp"])
def test_checkpointing_under_a_strategy_ends_where_one_plain_process_ends(tmp_path, strategy, quantize):
    one = _run(tmp_path, "one", 1, "auto", {"quantize": quantize})
    two = _run(tmp_path, "two", 2, strategy, {"quantize": quantize, "gradient_checkpointing": True})
    assert any(torch.count_nonzero(b) for b in two.values())
    for path, b in one.items():
        torch.testing.assert_close(two[path], b, rtol=1e-4, atol=1e-5, msg=path)
