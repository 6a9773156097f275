"""The LoRI method in plain torch: no Lightning import anywhere under ``lori.core``.

    W = W0 + (alpha / r) * (B ⊙ M) A      A frozen (seeded), B trained, M from calibration
"""

from lori.core.adapter import (
    Adapter,
    AdapterMismatchError,
    adapter_from_model,
    apply_adapter,
    base_fingerprint,
)
from lori.core.atomic_files import DiskFullError, atomic_write, write_text_atomic
from lori.core.config import DEFAULT_TARGETS, GRANULARITIES, LoRIConfig, LoRIConfigError
from lori.core.errors import LoRIError
from lori.core.finite import NonFiniteError
from lori.core.inject import (
    InjectionError,
    adapter_listing,
    count_trainable,
    get_A,
    get_B,
    get_masks,
    inject_lori,
    lori_layers,
    merge_lori,
    reset_B,
    set_masks,
    trainable_parameters,
    unload,
    unmerge_lori,
)
from lori.core.io import AdapterFileError, load_adapter, load_masks, save_adapter
from lori.core.layer import LoRILinear, QuantizedMergeError, draw_A
from lori.core.masks import calibrate, mask_density, mask_overlap, sparsity_by, sparsity_table
from lori.core.merge import (
    DeltaMerge,
    merge_concat,
    merge_deltas,
    merge_factors,
    merge_linear,
    merge_linear_eq8,
)
from lori.core.sharding import full_parameters, unwrap_fsdp

__all__ = [
    "DEFAULT_TARGETS", "GRANULARITIES", "Adapter", "AdapterFileError", "AdapterMismatchError",
    "DeltaMerge", "DiskFullError", "InjectionError", "LoRIConfig", "LoRIConfigError", "LoRIError", "LoRILinear", "NonFiniteError", "QuantizedMergeError",
    "adapter_from_model",
    "adapter_listing", "apply_adapter", "atomic_write", "base_fingerprint", "calibrate", "count_trainable", "draw_A",
    "full_parameters", "get_A", "get_B", "get_masks", "inject_lori", "load_adapter", "load_masks",
    "lori_layers",
    "mask_density", "mask_overlap", "merge_concat", "merge_deltas", "merge_factors", "merge_linear",
    "merge_linear_eq8",
    "merge_lori", "reset_B", "save_adapter", "set_masks", "sparsity_by", "sparsity_table",
    "trainable_parameters", "unload", "unmerge_lori", "unwrap_fsdp", "write_text_atomic",
]
