"""Adapter: a LoRI (or LoRA) adapter as plain tensors, detached from any model.

This is the unit that files hold, that merging combines and that a model receives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lori.core.config import LoRIConfig
from lori.core.errors import LoRIError
from lori.core.inject import get_A, get_B, get_masks, inject_lori, lori_layers, set_masks
from lori.core.layer import LoRILinear

SAVED_EMBEDDINGS = "peft_saved_embeddings"  # Adapter.meta key: embedding weights a PEFT file held, not loaded


class AdapterMismatchError(LoRIError, ValueError):
    """An adapter that does not fit a model or another adapter (shapes, ranks, targets, base)."""


@dataclass
class Adapter:
    """A adapter as tensors by module path.

    Attributes:
        config: rank, alpha, targets, sparsity, granularity and seed.
        A: frozen A (r x d_in) by module path.
        B: effective B (d_out x r) by module path.
        masks: bool masks of B's shape, or None for a dense adapter.
        base_model: name or path of the base model it was trained on, when known.
        base_fingerprint: digest of a few base weights (see ``base_fingerprint``), when known.
        meta: anything else worth keeping (calibration details, training stage).
    """

    config: LoRIConfig
    A: dict[str, Tensor]
    B: dict[str, Tensor]
    masks: dict[str, Tensor] | None = None
    base_model: str | None = None
    base_fingerprint: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.A) != set(self.B):
            raise AdapterMismatchError(f"A and B cover different modules: {sorted(set(self.A) ^ set(self.B))[:3]}")
        for path in self.A:
            a, b = self.A[path], self.B[path]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise AdapterMismatchError(
                    f"{path}: A {tuple(a.shape)} and B {tuple(b.shape)} are not (r x in) and (out x r)"
                )
        if self.masks is not None:
            for path, b in self.B.items():
                m = self.masks.get(path)
                if m is None or m.shape != b.shape:
                    got = None if m is None else tuple(m.shape)
                    raise AdapterMismatchError(f"mask of {path} has shape {got}, B has {tuple(b.shape)}")

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every adapted module."""
        return {p: (self.B[p].shape[0], self.A[p].shape[1]) for p in self.A}

    @property
    def rank(self) -> int:
        return next(iter(self.A.values())).shape[0]

    def delta(self, path: str) -> Tensor:
        """scale * B A for one module, in fp32."""
        return self.config.scale * (self.B[path].float() @ self.A[path].float())


FINGERPRINT_HEAD = "lori_weight_head"  # a quantized layer's first 64 original weight entries (a plain attribute)


def base_fingerprint(model: nn.Module, paths: list[str]) -> str:
    """A short digest of the first 64 base-weight entries of up to 4 adapted modules.

    Rounded to bf16 first, so the same base loaded in fp32 or bf16 gives the same digest.
    Computed from unmerged weights only. A layer stored quantized (``lori.training.quantize``)
    digests the entries it kept from before quantization (its ``FINGERPRINT_HEAD`` attribute),
    so a quantized base has the digest of the unquantized one.
    """
    h = hashlib.sha256()
    for path in sorted(paths)[:4]:
        module = model.get_submodule(path)
        if isinstance(module, LoRILinear):
            if module.merged:
                raise AdapterMismatchError(f"{path} is merged; unmerge before fingerprinting the base")
            module = module.base_layer
        w = getattr(module, FINGERPRINT_HEAD, None)
        w = module.weight.detach() if w is None else w
        if w.device.type == "meta":
            return "meta"
        head = w.reshape(-1)[:64].to(torch.bfloat16).float().cpu()
        h.update(path.encode())
        h.update(head.numpy().tobytes())
    return h.hexdigest()[:16]


A_DIGEST_MODULES = 4  # modules (first in sorted path order) whose A the digest covers


