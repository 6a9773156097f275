"""Merging: results equal the explicit matrix formulas; live == merged; idempotent; refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from lori.core import (
    Adapter,
    AdapterMismatchError,
    DeltaMerge,
    LoRIConfig,
    adapter_from_model,
    apply_adapter,
    calibrate,
    get_B,
    inject_lori,
    lori_layers,
    merge_concat,
    merge_deltas,
    merge_factors,
    merge_linear,
    merge_linear_eq8,
    merge_lori,
    set_masks,
    unload,
    unmerge_lori,
)
from lori.core.merge import canonical_method, magnitude_prune, random_prune


def _trained_adapter(seed: int, r: int = 4, alpha: float = 8.0, sparsity: float | None = None) -> Adapter:
    model = make_tiny_llama()
    cfg = LoRIConfig(r=r, alpha=alpha, dropout=0.0, seed=seed)
    inject_lori(model, cfg)
    g = torch.Generator().manual_seed(100 + seed)
    for layer in lori_layers(model).values():
        layer.lori_B.data.copy_(torch.randn(layer.lori_B.shape, generator=g) * 0.05)
    if sparsity is not None:
        set_masks(model, calibrate(get_B(model), sparsity))
    return adapter_from_model(model, cfg, base_model="tiny-llama")


def _weights_after(adapter_or_deltas) -> dict[str, torch.Tensor]:
    model = make_tiny_llama()
    if isinstance(adapter_or_deltas, Adapter):
        apply_adapter(model, adapter_or_deltas)
        merge_lori(model)
        return {p: m.base_layer.weight.detach().clone() for p, m in lori_layers(model).items()}
    DeltaMerge(model, adapter_or_deltas).merge()
    return {p: model.get_submodule(p).weight.detach().clone() for p in adapter_or_deltas}


def test_concat_and_linear_equal_formulas():
    ads = [_trained_adapter(s, sparsity=0.9) for s in range(3)]
    w = [0.3, 0.5, 0.2]
    base = {p: make_tiny_llama().get_submodule(p).weight.detach() for p in ads[0].A}
    cat = _weights_after(merge_concat(ads, w))
    lin = _weights_after(merge_linear(ads, w))
    eq8 = _weights_after(merge_linear_eq8(ads, w))
    s = ads[0].config.scale
    for p in ads[0].A:
        want_cat = base[p] + sum(wt * a.config.scale * a.B[p] @ a.A[p] for a, wt in zip(ads, w))
        # PEFT / official linear: sqrt(w s) on each factor
        want_lin = base[p] + sum((wt * s) ** 0.5 * a.B[p] for a, wt in zip(ads, w)) @ sum(
            (wt * s) ** 0.5 * a.A[p] for a, wt in zip(ads, w))
        want_eq8 = base[p] + s * sum(wt * a.B[p] for a, wt in zip(ads, w)) @ sum(wt * a.A[p] for a, wt in zip(ads, w))
        assert torch.allclose(cat[p], want_cat, atol=1e-6), p
        assert torch.allclose(lin[p], want_lin, atol=1e-6), p
        assert torch.allclose(eq8[p], want_eq8, atol=1e-6), p
        assert not torch.allclose(lin[p], eq8[p], atol=1e-4), p  # sqrt(w s)^2 = w s != s w^2


def _prune_reference(x: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * x.numel())
    keep = x.abs().flatten().argsort(descending=True)[:k]
    out = torch.zeros(x.numel())
    out[keep] = x.flatten()[keep]
    return out.view_as(x)


def _ties_reference(trimmed: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """Elementwise: sign elected on the unweighted sum (0 counts as +), mean of the agreeing w_t x_t."""
    flat = [t.flatten() for t in trimmed]
    out = torch.zeros_like(flat[0])
    for i in range(out.numel()):
        elected = 1.0 if sum(float(t[i]) for t in flat) >= 0 else -1.0
        agreeing = [wt * float(t[i]) for t, wt in zip(flat, w) if float(t[i]) * elected > 0]
        out[i] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out.view_as(trimmed[0])


@pytest.mark.parametrize("method", ["concat", "linear", "magnitude", "ties", "dare", "dare_ties", "dare_linear"])
def test_lora_baselines_in_delta_space_equal_formulas(method):
    ads = [_trained_adapter(s) for s in range(3)]
    w, density = [0.4, 0.4, 0.4], 0.3
    deltas = merge_deltas(ads, w, method, density=density, seed=5)
    g = torch.Generator().manual_seed(5)
    for p in ads[0].A:
        d = [a.config.scale * a.B[p] @ a.A[p] for a in ads]
        if canonical_method(method) in ("concat", "linear"):
            want = sum(wt * x for x, wt in zip(d, w))
        elif method == "magnitude":
            want = sum(wt * _prune_reference(x, density) for x, wt in zip(d, w))
            assert all((magnitude_prune(x, density) != 0).sum() == int(density * x.numel()) for x in d)
        elif method in ("dare", "dare_linear"):
            want = sum(wt * x * torch.bernoulli(torch.full_like(x, density), generator=g) / density
                       for x, wt in zip(d, w))
        elif method == "dare_ties":
            want = _ties_reference([x * torch.bernoulli(torch.full_like(x, density), generator=g) / density
                                    for x in d], w)
        else:
            want = _ties_reference([_prune_reference(x, density) for x in d], w)
        assert torch.allclose(deltas[p], want, atol=1e-6), (method, p)
    merged = _weights_after(deltas)
    base = make_tiny_llama()
    for p in deltas:
        assert torch.allclose(merged[p], base.get_submodule(p).weight + deltas[p], atol=1e-6)


def test_dare_drop_and_rescale():
    x = torch.randn(200, 50)
    kept = random_prune(x, 0.7, torch.Generator().manual_seed(0), rescale=False)
    scaled = random_prune(x, 0.7, torch.Generator().manual_seed(0), rescale=True)
    assert torch.equal(kept / 0.7, scaled)
    assert abs((kept != 0).float().mean() - 0.7) < 0.02  # each entry kept with probability 0.7
    assert torch.equal(random_prune(x, 1.0, None), x)  # density 1: untouched, nothing drawn


@pytest.mark.parametrize("method", ["linear", "magnitude", "ties", "dare", "dare_ties"])
def test_lora_baselines_in_factor_space(method):
    ads = [_trained_adapter(s) for s in range(2)]
    w = [0.5, 0.5]
    out = merge_factors(ads, w, method, density=0.7, seed=1)
    assert out.rank == ads[0].rank and out.config.scale == 1.0
    assert out.meta["merge"]["method"] == method
    if method == "linear":  # sqrt(w s) on both factors: (Σ√(ws) B)(Σ√(ws) A)
        p = next(iter(ads[0].A))
        want = sum((0.5 * a.config.scale) ** 0.5 * a.B[p] for a in ads) @ sum(
            (0.5 * a.config.scale) ** 0.5 * a.A[p] for a in ads)
        assert torch.allclose(out.delta(p), want, atol=1e-6)


def test_live_equals_merged_and_merge_is_idempotent(tokens):
    ad = _trained_adapter(0, sparsity=0.9)
    model = make_tiny_llama()
    W0 = {p: model.get_submodule(p).weight.detach().clone() for p in ad.A}
    apply_adapter(model, ad)
    live = model(tokens).logits
    merge_lori(model)
    once = model(tokens).logits
    weights_once = {p: m.base_layer.weight.clone() for p, m in lori_layers(model).items()}
    merge_lori(model)
    assert torch.allclose(live, once, atol=1e-5)
    assert all(torch.equal(weights_once[p], m.base_layer.weight) for p, m in lori_layers(model).items())
    unmerge_lori(model)
    assert all(torch.allclose(W0[p], m.base_layer.weight, atol=1e-6) for p, m in lori_layers(model).items())
    merge_lori(model)
    plain = unload(model)
    assert not lori_layers(plain)
    assert torch.allclose(plain(tokens).logits, live, atol=1e-5)


def test_delta_merge_idempotent_and_reversible():
    ads = [_trained_adapter(s) for s in range(2)]
    deltas = merge_deltas(ads, [0.5, 0.5], "ties", density=0.7)
    model = make_tiny_llama()
    p = next(iter(deltas))
    w0 = model.get_submodule(p).weight.detach().clone()
    dm = DeltaMerge(model, deltas).merge()
    once = model.get_submodule(p).weight.detach().clone()
    dm.merge()
    assert torch.equal(once, model.get_submodule(p).weight)
    dm.unmerge()
    assert torch.allclose(w0, model.get_submodule(p).weight, atol=1e-6)


def test_merge_refusals():
    a, b = _trained_adapter(0, r=4), _trained_adapter(1, r=8, alpha=16)
    with pytest.raises(AdapterMismatchError, match="rank 8"):
        merge_linear([a, b], [0.5, 0.5])
    with pytest.raises(AdapterMismatchError, match="rank 8"):
        merge_linear_eq8([a, b], [0.5, 0.5])
    c = _trained_adapter(1, r=4, alpha=16)
    assert merge_linear([a, c], [0.5, 0.5]).rank == 4  # PEFT's linear takes unequal scales (sqrt(w s) each)
    with pytest.raises(AdapterMismatchError, match="scale 4.0"):
        merge_linear_eq8([a, c], [0.5, 0.5])
    with pytest.raises(AdapterMismatchError, match="2 weights given for 3"):
        merge_concat([a, a, a], [0.5, 0.5])
    assert merge_concat([a, b], [0.5, 0.5]).rank == 12  # concat accepts different ranks
    other = _trained_adapter(0)
    other.base_fingerprint = "0123456789abcdef"
    with pytest.raises(AdapterMismatchError, match="another base model"):
        merge_concat([a, other], [0.5, 0.5])
    fewer = _trained_adapter(0)
    path = next(iter(fewer.A))
    del fewer.A[path], fewer.B[path]
    with pytest.raises(AdapterMismatchError, match="other modules"):
        merge_deltas([a, fewer], [0.5, 0.5], "linear")
    with pytest.raises(ValueError, match="density"):
        merge_deltas([a, a], [0.5, 0.5], "ties", density=0.0)
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_deltas([a, a], [0.5, 0.5], "average")
    with pytest.raises(ValueError, match="linear_eq8 is a factor-space merge"):
        merge_deltas([a, a], [0.5, 0.5], "linear_eq8")
    with pytest.raises(AdapterMismatchError, match="misses adapted modules"):
        merge_factors([a, a], [0.5, 0.5], "dare", density=0.5, order=["model.embed_tokens"])


def test_adapter_for_another_base_is_refused():
    ad = _trained_adapter(0)
    wider = make_tiny_llama(hidden_size=48)
    with pytest.raises(AdapterMismatchError, match="another base model"):
        apply_adapter(wider, ad)
    other_weights = make_tiny_llama(seed=1)
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        apply_adapter(other_weights, ad)
    apply_adapter(other_weights, ad, strict_base=False)  # explicit override works


def test_with_one_shared_A_linear_is_T_times_concat():
    """The official set-up (every task the same A): PEFT's linear = T · concat, eq. 8 = T w · concat."""
    ads = [_trained_adapter(0) for _ in range(3)]  # seed 0 for all: the same A everywhere
    for i, a in enumerate(ads):  # different B per task
        g = torch.Generator().manual_seed(7 + i)
        a.B = {p: torch.randn(b.shape, generator=g) for p, b in a.B.items()}
    w, T = [0.4] * 3, 3
    cat, lin, eq8 = merge_concat(ads, w), merge_linear(ads, w), merge_linear_eq8(ads, w)
    for p in ads[0].A:
        assert torch.allclose(lin.delta(p), T * cat.delta(p), atol=1e-5)
        assert torch.allclose(eq8.delta(p), T * 0.4 * cat.delta(p), atol=1e-5)


