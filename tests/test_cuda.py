"""bf16 paths on a CUDA device (``pytest -m gpu``), each also run on CPU so the test itself is checked
where no GPU is: the fused node against fp64, masked entries under AdamW (foreach and fused), the
chunked loss, merging, and dropout's keep mask (``bernoulli_`` on CUDA, drawn positions on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama
from torch import nn

from lori.core import LoRIConfig, calibrate, get_B, inject_lori, lori_layers, merge_lori, set_masks, unmerge_lori
from lori.core import trainable_parameters
from lori.core.layer import LoRILinear, dropout_draw
from lori.training.module import response_loss, split_lm_head

BF16 = torch.bfloat16
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _tiny(device: str, sparse: bool, dropout: float = 0.0) -> nn.Module:
    model = make_tiny_llama().to(device=device, dtype=BF16).train()
    inject_lori(model, LoRIConfig(r=4, alpha=8, dropout=dropout, sparsity=0.9))
    g = torch.Generator().manual_seed(0)
    for layer in lori_layers(model).values():  # entries outside the mask keep non-zero values
        layer.lori_B.data.copy_(torch.randn(layer.lori_B.shape, generator=g))
    if sparse:
        set_masks(model, calibrate(get_B(model), 0.9, "model"))
    return model


def _ids(device: str, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(1)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True])
def test_fused_node_in_bf16_matches_fp64(device, masked):
    torch.manual_seed(0)
    layer = LoRILinear(nn.Linear(48, 40).to(BF16), r=8, alpha=16, dropout=0.0, seed=0, path="m").to(device)
    layer.lori_B.data.normal_()
    if masked:
        layer.set_mask(torch.rand(40, 8, device=device) < 0.5)
    trainable = layer.lori_B if layer.lori_B_values is None else layer.lori_B_values
    x = torch.randn(3, 5, 48, device=device).to(BF16).requires_grad_()
    y = layer(x)
    assert y.dtype == BF16 and "LoRIMatmul" in y.grad_fn.name()
    g = torch.randn_like(y)
    dx, dt = torch.autograd.grad(y, [x, trainable], g)
    assert dx.dtype == BF16 and dt.dtype == torch.float32 == trainable.dtype == layer.lori_A.dtype
    # fp64 on CPU from the same (rounded) operands
    w, b = layer.base_layer.weight.double().cpu(), layer.base_layer.bias.double().cpu()
    x64, t64 = x.detach().double().cpu().requires_grad_(), trainable.detach().double().cpu().requires_grad_()
    B64 = t64 if not masked else layer.lori_B.double().cpu().reshape(-1).scatter(  # frozen entries kept
        0, layer.lori_index.cpu(), t64).view(40, 8)
    ref = x64 @ w.t() + b + layer.scale * x64 @ layer.lori_A.double().cpu().t() @ B64.t()
    rdx, rdt = torch.autograd.grad(ref, [x64, t64], g.double().cpu())
    for got, want in ((y, ref), (dx, rdx), (dt, rdt)):
        torch.testing.assert_close(got.double().cpu(), want, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [False, True])
def test_masked_entries_bit_identical_under_adamw_with_dropout(device, fused):
    model = _tiny(device, sparse=True, dropout=0.1)
    before = {p: b.clone() for p, b in get_B(model).items()}
    params = trainable_parameters(model)
    assert params and all(p.dtype == torch.float32 and p.device.type == device for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5, fused=fused)
    ids = _ids(device)
    for _ in range(3):
        logits = model(input_ids=ids).logits
        assert logits.dtype == BF16
        F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    changed = False
    for path, layer in lori_layers(model).items():
        after = layer.B()
        assert torch.equal(after[~layer.lori_mask], before[path][~layer.lori_mask]), path
        changed |= not torch.equal(after, before[path])
    assert changed


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_loss_equals_the_plain_loss_and_gradients(device, monkeypatch):
    monkeypatch.setattr("lori.training.module.LOSS_CHUNK_LOGITS", 96 * 5)  # 5 rows per chunk: several chunks
    model = _tiny(device, sparse=False)
    ids = _ids(device, (3, 16))
    labels = ids.clone()
    labels[:, :4] = -100
    decoder, head = split_lm_head(model)
    chunked = response_loss(decoder(input_ids=ids)[0], labels, head, "token_mean")
    grads = torch.autograd.grad(chunked, trainable_parameters(model))
    logits = model(input_ids=ids).logits[:, :-1].float()
    plain = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)
    want = torch.autograd.grad(plain, trainable_parameters(model))
    torch.testing.assert_close(chunked, plain, rtol=1e-2, atol=1e-2)
    for got, ref in zip(grads, want):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_in_bf16_matches_the_unmerged_forward_and_unmerges_within_an_ulp(device):
    model = _tiny(device, sparse=True).eval()
    for layer in lori_layers(model).values():
        layer.lori_B.data.mul_(1e-3)  # a delta small next to W0: an ulp of W0 bounds the drift
        layer.lori_B_values.data.mul_(1e-3)
    ids = _ids(device)
    weights = {p: layer.base_layer.weight.clone() for p, layer in lori_layers(model).items()}
    with torch.no_grad():
        live = model(input_ids=ids).logits.float()
        merge_lori(model)
        once = {p: layer.base_layer.weight.clone() for p, layer in lori_layers(model).items()}
        merge_lori(model)  # twice: no change
        assert all(torch.equal(layer.base_layer.weight, once[p]) for p, layer in lori_layers(model).items())
        merged = model(input_ids=ids).logits.float()
        unmerge_lori(model)
    torch.testing.assert_close(merged, live, rtol=0.02, atol=0.02)
    for path, layer in lori_layers(model).items():
        assert not torch.equal(once[path], weights[path]), path
        w, w0, w1 = (t.float() for t in (layer.base_layer.weight, weights[path], once[path]))
        ulp = 2 * torch.finfo(BF16).eps * torch.maximum(w0.abs(), w1.abs())  # two roundings
        assert bool(((w - w0).abs() <= ulp).all()), path


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_draw_drops_each_entry_with_probability_p(device):
    torch.manual_seed(0)
    n, p = 200_000, 0.1
    drop = dropout_draw(n, p, torch.device(device))
    if drop.dtype == torch.bool:  # a keep mask on the device
        assert drop.device.type == device and drop.numel() == n
        dropped = (~drop).nonzero().squeeze(1).cpu()
    else:  # the dropped positions, on CPU
        dropped = drop
    rate = dropped.numel() / n
    assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert dropped.unique().numel() == dropped.numel() and int(dropped.max()) < n
