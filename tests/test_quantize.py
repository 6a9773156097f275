"""model.quantize: a frozen base stored in NF4, FP4 or int8 (bitsandbytes' CPU backend runs them forward
and backward). Every linear layer but the LM head is stored quantized, the LoRI-adapted ones too; only B
trains and the base's storage is bit-identical after training; LoRI-S keeps the entries outside its mask;
calibration, resume and ``lori eval`` (unmerged) run on it; adapter files move between a quantized and an
unquantized base both ways; merging into it is refused; the PEFT baselines train on the same base; a method
that trains the base, or a missing bitsandbytes, stops in one line before anything loads."""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from pipeline_helpers import tiny_config, write_config
from test_baselines import LORI, _batches, _changed, _state, _trainer
from test_resume import Crash, CrashAt
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

import lori.training.module
from lori.commands.main import main
from lori.core import (
    LoRIConfig,
    QuantizedMergeError,
    adapter_from_model,
    apply_adapter,
    base_fingerprint,
    get_B,
    inject_lori,
    load_adapter,
    lori_layers,
    merge_lori,
    save_adapter,
)
from lori.core.layer import dropout_draw
from lori.training.base_model import resolve_base_dtype, tiny_llama
from lori.training.baselines import PEFT_METHODS
from lori.training.module import LoRIModule
from lori.training.quantize import QUANTIZE_MODES, QuantizeError, quantize_base

TARGETS = LORI["target_modules"]


@pytest.fixture
def tiny_q(monkeypatch):
    """LoRIModule builds the 2-layer random Llama (vocab 128), quantized as ``model.quantize`` says."""
    def build(name, gguf_file, dtype, cache_dir, quantize=None):
        model = tiny_llama()
        if quantize is not None:
            quantize_base(model, quantize, resolve_base_dtype(dtype))
        return model, None

    monkeypatch.setattr(lori.training.module, "build_model", build)


def _ids() -> torch.Tensor:
    return _batches(1)[0]["input_ids"]


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=_ids()).logits


@pytest.mark.parametrize("mode", QUANTIZE_MODES)
def test_every_linear_but_the_lm_head_is_stored_quantized(mode):
    wide = {"hidden_size": 128, "intermediate_size": 256}  # wide enough for the per-layer constants not to dominate
    plain, model = tiny_llama(**wide), tiny_llama(**wide)
    info = quantize_base(model, mode, torch.float32)
    kept = [p for p, m in model.named_modules() if type(m) is nn.Linear]
    quantized = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and type(m) is not nn.Linear]
    assert kept == ["lm_head"] and info["kept"] == kept
    assert len(quantized) == info["layers"] == 14  # 7 per decoder layer
    ratio = info["quantized_bytes"] / info["unquantized_bytes"]  # of fp32: 1/8 (4-bit), 1/4 (int8) + scales
    assert (0.125 < ratio < 0.16) if mode != "int8" else (0.25 < ratio < 0.27), ratio
    assert base_fingerprint(model, quantized) == base_fingerprint(plain, quantized)  # the unquantized base's
    a, b = _logits(plain), _logits(model)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95  # the same function, rounded


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_only_B_trains_and_the_quantized_storage_stays_bit_identical(tiny_q, mode):
    module = LoRIModule(model="tiny", lori=LORI, lr=0.01, quantize=mode)
    layers = lori_layers(module.model)
    assert layers and all(type(m.base_layer) is not nn.Linear for m in layers.values())  # LoRILinear wraps it
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert all(".lori_B" in n for n in trainable) and {p.dtype for p in module.model.parameters()
                                                       if p.requires_grad} == {torch.float32}
    batch = _batches(1)[0]
    with torch.no_grad():
        loss_before = module.model_step(batch).item()
    before = _state(module)
    _trainer(3).fit(module, DataLoader(_batches(), batch_size=None))
    assert _changed(before, _state(module)) == trainable  # A, codes, scales, absmax: untouched
    with torch.no_grad():
        assert module.model_step(batch).item() < loss_before
    assert f"{mode} (bitsandbytes)" in module.precision_info()["storage"]


