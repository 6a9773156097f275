"""lori.core.sharding in the test process: torch's FSDP (and FSDP2) over two ranks that are threads.

tests/test_fsdp.py runs lori under FSDP in two processes, which a mutation run never sees
(docs/mutation_testing.md). Here torch's threaded process group (the one torch's own distributed
tests use: each thread is a rank, and its collectives really gather between the threads) lets
torch's FSDP shard a tiny adapted model FULL_SHARD over 2 ranks in this process, and what
``full_parameters`` and ``unwrap_fsdp`` give each rank is compared with the model never sharded.

The model: Linear(2, 6, bias=False) and Linear(6, 3), each in a Block, with LoRI (r = 4: B is
6 x 4 and 3 x 4) and a frozen Linear(3, 2). As one FSDP unit its flat parameter (83 entries, 84 padded) splits at 42, in
the middle of the second B (entries 36-48): each rank holds half of it. DeepSpeed is not installed:
a stand-in with its partitioning contract takes its place.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp._common_utils import TrainingState
from torch.testing._internal.distributed import multi_threaded_pg

from lori.core import LoRIConfig, full_parameters, get_B, inject_lori, sharding, unwrap_fsdp

CPU = torch.device("cpu")


def on_two_ranks(fn):
    """[fn(0), fn(1)], each called in its own thread as that rank of a 2-rank threaded process group."""
    results, errors = [None, None], []
    store = dist.HashStore()

    def rank_main(rank: int) -> None:
        dist.init_process_group("threaded", rank=rank, world_size=2, store=store)
        try:
            results[rank] = fn(rank)
        except BaseException as error:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(error)
            multi_threaded_pg.ProcessLocalGroup.exception_handle(error)  # frees a rank waiting in a collective
        finally:
            dist.destroy_process_group()

    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    multi_threaded_pg._install_threaded_pg()
    try:
        threads = [threading.Thread(target=rank_main, args=(rank,), daemon=True) for rank in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        hung = any(thread.is_alive() for thread in threads)
    finally:
        multi_threaded_pg.ProcessLocalGroup.reset()
        multi_threaded_pg._uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
    if errors:
        raise errors[0]
    assert not hung, "a rank did not finish in 60 s"
    return results


class Block(nn.Module):
    """A layer holding its projection, as a decoder layer holds q_proj: what FSDP units and
    activation checkpointing wrap (lori's paths leave out the wrappers *inside* a module path)."""

    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def adapted() -> nn.Sequential:
    """The module docstring's model, every parameter (B too) drawn from N(0, 1) by a generator of
    its own: alike on every rank (the ranks are threads: the global generator is shared)."""
    model = nn.Sequential(Block(2, 6, bias=False), nn.ReLU(), Block(6, 3, bias=True), nn.Linear(3, 2))
    inject_lori(model, LoRIConfig(r=4, alpha=8, dropout=0.0, target_modules=["proj"]))  # A: seeded by path
    for seed, p in enumerate(model.parameters()):
        p.data.normal_(generator=torch.Generator().manual_seed(seed))
    return model


def wrap(module: nn.Module, **options) -> FSDP:
    return FSDP(module, device_id=CPU, use_orig_params=options.pop("use_orig_params", True), **options)


def per_layer() -> tuple[nn.Sequential, FSDP]:
    """Both LoRI layers in units of their own, nested with activation checkpointing both ways round
    (FSDP over the checkpoint wrapper, and the wrapper over FSDP); the root unit holds only Linear(3, 2)."""
    model = adapted()
    model[0] = wrap(checkpoint_wrapper(model[0]))
    model[2] = checkpoint_wrapper(wrap(model[2]))
    return model, wrap(model)


def whole_B() -> dict[str, torch.Tensor]:
    return {p: b.clone() for p, b in get_B(adapted()).items()}


def clones(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def numels(model: nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in model.named_parameters()}


def watch_unsharding(monkeypatch) -> list[tuple[int, str, list[str]]]:
    """For each unit ``FSDP.summon_full_params`` unshards: (rank, the class the unit wraps, the
    classes of every unit under the summoned one that is unsharded at that moment)."""
    summoned, real = [], FSDP.summon_full_params

    @contextlib.contextmanager
    def watched(unit, *args, **kwargs):
        with real(unit, *args, **kwargs):
            units = FSDP.fsdp_modules(unit)
            busy = [m for m in units if m.training_state == TrainingState.SUMMON_FULL_PARAMS]
            name = lambda m: type(m._fsdp_wrapped_module).__name__
            summoned.append((dist.get_rank(), name(unit), [name(m) for m in busy]))
            yield

    monkeypatch.setattr(FSDP, "summon_full_params", staticmethod(watched))
    return summoned


X = torch.linspace(-1.0, 1.0, 10).reshape(5, 2)


def test_full_parameters_gives_every_rank_the_whole_B_and_leaves_the_base_sharded():
    expected = whole_B()
    plain = adapted()
    frozen_total = sum(p.numel() for p in plain.parameters() if not p.requires_grad)

    def rank(r: int):
        model = adapted()
        wrapped = wrap(model)
        held = numels(model)
        pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
        with full_parameters(wrapped):
            inside = {p: b.clone() for p, b in get_B(model).items()}
            inside_numel = numels(model)
            frozen_inside = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        after = (numels(model), {name: p.data_ptr() for name, p in model.named_parameters()})
        with torch.no_grad():
            out = wrapped(X)
        return held, inside, inside_numel, frozen_inside, pointers, after, out

    results = on_two_ranks(rank)
    held = [r[0] for r in results]
    assert 0 < held[0]["2.proj.lori_B"] < 12 and held[0]["2.proj.lori_B"] + held[1]["2.proj.lori_B"] == 12  # cut in two
    for r, (held_r, inside, inside_numel, frozen_inside, pointers, after, out) in enumerate(results):
        assert inside.keys() == expected.keys()
        for path in expected:
            assert torch.equal(inside[path], expected[path]), (r, path)
        for name, n in inside_numel.items():  # whole B, the frozen weights as held
            assert n == (plain.get_parameter(name).numel() if name.endswith("lori_B") else held_r[name]), (r, name)
        assert frozen_inside < frozen_total
        assert after == (held_r, pointers), r  # FSDP's own shard views back
        torch.testing.assert_close(out, plain(X).detach(), rtol=0, atol=1e-6)  # and FSDP still runs on them


def test_full_parameters_gives_the_shards_back_when_its_body_raises():
    def rank(r: int):
        model = adapted()
        wrapped = wrap(model)
        held = numels(model)
        with pytest.raises(KeyError), full_parameters(wrapped):
            assert numels(model)["2.proj.lori_B"] == 12
            raise KeyError("body")
        return held, numels(model)

    for held, after in on_two_ranks(rank):
        assert after == held


def test_full_parameters_unshards_one_unit_at_a_time_and_only_units_holding_B(monkeypatch):
    """The peak is one unit's flat parameter: a unit is unsharded alone (not with the units inside
    it), and the root unit, which holds only frozen weights, is never unsharded."""
    expected = whole_B()
    summoned = watch_unsharding(monkeypatch)

    def rank(r: int):
        model, wrapped = per_layer()
        with full_parameters(wrapped):
            return {p: b.clone() for p, b in get_B(model).items()}

    for r, inside in enumerate(on_two_ranks(rank)):
        assert inside.keys() == expected.keys()
        for path in expected:
            assert torch.equal(inside[path], expected[path]), (r, path)
    for r in (0, 1):
        assert [(unit, busy) for rank_, unit, busy in summoned if rank_ == r] == [
            ("CheckpointWrapper", ["CheckpointWrapper"]), ("Block", ["Block"])], summoned


def test_unwrap_fsdp_gives_the_plain_model_back_with_whole_parameters_on_every_rank():
    plain = adapted()
    expected, names = clones(plain), [name for name, _ in plain.named_parameters()]

    def rank(r: int):
        _, wrapped = per_layer()
        with torch.no_grad():
            wrapped(X)  # a forward marks the modules FSDP manages (transformers' generate reads the mark)
        managed = sum("_is_fsdp_managed_module" in m.__dict__ for m in wrapped.modules())
        unwrapped = unwrap_fsdp(wrapped)
        return managed, unwrapped

    for r, (managed, model) in enumerate(on_two_ranks(rank)):
        assert managed > 0
        assert type(model) is nn.Sequential
        assert [type(m) for m in model] == [Block, nn.ReLU, Block, nn.Linear]
        assert not any(isinstance(m, FSDP | CheckpointWrapper) for m in model.modules())
        assert not any("_is_fsdp_managed_module" in m.__dict__ for m in model.modules())
        assert [name for name, _ in model.named_parameters()] == names
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), expected[name]), (r, name)
            assert p.device == CPU and not hasattr(p, "_fsdp_flattened"), (r, name)
            assert p.requires_grad == plain.get_parameter(name).requires_grad, (r, name)
        torch.testing.assert_close(model(X), plain(X), rtol=0, atol=0)