def _second_of_another_name(a: Adapter) -> Adapter:
    """``a`` with another base_model name and its modules in reversed order (same tensors)."""
    rev = list(reversed(list(a.A)))
    return Adapter(a.config, {p: a.A[p] for p in rev}, {p: a.B[p] for p in rev}, None, "second", a.base_fingerprint)


def test_merged_adapters_follow_the_first_adapter_and_the_order_and_record_the_merge():
    a = _trained_adapter(0)
    b = _second_of_another_name(_trained_adapter(1))
    paths = list(a.A)
    w = [0.3, 0.7]
    for merged, method in [(merge_concat([a, b], w), "concat"), (merge_linear_eq8([a, b], w), "linear_eq8")]:
        assert merged.base_model == "tiny-llama" and list(merged.A) == paths and list(merged.B) == paths
        assert merged.meta == {"merge": {"method": method, "weights": w}}
    backwards = paths[::-1]
    assert list(merge_concat([a, b], w, order=backwards).A) == backwards
    assert list(merge_linear([a, b], w, order=backwards).A) == backwards
    assert list(merge_linear([a, b], w).A) == paths


def test_delta_merge_merges_again_after_unmerge():
    ads = [_trained_adapter(s) for s in range(2)]
    deltas = merge_deltas(ads, [0.5, 0.5], "linear")
    model = make_tiny_llama()
    p = next(iter(deltas))
    dm = DeltaMerge(model, deltas).merge()
    once = model.get_submodule(p).weight.detach().clone()
    dm.unmerge()
    assert dm.merged is False
    dm.merge()
    assert dm.merged is True and torch.equal(once, model.get_submodule(p).weight)