def test_resume_on_a_quantized_base_ends_as_an_uninterrupted_run(tiny_q, tmp_path):
    loader = DataLoader(_batches(1), batch_size=None)
    uninterrupted = LoRIModule(model="tiny", lori=LORI, lr=0.01, quantize="nf4")
    _trainer(4).fit(uninterrupted, loader)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    with pytest.raises(Crash):
        _trainer(4, callbacks=[CrashAt(2), ckpt], enable_checkpointing=True).fit(
            LoRIModule(model="tiny", lori=LORI, lr=0.01, quantize="nf4"), loader)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(".lori_" in k for k in state)  # only the adapter: the quantized base is rebuilt, not saved
    resumed = LoRIModule(model="tiny", lori=LORI, lr=0.01, quantize="nf4")
    _trainer(4).fit(resumed, loader, ckpt_path=str(tmp_path / "last.ckpt"))
    for want, got in zip(get_B(uninterrupted.model).values(), get_B(resumed.model).values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_adapter_files_move_between_quantized_and_unquantized_bases(tmp_path):
    config = LoRIConfig(r=4, alpha=8.0, target_modules=TARGETS, seed=3)
    plain = tiny_llama()
    inject_lori(plain, config)
    for layer in lori_layers(plain).values():
        layer.lori_B.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(layer.path)))
    save_adapter(adapter_from_model(plain, config, "tiny"), tmp_path / "plain")
    quantized = tiny_llama()
    quantize_base(quantized, "nf4", torch.float32)
    apply_adapter(quantized, load_adapter(tmp_path / "plain"))  # strict base check: same fingerprint
    for a, b in zip(get_B(plain).values(), get_B(quantized).values()):
        assert torch.equal(a, b)
    cos = torch.nn.functional.cosine_similarity(_logits(plain).flatten(), _logits(quantized).flatten(), dim=0)
    assert cos > 0.95  # the adapter acts on the quantized base as on the plain one, up to the rounding of W0
    save_adapter(adapter_from_model(quantized, config, "tiny"), tmp_path / "quantized")
    back = tiny_llama()
    apply_adapter(back, load_adapter(tmp_path / "quantized"))
    torch.testing.assert_close(_logits(back), _logits(plain), rtol=0, atol=0)  # bit for bit on the plain base


def test_quantizing_releases_the_full_precision_weights_and_the_checkpoints_mapping(tmp_path):
    tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)  # views of one file mapping
    mapped = lambda: [line for line in Path("/proc/self/maps").read_text().splitlines() if str(tmp_path) in line]
    assert mapped()  # (the premise: the loader maps the checkpoint)
    originals = [weakref.ref(m.weight) for m in model.modules() if type(m) is nn.Linear][:-1]  # (not lm_head)
    before = _logits(model)
    quantize_base(model, "nf4", torch.float32, device="cpu")
    gc.collect()
    assert not [ref for ref in originals if ref() is not None]  # no fp32 weight of a quantized layer is left
    assert not mapped()  # the kept parameters own their memory: the checkpoint's pages are unmapped
    assert model.lm_head.weight is model.model.embed_tokens.weight  # ties kept
    assert torch.nn.functional.cosine_similarity(before.flatten(), _logits(model).flatten(), dim=0) > 0.95


def test_the_adapter_beside_a_quantized_layer_saves_no_copy_of_its_input():
    model = tiny_llama(hidden_size=128, intermediate_size=256)
    quantize_base(model, "nf4", torch.float32)
    inject_lori(model, LoRIConfig(r=4, alpha=8.0, dropout=0.05, target_modules=["q_proj"]))
    layer = next(iter(lori_layers(model).values())).train()
    layer.lori_B.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 16, 128, requires_grad=True)
    frozen = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *layer.buffers()]}
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in frozen:
            saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    # h (n x r) and the drops' positions (~n d_in p int64): not a dropped copy of x nor a mask of its size
    assert saved and sum(saved) < x.numel() * x.element_size() / 4
    torch.manual_seed(0)  # the same drops, by the plain formula on the dequantized layer
    drop = dropout_draw(x.numel(), 0.05, x.device)
    x_ref = x.detach().clone().requires_grad_(True)
    kept = x_ref.reshape(-1).index_fill(0, drop, 0).view_as(x_ref)
    B = layer.lori_B.detach().clone().requires_grad_(True)
    want = layer.base_layer(x_ref) + layer.scale / 0.95 * torch.nn.functional.linear(kept @ layer.lori_A.t(), B)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.lori_B.grad, B.grad)


