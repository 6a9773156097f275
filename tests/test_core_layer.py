"""LoRILinear and injection: init == base, only B trains, seeded frozen A, dtypes, families."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_qwen2
from transformers import LlamaConfig, LlamaForCausalLM

from lori.core import layer as lori_layer
from lori.core import (
    InjectionError,
    LoRIConfig,
    LoRIConfigError,
    LoRILinear,
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
from lori.core.layer import dropout_draw


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


def test_config_edges_that_are_accepted():
    cfg = LoRIConfig(r=1, alpha=0.5, dropout=0.0, sparsity=0.0, target_modules="q_proj", seed=7)
    assert cfg.target_modules == ["q_proj"] and cfg.scale == 0.5
    assert LoRIConfig.from_dict(cfg.to_dict()) == cfg
    assert LoRIConfig(target_modules=("q_proj", "v_proj")).target_modules == ["q_proj", "v_proj"]
    with pytest.raises(LoRIConfigError, match="^target_modules is empty$"):
        LoRIConfig(target_modules=[])
    with pytest.raises(LoRIConfigError, match="^seed must be an int, got seed=1.5$"):
        LoRIConfig(seed=1.5)


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


# ---- the fused forward/backward (lori.core.layer._LoRIMatmul) ------------------------------
def _layer(p: float, masked: bool, dtype: torch.dtype = torch.float64, reset: bool = False) -> LoRILinear:
    torch.manual_seed(0)
    layer = LoRILinear(torch.nn.Linear(12, 10), r=4, alpha=8, dropout=p, seed=0, path="m")
    layer.lori_B.data.normal_()
    if masked:  # without reset, entries outside keep their (non-zero) values; with it they are 0
        layer.set_mask(torch.rand(10, 4) < 0.5, reset=reset)
        layer.lori_B_values.data.normal_()  # kept entries differ from the B they were taken from
    return layer.to(dtype).train()


def _B_eff_reference(layer: LoRILinear) -> torch.Tensor:
    """B_eff by boolean indexing: the frozen B outside the mask, the kept values inside (B ⊙ M
    after a reset); differentiable in the trainable."""
    if layer.lori_mask is None:
        return layer.lori_B
    B = layer.lori_B.detach().clone()
    B[layer.lori_mask] = layer.lori_B_values
    return B


def _reference(layer: LoRILinear, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """y = W0 x + b + scale * B_eff A dropout(x), in plain autograd."""
    p = layer.lori_dropout.p if keep is not None else 0.0
    xd = x if keep is None else x * keep.view_as(x) / (1 - p)
    return layer.base_layer(x) + layer.scale * xd @ layer.lori_A.t() @ _B_eff_reference(layer).t()


def _grads(layer: LoRILinear, y: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> list:
    trainable = layer.lori_B if layer.lori_B_values is None else layer.lori_B_values
    return list(torch.autograd.grad(y, [x, trainable], g))


@pytest.mark.parametrize(("masked", "reset"), [(False, False), (True, False), (True, True)],
                         ids=["dense", "masked", "masked-reset"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_step_equals_autograd_reference(masked, reset, p):
    layer = _layer(p, masked, reset=reset)
    if reset:  # LoRI-S: B_eff = B ⊙ M, zero outside the mask
        assert torch.count_nonzero(layer.B()[~layer.lori_mask]) == 0
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 10, dtype=torch.float64)
    torch.manual_seed(7)
    y = layer(x)
    keep = None
    if p > 0:  # the same draw from the same RNG state
        torch.manual_seed(7)
        drops = dropout_draw(x.numel(), p, x.device)
        keep = torch.ones(x.numel(), dtype=torch.float64).index_fill_(0, drops, 0.0)
        assert 0 < len(drops) < x.numel()
    ref = _reference(layer, x, keep)
    assert torch.allclose(y, ref, atol=1e-12)
    for got, want in zip(_grads(layer, y, x, g), _grads(layer, ref, x, g)):
        assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "autograd"])
def test_update_is_alpha_over_r_times_masked_B_times_A_x(monkeypatch, fused):
    """y - (W0 x + b) = (alpha / r) (B ⊙ M) A x, the numbers written out: alpha 12, r 4, scale 3."""
    if not fused:
        monkeypatch.setattr(LoRILinear, "_fusable", lambda self, x, trainable: False)
    torch.manual_seed(0)
    layer = LoRILinear(torch.nn.Linear(6, 5), r=4, alpha=12, dropout=0.0, seed=3, path="m")
    layer = layer.to(torch.float64)
    B, M = torch.randn(5, 4, dtype=torch.float64), torch.rand(5, 4) < 0.5
    x, A = torch.randn(3, 6, dtype=torch.float64), layer.lori_A
    layer.lori_B.data.copy_(B)
    assert torch.allclose(layer(x) - layer.base_layer(x), 3.0 * x @ A.T @ B.T, atol=1e-12)
    layer.set_mask(M, reset=True)
    layer.lori_B_values.data.copy_(B[M])
    want = 3.0 * x @ A.T @ (B * M).T  # (3, 5)
    assert torch.allclose(layer(x) - layer.base_layer(x), want, atol=1e-12)
    assert torch.allclose(layer.delta_weight(), 3.0 * (B * M) @ A, atol=1e-12)
    W0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.allclose(layer.base_layer.weight, W0 + 3.0 * (B * M) @ A, atol=1e-12)


def test_fallback_casts_fp32_adapter_to_the_input_dtype_on_3d_inputs(monkeypatch):
    """The autograd path with fp32 A and B under an fp64 base: y - W0 x - b = scale B A x per token."""
    monkeypatch.setattr(LoRILinear, "_fusable", lambda self, x, trainable: False)
    torch.manual_seed(0)
    layer = LoRILinear(torch.nn.Linear(6, 5).double(), r=4, alpha=8, dropout=0.0, seed=3, path="m")
    layer.lori_B.data.normal_()
    x = torch.randn(2, 3, 6, dtype=torch.float64)  # (batch, seq, d_in): seq != d_out
    y = layer(x)
    want = 2.0 * x @ layer.lori_A.double().T @ layer.lori_B.double().T
    assert y.dtype == torch.float64 and torch.allclose(y - layer.base_layer(x), want, atol=1e-6)


def test_fallback_adds_out_of_place_to_a_non_contiguous_base_output():
    torch.manual_seed(0)
    layer = LoRILinear(torch.nn.Linear(6, 5), r=4, alpha=8, dropout=0.0, seed=3, path="m")
    layer.lori_B.data.normal_()
    layer.base_layer.register_forward_hook(
        lambda m, args, out: out.transpose(0, 1).contiguous().transpose(0, 1))
    x = torch.randn(2, 3, 6)  # 3-d: a non-contiguous (2, 3, 5) output has no flat view
    base = layer.base_layer(x)
    assert not base.is_contiguous()
    want = 2.0 * x @ layer.lori_A.T @ layer.lori_B.T
    assert torch.allclose(layer(x) - base, want, atol=1e-5)


def test_set_mask_checks_shape_casts_to_bool_and_removes():
    torch.manual_seed(0)
    layer = LoRILinear(torch.nn.Linear(12, 10), r=4, alpha=8, dropout=0.0, seed=0, path="m")
    layer.lori_B.data.normal_()
    with pytest.raises(ValueError, match=r"^mask for 'm' has shape \(3, 4\), B has \(10, 4\)$"):
        layer.set_mask(torch.ones(3, 4, dtype=torch.bool))
    mask = (torch.rand(10, 4) < 0.5).int()  # any 0/1 dtype: stored as bool
    layer.set_mask(mask)
    assert layer.lori_mask.dtype == torch.bool and torch.equal(layer.lori_mask, mask.bool())
    layer.lori_B_values.data.add_(1.0)
    B_eff = layer.B().detach().clone()
    layer.set_mask(None)  # back to a dense, trainable B holding B_eff
    assert layer.lori_mask is None and layer.lori_index is None and layer.lori_B_values is None
    assert isinstance(layer.lori_B, torch.nn.Parameter) and layer.lori_B.requires_grad
    assert torch.equal(layer.lori_B.detach(), B_eff) and torch.equal(layer.B(), layer.lori_B)


def test_set_mask_on_the_meta_device_counts_kept_entries():
    layer = LoRILinear(torch.nn.Linear(12, 10, device="meta"), r=4, alpha=8, dropout=0.0, seed=0,
                       path="m")
    mask = torch.zeros(10, 4, dtype=torch.bool)
    mask[::2, 1] = True
    layer.set_mask(mask)
    assert layer.lori_B_values.is_meta and layer.lori_B_values.shape == (5,)
    assert layer.lori_B_values.dtype == torch.float32 and layer.lori_mask.device.type == "cpu"


def test_merge_sets_merged_and_unmerge_restores():
    torch.manual_seed(0)
    layer = LoRILinear(torch.nn.Linear(6, 5).double(), r=4, alpha=8, dropout=0.0, seed=3, path="m")
    layer.lori_B.data.normal_()
    x = torch.randn(3, 6, dtype=torch.float64)
    W0, live = layer.base_layer.weight.detach().clone(), layer(x)
    layer.merge()
    assert layer.merged is True and torch.allclose(layer(x), live, atol=1e-12)
    layer.unmerge()
    assert layer.merged is False and torch.allclose(layer.base_layer.weight, W0, atol=1e-12)


def test_a_quantized_base_weight_is_refused_for_merging_by_path():
    layer = LoRILinear(torch.nn.Linear(6, 5), r=4, alpha=8, dropout=0.0, seed=3, path="layers.0.q")
    layer.base_layer.weight = torch.nn.Parameter(torch.zeros(5, 6, dtype=torch.int8), requires_grad=False)
    assert layer.delta_weight().dtype == torch.float32  # a delta still, in the adapter's dtype
    with pytest.raises(lori_layer.QuantizedMergeError) as err:
        layer.merge()
    assert str(err.value) == (
        "refusing to merge into layers.0.q: its base weight is stored quantized (torch.int8, "
        "model.quantize), where W0 + ΔW would be rounded to 4/8 bits again; evaluate with the adapter "
        "unmerged (merge: false) or merge into the unquantized base (model.quantize: null): the "
        "adapter file is the same")
    assert layer.merged is False


def _masked_pair() -> tuple[torch.nn.Sequential, torch.nn.Sequential, torch.Tensor]:
    """Two one-layer models (the layer under prefix "0."): a masked source and a dense target."""
    torch.manual_seed(0)
    src, dst = (torch.nn.Sequential(
        LoRILinear(torch.nn.Linear(12, 10), r=4, alpha=8, dropout=0.0, seed=0, path="m")) for _ in range(2))
    src[0].lori_B.data.normal_()
    mask = torch.rand(10, 4) < 0.5
    src[0].set_mask(mask)
    src[0].lori_B_values.data.add_(1.0)
    return src, dst, mask


def test_loading_a_masked_state_installs_its_mask_first():
    src, dst, mask = _masked_pair()
    state = src.state_dict()
    state["0.lori_mask"] = state["0.lori_mask"].to(torch.uint8)  # any 0/1 dtype
    dst.load_state_dict(state)
    assert dst[0].lori_mask.dtype == torch.bool and torch.equal(dst[0].lori_mask, mask)
    assert torch.equal(dst[0].B(), src[0].B())
    values = dst[0].lori_B_values
    dst.load_state_dict(src.state_dict())  # an equal mask stays installed: same parameter object
    dst.load_state_dict(state)  # (equal once read as bool)
    assert dst[0].lori_B_values is values
    other = src.state_dict() | {"0.lori_mask": ~mask}
    other["0.lori_B_values"] = torch.zeros(int((~mask).sum()))
    dst.load_state_dict(other)  # a different mask replaces it
    assert torch.equal(dst[0].lori_mask, ~mask) and torch.count_nonzero(dst[0].B()[~mask]) == 0


def test_loading_a_dense_state_removes_the_mask():
    src, dst, _ = _masked_pair()
    dense_state = dst.state_dict()  # dense, B = 0
    dst.load_state_dict(src.state_dict())
    dst.load_state_dict(dense_state)
    assert dst[0].lori_mask is None and dst[0].lori_B_values is None
    assert torch.count_nonzero(dst[0].B()) == 0
    src[0].load_state_dict({"lori_A": src[0].lori_A}, strict=False)  # no B in it: the mask stays
    assert src[0].lori_mask is not None


def test_extra_repr_names_rank_scale_and_kept_entries():
    src, _, mask = _masked_pair()
    dense = LoRILinear(torch.nn.Linear(12, 10), r=4, alpha=8, dropout=0.0, seed=0, path="m")
    assert dense.extra_repr() == "r=4, scale=2, B=dense, merged=False"
    assert src[0].extra_repr() == f"r=4, scale=2, B={int(mask.sum())} kept, merged=False"


def test_module_seed_is_the_documented_63_bit_hash():
    import hashlib

    for seed, path in [(0, "m"), (7, "model.layers.0.self_attn.q_proj")]:
        digest = hashlib.sha256(f"lori:{seed}:{path}".encode()).digest()
        want = int.from_bytes(digest[:8], "little") % 2**63
        assert lori_layer.module_seed(seed, path) == want
    assert lori_layer.module_seed(0, "m") != lori_layer.module_seed(0, "n")


def test_new_layer_state_whatever_the_base_dtype_or_device():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert draw_A(4, 12, 0, "m").dtype == torch.float32  # fp32 whatever the default dtype
        layer = LoRILinear(torch.nn.Linear(12, 10), r=4, alpha=8, dropout=0.0, seed=0, path="m")
        meta = LoRILinear(torch.nn.Linear(12, 10, device="meta"), r=4, alpha=8, dropout=0.1, seed=0,
                          path="m")
        meta.set_mask(torch.rand(10, 4) < 0.5)
        assert meta.lori_B_values.is_meta and meta.lori_B_values.dtype == torch.float32
    finally:
        torch.set_default_dtype(default)
    # Kaiming-uniform with a = sqrt(5): uniform on +-1/sqrt(fan_in), from the module's own generator
    g = torch.Generator().manual_seed(lori_layer.module_seed(0, "m"))
    assert torch.equal(draw_A(4, 12, 0, "m"), torch.empty(4, 12).uniform_(-12**-0.5, 12**-0.5, generator=g))
    assert layer.merged is False and isinstance(layer.lori_dropout, torch.nn.Identity)
    assert layer.lori_A.dtype == layer.lori_B.dtype == torch.float32
    assert torch.equal(layer.lori_A, draw_A(4, 12, 0, "m")) and torch.count_nonzero(layer.lori_B) == 0
    assert meta.lori_A.is_meta and meta.lori_A.shape == (4, 12) and meta.lori_A.dtype == torch.float32
    assert meta.lori_B.is_meta and meta.lori_B.shape == (10, 4) and meta.lori_dropout.p == 0.1
    layer.set_mask(torch.rand(10, 4) < 0.5)
    assert "lori_index" not in layer.state_dict() and "lori_mask" in layer.state_dict()


def test_compute_dtype_follows_autocast_or_the_pair():
    f32, f64, bf16 = (torch.empty(1, dtype=d) for d in (torch.float32, torch.float64, torch.bfloat16))
    assert lori_layer.compute_dtype(f32, f32) == torch.float32
    assert lori_layer.compute_dtype(f64, f32) is None  # nn.Linear would refuse the pair
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lori_layer.compute_dtype(f32, f32) == torch.bfloat16
        assert lori_layer.compute_dtype(f32, bf16) == torch.bfloat16
        assert lori_layer.compute_dtype(f64, f32) is None and lori_layer.compute_dtype(f32, f64) is None


def test_fused_node_under_autocast_equals_the_autograd_path(monkeypatch):
    layer = _layer(0.0, masked=True, dtype=torch.float32)
    x = torch.randn(2, 3, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = layer(x)
        monkeypatch.setattr(LoRILinear, "_fusable", lambda self, x, trainable: False)
        plain = layer(x)
    assert fused.dtype == plain.dtype == torch.bfloat16 and fused.shape == (2, 3, 10)
    assert torch.allclose(fused.float(), plain.float(), atol=0.05, rtol=0.02)


def test_a_global_forward_hook_takes_the_autograd_path():
    from torch.nn.modules.module import register_module_forward_hook

    layer = _layer(0.0, masked=True)
    x = torch.randn(3, 12, dtype=torch.float64)
    fused = layer(x).grad_fn.name()
    handle = register_module_forward_hook(lambda module, args, out: None)
    try:
        hooked = layer(x).grad_fn.name()
    finally:
        handle.remove()
    assert "LoRIMatmul" in fused and hooked != fused


def test_set_mask_reset_zeroes_B_inside_and_outside_the_mask():
    """LoRI-S (reset): B_eff = 0 so the output is the base's; without reset B is kept as it was."""
    torch.manual_seed(0)
    mask = torch.rand(10, 4) < 0.5
    x = torch.randn(3, 12)
    kept = LoRILinear(torch.nn.Linear(12, 10), r=4, alpha=8, dropout=0.0, seed=0, path="m")
    kept.lori_B.data.normal_()
    B = kept.lori_B.detach().clone()
    kept.set_mask(mask)
    assert torch.equal(kept.B(), B) and torch.equal(kept.lori_B_values.detach(), B[mask])
    kept.set_mask(mask, reset=True)
    assert torch.count_nonzero(kept.B()) == 0 and torch.count_nonzero(kept.lori_B_values) == 0
    assert torch.equal(kept(x), kept.base_layer(x))
    assert kept.lori_B_values.requires_grad and not kept.lori_B.requires_grad