def _same(x: Adapter, y: Adapter) -> bool:
    return (list(x.A) == list(y.A) and all(torch.equal(x.A[p], y.A[p]) and torch.equal(x.B[p], y.B[p]) for p in x.A)
            and x.meta == y.meta)


def test_merge_factors_dispatches_concat_and_eq8_and_its_defaults_are_seed_0_rescaled():
    a, b = _trained_adapter(0), _trained_adapter(1)
    w = [0.3, 0.7]
    backwards = list(a.A)[::-1]
    assert _same(merge_factors([a, b], w, "cat", order=backwards), merge_concat([a, b], w, order=backwards))
    assert _same(merge_factors([a, b], w, "linear_eq8"), merge_linear_eq8([a, b], w))
    torch.manual_seed(1)
    dare = merge_factors([a, b], w, "dare", density=0.5)
    torch.manual_seed(2)  # the default seed 0 draws the same, whatever the global RNG
    assert _same(dare, merge_factors([a, b], w, "dare", density=0.5, seed=0, rescale=True))
    assert dare.meta["merge"] == {"method": "dare", "combination_type": "dare_linear", "weights": w,
                                 "density": 0.5, "seed": 0, "rescale": True}
    ties = merge_factors([a, b], w, "ties")  # density 1 by default: nothing pruned
    assert ties.meta["merge"]["density"] == 1.0 and ties.meta["merge"]["majority_sign_method"] == "total"
    with pytest.raises(ValueError, match="density must be in"):
        merge_factors([a, b], w, "ties", density=0.0)
    merged = merge_linear([a, b], w)
    assert merged.config.seed == -1 and merged.config.sparsity == 0.0
    assert a.base_fingerprint is not None and merged.base_fingerprint == a.base_fingerprint