def test_the_adapter_beside_a_quantized_layer_computes_in_the_autocast_dtype():
    model = tiny_llama(hidden_size=128, intermediate_size=256)
    quantize_base(model, "nf4", torch.bfloat16)
    inject_lori(model, LoRIConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj"]))
    layer = next(iter(lori_layers(model).values()))
    layer.lori_B.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 16, 128, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        base = layer.base_layer(x)
    # the adapter's two matmuls in bf16, as autocast asks, then cast to the base output's dtype
    h = torch.mm(x.reshape(-1, 128).bfloat16(), layer.lori_A.bfloat16().t())
    delta = torch.mm(h, layer.lori_B.detach().bfloat16().t()).mul_(layer.scale).view(3, 16, -1)
    assert y.dtype == base.dtype
    assert torch.equal(y, base + delta.to(base.dtype))
    in_fp32 = layer.scale * (x @ layer.lori_A.t()) @ layer.lori_B.detach().t()
    assert not torch.equal(y, base + in_fp32.to(base.dtype))  # the fp32 adapter is another result here
    y.sum().backward()
    assert layer.lori_B.grad.dtype == torch.float32  # B and its gradient stay fp32


def test_merging_into_a_quantized_base_is_refused_and_changes_nothing():
    model = tiny_llama()
    quantize_base(model, "nf4", torch.float32)
    inject_lori(model, LoRIConfig(r=4, alpha=8.0, target_modules=TARGETS))
    for layer in lori_layers(model).values():
        layer.lori_B.data.fill_(0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(QuantizedMergeError, match="refusing to merge into .*stored quantized.*merge: false"):
        merge_lori(model)
    assert not any(layer.merged for layer in lori_layers(model).values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    delta = next(iter(lori_layers(model).values())).delta_weight()
    assert delta.dtype == torch.float32 and delta.abs().sum() > 0  # ΔW itself is still there to read


# one of each PEFT layer kind on bitsandbytes (rsLoRA and LoRA+ are LoRA's layer with another scale / optimizer)
@pytest.mark.parametrize("method", [m for m in PEFT_METHODS if m not in ("pissa", "rslora", "loraplus")])
def test_peft_baselines_train_on_the_quantized_base(tiny_q, method):
    module = LoRIModule(model="tiny", method=method, lori=LORI, lr=0.01, quantize="nf4")
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    before = _state(module)
    _trainer(2).fit(module, DataLoader(_batches(2), batch_size=None))
    changed = _changed(before, _state(module))
    assert changed and changed <= trainable  # the quantized base never moves
    base = module.model.model.layers[0].self_attn.q_proj.get_base_layer()
    assert not base.weight.is_floating_point()


@pytest.mark.parametrize(("method", "mode", "fragment"), [
    ("full", "nf4", "trains every base weight"), ("pissa", "nf4", "residual"), ("dora", "int8", "nf4 or fp4"),
    ("lori", "nf3", "unknown model.quantize 'nf3'"),
])
def test_what_cannot_run_on_a_quantized_base_stops_before_loading(monkeypatch, method, mode, fragment):
    monkeypatch.setattr(lori.training.module, "build_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(QuantizeError, match=fragment):
        LoRIModule(model="tiny", method=method, lori=LORI if method == "lori" else dict(LORI, sparsity=0.0),
                   quantize=mode)


def test_missing_bitsandbytes_is_one_line_with_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec: not installed
    monkeypatch.setattr(lori.training.module, "build_model", lambda *a, **k: pytest.fail("loaded"))
    cfg = tiny_config(tmp_path)
    cfg["model"]["quantize"] = "nf4"
    with pytest.raises(SystemExit) as info:
        main(["pipeline", "--config", str(write_config(tmp_path, cfg))])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("lori: error: ")
    assert "pip install bitsandbytes" in err[-1]


def test_pipeline_and_eval_on_a_quantized_base(tmp_path, capsys):
    """LoRI-D -> calibration -> LoRI-S on an NF4 base, then ``lori eval`` of its adapter unmerged on it."""
    cfg = tiny_config(tmp_path, dense_steps=2, sparse_steps=2, checkpoint_every=5, held_out_loss=False)
    cfg["model"]["quantize"] = "nf4"
    main(["pipeline", "--config", str(write_config(tmp_path, cfg))])
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"]["storage"].startswith("nf4 (bitsandbytes) for 14 linear layers")
    assert "base storage: nf4 (bitsandbytes)" in capsys.readouterr().out  # the printed run summary names it
    lori_s = load_adapter(out / "lori_s")
    kept = sum(int(m.sum()) for m in lori_s.masks.values()) / sum(m.numel() for m in lori_s.masks.values())
    assert abs(kept - 0.1) < 0.01  # calibrated to sparsity 0.9
    assert all(not b[~lori_s.masks[p]].any() for p, b in lori_s.B.items())  # LoRI-S: zero outside the mask
    assert any(b.any() for b in lori_s.B.values())
    main(["eval", "--model", "tiny-llama", "--quantize", "nf4", "--adapter", str(out / "lori_s"), "--merge", "false",
          "--output_dir", str(tmp_path / "eval"), "--eval.tasks", "[gsm8k]", "--eval.max_examples", "2",
          "--eval.max_new_tokens", "4", "--eval.held_out", "4", "--eval.progress", "false"])
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["target"]["quantize"] == "nf4" and report["target"]["merged"] is False
    assert report["results"]["gsm8k"]["n"] == 2


@pytest.mark.slow
def test_continual_on_a_quantized_base_keeps_every_entry_outside_the_task_mask(tmp_path):
    from test_continual import continual_config

    from lori.commands.continual_command import continual

    path = continual_config(tmp_path, "run", model={"quantize": "nf4", "gradient_checkpointing": True},
                            protect_safety=True)
    cfg = yaml.safe_load(path.read_text())
    cfg["eval"]["tasks"] = ["harmbench"]
    path.write_text(yaml.safe_dump(cfg))
    continual(["--config", str(path)])
    safety, task = load_adapter(tmp_path / "run" / "safety" / "lori_s"), load_adapter(tmp_path / "run" / "task")
    changed = 0
    for p, trained in task.masks.items():
        assert torch.equal(task.B[p][~trained], safety.B[p][~trained]), p  # bit-identical outside M_t
        changed += int((task.B[p][trained] != safety.B[p][trained]).sum())
    assert changed > 0
