"""Put LoRILinear adapters into a (Hugging Face) model by module-name suffix, and act on them."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lori.core.config import LoRIConfig
from lori.core.errors import LoRIError
from lori.core.finite import NonFiniteError, describe_non_finite
from lori.core.layer import LoRILinear, check_float_weight


class InjectionError(LoRIError, ValueError):
    """Target modules that do not exist in the model, or a model injected twice."""


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)


def inject_lori(model: nn.Module, config: LoRIConfig) -> dict[str, LoRILinear]:
    """Replace every ``nn.Linear`` whose path ends with a target name by a LoRILinear.

    Every parameter of the model is frozen; only the adapters' B is trainable afterwards.

    Args:
        model: the model to adapt, in place (a ``transformers`` causal LM or any nn.Module).
        config: the adapter's hyperparameters; ``config.seed`` draws every A.

    Returns:
        The new layers by module path.

    Raises:
        InjectionError: a target name matches no linear layer, or the model already has LoRI.
    """
    if lori_layers(model):
        raise InjectionError("model already holds LoRI adapters; build a fresh base model")
    found: dict[str, nn.Linear] = {}
    hits = {t: 0 for t in config.target_modules}
    for path, module in model.named_modules():
        for target in config.target_modules:
            if _matches(path, target) and isinstance(module, nn.Linear):
                found[path] = module
                hits[target] += 1
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise InjectionError(
            f"target_modules {missing} match no nn.Linear in {type(model).__name__}; "
            f"linear layer names there: {names}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, LoRILinear] = {}
    for path, linear in found.items():
        layer = LoRILinear(linear, config.r, config.alpha, config.dropout, config.seed, path)
        layer.train(linear.training)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, layer)
        layers[path] = layer
    return layers


_WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def plain_path(path: str) -> str:
    """A module path without the segments FSDP and activation-checkpoint wrappers insert.

    Anywhere in the path, the last segment too: a LoRILinear that is itself an FSDP unit or
    checkpointed sits at ``<path>._fsdp_wrapped_module`` and keeps the key ``<path>``.
    """
    return ".".join(s for s in path.split(".") if s not in _WRAPPER_SEGMENTS)


def lori_layers(model: nn.Module) -> dict[str, LoRILinear]:
    """The LoRI layers of a model by module path (as if unwrapped by FSDP), in model order."""
    return {plain_path(p): m for p, m in model.named_modules() if isinstance(m, LoRILinear)}


def _layers_or_raise(model: nn.Module) -> dict[str, LoRILinear]:
    layers = lori_layers(model)
    if not layers:
        raise InjectionError(f"{type(model).__name__} holds no LoRI adapters; call inject_lori first")
    return layers


def get_B(model: nn.Module) -> dict[str, Tensor]:
    """Effective B of every adapter (detached views), by module path."""
    return {p: m.B().detach() for p, m in _layers_or_raise(model).items()}


def get_A(model: nn.Module) -> dict[str, Tensor]:
    """Frozen A of every adapter, by module path."""
    return {p: m.lori_A for p, m in _layers_or_raise(model).items()}


def get_masks(model: nn.Module) -> dict[str, Tensor]:
    """Installed masks by module path (empty when the adapters are dense)."""
    return {p: m.lori_mask for p, m in _layers_or_raise(model).items() if m.lori_mask is not None}


def set_masks(model: nn.Module, masks: Mapping[str, Tensor] | None, reset: bool = False) -> None:
    """Install masks on every adapter (None removes them); ``reset`` zeroes B first (LoRI-S).

    Raises:
        InjectionError: the masks do not cover exactly the model's adapters.
    """
    layers = _layers_or_raise(model)
    if masks is not None and set(masks) != set(layers):
        extra, absent = sorted(set(masks) - set(layers)), sorted(set(layers) - set(masks))
        raise InjectionError(f"masks do not match the adapters: unknown {extra[:3]}, missing {absent[:3]}")
    for path, layer in layers.items():
        layer.set_mask(None if masks is None else masks[path], reset=reset)


def reset_B(model: nn.Module) -> None:
    """Zero every B, keeping masks and A (the LoRI-S restart)."""
    for layer in _layers_or_raise(model).values():
        layer.set_mask(layer.lori_mask, reset=True)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should get: every B (or its kept entries) and nothing else."""
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    """Trainable entries: all of B for dense adapters, only the mask entries when masked."""
    return sum(p.numel() for p in trainable_parameters(model))


def adapter_listing(model: nn.Module) -> list[dict[str, object]]:
    """One row per adapted module: path, shapes, rank, entries of B kept trainable."""
    rows = []
    for path, m in _layers_or_raise(model).items():
        kept = m.lori_B.numel() if m.lori_mask is None else int(m.lori_mask.sum())
        rows.append({"path": path, "in": m.in_features, "out": m.out_features, "r": m.r, "trainable": kept})
    return rows


@torch.no_grad()
def check_merge_finite(layers: Mapping[str, LoRILinear]) -> None:
    """Refuse a merge that would put NaN or inf into a base weight, before any layer is merged.

    Checks ΔW and W0 + ΔW (in the weight's dtype, as ``LoRILinear.merge`` adds them) of every
    unmerged layer, one layer at a time (one d_out x d_in temporary).

    Raises:
        NonFiniteError: naming the first module whose merge is not finite; nothing was merged.
        QuantizedMergeError: a base weight is stored quantized; nothing was merged.
    """
    for path, layer in layers.items():
        check_float_weight(layer.base_layer.weight, path)
        if layer.merged:
            continue
        delta = layer.delta_weight()
        found = describe_non_finite(f"ΔW of {path}", delta) or describe_non_finite(
            f"W0 + ΔW of {path} ({layer.base_layer.weight.dtype})", layer.base_layer.weight + delta
        )
        if found is not None:
            raise NonFiniteError(f"refusing to merge: {found}; no base weight was changed")


def merge_lori(model: nn.Module) -> None:
    """Merge every adapter into its base weight (idempotent, all or nothing).

    Raises:
        NonFiniteError: some module's merged weight would hold NaN or inf (``check_merge_finite``).
    """
    layers = _layers_or_raise(model)
    check_merge_finite(layers)
    for layer in layers.values():
        layer.merge()


def unmerge_lori(model: nn.Module) -> None:
    """Undo ``merge_lori``."""
    for layer in _layers_or_raise(model).values():
        layer.unmerge()


@torch.no_grad()
def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRILinear by its base ``nn.Linear`` (merged first unless ``merge=False``).

    Raises:
        NonFiniteError: with ``merge``, some merged weight would hold NaN or inf; the model is unchanged.
    """
    layers = _layers_or_raise(model)
    if merge:
        check_merge_finite(layers)
    for path, layer in layers.items():
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, layer.base_layer)
    return model