def a_digest(A: Mapping[str, Tensor]) -> str:
    """Identity of a frozen A: sha256 over path, shape and values of the first 4 modules (sorted paths).

    Values are rounded to bf16 first, so fp32 and bf16 copies of one A agree. The same function
    serves an Adapter (``adapter.A``), a model (``get_A(model)``) and a file (``io.read_a_identity``):
    a seed names an A only among lori's draws, the digest also identifies one imported from elsewhere
    (the original LoRI code draws A from torch's default generator; PEFT files carry no seed).

    Returns:
        16 hex digits, or ``"meta"`` when A has no values (a model on the meta device).
    """
    h = hashlib.sha256()
    for path in sorted(A)[:A_DIGEST_MODULES]:
        a = A[path].detach()
        if a.device.type == "meta":
            return "meta"
        h.update(f"{path}:{tuple(a.shape)}".encode())
        h.update(a.to(torch.bfloat16).float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def adapter_from_model(
    model: nn.Module, config: LoRIConfig, base_model: str | None = None, meta: dict | None = None,
    fingerprint: str | None = None,
) -> Adapter:
    """Copy a model's LoRI adapters out into an Adapter (tensors cloned to CPU).

    ``fingerprint``: the base's digest taken before training (sharded base weights cannot give it);
    None = compute it from the model's base weights now.
    """
    A = {p: t.detach().cpu().clone() for p, t in get_A(model).items()}
    B = {p: t.detach().cpu().clone() for p, t in get_B(model).items()}
    masks = {p: t.cpu().clone() for p, t in get_masks(model).items()} or None
    fingerprint = fingerprint or base_fingerprint(model, list(A))
    return Adapter(config, A, B, masks, base_model, fingerprint, dict(meta or {}))


def check_fits(model: nn.Module, adapter: Adapter, strict_base: bool = True) -> None:
    """Raise AdapterMismatchError unless every adapted module exists with the right shape."""
    for path, (d_out, d_in) in adapter.shapes.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise AdapterMismatchError(
                f"adapter module {path!r} does not exist in {type(model).__name__}: "
                "the adapter was trained on another base model"
            ) from None
        shape = (module.out_features, module.in_features) if hasattr(module, "in_features") else module.weight.shape
        if tuple(shape) != (d_out, d_in):  # (a quantized weight's own shape is its packed storage's)
            raise AdapterMismatchError(
                f"{path}: adapter expects a ({d_out} x {d_in}) weight, the model has "
                f"{tuple(shape)}: the adapter was trained on another base model"
            )
    _check_saved_embeddings(model, adapter)
    if strict_base and adapter.base_fingerprint not in (None, "meta"):
        mine = base_fingerprint(model, list(adapter.A))
        if mine not in ("meta", adapter.base_fingerprint):
            raise AdapterMismatchError(
                f"adapter was trained on base {adapter.base_model!r} (fingerprint "
                f"{adapter.base_fingerprint}); this model's weights differ (fingerprint {mine}). "
                "Pass strict_base=False to apply it anyway."
            )


def _check_saved_embeddings(model: nn.Module, adapter: Adapter) -> None:
    """The embedding weights a PEFT file held (not loaded) must be this base's vocabulary, or it plus one row.

    PEFT's ``save_pretrained`` writes the whole input / output embedding when the vocabulary was resized;
    the original LoRI code adds one '<PAD>' token (train_lori.py l.77-81), hence vocab + 1 rows.
    """
    saved = adapter.meta.get(SAVED_EMBEDDINGS) or {}
    for path, (rows, cols) in saved.get("shapes", {}).items():
        try:
            have_rows, have_cols = model.get_submodule(path).weight.shape
        except AttributeError:
            raise AdapterMismatchError(
                f"the adapter file holds {path}.weight ({rows} x {cols}), {type(model).__name__} has no "
                f"module {path!r}: the adapter was trained on another base model"
            ) from None
        if cols != have_cols or rows not in (have_rows, have_rows + 1):
            raise AdapterMismatchError(
                f"the adapter file holds {path}.weight ({rows} x {cols}), this base has ({have_rows} x "
                f"{have_cols}): lori ignores saved embeddings only when they are the base vocabulary or it "
                "plus one added '<PAD>' row (the original LoRI code's); use the base the adapter was trained on"
            )


@torch.no_grad()
def apply_adapter(model: nn.Module, adapter: Adapter, strict_base: bool = True) -> dict[str, LoRILinear]:
    """Inject the adapter's config into a base model and load A, B and masks into it.

    A model that already holds LoRI layers on exactly the adapter's modules is reused.
    """
    check_fits(model, adapter, strict_base)
    layers = lori_layers(model)
    if not layers:
        layers = inject_lori(model, adapter.config)
    if set(layers) != set(adapter.A):
        raise AdapterMismatchError(
            f"model adapters and file adapters differ: {sorted(set(layers) ^ set(adapter.A))[:3]}"
        )
    set_masks(model, None)
    for path, layer in layers.items():
        if layer.r != adapter.A[path].shape[0]:
            raise AdapterMismatchError(f"{path}: model adapter has r={layer.r}, file has r={adapter.rank}")
        layer.lori_A.copy_(adapter.A[path])
        layer.lori_B.copy_(adapter.B[path])
        layer.scale, layer.alpha = adapter.config.scale, float(adapter.config.alpha)
    if adapter.masks is not None:
        set_masks(model, adapter.masks)
    return layers
