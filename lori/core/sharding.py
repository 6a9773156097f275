"""Whole parameters from a sharded model: what calibration and adapter saving read under FSDP / ZeRO-3.

Under FSDP (FULL_SHARD) or DeepSpeed ZeRO-3 each rank holds a slice of every flat parameter outside
forward and backward, and a slice may end in the middle of a B. Code that reads B (the global
top-k of mask calibration, the adapter file) must see the whole tensors on every rank, so:

    with full_parameters(root):      # collective: every rank enters, every rank sees whole B
        masks = calibrate(get_B(model), sparsity)

``unwrap_fsdp(root)`` ends a fit's FSDP wrapping: it returns the plain module with whole
parameters, so the next stage (set masks, reset B, wrap again) works on ordinary tensors.
Plain torch; the Lightning callbacks call these with ``trainer.strategy.model``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

_FSDP_FLATTENED = "_fsdp_flattened"  # torch marks parameters it manages with this attribute


def _fsdp_class() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return None
    return FullyShardedDataParallel


def has_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` is, or contains, an FSDP (FullyShardedDataParallel) unit."""
    fsdp = _fsdp_class()
    return fsdp is not None and any(isinstance(m, fsdp) for m in module.modules())


def zero3_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters DeepSpeed ZeRO-3 partitions (they carry ``ds_id``)."""
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


def _dtensor_parameter(module: nn.Module) -> str | None:
    for name, p in module.named_parameters():
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            return name
    return None


def _gather_fsdp(root: nn.Module, keep: Callable[[nn.Parameter], bool], device: torch.device | None
                 ) -> list[tuple[nn.Parameter, Tensor]]:
    """Whole copies of the FSDP-managed parameters ``keep`` selects, one FSDP unit at a time.

    Each unit is unsharded alone (``recurse=False``), its parameters copied (to ``device``, or where
    they are), and resharded before the next: the peak is one unit, never the whole model. Units are
    visited in module order and ``keep`` must answer alike on every rank (a collective per unit).
    """
    fsdp = _fsdp_class()
    whole: list[tuple[nn.Parameter, Tensor]] = []
    for unit in fsdp.fsdp_modules(root):
        flat = unit._flat_param
        if flat is None:
            continue
        if getattr(flat, "_params", None) is None:
            raise RuntimeError("lori reads FSDP parameters through use_orig_params=True (Lightning's default)")
        params = [p for p in list(flat._params) + list(getattr(flat, "_shared_params", None) or []) if keep(p)]
        if not params:
            continue
        with fsdp.summon_full_params(unit, recurse=False, writeback=False, rank0_only=False, offload_to_cpu=False):
            whole += [(p, p.detach().to(device or p.device, copy=True)) for p in params]
    return whole


@contextlib.contextmanager
def full_parameters(root: nn.Module) -> Iterator[None]:
    """Inside, every rank sees the whole *trainable* parameters of ``root`` (read only).

    That is all calibration and adapter saving read (B; every weight under full fine-tuning); frozen
    base weights stay sharded, so the extra memory is one copy of B. FSDP: gathered unit by unit;
    ZeRO-3: ``GatheredParameters``; a no-op when nothing is sharded. Collective: call it on every
    rank, never inside forward or backward. Pass the outermost wrapped module
    (``trainer.strategy.model``).
    """
    if has_fsdp(root):
        whole = _gather_fsdp(root, lambda p: p.requires_grad, None)
        sharded = [(p, p.data) for p, _ in whole]
        for p, t in whole:
            p.data = t
        try:
            yield
        finally:
            for p, data in sharded:  # FSDP's own views back
                p.data = data
        return
    partitioned = [p for p in zero3_parameters(root) if p.requires_grad]
    if partitioned:
        import deepspeed  # present whenever ZeRO-3 partitioned the parameters

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            yield
        return
    name = _dtensor_parameter(root)
    if name is not None:
        raise NotImplementedError(
            f"parameter {name!r} is a DTensor (FSDP2 / ModelParallelStrategy): lori gathers B under FSDP "
            "(lightning FSDPStrategy, configs/trainer/fsdp.yaml) and DeepSpeed ZeRO-3 only"
        )
    yield


def _strip(module: nn.Module) -> nn.Module:
    """The module an FSDP unit or an activation-checkpoint wrapper stands for."""
    fsdp = _fsdp_class()
    while True:
        if fsdp is not None and isinstance(module, fsdp):
            module = module._fsdp_wrapped_module
        elif hasattr(module, "_checkpoint_wrapped_module"):
            module = module._checkpoint_wrapped_module
        else:
            return module


def unwrap_fsdp(root: nn.Module) -> nn.Module:
    """The plain module inside an FSDP-wrapped ``root``, with whole parameters on every rank, on the CPU.

    Gathered one unit at a time, so no GPU ever holds the whole model. Needs FSDP's
    ``use_orig_params=True`` (Lightning's default): the original parameter objects stay registered
    in the wrapped modules and get their whole values back here. Collective (every rank
    calls it). Returns ``root`` unchanged when it holds no FSDP unit. DeepSpeed ZeRO-3 cannot be
    undone this way: a module it partitioned raises.
    """
    if not has_fsdp(root):
        if zero3_parameters(root):
            raise NotImplementedError(
                "a model partitioned by DeepSpeed ZeRO-3 cannot be handed to the next stage: run multi-stage "
                "commands (lori pipeline, lori continual) under FSDP (configs/trainer/fsdp.yaml); ZeRO-3 serves "
                "single fits (lori fit)"
            )
        return root
    whole = {id(p): t for p, t in _gather_fsdp(root, lambda p: True, torch.device("cpu"))}
    plain = _strip(root)
    for parent in list(plain.modules()):
        for name, child in list(parent.named_children()):
            inner = _strip(child)
            if inner is not child:
                setattr(parent, name, inner)
    missing = [n for n, p in plain.named_parameters() if id(p) not in whole]
    if missing:
        raise RuntimeError(
            f"FSDP unwrapping lost track of {missing[:3]}: wrap with use_orig_params=True (Lightning's default)"
        )
    for p in plain.parameters():
        p.data = whole[id(p)]
        if hasattr(p, _FSDP_FLATTENED):
            delattr(p, _FSDP_FLATTENED)
    for m in plain.modules():  # torch's mark of FSDP-managed modules (transformers' generate reads it)
        if "_is_fsdp_managed_module" in m.__dict__:
            del m._is_fsdp_managed_module
    return plain.cpu()  # as from_pretrained left it: the next FSDP wrap moves it to the GPU unit by unit