def test_factor_weights_split_a_negative_weight_sign_onto_A():
    from lori.core.merge import factor_weights
    a = _trained_adapter(0)  # scale alpha / r = 2
    assert factor_weights([a, a], [-2.0, 0.5]) == ([-2.0, 1.0], [2.0, 1.0])


def test_merge_factors_prunes_both_factors_and_records_each_methods_settings():
    a, b = _trained_adapter(0), _trained_adapter(1)
    w = [0.3, 0.7]
    one = merge_factors([a], [1.0], "magnitude", density=0.5)  # one adapter: exactly half of each kept
    for p in a.A:
        assert int((one.A[p] != 0).sum()) == a.A[p].numel() // 2 and int((one.B[p] != 0).sum()) == a.B[p].numel() // 2
    expected = {
        "linear": {"combination_type": "linear"},
        "magnitude": {"combination_type": "magnitude_prune", "density": 0.5, "seed": 3},
        "ties": {"combination_type": "ties", "density": 0.5, "seed": 3, "majority_sign_method": "frequency"},
        "dare": {"combination_type": "dare_linear", "density": 0.5, "seed": 3, "rescale": False},
        "dare_ties": {"combination_type": "dare_ties", "density": 0.5, "seed": 3, "rescale": False,
                      "majority_sign_method": "frequency"},
    }
    for method, settings in expected.items():
        merged = merge_factors([a, b], w, method, density=0.5, seed=3, rescale=False, majority_sign_method="frequency")
        assert merged.meta == {"merge": {"method": method, "weights": w, **settings}}, method


def test_magnitude_prune_keeps_dtype_and_returns_t_from_density_1():
    t = torch.tensor([[0.5, -2.0], [1.0, -0.25]], dtype=torch.bfloat16)
    pruned = magnitude_prune(t, 0.5)
    assert pruned.dtype == torch.bfloat16 and pruned.tolist() == [[0.0, -2.0], [1.0, 0.0]]
    assert magnitude_prune(t, 1.0) is t and magnitude_prune(t, 1.5) is t