def test_keep_mask_form_of_dropout_equals_positions(monkeypatch):
    """Off CPU, dropout_draw returns a bool keep mask instead of positions: same step."""
    layer = _layer(0.3, masked=True)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 10, dtype=torch.float64)
    drops = dropout_draw(x.numel(), 0.3, x.device)
    keep = torch.ones(x.numel(), dtype=torch.bool).index_fill_(0, drops, False)
    results = []
    for draw in (drops, keep):
        monkeypatch.setattr(lori_layer, "dropout_draw", lambda n, p, device, draw=draw: draw)
        y = layer(x)
        results.append([y, *_grads(layer, y, x, g)])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_backward_passes_gradcheck(monkeypatch, p):
    layer = _layer(p, masked=True)
    fixed = dropout_draw(3 * 12, p, torch.device("cpu")) if p else None
    monkeypatch.setattr(lori_layer, "dropout_draw", lambda n, p, device: fixed)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs the inputs in place: the second one is the layer's own parameter
    assert torch.autograd.gradcheck(lambda x, values: layer(x), (x, layer.lori_B_values))


def test_grad_of_kept_values_is_gather_of_dense_grad():
    dense, sparse = _layer(0.0, masked=False), _layer(0.0, masked=True)
    sparse.lori_B.data.copy_(dense.lori_B.data)  # same B_eff: scatter of the same values
    sparse.lori_B_values.data.copy_(dense.lori_B.data.view(-1)[sparse.lori_index])
    x = torch.randn(6, 12, dtype=torch.float64)
    dense(x).pow(2).sum().backward()
    sparse(x).pow(2).sum().backward()
    assert torch.allclose(sparse.lori_B_values.grad, dense.lori_B.grad.view(-1)[sparse.lori_index])


