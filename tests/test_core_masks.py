"""Calibration equals a sort-based reference, keeps exactly k; masked training is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from lori.core import (
    LoRIConfig,
    calibrate,
    count_trainable,
    get_B,
    get_masks,
    inject_lori,
    lori_layers,
    mask_overlap,
    reset_B,
    set_masks,
    sparsity_by,
    sparsity_table,
    trainable_parameters,
)
from lori.core.masks import group_of, keep_count

GRANS = ["model", "module", "projection", "layer", "matrix"]


def _random_bs(seed: int = 0, with_ties: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bs = {}
    for layer in range(3):
        for proj, out in [("q_proj", 16), ("k_proj", 8), ("v_proj", 8), ("o_proj", 16),
                          ("gate_proj", 24), ("up_proj", 24), ("down_proj", 16)]:
            kind = "self_attn" if proj[0] in "qkvo" else "mlp"
            t = torch.randn(out, 4, generator=g)
            if with_ties:  # few distinct magnitudes: many ties at the threshold
                t = torch.randint(-3, 4, (out, 4), generator=g).float()
            bs[f"model.layers.{layer}.{kind}.{proj}"] = t
    return bs


def _reference(bs, sparsity, granularity):
    """Plain sort: order by (-|b|, group position) and keep the first k of each group."""
    groups: dict[str, list[str]] = {}
    for p in sorted(bs):
        groups.setdefault(group_of(p, granularity), []).append(p)
    masks = {}
    for paths in groups.values():
        flat = torch.cat([bs[p].abs().reshape(-1) for p in paths])
        k = keep_count(flat.numel(), sparsity)
        order = sorted(range(flat.numel()), key=lambda i: (-flat[i].item(), i))
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[order[:k]] = True
        start = 0
        for p in paths:
            masks[p] = keep[start:start + bs[p].numel()].view_as(bs[p])
            start += bs[p].numel()
    return masks


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.97])
@pytest.mark.parametrize("with_ties", [False, True])
def test_calibration_equals_sort_reference(granularity, sparsity, with_ties):
    bs = _random_bs(with_ties=with_ties)
    snapshot = {p: t.clone() for p, t in bs.items()}
    masks = calibrate(bs, sparsity, granularity)
    ref = _reference(bs, sparsity, granularity)
    for p in bs:
        assert masks[p].dtype == torch.bool and torch.equal(masks[p], ref[p]), p
        assert torch.equal(bs[p], snapshot[p])  # B is never modified
    groups: dict[str, int] = {}
    for p in bs:
        g = group_of(p, granularity)
        groups[g] = groups.get(g, 0) + bs[p].numel()
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == sum(keep_count(n, sparsity) for n in groups.values())


def test_calibration_independent_of_input_order():
    bs = _random_bs(with_ties=True)
    reversed_bs = dict(reversed(list(bs.items())))
    a, b = calibrate(bs, 0.8, "model"), calibrate(reversed_bs, 0.8, "model")
    assert all(torch.equal(a[p], b[p]) for p in bs)


def test_calibration_handles_negative_zero_and_bf16():
    bs = {"layers.0.q_proj": torch.tensor([[-0.0, 0.0], [1.0, -2.0]]).bfloat16()}
    m = calibrate(bs, 0.5, "model")["layers.0.q_proj"]
    assert m.tolist() == [[False, False], [True, True]]


def test_calibration_refuses_nan_and_bad_sparsity():
    with pytest.raises(ValueError, match="NaN"):
        calibrate({"layers.0.q_proj": torch.tensor([[float("nan"), 1.0]])}, 0.5)
    with pytest.raises(ValueError, match="sparsity=1.0"):
        calibrate(_random_bs(), 1.0)
    with pytest.raises(ValueError, match="granularity"):
        calibrate(_random_bs(), 0.5, "row")


def test_calibration_on_44m_entries():
    g = torch.Generator().manual_seed(0)
    outs = [4096, 1024, 1024, 4096, 14336, 14336, 4096]
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    bs = {f"model.layers.{i}.x.{n}": torch.randn(o, 32, generator=g) for i in range(32) for n, o in zip(names, outs)}
    n = sum(t.numel() for t in bs.values())
    assert n == 44_040_192 > 2**24
    masks = calibrate(bs, 0.9, "model")
    assert sum(int(m.sum()) for m in masks.values()) == keep_count(n, 0.9)
    # every kept |b| >= every dropped |b|
    lo = min(t[m].abs().min() for t, m in zip(bs.values(), masks.values()))
    hi = max(t[~m].abs().max() for t, m in zip(bs.values(), masks.values()))
    assert lo >= hi


def test_sparsity_statistics_and_overlap():
    bs = _random_bs()
    masks = calibrate(bs, 0.9, "matrix")
    by_layer = sparsity_by(masks, "layer")
    assert set(by_layer) == {"layer0", "layer1", "layer2"}
    assert all(abs(v - 0.9) < 0.02 for v in by_layer.values())
    layers, projections, table = sparsity_table(masks)
    assert layers == [0, 1, 2] and len(projections) == 7 and table.shape == (3, 7)
    assert mask_overlap(masks, masks)["jaccard"] == 1.0
    g = torch.Generator().manual_seed(1)
    big_a = {"l.0.q_proj": torch.rand(400, 100, generator=g) < 0.1}
    big_b = {"l.0.q_proj": torch.rand(400, 100, generator=g) < 0.1}
    assert abs(mask_overlap(big_a, big_b)["intersection"] - 0.01) < 0.003


def _train(model, tokens, steps, opt):
    model.train()
    for _ in range(steps):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), 1.0)
        opt.step()
        opt.zero_grad()


def test_entries_outside_mask_bit_identical_after_adamw(tokens):
    """Continual learning: B holds earlier-task values; AdamW wd=0.1 with momentum from before."""
    model = make_tiny_llama()
    inject_lori(model, LoRIConfig(r=4, alpha=8, dropout=0.05))
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    _train(model, tokens, 5, opt)  # dense phase: non-zero B everywhere
    before = {p: b.clone() for p, b in get_B(model).items()}
    assert all(b.abs().sum() > 0 for b in before.values())
    masks = calibrate(before, 0.9, "model")
    set_masks(model, masks)  # no reset: keep earlier values
    assert count_trainable(model) == sum(int(m.sum()) for m in masks.values())
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999))
    _train(model, tokens, 20, opt)
    after = get_B(model)
    changed_inside = 0
    for p, m in masks.items():
        assert torch.equal(after[p][~m], before[p][~m]), p  # bit-identical outside the mask
        changed_inside += int((after[p][m] != before[p][m]).sum())
    assert changed_inside > 0.9 * sum(int(m.sum()) for m in masks.values())


def test_lori_s_reset_keeps_A_and_zeroes_B(tokens):
    model = make_tiny_llama()
    inject_lori(model, LoRIConfig(r=4, alpha=8))
    for layer in lori_layers(model).values():
        layer.lori_B.data.normal_()
    A_before = {p: m.lori_A.clone() for p, m in lori_layers(model).items()}
    masks = calibrate(get_B(model), 0.9)
    set_masks(model, masks, reset=True)
    assert all(torch.count_nonzero(b) == 0 for b in get_B(model).values())
    assert all(torch.equal(A_before[p], m.lori_A) for p, m in lori_layers(model).items())
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1, momentum=0.9, weight_decay=0.1)
    _train(model, tokens, 3, opt)
    for p, b in get_B(model).items():
        assert torch.count_nonzero(b[~masks[p]]) == 0 and torch.count_nonzero(b[masks[p]]) > 0
    reset_B(model)
    assert all(torch.count_nonzero(b) == 0 for b in get_B(model).values())
    assert all(torch.equal(get_masks(model)[p], masks[p]) for p in masks)


def test_masked_state_dict_round_trip(tokens):
    """A checkpoint of a masked model loads into a dense fresh model (mask installed first)."""
    model = make_tiny_llama()
    inject_lori(model, LoRIConfig(r=4, alpha=8, dropout=0.0))
    for layer in lori_layers(model).values():
        layer.lori_B.data.normal_()
    set_masks(model, calibrate(get_B(model), 0.7))
    state = model.state_dict()
    fresh = make_tiny_llama()
    inject_lori(fresh, LoRIConfig(r=4, alpha=8, dropout=0.0))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(tokens).logits, model(tokens).logits)
    assert count_trainable(fresh) == count_trainable(model)