def test_random_prune_rescales_by_default_and_returns_t_from_density_1():
    t = torch.ones(1000)
    kept = random_prune(t, 0.5, torch.Generator().manual_seed(0))
    assert set(kept.unique().tolist()) == {0.0, 2.0}  # kept entries divided by the density
    assert torch.equal(kept, 2 * random_prune(t, 0.5, torch.Generator().manual_seed(0), rescale=False))
    assert random_prune(t, 1.0, None) is t and random_prune(t, 1.5, None) is t


def test_majority_sign_mask_total_and_frequency_with_a_tie_electing_plus():
    from lori.core.merge import combine, majority_sign_mask
    stacked = torch.tensor([[3.0, 1.0, -2.0], [-1.0, -1.0, -2.0], [-1.0, 0.0, 1.0]])  # (T=3, 3)
    # column sums 1, 0 (a tie: +), -3; sign votes -1, 0 (+), -1
    total = [[True, True, True], [False, False, True], [False, False, False]]
    frequency = [[False, True, True], [True, False, True], [True, False, False]]
    assert majority_sign_mask(stacked).tolist() == total
    assert majority_sign_mask(stacked, "frequency").tolist() == frequency
    with pytest.raises(ValueError) as info:
        majority_sign_mask(stacked, "mean")
    assert str(info.value) == "majority_sign_method must be one of ['total', 'frequency'], got 'mean'"
    rows = list(stacked)
    assert combine(rows, [1.0] * 3, "ties", majority_sign_method="frequency").tolist() == [-1.0, 1.0, -2.0]
    assert combine(rows, [1.0] * 3, "ties").tolist() == [3.0, 1.0, -2.0]


def test_delta_merge_refusals_name_the_module():
    from lori.core import QuantizedMergeError
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(AdapterMismatchError) as info:
        DeltaMerge(model, {"0": torch.zeros(3, 2)})
    assert str(info.value) == "0: ΔW (3, 2) vs weight (2, 2)"
    model[0].weight = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.int8), requires_grad=False)
    with pytest.raises(QuantizedMergeError, match="refusing to merge into 0: "):
        DeltaMerge(model, {"0": torch.zeros(2, 2)})


def test_merge_deltas_defaults_and_order():
    a, b = _trained_adapter(0), _trained_adapter(1)
    w = [0.3, 0.7]
    torch.manual_seed(1)
    dare = merge_deltas([a, b], w, "dare", density=0.5)
    torch.manual_seed(2)  # seed 0 by default: the same draws whatever the global RNG
    explicit = merge_deltas([a, b], w, "dare", density=0.5, seed=0)
    assert all(torch.equal(dare[p], explicit[p]) for p in a.A)
    from lori.core.merge import combine
    ties = merge_deltas([a, b], w, "ties")  # density 1 by default: ties of the unpruned ΔW
    assert all(torch.equal(ties[p], combine([a.delta(p), b.delta(p)], w, "ties", density=1.0)) for p in a.A)
    backwards = list(a.A)[::-1]
    assert list(merge_deltas([a, b], w, "linear", order=backwards)) == backwards


def test_check_mergeable_takes_one_adapter_and_names_what_differs():
    a = _trained_adapter(0)
    w = [0.5, 0.5]
    assert merge_concat([a], [1.0]).rank == a.rank  # a single adapter merges (scaled by its weight)
    with pytest.raises(AdapterMismatchError) as info:
        merge_concat([], [])
    assert str(info.value) == "nothing to merge: no adapters given"
    paths = sorted(a.A)
    fewer = Adapter(a.config, {p: a.A[p] for p in paths[4:]}, {p: a.B[p] for p in paths[4:]})
    with pytest.raises(AdapterMismatchError) as info:
        merge_concat([a, a, fewer], [0.2, 0.3, 0.5])
    assert str(info.value) == f"adapter 2 adapts other modules than adapter 0 (e.g. {paths[:3]})"
    p = paths[0]
    wide = Adapter(a.config, {**a.A, p: torch.zeros(a.rank, 5)}, a.B)
    d_out = a.B[p].shape[0]
    with pytest.raises(AdapterMismatchError) as info:
        merge_concat([a, wide], w)
    assert str(info.value) == (f"adapter 1 has {p} of shape ({d_out}, 5), adapter 0 ({d_out}, {a.A[p].shape[1]}): "
                               "different base models")
    on_meta = Adapter(a.config, a.A, a.B, None, None, "meta")  # a model on the meta device: no digest to compare
    assert merge_concat([a, on_meta], w).rank == 2 * a.rank
    with pytest.raises(AdapterMismatchError) as info:
        merge_factors([a, a], w, "dare", density=0.5, order=[p])
    assert str(info.value) == f"the module order misses adapted modules, e.g. {paths[1:4]}"