def test_fused_path_equals_fallback_path(monkeypatch):
    """Autocast, mixed dtypes or a trainable base take plain autograd; both give the same step."""
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 10, dtype=torch.float64)
    layer = _layer(0.0, masked=True)
    fused = layer(x)
    fused_grads = _grads(layer, fused, x, g)
    monkeypatch.setattr(LoRILinear, "_fusable", lambda self, x, trainable: False)
    plain = layer(x)
    assert plain.grad_fn.name() != fused.grad_fn.name()
    assert torch.allclose(fused, plain, atol=1e-12)
    for got, want in zip(fused_grads, _grads(layer, plain, x, g)):
        assert torch.allclose(got, want, atol=1e-12)


def test_hooks_and_subclasses_of_the_base_layer_keep_working():
    """A hooked base (e.g. ZeRO-3 gathering weights) or a Linear subclass takes plain autograd."""
    x = torch.randn(3, 12, dtype=torch.float64)
    layer = _layer(0.0, masked=True)
    fused = layer(x)
    calls = []
    handle = layer.base_layer.register_forward_pre_hook(lambda m, args: calls.append(m))
    assert torch.allclose(layer(x), fused, atol=1e-12) and calls == [layer.base_layer]
    handle.remove()

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    base = layer.base_layer
    plain = torch.nn.functional.linear(x, base.weight, base.bias)
    base.__class__ = Doubled
    assert torch.allclose(layer(x), fused + plain, atol=1e-12)  # the subclass's forward ran


