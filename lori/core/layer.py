"""LoRILinear: a frozen ``nn.Linear`` plus a LoRI update (paper eq. 2-3).

    y = W0 x + (alpha / r) * B_eff A dropout(x)

      x (..., d_in) ──dropout──> A (r x d_in, frozen) ──> (..., r) ──> B_eff (d_out x r) ──> (..., d_out)

Without a mask, ``lori_B`` is a dense trainable parameter (LoRI-D). With a mask M installed,
the trainable state is only ``lori_B_values``, the kept entries (LoRI-S):

    B_eff = scatter(lori_B, index(M), lori_B_values)

``lori_B`` then becomes a buffer holding the entries outside M (zero after the LoRI-S reset,
earlier-task values in continual learning), so B_eff = B ⊙ M after a reset.

Why masked training is exact: entries outside M are not parameters at all. No optimizer, weight
decay, momentum left from earlier steps or gradient clipping can reach them, because the optimizer
only ever receives ``lori_B_values``; the scatter copies buffer entries bit for bit. Optimizer state
is kept for the kept entries only (a (1 - s) fraction of LoRI-D's).

A is a buffer drawn from a CPU ``torch.Generator`` seeded by (seed, module path), so it is the same
in any process and on any machine, and no optimizer can pick it up.

Precision: A and B are created in fp32 whatever the base's dtype (a bf16 or fp16 base needs no fp32
master, being frozen; what trains keeps one). The compute dtype is the input's (the base's), or the
autocast dtype under autocast: the fused node casts A and B_eff to it, computes dB in it and hands
the fp32 trainable an fp32 gradient. ``merge`` adds the fp32 ΔW to the weight in fp32 and rounds
once into the weight's dtype.

Cost: forward and backward are one autograd node (``_LoRIMatmul``) with the backward written out:
dx = g W0 + c (g B_eff) A (masked by dropout), dB_eff = c g^T h, and in LoRI-S the gradient of the
kept entries is a gather of dB_eff. No gradient is formed for A; x is never copied when dropout
is off (p = 0 or eval) and otherwise only to zero the dropped entries, whose positions are all
that is saved (not a float mask); the adapter's product is added into the base output in place.
Measured in ``experiments/bench_train.py``, written up in ``docs/performance.md``. A quantized base
(``model.quantize``) is its library's own autograd node; the adapter beside it is one node too
(``_LoRIAdapterMatmul``), which saves the same h and drops, not a dropped copy of x.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from lori.core.errors import LoRIError

ADAPTER_DTYPE = torch.float32  # A, B and (so) B's optimizer state, whatever the base's dtype


class QuantizedMergeError(LoRIError, ValueError):
    """A merge into a base weight stored quantized (``model.quantize``: 4- or 8-bit): refused."""


def check_float_weight(weight: Tensor, path: str) -> None:
    """Refuse to merge into ``weight`` when it is stored quantized (not floating point).

    W0 + ΔW would have to be dequantized, summed and quantized again: the sum rounded to 4 or 8
    bits, every entry of W0 moved by up to a quantization step that training never saw. The
    adapter is the same file on the unquantized base, where the merge is exact to one rounding.

    Raises:
        QuantizedMergeError: naming the module and what to do instead.
    """
    if not weight.is_floating_point():
        raise QuantizedMergeError(
            f"refusing to merge into {path}: its base weight is stored quantized ({weight.dtype}, model.quantize), "
            "where W0 + ΔW would be rounded to 4/8 bits again; evaluate with the adapter unmerged (merge: false) "
            "or merge into the unquantized base (model.quantize: null): the adapter file is the same"
        )


def module_seed(seed: int, path: str) -> int:
    """A 63-bit generator seed derived from the adapter seed and the module path."""
    digest = hashlib.sha256(f"lori:{seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_A(r: int, in_features: int, seed: int, path: str) -> Tensor:
    """Kaiming-uniform A (r x in_features), fp32, as LoRA initialises it (a = sqrt(5))."""
    generator = torch.Generator(device="cpu").manual_seed(module_seed(seed, path))
    A = torch.empty(r, in_features, dtype=torch.float32)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return A


class LoRILinear(nn.Module):
    """A frozen linear layer with a LoRI adapter.

    Args:
        base: the linear layer to adapt; its parameters are frozen.
        r: adapter rank.
        alpha: the update is scaled by ``alpha / r``.
        dropout: dropout probability on the adapter input.
        seed: adapter seed; A is drawn from (seed, path).
        path: module path of ``base`` in the model (part of A's seed).
    """

    def __init__(
        self, base: nn.Linear, r: int, alpha: float, dropout: float, seed: int, path: str
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.r, self.alpha, self.scale, self.path = r, float(alpha), alpha / r, path
        self.merged = False
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lori_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if w.device.type == "meta":
            A = torch.empty(r, base.in_features, device="meta", dtype=ADAPTER_DTYPE)
        else:
            A = draw_A(r, base.in_features, seed, path).to(device=w.device)
        self.register_buffer("lori_A", A)  # (r, d_in), frozen, fp32 whatever the base's dtype
        B = torch.zeros(base.out_features, r, device=w.device, dtype=ADAPTER_DTYPE)
        self.lori_B = nn.Parameter(B)  # (d_out, r), trained, fp32
        self.register_buffer("lori_mask", None)
        self.register_buffer("lori_index", None, persistent=False)
        self.register_parameter("lori_B_values", None)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:
        """The base weight, so code that reads ``.weight`` of a linear layer keeps working."""
        return self.base_layer.weight

    def B(self) -> Tensor:
        """The effective B (d_out x r): dense B, or the buffer with kept entries scattered in."""
        trainable = self.lori_B if self.lori_B_values is None else self.lori_B_values
        return _effective_B(trainable, self.lori_B, self.lori_index)

    def set_mask(self, mask: Tensor | None, reset: bool = False) -> None:
        """Install (or remove, with None) a bool mask of B's shape; optionally zero B first.

        Entries outside the mask keep their current values and are frozen; entries inside it
        become the trainable ``lori_B_values``. Parameters are replaced, so an optimizer built
        before this call must be rebuilt.
        """
        dense = self.B().detach().clone()
        if reset:
            dense.zero_()
        if mask is not None and tuple(mask.shape) != tuple(dense.shape):
            raise ValueError(
                f"mask for {self.path!r} has shape {tuple(mask.shape)}, B has {tuple(dense.shape)}"
            )
        del self.lori_B
        self.lori_B_values = None
        if mask is None:
            self.lori_B = nn.Parameter(dense)
            self.lori_mask, self.lori_index = None, None
            return
        on_meta = dense.device.type == "meta"  # shape-only model: count parameters, no values
        mask = mask.to(device=mask.device if on_meta else dense.device, dtype=torch.bool)
        index = mask.reshape(-1).nonzero().squeeze(1)
        self.register_buffer("lori_B", dense)
        self.lori_mask, self.lori_index = mask, index
        values = torch.empty(index.numel(), device="meta", dtype=dense.dtype) if on_meta else None
        self.lori_B_values = nn.Parameter(dense.reshape(-1)[index].clone() if values is None else values)

    def delta_weight(self) -> Tensor:
        """scale * B_eff A (d_out x d_in), computed in fp32 and cast to the weight's dtype (fp32 kept
        for a weight stored quantized)."""
        weight = self.base_layer.weight
        return self._delta_fp32().to(weight.dtype if weight.is_floating_point() else ADAPTER_DTYPE)

    def _delta_fp32(self) -> Tensor:
        return self.scale * (self.B().detach().float() @ self.lori_A.float())

    def merge(self) -> None:
        """Add the update into the base weight. Merging a merged layer changes nothing.

        Raises:
            QuantizedMergeError: the base weight is stored quantized (``check_float_weight``).
        """
        check_float_weight(self.base_layer.weight, self.path)
        if not self.merged:
            self._add_delta(1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Subtract the update from the base weight (inverse of ``merge``)."""
        if self.merged:
            self._add_delta(-1.0)
            self.merged = False

    @torch.no_grad()
    def _add_delta(self, sign: float) -> None:
        """W := round(W + sign * ΔW): the sum in fp32, one rounding into the weight's dtype.

        A bf16 weight is therefore rounded once per merge and once per unmerge, never twice: after
        merge -> unmerge each entry is within one bf16 ulp of max(|W|, |W + ΔW|) of where it started,
        and further cycles add nothing (tests/test_bf16.py derives and checks the bound).
        """
        w = self.base_layer.weight.data
        if w.dtype == torch.float32:
            w.add_(self._delta_fp32(), alpha=sign)
        else:
            w.copy_(w.float().add_(self._delta_fp32(), alpha=sign))

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        trainable = self.lori_B if self.lori_B_values is None else self.lori_B_values
        compute = compute_dtype(x, self.base_layer.weight)
        if compute is None or not self._fusable(x, trainable):
            return self._forward_autograd(x)
        dropout = self.lori_dropout
        p = dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0
        drop = dropout_draw(x.numel(), p, x.device) if p > 0 else None  # 1/(1-p) joins the scale
        base = self.base_layer
        return _LoRIMatmul.apply(
            x, trainable, base.weight, base.bias, self.lori_A, self.lori_B, self.lori_index, drop,
            self.scale / (1.0 - p), compute,
        )

    def _fusable(self, x: Tensor, trainable: Tensor) -> bool:
        """Whether the fused node may stand in for ``base_layer(x)`` plus the adapter.

        It needs a frozen base and floating A and B of any dtype (cast to the compute dtype,
        see ``compute_dtype``); and, since it reads the base weight itself, a plain ``nn.Linear``
        forward with no hooks (sharding such as DeepSpeed ZeRO-3 gathers weights in hooks;
        subclasses may compute differently).
        """
        base = self.base_layer
        return (
            self.lori_A.is_floating_point() and trainable.is_floating_point()
            and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and type(base).forward is nn.Linear.forward
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not (_module._global_forward_hooks or _module._global_forward_pre_hooks)
        )

    def _forward_autograd(self, x: Tensor) -> Tensor:
        """A trainable or hooked base, or dtypes nn.Linear would refuse: plain autograd, same formula."""
        result = self.base_layer(x)
        trainable = self.lori_B if self.lori_B_values is None else self.lori_B_values
        if not self.base_layer.weight.is_floating_point() and self.lori_A.is_floating_point() \
                and trainable.is_floating_point():  # a quantized base: its library's node, the adapter beside it
            dropout = self.lori_dropout
            p = dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0
            drop = dropout_draw(x.numel(), p, x.device) if p > 0 else None
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) \
                and x.dtype in _AUTOCAST_ELIGIBLE else x.dtype
            delta = _LoRIAdapterMatmul.apply(x, trainable, self.lori_A, self.lori_B, self.lori_index, drop,
                                             self.scale / (1.0 - p), dtype)
            return result + _as(delta, result.dtype)
        h = F.linear(self.lori_dropout(x), _as(self.lori_A, x.dtype))  # (..., r)
        B = _as(self.B(), h.dtype)  # (d_out, r)
        if result.dtype == h.dtype and result.is_contiguous() and self.base_layer.weight.is_floating_point():
            # fused result += scale * h B^T on the base output, which autograd does not keep (a quantized
            # base's output comes from the quantization library's own autograd node: added out of place)
            flat = result.view(-1, result.shape[-1])
            flat.addmm_(h.reshape(-1, self.r), B.t(), alpha=self.scale)
            return result
        return result + (F.linear(h, B) * self.scale).to(result.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # A checkpoint taken after calibration holds the mask: install it before loading values.
        mask = state_dict.get(prefix + "lori_mask")
        if mask is not None:
            mask = mask.to(device="cpu", dtype=torch.bool)  # (also loads a lazily read checkpoint tensor)
            if self.lori_mask is None or not torch.equal(self.lori_mask.cpu(), mask):
                self.set_mask(mask)  # (an installed equal mask stays: FSDP may already manage lori_B_values)
        elif self.lori_mask is not None and prefix + "lori_B" in state_dict:
            self.set_mask(None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        kept = "dense" if self.lori_mask is None else f"{int(self.lori_mask.sum())} kept"
        return f"r={self.r}, scale={self.scale:g}, B={kept}, merged={self.merged}"


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


_AUTOCAST_ELIGIBLE = (torch.float32, torch.bfloat16, torch.float16)  # what autocast casts (not fp64)


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype ``base_layer(x)`` computes in: autocast's when autocast is on, else x's.

    None where ``nn.Linear`` itself would refuse the pair (x and the weight differ without
    autocast), so the layer takes plain autograd and raises the same error.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        if x.dtype in _AUTOCAST_ELIGIBLE and weight.dtype in _AUTOCAST_ELIGIBLE:
            return torch.get_autocast_dtype(device)
        return None
    return x.dtype if x.dtype == weight.dtype else None


def dropout_draw(n: int, p: float, device: torch.device) -> Tensor:
    """Which of ``n`` entries dropout zeroes, each independently with probability ``p``.

    Returns the sorted flat positions of the dropped entries (int64) on CPU, a bool keep mask
    elsewhere (``bernoulli_``). On CPU the positions are drawn directly: the gaps between drops
    of a Bernoulli(p) sequence are i.i.d. Geometric(p) = ceil(log U / log(1 - p)), so about
    ``n * p`` uniforms are drawn instead of ``n`` (``bernoulli_`` costs several ns per entry on CPU,
    as much as the adapter's matmuls at small widths) and zeroing touches only the dropped entries.
    Same distribution as ``nn.Dropout`` up to U's float32 resolution, from the same global RNG.
    """
    if device.type != "cpu":
        return torch.empty(n, dtype=torch.bool, device=device).bernoulli_(1.0 - p)
    log_q, mean = math.log1p(-p), n * p
    chunk = int(mean + 8.0 * math.sqrt(mean) + 16)  # reaches n in all but ~1e-15 of draws

    def after(last: int) -> Tensor:  # positions of the next ``chunk`` drops after ``last``
        u = torch.empty(chunk).uniform_(2.0**-24, 1.0)  # never 0, so log U is finite
        return u.log_().div_(log_q).ceil_().long().cumsum_(0).add_(last)

    drops = after(-1)
    while (last := int(drops[-1])) < n:
        drops = torch.cat([drops, after(last)])
    return drops[: int(torch.searchsorted(drops, n))]


def _zero_dropped(t: Tensor, drop: Tensor) -> Tensor:
    """Zero, in place, the entries of contiguous ``t`` that ``dropout_draw`` dropped."""
    if drop.dtype == torch.bool:
        return t.mul_(drop.view_as(t))
    t.view(-1).index_fill_(0, drop, 0)
    return t


class _LoRIMatmul(torch.autograd.Function):
    """y = W0 x + b + c * B_eff A (x ⊙ keep), with c = scale / (1 - p), as one autograd node.

    Forward, with x flattened to (n, d_in), ``keep`` the dropout mask (all ones when p = 0) and
    every operand cast to the compute dtype (x, W0, b, A and B_eff; A and B_eff are fp32 tensors
    when the base is bf16, so their casts are (r x d_in) and (d_out x r) copies, never kept):

        y = x W0^T + b                (n, d_out)
        h = (x ⊙ keep) A^T            (n, r)      x is copied only with dropout, to zero the drops
        y += c h B_eff^T                          in place

    Backward, from g = dL/dy (n, d_out), in the compute dtype:

        dh = g B_eff                  (n, r)
        dx = c (dh A) ⊙ keep + g W0   (n, d_in)   one addmm, the other term's scale as its beta
        dB_eff = c g^T h              (d_out, r); in LoRI-S d(values) = dB_eff.flat[index]

    dx comes back in x's dtype, the gradient of the trainable in the trainable's (fp32): dB_eff
    is rounded to the compute dtype once, by its matmul, and scaled by c in fp32.

    Nothing is formed for A, W0 or b (frozen). Saved: h and the drops, not a copy of x nor any
    cast; in LoRI-S B_eff is scattered again for the backward rather than kept from the forward.
    """

    @staticmethod
    def forward(ctx, x, trainable, weight, bias, A, B_rest, index, drop, c, dtype):  # type: ignore
        with torch.autocast(x.device.type, enabled=False):  # operands are cast here, explicitly
            B = _as(_effective_B(trainable, B_rest, index), dtype)
            xc = _as(x.reshape(-1, x.shape[-1]), dtype)  # (n, d_in)
            y = F.linear(xc, _as(weight, dtype), _as(bias, dtype))  # (n, d_out)
            h = torch.mm(_without_drops(xc, x.dtype, drop), _as(A, dtype).t())  # (n, r)
            y.addmm_(h, B.t(), alpha=c)
        ctx.save_for_backward(weight, A, trainable, B_rest, h, index, drop)
        ctx.c, ctx.dtype, ctx.x_dtype = c, dtype, x.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        weight, A, trainable, B_rest, h, index, drop = ctx.saved_tensors
        dtype = ctx.dtype
        g = _as(grad.reshape(-1, grad.shape[-1]), dtype)  # (n, d_out)
        dx = dtrainable = None
        if ctx.needs_input_grad[0]:
            dh = torch.mm(g, _as(_effective_B(trainable, B_rest, index), dtype))  # (n, r), c comes below
            A, weight = _as(A, dtype), _as(weight, dtype)
            if drop is None:
                dx = torch.mm(g, weight).addmm_(dh, A, alpha=ctx.c)
            else:
                dx = _zero_dropped(torch.mm(dh, A), drop).addmm_(g, weight, beta=ctx.c)
            dx = _as(dx.view(*grad.shape[:-1], dx.shape[-1]), ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dtrainable = _trainable_grad(g, h, trainable, index, ctx.c)
        return dx, dtrainable, None, None, None, None, None, None, None, None


class _LoRIAdapterMatmul(torch.autograd.Function):
    """z = c * B_eff A (x ⊙ keep) alone, as one autograd node: the adapter beside a base layer that
    is its own node (a quantized base, whose library dequantizes per matmul).

        h = (x ⊙ keep) A^T     (n, r)        z = c h B_eff^T     (n, d_out)
        dx = c (g B_eff A) ⊙ keep            dB_eff = c g^T h    (LoRI-S: gathered at the kept entries)

    Saved: h and the drops, as in ``_LoRIMatmul``; plain autograd would keep the dropped copy of x
    (n x d_in) and dropout's mask for every adapted layer, the bulk of a quantized base's step.
    """

    @staticmethod
    def forward(ctx, x, trainable, A, B_rest, index, drop, c, dtype):  # type: ignore[override]
        with torch.autocast(x.device.type, enabled=False):  # operands are cast here, explicitly
            B = _as(_effective_B(trainable, B_rest, index), dtype)
            xc = _as(x.reshape(-1, x.shape[-1]), dtype)  # (n, d_in)
            h = torch.mm(_without_drops(xc, x.dtype, drop), _as(A, dtype).t())  # (n, r)
            z = torch.mm(h, B.t()).mul_(c)  # (n, d_out)
        ctx.save_for_backward(A, trainable, B_rest, h, index, drop)
        ctx.c, ctx.dtype, ctx.x_dtype = c, dtype, x.dtype
        return z.view(*x.shape[:-1], z.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        A, trainable, B_rest, h, index, drop = ctx.saved_tensors
        dtype = ctx.dtype
        g = _as(grad.reshape(-1, grad.shape[-1]), dtype)  # (n, d_out)
        dx = dtrainable = None
        if ctx.needs_input_grad[0]:
            dh = torch.mm(g, _as(_effective_B(trainable, B_rest, index), dtype))  # (n, r)
            dx = torch.mm(dh, _as(A, dtype)).mul_(ctx.c)  # (n, d_in)
            if drop is not None:
                _zero_dropped(dx, drop)
            dx = _as(dx.view(*grad.shape[:-1], dx.shape[-1]), ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dtrainable = _trainable_grad(g, h, trainable, index, ctx.c)
        return dx, dtrainable, None, None, None, None, None, None


def _without_drops(xc: Tensor, x_dtype: torch.dtype, drop: Tensor | None) -> Tensor:
    """``xc`` (x flattened, in the compute dtype) with dropout's drops zeroed, in a copy: a cast
    (``xc.dtype != x_dtype``) is one already, else x itself is cloned, never written."""
    if drop is None:
        return xc
    fresh = xc.dtype != x_dtype
    return _zero_dropped(xc if fresh else xc.clone(memory_format=torch.contiguous_format), drop)


def _trainable_grad(g: Tensor, h: Tensor, trainable: Tensor, index: Tensor | None, c: float) -> Tensor:
    """dB_eff = c g^T h (d_out, r), in the compute dtype; in LoRI-S gathered at the kept entries;
    scaled by c in the trainable's dtype (fp32 for an fp32 trainable)."""
    dB = torch.mm(g.t(), h)
    flat = dB if index is None else dB.view(-1).index_select(0, index)
    return flat.to(trainable.dtype).mul_(c)


def _effective_B(trainable: Tensor, B_rest: Tensor, index: Tensor | None) -> Tensor:
    """Dense B (LoRI-D), or the frozen entries with the kept values scattered in (LoRI-S)."""
    if index is None:
        return trainable
    return B_rest.reshape(-1).scatter(0, index, trainable).view_as(B_rest)