def test_combine_keeps_the_dtype_and_rescales_dare_by_default():
    from lori.core.merge import combine
    ts = [torch.tensor([1.0, -2.0], dtype=torch.bfloat16), torch.tensor([3.0, 4.0], dtype=torch.bfloat16)]
    assert combine(ts, [0.5, 0.5], "linear").dtype == torch.bfloat16
    ones = [torch.ones(100), torch.ones(100)]
    dare = combine(ones, [1.0, 1.0], "dare", density=0.5, generator=torch.Generator().manual_seed(0))
    rescaled = combine(ones, [1.0, 1.0], "dare", density=0.5, generator=torch.Generator().manual_seed(0), rescale=True)
    assert torch.equal(dare, rescaled) and set(dare.unique().tolist()) <= {0.0, 2.0, 4.0}


def test_combine_without_rescale_and_its_refusals():
    from lori.core.merge import PEFT_TYPES, combine
    ones = [torch.ones(100), torch.ones(100)]
    plain = combine(ones, [1.0, 1.0], "dare", density=0.5, generator=torch.Generator().manual_seed(0), rescale=False)
    rescaled = combine(ones, [1.0, 1.0], "dare", density=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(2 * plain, rescaled)
    with pytest.raises(ValueError) as info:
        combine(ones, [1.0, 1.0], "linear_eq8")
    assert str(info.value) == f"'linear_eq8' is not an operator on tensors; choose one of {list(PEFT_TYPES)}"
    a = _trained_adapter(0)
    with pytest.raises(ValueError) as info:
        merge_factors([a, a], [0.5, 0.5], "ties", density=1.5)
    assert str(info.value) == "density must be in (0, 1] for ties, got density=1.5"
    assert merge_factors([a, a], [0.5, 0.5], "ties", density=1.0).meta["merge"]["density"] == 1.0


def test_delta_space_merge_passes_every_setting_and_has_seeded_defaults():
    from lori.core.merge import combine, iter_merged_deltas
    a, b = _trained_adapter(0), _trained_adapter(1, r=8, alpha=16)  # ranks may differ in ΔW space
    w = [0.3, 0.7]
    paths = list(a.A)
    torch.manual_seed(1)
    dare = dict(iter_merged_deltas([a, b], w, "dare", density=0.5))
    torch.manual_seed(2)
    assert all(torch.equal(dare[p], t) for p, t in merge_deltas([a, b], w, "dare", density=0.5, seed=0).items())
    ties = dict(iter_merged_deltas([a, b], w, "ties"))  # density 1, sign by total
    assert all(torch.equal(ties[p], combine([a.delta(p), b.delta(p)], w, "ties")) for p in paths)
    freq = merge_deltas([a, b], w, "ties", majority_sign_method="frequency")
    assert all(torch.equal(freq[p], combine([a.delta(p), b.delta(p)], w, "ties", majority_sign_method="frequency"))
               for p in paths)
    g = torch.Generator().manual_seed(4)
    plain = merge_deltas([a, b], w, "dare", density=0.5, seed=4, rescale=False)
    assert all(torch.equal(plain[p], combine([a.delta(p), b.delta(p)], w, "dare", 0.5, g, rescale=False)) for p in paths)
    torch.manual_seed(5)
    unseeded = merge_deltas([a, b], w, "dare", density=0.5, seed=None)  # torch's default generator
    torch.manual_seed(5)
    assert all(torch.equal(unseeded[p], t) for p, t in merge_deltas([a, b], w, "dare", density=0.5, seed=None).items())
    assert next(iter_merged_deltas([a, b], w, "linear", order=paths[::-1]))[0] == paths[-1]
    with pytest.raises(ValueError) as info:
        merge_deltas([a, b], w, "linear_eq8")
    assert str(info.value) == "linear_eq8 is a factor-space merge; in ΔW space linear and concat are Σ w_t ΔW_t"