def test_trainable_base_weight_gets_its_gradient():
    layer = _layer(0.0, masked=True)
    layer.base_layer.weight.requires_grad_(True)
    layer(torch.randn(3, 12, dtype=torch.float64)).sum().backward()
    assert layer.base_layer.weight.grad is not None and layer.lori_B_values.grad is not None


def test_the_plain_autograd_path_of_a_float_base_runs_the_layers_own_dropout_module():
    """Plain autograd (a trainable or hooked float base) calls ``lori_dropout`` as a module, so a
    replaced one runs; only a quantized base takes the adapter node with lori's own drops."""
    layer = _layer(0.0, masked=True).train()
    layer.base_layer.weight.requires_grad_(True)  # not fusable: plain autograd
    seen = []

    class Halve(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape)
            return x / 2

    x = torch.randn(3, 12, dtype=torch.float64)
    full = layer(x)
    layer.lori_dropout = Halve()
    halved = layer(x)
    base = layer.base_layer(x)
    assert seen == [x.shape]
    assert torch.allclose(halved - base, (full - base) / 2, atol=1e-12)  # the adapter saw x / 2


def test_dropout_inactive_in_eval_equals_p0():
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    with_dropout, without = _layer(0.3, masked=True).eval(), _layer(0.0, masked=True).eval()
    assert torch.equal(with_dropout(x), without(x))
    assert not torch.equal(with_dropout.train()(x), with_dropout(x))  # live in training