def test_unwrap_fsdp_gathers_one_unit_at_a_time_the_root_too(monkeypatch):
    summoned = watch_unsharding(monkeypatch)
    on_two_ranks(lambda r: unwrap_fsdp(per_layer()[1]))
    for r in (0, 1):  # the root unit (Linear(3, 2)'s weights) too
        assert [(unit, busy) for rank_, unit, busy in summoned if rank_ == r] == [
            ("Sequential", ["Sequential"]), ("CheckpointWrapper", ["CheckpointWrapper"]), ("Block", ["Block"])]


def test_unwrap_fsdp_of_a_root_unit_without_parameters_of_its_own():
    expected = clones(adapted())

    def rank(r: int):
        model = adapted()
        for i in (0, 2, 3):
            model[i] = wrap(model[i])
        return clones(unwrap_fsdp(wrap(model)))  # the root's flat parameter is None

    for got in on_two_ranks(rank):
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_fsdp_without_use_orig_params_is_refused():
    def rank(r: int):
        model = adapted().requires_grad_(True)  # use_orig_params=False flattens only alike requires_grad
        wrapped = wrap(model, use_orig_params=False)
        with pytest.raises(RuntimeError) as refused, full_parameters(wrapped):
            pass
        return str(refused.value)

    assert on_two_ranks(rank) == ["lori reads FSDP parameters through use_orig_params=True (Lightning's default)"] * 2


