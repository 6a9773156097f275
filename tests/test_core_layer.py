"""LoRILinear and injection: init == base, only B trains, seeded frozen A, dtypes, families."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_qwen2
from transformers import LlamaConfig, LlamaForCausalLM

from lori.core import (
    InjectionError,
    LoRIConfig,
    LoRIConfigError,
    adapter_listing,
    calibrate,
    count_trainable,
    draw_A,
    get_A,
    inject_lori,
    lori_layers,
    set_masks,
    trainable_parameters,
)


def test_init_output_equals_base(tiny_llama, tokens):
    ref = tiny_llama(tokens).logits
    inject_lori(tiny_llama, LoRIConfig(r=4, alpha=8))
    assert torch.equal(tiny_llama(tokens).logits, ref)


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_qwen2])
def test_injection_covers_all_seven_projections(make):
    model = make()
    layers = inject_lori(model, LoRIConfig(r=4))
    assert len(layers) == 7 * 2
    assert {p.rsplit(".", 1)[-1] for p in layers} == set(LoRIConfig().target_modules)
    rows = adapter_listing(model)
    assert sum(r["trainable"] for r in rows) == count_trainable(model)
    # only B trains; A is a buffer no optimizer can pick up
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith("lori_B") for n in names)
    assert not any("lori_A" in n for n, _ in model.named_parameters())


def test_only_B_changes_under_training(tiny_llama, tokens):
    inject_lori(tiny_llama, LoRIConfig(r=4, alpha=8, dropout=0.0))
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    opt = torch.optim.AdamW(trainable_parameters(tiny_llama), lr=1e-2, weight_decay=0.1)
    tiny_llama.train()
    for _ in range(3):
        loss = tiny_llama(tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = tiny_llama.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("lori_B") for k in changed)
    assert len(changed) == 14


def test_A_is_kaiming_uniform_and_seeded():
    a = draw_A(8, 256, seed=3, path="model.layers.0.mlp.up_proj")
    bound = 1.0 / 256**0.5  # kaiming_uniform_ with a=sqrt(5): bound = 1/sqrt(fan_in)
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert torch.equal(a, draw_A(8, 256, seed=3, path="model.layers.0.mlp.up_proj"))
    assert not torch.equal(a, draw_A(8, 256, seed=4, path="model.layers.0.mlp.up_proj"))
    assert not torch.equal(a, draw_A(8, 256, seed=3, path="model.layers.1.mlp.up_proj"))
    # global RNG state plays no part
    torch.manual_seed(123)
    assert torch.equal(a, draw_A(8, 256, seed=3, path="model.layers.0.mlp.up_proj"))


def test_same_seed_same_A_in_a_fresh_process():
    code = (
        "import torch; from lori.core import draw_A; "
        "a = draw_A(8, 64, seed=7, path='model.layers.1.self_attn.q_proj'); "
        "print(repr(a.double().sum().item()), repr(a[3, 5].item()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    a = draw_A(8, 64, seed=7, path="model.layers.1.self_attn.q_proj")
    assert out == [repr(a.double().sum().item()), repr(a[3, 5].item())]


def test_different_seeds_give_independent_A():
    m1, m2 = make_tiny_llama(), make_tiny_llama()
    inject_lori(m1, LoRIConfig(r=4, seed=0))
    inject_lori(m2, LoRIConfig(r=4, seed=1))
    for (p, a1), a2 in zip(get_A(m1).items(), get_A(m2).values()):
        assert not torch.equal(a1, a2), p


def test_bf16_forward_matches_fp32():
    m32, m16 = make_tiny_llama(), make_tiny_llama().to(torch.bfloat16)
    cfg = LoRIConfig(r=4, alpha=8, dropout=0.0)
    for m in (m32, m16):
        inject_lori(m, cfg)
        for layer in lori_layers(m).values():
            torch.manual_seed(0)
            layer.lori_B.data.copy_(torch.randn(layer.lori_B.shape) * 0.1)
    x = torch.randint(0, 96, (2, 8))
    out32, out16 = m32(x).logits, m16(x).logits
    assert out16.dtype == torch.bfloat16
    assert torch.allclose(out16.float(), out32, atol=0.1, rtol=0.05)
    for layer in lori_layers(m16).values():
        assert layer.delta_weight().dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"r": 0}, "r=0"),
        ({"r": -3}, "r=-3"),
        ({"sparsity": 1.0}, "sparsity=1.0"),
        ({"sparsity": 1.5}, "sparsity=1.5"),
        ({"sparsity": -0.1}, "sparsity=-0.1"),
        ({"granularity": "row"}, "'row'"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"alpha": 0}, "alpha=0"),
    ],
)
def test_bad_config_values_are_named(kwargs, fragment):
    with pytest.raises(LoRIConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        LoRIConfig(**kwargs)


def test_unknown_config_key_is_named():
    with pytest.raises(LoRIConfigError, match="sparsty"):
        LoRIConfig.from_dict({"sparsty": 0.9})


def test_unknown_target_module_is_named(tiny_llama):
    with pytest.raises(InjectionError, match="qq_proj"):
        inject_lori(tiny_llama, LoRIConfig(target_modules=["q_proj", "qq_proj"]))
    assert not lori_layers(tiny_llama)  # nothing half-injected


def test_double_injection_refused(tiny_llama):
    inject_lori(tiny_llama, LoRIConfig(r=2))
    with pytest.raises(InjectionError, match="already"):
        inject_lori(tiny_llama, LoRIConfig(r=2))


def _llama3_8b_meta() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=32, vocab_size=128256,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def test_paper_trainable_counts_on_llama3_8b_meta():
    model = _llama3_8b_meta()
    inject_lori(model, LoRIConfig(r=32, alpha=64))
    n_dense = count_trainable(model)
    assert n_dense == 44_040_192  # paper: 44M (0.54%) for LoRI-D at r=32
    total_base = sum(p.numel() for p in model.parameters()) - n_dense
    assert abs(n_dense / total_base - 0.0054) < 0.0003
    # LoRI-S: calibrate model-wise over random B of the exact shapes (44M entries, real tensors)
    g = torch.Generator().manual_seed(0)
    bs = {p: torch.randn(m.out_features, m.r, generator=g) for p, m in lori_layers(model).items()}
    set_masks(model, calibrate(bs, 0.9, "model"))
    assert count_trainable(model) == 4_404_019  # paper: 4.4M (0.05%)