def test_masked_entries_untouched_by_adamw_weight_decay_through_fused_step():
    layer = _layer(0.3, masked=True, dtype=torch.float32)
    outside = ~layer.lori_mask
    before = layer.B().detach().clone()
    opt = torch.optim.AdamW(trainable_parameters(layer), lr=1e-2, weight_decay=0.5)
    for _ in range(5):
        layer(torch.randn(8, 12)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = layer.B().detach()
    assert torch.equal(after[outside], before[outside]) and not torch.equal(after, before)
    assert opt.state[layer.lori_B_values]["exp_avg"].numel() == int(layer.lori_mask.sum())


def test_backward_keeps_no_copy_of_x_or_B():
    """Saved for backward: the layer's own tensors, h (n x r) and the drop positions only."""
    layer = _layer(0.3, masked=True, dtype=torch.float32)
    x = torch.randn(64, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    own = {t.data_ptr() for t in [*layer.parameters(), *layer.buffers()] if t is not None}
    assert saved
    for t in saved:
        assert t.data_ptr() in own or tuple(t.shape) == (64, 4) or t.dtype == torch.int64


def test_values_changed_between_forward_and_backward_are_refused():
    layer = _layer(0.0, masked=True)
    y = layer(torch.randn(3, 12, dtype=torch.float64, requires_grad=True))
    with torch.no_grad():
        layer.lori_B_values.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("n, p", [(1, 0.5), (7, 0.9), (1000, 0.05), (200_000, 0.05), (50_000, 0.5)])
def test_dropout_draw_is_bernoulli(n, p):
    torch.manual_seed(0)
    draws = [dropout_draw(n, p, torch.device("cpu")) for _ in range(max(1, 40_000 // n))]
    for d in draws:
        assert d.dtype == torch.int64 and (d >= 0).all() and (d < n).all()
        assert (d[1:] > d[:-1]).all()  # sorted, no repeats
    hits = torch.zeros(n)
    for d in draws:
        hits[d] += 1
    total = len(draws) * n
    assert abs(hits.sum() / total - p) < 5 * (p * (1 - p) / total) ** 0.5 + 1e-9
    if n >= 1000:  # neighbours independent: P(both dropped) = p^2
        masks = torch.stack([torch.zeros(n).index_fill_(0, d, 1.0) for d in draws])
        pair = (masks[:, 1:] * masks[:, :-1]).mean()
        assert abs(pair - p * p) < 0.01 * p


def test_dropout_draw_off_the_cpu_is_a_bool_keep_mask_with_probability_1_minus_p():
    """The non-CPU branch (``bernoulli_`` on the device), checked on the meta device: a bool keep
    mask of n entries where B lives, drawn with keep probability 1 - p (CUDA: tests/test_cuda.py)."""
    from torch.overrides import TorchFunctionMode

    class KeepProbabilities(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.p: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.bernoulli_:
                self.p.append(args[1])
            return func(*args, **(kwargs or {}))

    with KeepProbabilities() as seen:
        keep = dropout_draw(10, 0.25, torch.device("meta"))
    assert keep.device.type == "meta" and keep.dtype == torch.bool and keep.shape == (10,)
    assert seen.p == [0.75]


def test_dropout_draw_follows_global_seed():
    torch.manual_seed(3)
    a = dropout_draw(5000, 0.1, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(a, dropout_draw(5000, 0.1, torch.device("cpu")))
