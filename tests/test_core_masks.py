"""Calibration equals a sort-based reference, keeps exactly k; masked training is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from torch.overrides import TorchFunctionMode

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


def test_calibration_refuses_an_all_zero_group():
    """B = 0 (LoRI-D trained nothing) carries no information: ties would be broken by position."""
    zeros = {f"model.layers.{i}.self_attn.q_proj": torch.zeros(8, 4) for i in range(2)}
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="is zero.*by position"):
        calibrate(zeros, 0.9)
    assert torch.get_num_threads() == threads  # restored after calibration, even when it raises
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj"):  # the zero group, at matrix level
        calibrate({**_random_bs(), "model.layers.1.mlp.up_proj": torch.zeros(24, 4)}, 0.9, "matrix")
    # mostly zero but with some signal is fine: the nonzero entries are kept first
    few = torch.zeros(8, 4)
    few[3, 1] = -0.5
    assert calibrate({"layers.0.q_proj": few}, 0.9)["layers.0.q_proj"][3, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_calibration_of_every_float_dtype_equals_the_reference(dtype):
    bs = {p: t.to(dtype) for p, t in _random_bs(seed=3).items()}
    ref = _reference({p: t.float() for p, t in bs.items()}, 0.9, "model")
    masks = calibrate(bs, 0.9, "model")
    assert all(torch.equal(masks[p], ref[p]) for p in bs)


def test_calibration_threshold_bucket_holds_every_entry():
    """All |b| share the high 15 bits (one pass-1 bucket): the low pass alone decides, exactly."""
    g = torch.Generator().manual_seed(0)
    bs = {f"layers.{i}.q_proj": 1.0 + torch.randint(0, 50, (16, 4), generator=g).float() * 2**-23
          for i in range(3)}
    masks = calibrate(bs, 0.75, "model")
    ref = _reference(bs, 0.75, "model")
    assert all(torch.equal(masks[p], ref[p]) for p in bs)


class _HostTransferSpy(TorchFunctionMode):
    """Records every call that would copy a tensor of more than ``allowed`` elements to host memory."""

    HOST = (torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.__array__)

    def __init__(self, allowed: int) -> None:
        super().__init__()
        self.allowed = allowed
        self.transfers: list[str] = []
        self.bincount_devices: set[torch.device] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if tensor is not None and tensor.numel() > self.allowed:
            to_host = func is torch.Tensor.to and any(
                str(a).startswith("cpu") for a in (*args[1:], kwargs.get("device")) if isinstance(a, str | torch.device)
            )
            if func in self.HOST or to_host:
                self.transfers.append(f"{getattr(func, '__name__', func)} of {tuple(tensor.shape)}")
        if func is torch.bincount:
            self.bincount_devices.add(tensor.device)
        return func(*args, **kwargs)


def test_calibration_stays_on_the_device_of_b():
    """No B-sized data is copied to the host (scalars and one count per tensor at most), and every
    tensor calibration creates is on b's device.

    Inside ``torch.device("meta")`` a tensor created without an explicit device would be a meta
    tensor, and mixing it with b's (cpu) tensors or reading it fails; on a GPU the same code would
    have made a host tensor and copied the histograms across every pass.
    """
    bs = _random_bs(with_ties=True)
    spy = _HostTransferSpy(allowed=len(bs) + 1)
    with torch.device("meta"), spy:
        masks = calibrate(bs, 0.9, "model")
    assert spy.transfers == []
    assert spy.bincount_devices == {torch.device("cpu")}
    assert all(m.device.type == "cpu" for m in masks.values())
    assert all(torch.equal(masks[p], r) for p, r in _reference(bs, 0.9, "model").items())


@pytest.mark.gpu
def test_calibration_on_cuda_equals_cpu():
    bs = _random_bs(with_ties=True)
    cuda = calibrate({p: t.cuda() for p, t in bs.items()}, 0.9, "layer")
    cpu = calibrate(bs, 0.9, "layer")
    assert all(cuda[p].device.type == "cuda" and torch.equal(cuda[p].cpu(), cpu[p]) for p in bs)


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


# --- path helpers and mask statistics, exact values on hand-made masks ------------------------


def test_path_helpers_name_layer_projection_and_kind():
    from lori.core.masks import layer_index, module_kind, projection_name
    assert layer_index("model.layers.3.mlp.up_proj") == 3 and layer_index("transformer.h.11.attn.c_attn") == 11
    assert layer_index("model.embed_tokens") is None and layer_index("lm_head") is None
    assert projection_name("model.layers.3.mlp.up_proj") == "up_proj" and projection_name("lm_head") == "lm_head"
    kinds = {
        "model.layers.0.self_attn.c_proj": "attention",  # by a parent named *attn*
        "bert.encoder.layer.0.attention.output.dense": "attention",  # by a parent named *attention*
        "model.layers.0.mlp.q_proj": "attention",  # by the projection name
        "q_proj": "attention",
        "model.layers.0.mlp.up_proj": "mlp",
        "model.layers.0.mlp.attn_gate": "mlp",  # the module's own name is not a parent
        "lm_head": "mlp",
    }
    assert {p: module_kind(p) for p in kinds} == kinds


def _hand_masks() -> dict[str, torch.Tensor]:
    t, f = True, False
    return {
        "lm_head": torch.tensor([f, f]),  # no layer index (first: the ones after it still count)
        "model.layers.0.self_attn.q_proj": torch.tensor([[t, f], [f, f]]),
        "model.layers.0.cross_attn.q_proj": torch.tensor([t, t, t, f]),  # same (layer, projection)
        "model.layers.0.mlp.up_proj": torch.tensor([t, t, f, f]),
        "model.layers.1.mlp.up_proj": torch.tensor([t]),
    }


def test_sparsity_by_each_grouping_exactly():
    from lori.core.masks import mask_density
    masks = _hand_masks()
    assert sparsity_by(masks, "layer") == {"layer0": 1 - 6 / 12, "layer1": 0.0, "layerNone": 1.0}
    assert sparsity_by(masks, "projection") == {"q_proj": 1 - 4 / 8, "up_proj": 1 - 3 / 5, "lm_head": 1.0}
    assert sparsity_by(masks, "module") == {"attention": 0.5, "mlp": 1 - 3 / 7}
    assert sparsity_by(masks, "matrix")["model.layers.0.self_attn.q_proj"] == 0.75
    assert sparsity_by(masks) == sparsity_by(masks, "layer")
    with pytest.raises(ValueError, match="unknown grouping 'model'"):
        sparsity_by(masks, "model")
    assert mask_density(masks) == 7 / 15 and mask_density({}) == 0.0
    assert mask_density({"x": torch.tensor([True])}) == 1.0


def test_sparsity_table_sums_modules_of_one_cell_and_skips_unlayered():
    layers, projections, table = sparsity_table(_hand_masks())
    assert layers == [0, 1] and projections == ["lm_head", "q_proj", "up_proj"]
    assert table.dtype == torch.float64
    # lm_head has no layer: its column is empty (sparsity 1); (0, q_proj) sums two modules: 4 of 8
    assert table.tolist() == [[1.0, 0.5, 0.5], [1.0, 1.0, 0.0]]


def test_mask_overlap_exact_values_and_refusals():
    a = {"x": torch.tensor([True, True, False, False])}
    b = {"x": torch.tensor([True, False, True, False])}
    assert mask_overlap(a, b) == {"intersection": 0.25, "jaccard": 1 / 3, "of_a": 0.5}
    a2 = {**a, "y": torch.tensor([True, False])}
    b2 = {**b, "y": torch.tensor([True, True])}
    assert mask_overlap(a2, b2) == {"intersection": 2 / 6, "jaccard": 2 / 5, "of_a": 2 / 3}
    one = {"x": torch.tensor([True])}
    assert mask_overlap(one, one) == {"intersection": 1.0, "jaccard": 1.0, "of_a": 1.0}
    none = {"x": torch.tensor([False, False])}
    assert mask_overlap(none, none) == {"intersection": 0.0, "jaccard": 0.0, "of_a": 0.0}
    extra = {f"m{i}": torch.tensor([True]) for i in range(7)}
    with pytest.raises(ValueError) as info:
        mask_overlap({**one, **extra}, one)
    assert str(info.value) == "mask sets cover different modules: ['m0', 'm1', 'm2', 'm3', 'm4']"
    with pytest.raises(ValueError) as info:
        mask_overlap(one, {"x": torch.tensor([True, False])})
    assert str(info.value) == "mask shapes differ at 'x': torch.Size([1]) vs torch.Size([2])"


def test_select_digit_counts_entries_above_the_chosen_digit():
    from lori.core.masks import _select_digit
    hist = torch.tensor([4, 2, 3])  # digit 2 holds 3 entries, digit 1 two, digit 0 four
    assert _select_digit(hist, 1) == (2, 0) and _select_digit(hist, 3) == (2, 0)
    assert _select_digit(hist, 4) == (1, 3) and _select_digit(hist, 5) == (1, 3)
    assert _select_digit(hist, 6) == (0, 5)
    # every entry tied in the top bucket: exactly k kept, the first in row-major order
    mask = calibrate({"w": torch.ones(4, 4)}, 0.5)["w"]
    assert mask.reshape(-1).tolist() == [True] * 8 + [False] * 8


def test_calibration_of_scalar_vector_and_matrix_b_in_one_group():
    """B of any rank (0-d, 1-d, 2-d: rows of different widths) ranks in one group; k >= 1."""
    bs = {"s": torch.tensor(-2.0), "v": torch.tensor([0.1, -1.5, 0.2]), "w": torch.tensor([[1.0, -0.5]])}
    masks = calibrate(bs, 0.5)  # n = 6, k = 3: |-2|, |-1.5|, |1|
    assert masks["s"].shape == () and bool(masks["s"])
    assert masks["v"].tolist() == [False, True, False] and masks["w"].tolist() == [[True, False]]
    assert keep_count(10, 0.95) == 1 and keep_count(10, 0.0) == 10
    with pytest.raises(ValueError, match="^calibrate got no B tensors$"):
        calibrate({}, 0.5)


def test_histogram_counts_are_exact_integers():
    from lori.core.masks import _histogram
    hist = _histogram([torch.tensor([1, 1, 3]), torch.tensor([3, 0])], 4)
    assert hist.dtype == torch.int64 and hist.tolist() == [1, 2, 0, 2]


def test_calibration_runs_on_one_cpu_thread_and_restores_the_count(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    calibrate({"w": torch.tensor([[1.0, 2.0]])}, 0.5)
    assert calls == [1, 4]  # one thread inside, the previous count after
    calls.clear()
    from lori.core.masks import _one_cpu_thread
    with _one_cpu_thread(False):  # B off the CPU: the thread count is left alone
        pass
    assert calls == []


def test_calibration_refusal_messages_in_full():
    from lori.core.finite import NonFiniteError
    from lori.core.masks import CalibrationError
    with pytest.raises(NonFiniteError) as info:
        calibrate({"layers.0.q_proj": torch.tensor([[float("nan"), 1.0]])}, 0.5)
    assert str(info.value) == "B of 'layers.0.q_proj' holds 1 NaN and 0 inf of 2 values; cannot calibrate a mask from it"
    with pytest.raises(CalibrationError) as info:
        calibrate({"a": torch.zeros(2), "b": torch.zeros(3)}, 0.5)
    assert str(info.value) == (
        "every B entry of the group (2 tensors, 'a' ... 'b', 5 entries) is zero: a mask calibrated from it "
        "would keep entries by position only; train B first (LoRI-D)")
    assert {group_of(p, g) for p in ["model.layers.2.mlp.up_proj"] for g in GRANS} == {
        "model", "mlp", "up_proj", "layer2", "model.layers.2.mlp.up_proj"}


# --- injection (lori.core.inject): which layers, frozen base, refusals, listing ---------------


def _named_linears() -> torch.nn.Module:
    from collections import OrderedDict
    nn = torch.nn
    return nn.Sequential(OrderedDict(
        q_proj=nn.Linear(4, 4),  # a top-level target: no parent path
        blk=nn.Sequential(OrderedDict(mlp=nn.Sequential(OrderedDict(up_proj=nn.Linear(4, 4), act=nn.GELU())))),
        norm=nn.LayerNorm(4),
    ))


def test_inject_lori_adapts_exactly_the_targeted_linears_and_freezes_the_rest():
    from lori.core.inject import InjectionError, adapter_listing, plain_path
    cfg = LoRIConfig(r=2, alpha=4, target_modules=["up_proj"])
    model = _named_linears()
    assert list(inject_lori(model, cfg)) == ["blk.mlp.up_proj"]
    assert count_trainable(model) == 4 * 2  # B only: every base parameter frozen
    both = LoRIConfig(r=2, alpha=4, target_modules=["q_proj", "up_proj"], seed=5)
    m1, m2 = _named_linears(), _named_linears()
    l1, l2 = inject_lori(m1, both), inject_lori(m2, both)
    assert list(l1) == ["q_proj", "blk.mlp.up_proj"] and m1.q_proj is l1["q_proj"]
    assert all(torch.equal(l1[p].lori_A, l2[p].lori_A) for p in l1)  # seed and path draw A
    from lori.core.layer import draw_A
    assert torch.equal(l1["q_proj"].lori_A, draw_A(2, 4, 5, "q_proj").to(l1["q_proj"].lori_A.dtype))  # config.seed
    assert not torch.equal(l1["q_proj"].lori_A, l1["blk.mlp.up_proj"].lori_A)  # one A per path
    with pytest.raises(InjectionError) as info:
        inject_lori(m1, both)
    assert str(info.value) == "model already holds LoRI adapters; build a fresh base model"
    with pytest.raises(InjectionError) as info:
        inject_lori(_named_linears(), LoRIConfig(r=2, alpha=4, target_modules=["up_proj", "norm", "mlp"]))
    assert str(info.value) == ("target_modules ['norm', 'mlp'] match no nn.Linear in Sequential; "
                               "linear layer names there: ['q_proj', 'up_proj']")
    with pytest.raises(InjectionError) as info:
        get_B(_named_linears())
    assert str(info.value) == "Sequential holds no LoRI adapters; call inject_lori first"
    assert plain_path("_fsdp_wrapped_module.blk._checkpoint_wrapped_module.mlp") == "blk.mlp"
    assert plain_path("blk.mlp.up_proj._fsdp_wrapped_module") == "blk.mlp.up_proj"  # the layer is the unit
    assert plain_path("a._checkpoint_wrapped_module._fsdp_wrapped_module.b") == "a.b"
    set_masks(m1, {"q_proj": torch.tensor([[True, False]] * 4), "blk.mlp.up_proj": torch.ones(4, 2, dtype=torch.bool)})
    assert adapter_listing(m1) == [
        {"path": "q_proj", "in": 4, "out": 4, "r": 2, "trainable": 4},
        {"path": "blk.mlp.up_proj", "in": 4, "out": 4, "r": 2, "trainable": 8},
    ]
    set_masks(m1, None)
    assert [row["trainable"] for row in adapter_listing(m1)] == [8, 8]


def test_a_lori_layer_wrapped_itself_keeps_its_plain_path():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from lori.core.inject import lori_layers
    model = _named_linears()
    layers = inject_lori(model, LoRIConfig(r=2, alpha=4, target_modules=["q_proj", "up_proj"]))
    model.q_proj = checkpoint_wrapper(model.q_proj)  # the LoRILinear is now <path>._checkpoint_wrapped_module
    assert list(lori_layers(model)) == ["q_proj", "blk.mlp.up_proj"]
    assert lori_layers(model)["q_proj"] is layers["q_proj"]
    assert list(get_B(model)) == ["q_proj", "blk.mlp.up_proj"]


def test_set_masks_names_unknown_and_missing_modules():
    from collections import OrderedDict

    from lori.core.inject import InjectionError
    model = torch.nn.Sequential(OrderedDict((f"l{i}", torch.nn.Linear(3, 3)) for i in range(5)))
    inject_lori(model, LoRIConfig(r=2, alpha=4, target_modules=[f"l{i}" for i in range(5)]))
    with pytest.raises(InjectionError) as info:
        set_masks(model, {f"x{i}": torch.ones(3, 2, dtype=torch.bool) for i in range(5)})
    assert str(info.value) == "masks do not match the adapters: unknown ['x0', 'x1', 'x2'], missing ['l0', 'l1', 'l2']"