def test_unwrap_fsdp_names_parameters_fsdp_does_not_manage():
    """Parameters FSDP was told to ignore are not gathered: unwrapping refuses, naming the first three."""
    def rank(r: int):
        model = adapted()
        model.append(nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1)))
        wrapped = wrap(model, ignored_states=[model[4]])
        with pytest.raises(RuntimeError) as refused:
            unwrap_fsdp(wrapped)
        return str(refused.value)

    assert on_two_ranks(rank) == [(
        "FSDP unwrapping lost track of ['4.0.weight', '4.0.bias', '4.1.weight']: wrap with use_orig_params=True "
        "(Lightning's default)")] * 2


def test_without_sharding_both_are_no_ops():
    model = adapted()
    before = clones(model)
    with full_parameters(model):
        assert numels(model) == numels(adapted())
    assert unwrap_fsdp(model) is model
    assert all(torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())
    assert not sharding.has_fsdp(model)


def test_has_fsdp_finds_a_unit_anywhere_in_the_tree():
    def rank(r: int):
        model = adapted()
        outer = nn.Sequential(nn.Sequential(model))
        before = sharding.has_fsdp(outer)
        model[2] = wrap(model[2])
        return before, sharding.has_fsdp(outer), sharding.has_fsdp(model[0]), sharding.has_fsdp(model[2])

    assert on_two_ranks(rank) == [(False, True, False, True)] * 2


def test_torch_without_distributed_has_no_fsdp(monkeypatch):
    """A torch built without distributed has no FSDP module: nothing is FSDP, checkpoint wrappers
    are still taken off, and both context and unwrapping leave a plain model alone."""
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)  # the import fails
    assert sharding._fsdp_class() is None
    model = adapted()
    assert not sharding.has_fsdp(model)
    assert unwrap_fsdp(model) is model
    with full_parameters(model):
        pass
    inner = nn.Linear(2, 2)
    assert sharding._strip(checkpoint_wrapper(checkpoint_wrapper(inner))) is inner
    assert sharding._strip(inner) is inner


def test_strip_takes_off_nested_fsdp_and_checkpoint_wrappers():
    def rank(r: int):
        inner = adapted()[2]
        outer = checkpoint_wrapper(wrap(checkpoint_wrapper(wrap(inner))))
        return sharding._strip(outer) is inner, sharding._strip(inner) is inner

    assert on_two_ranks(rank) == [(True, True)] * 2


# ---- DeepSpeed ZeRO-3 (not installed here: a stand-in with its partitioning contract) -----------
class _GatheredParameters:
    """deepspeed.zero.GatheredParameters as lori relies on it: inside, the listed partitioned
    parameters hold their whole data; with a ``modifier_rank``, what that rank wrote is kept."""

    calls: ClassVar[list[tuple[list[nn.Parameter], object]]] = []

    def __init__(self, params, modifier_rank=None, fwd_module=None, enabled=True):
        self.params, self.modifier_rank = list(params), modifier_rank
        self.calls.append((self.params, modifier_rank))

    def __enter__(self):
        for p in self.params:
            p.data = p.ds_whole.clone()

    def __exit__(self, *exc):
        for p in self.params:
            if self.modifier_rank is not None:
                p.ds_whole = p.data.clone()
            p.data = torch.empty(0)


