"""Lightning's FSDPStrategy on CPU processes (gloo), for tests.

Two things stand between Lightning's FSDPStrategy and a CPU: Lightning refuses
``strategy=FSDPStrategy(...)`` with ``accelerator="cpu"`` by an exact-type check, and it passes
``device_id=root_device.index`` (None on CPU), which torch's FSDP reads as "find an accelerator".
This subclass passes the first check by being a subclass and gives FSDP ``device_id=cpu``;
wrapping, sharding, the optimizer and checkpointing are Lightning's and torch's own code.
"""
from __future__ import annotations

import torch
import torch.distributed.fsdp as fsdp
from lightning.pytorch.strategies import FSDPStrategy


class _CPUFullyShardedDataParallel(fsdp.FullyShardedDataParallel):
    def __init__(self, module, *args, device_id=None, **kwargs):
        super().__init__(module, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model):
        original = fsdp.FullyShardedDataParallel
        fsdp.FullyShardedDataParallel = _CPUFullyShardedDataParallel
        try:
            return super()._setup_model(model)
        finally:
            fsdp.FullyShardedDataParallel = original


def _full_state_dict_context_on_cpu(module, world_size: int, rank0_only: bool = True):
    """Lightning's full-state-dict context without ``offload_to_cpu``: on CPU processes torch's offload
    hands back views of the unsharded parameters after freeing them (a segfault at the first clone)."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType

    return fsdp.FullyShardedDataParallel.state_dict_type(
        module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


import lightning.pytorch.strategies.fsdp as _lightning_fsdp  # noqa: E402

_lightning_fsdp._get_full_state_dict_context = _full_state_dict_context_on_cpu