def partitioned(model: nn.Module) -> nn.Module:
    """Every parameter partitioned as ZeRO-3 leaves it: an id, its data elsewhere, an empty tensor."""
    for i, p in enumerate(model.parameters()):
        p.ds_id, p.ds_whole, p.data = i, p.data.clone(), torch.empty(0)
    return model


@pytest.fixture
def deepspeed(monkeypatch):
    _GatheredParameters.calls = []
    module = types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=_GatheredParameters))
    monkeypatch.setitem(sys.modules, "deepspeed", module)
    return module


def test_zero3_gathers_the_trainable_parameters_only_and_read_only(deepspeed):
    expected = whole_B()
    model = partitioned(adapted())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sharding.zero3_parameters(model) == list(model.parameters())
    with full_parameters(model):
        inside = {p: b.clone() for p, b in get_B(model).items()}
        frozen = [p.numel() for p in model.parameters() if not p.requires_grad]
        for p in trainable:
            p.data.fill_(7.0)  # read only: not kept
    assert [(list(map(id, params)), rank) for params, rank in _GatheredParameters.calls] == [
        (list(map(id, trainable)), None)]
    assert inside.keys() == expected.keys() and all(torch.equal(inside[p], expected[p]) for p in expected)
    assert frozen == [0, 0, 0, 0, 0] and all(p.numel() == 0 for p in model.parameters())
    assert all(torch.equal(p.ds_whole, expected[path]) for p, path in zip(trainable, expected, strict=True))


def test_zero3_with_nothing_trainable_partitioned_gathers_nothing(deepspeed):
    model = adapted()
    for p in model[3].parameters():  # partitioned, but frozen
        p.ds_id = 0
    with full_parameters(model):
        pass
    assert _GatheredParameters.calls == []
    assert sharding.zero3_parameters(model) == list(model[3].parameters())
    assert sharding.zero3_parameters(adapted()) == []


def test_a_model_partitioned_by_zero3_cannot_be_unwrapped():
    model = adapted()
    model[3].weight.ds_id = 3
    with pytest.raises(NotImplementedError) as refused:
        unwrap_fsdp(model)
    assert str(refused.value) == (
        "a model partitioned by DeepSpeed ZeRO-3 cannot be handed to the next stage: run multi-stage commands "
        "(lori pipeline, lori continual) under FSDP (configs/trainer/fsdp.yaml); ZeRO-3 serves single fits (lori fit)")


# ---- DTensor parameters (FSDP2, ModelParallelStrategy): refused by name ------------------------
def test_fsdp2_parameters_are_refused_by_name():
    """torch's fully_shard (FSDP2) turns a module's parameters into DTensors: lori does not gather them."""
    def rank(r: int):
        model = adapted()
        fully_shard(model[2], mesh=init_device_mesh("cpu", (2,)))
        found = sharding._dtensor_parameter(model)
        with pytest.raises(NotImplementedError) as refused, full_parameters(model):
            pass
        return found, str(refused.value)

    assert on_two_ranks(rank) == [("2.proj.lori_B", (
        "parameter '2.proj.lori_B' is a DTensor (FSDP2 / ModelParallelStrategy): lori gathers B under FSDP "
        "(lightning FSDPStrategy, configs/trainer/fsdp.yaml) and DeepSpeed ZeRO-3 only"))] * 2
    assert sharding._dtensor_parameter(adapted()) is None


class DTensor(torch.Tensor):
    """Named as torch's DTensor: lori tells DTensors by their class name."""


class _HoldsDTensor:
    """A parameter whose ``data`` is a DTensor while it is not one itself (lori checks both)."""

    def __init__(self):
        self.data, self.requires_grad = torch.zeros(2).as_subclass(DTensor), True


def test_a_parameter_holding_a_dtensor_is_refused_by_name(monkeypatch):
    model = adapted()
    plain_named = model.named_parameters

    def named_parameters(*args, **kwargs):
        yield from plain_named(*args, **kwargs)
        yield "3.weight_shard", _HoldsDTensor()

    monkeypatch.setattr(model, "named_parameters", named_parameters)
    assert sharding._dtensor_parameter(model) == "3.weight_shard"
    with pytest.raises(NotImplementedError, match=r"^parameter '3.weight_shard' is a DTensor \(FSDP2 "), \
            full_parameters(model):
        pass
