"""Mask calibration (paper Sec. 2.2, Alg. 1) and mask statistics, as pure functions.

Calibration keeps, within each group of B matrices, exactly the ``k = n - round(s * n)``
entries of largest |B| (at least one), where ``n`` is the group's entry count:

    M_t = 1[|B_t| >= tau],  tau = the s-quantile of |B| over the group

The threshold is found by radix selection over the bit patterns of |B| as float32 (for
non-negative IEEE floats, integer order of the bits equals numeric order), one tensor at a time:
one histogram (``torch.bincount``) of the high 15 bits of every entry, then one of the low 16
bits of the few entries in the threshold's bucket. No concatenated copy of all B, no sort and no
``torch.quantile`` (which refuses inputs above 2^24 elements; Llama-3-8B has 44M B entries at
r=32); all work stays on the device B lives on. Entries equal to the threshold are kept in a
fixed order (groups' tensors by sorted module path, then row-major position) until exactly k are
kept, so the result never depends on thread count, device or the order of the input mapping.
A group whose B is all zero (an untrained LoRI-D) is refused: its "mask" would be positions only.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor

from lori.core.config import GRANULARITIES
from lori.core.errors import LoRIError
from lori.core.finite import NonFiniteError, describe_non_finite

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


class CalibrationError(LoRIError, ValueError):
    """B that no mask can be calibrated from: a group that is all zero (NaN / inf: NonFiniteError)."""


def layer_index(path: str) -> int | None:
    """Decoder-block number in a module path (``model.layers.3.mlp.up_proj`` -> 3)."""
    match = _LAYER_RE.search(path)
    return int(match.group(1)) if match else None


def projection_name(path: str) -> str:
    """Projection type of a module path: its last name component (``up_proj``)."""
    return path.rsplit(".", 1)[-1]


def module_kind(path: str) -> str:
    """``attention`` or ``mlp`` for a module path."""
    parts = path.split(".")
    if any("attn" in p or "attention" in p for p in parts[:-1]):
        return "attention"
    if projection_name(path) in ATTENTION_PROJECTIONS:
        return "attention"
    return "mlp"


def group_of(path: str, granularity: str) -> str:
    """Name of the calibration group a module path belongs to at a granularity."""
    if granularity == "model":
        return "model"
    if granularity == "module":
        return module_kind(path)
    if granularity == "projection":
        return projection_name(path)
    if granularity == "layer":
        return f"layer{layer_index(path)}"
    if granularity == "matrix":
        return path
    raise ValueError(f"unknown granularity {granularity!r}; choose one of {list(GRANULARITIES)}")


def keep_count(n: int, sparsity: float) -> int:
    """Entries kept out of ``n`` at ``sparsity``: ``n - round(sparsity * n)``, at least 1."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got sparsity={sparsity!r}")
    return max(1, n - round(sparsity * n))


def calibrate(
    b_tensors: Mapping[str, Tensor], sparsity: float, granularity: str = "model"
) -> dict[str, Tensor]:
    """Bool masks keeping the top ``1 - sparsity`` fraction of |B| within each group.

    Args:
        b_tensors: B matrices by module path (any float dtype, any device). Not modified.
        sparsity: fraction dropped, in [0, 1).
        granularity: ``model`` (all B), ``module`` (attention vs MLP), ``projection`` (one group
            per projection type across layers), ``layer`` (per decoder block), ``matrix``.

    Returns:
        Bool masks of the same shapes and devices, by module path.

    Raises:
        NonFiniteError: a B holds NaN / inf.
        CalibrationError: every B of a group is zero (nothing to rank).
    """
    if not b_tensors:
        raise ValueError("calibrate got no B tensors")
    groups: dict[str, list[str]] = {}
    for path in sorted(b_tensors):
        groups.setdefault(group_of(path, granularity), []).append(path)
    masks: dict[str, Tensor] = {}
    with _one_cpu_thread(all(b.device.type == "cpu" for b in b_tensors.values())):
        for paths in groups.values():
            masks.update(_calibrate_group({p: b_tensors[p] for p in paths}, sparsity))
    return {p: masks[p] for p in b_tensors}


@contextmanager
def _one_cpu_thread(active: bool) -> Iterator[None]:
    """Run torch's CPU ops on one thread inside the block (restored after it).

    Calibration's ops are many and small (one B matrix, a few MB, per op). On a CPU shared with
    other busy processes every multi-threaded op waits for its slowest thread: on 2 loaded cores,
    two threads made calibration of a quarter of Llama-3-8B's B (11M entries) 10x slower than one
    (2.5x vs 0.2x one ``torch.topk`` of the same entries, experiments/bench_calibration.py), while
    on idle cores one thread costs little.
    """
    before = torch.get_num_threads()
    if not active or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Calibration works on the 31-bit pattern of |b| as float32 (for non-negative IEEE floats, integer
# order of the bits is numeric order), split into a high key (bits 16..30: exponent and the top 7
# mantissa bits) and a low key (bits 0..15; zero for bfloat16).
_HIGH_BINS, _LOW_BINS = 1 << 15, 1 << 16
_NONFINITE_HIGH = 0x7F80  # high key of inf and NaN (exponent all ones)
_LITTLE_ENDIAN = sys.byteorder == "little"


@dataclass
class _Part:
    """Consecutive tensors of a group on one device, their high keys side by side in one buffer.

    A few large ops over the buffer instead of several small ones per tensor: on a busy CPU every
    multi-threaded op waits for its slowest thread, and on a GPU every op is a launch.
    """

    paths: list[str]
    tensors: list[Tensor]
    keys: Tensor  # (N,) int16: high keys of every entry, tensor after tensor, row-major
    offsets: list[int]  # where each tensor starts in ``keys``, and N at the end
    index: Tensor | None = None  # (m,) int64: positions in ``keys`` of the threshold bucket, increasing
    bits: Tensor | None = None  # (m,) int32: their 31-bit patterns
    bounds: list[int] | None = None  # where each tensor's entries start in ``index``, and m at the end


def _high_half(b: Tensor) -> Tensor:
    """The int16 holding sign, exponent and top mantissa bits of each float32 of ``b`` (a view when
    possible), as a 2-D (rows, last dim) tensor."""
    b = b.detach()
    b = b.reshape(-1, b.shape[-1]) if b.dim() else b.reshape(1, 1)
    if b.dtype == torch.bfloat16:  # bfloat16 is the high half of a float32
        return b.contiguous().view(torch.int16)
    b = b.float().contiguous()  # float16 / float64 are compared as float32, like the rest of the group
    if _LITTLE_ENDIAN:  # the high half of each float32 is its second int16
        return b.view(torch.int16)[:, 1::2]
    return (b.view(torch.int32) >> 16).to(torch.int16)


def _parts(group: dict[str, Tensor]) -> list[_Part]:
    """The group's tensors (in path order) as runs of one device, each with its key buffer."""
    runs: list[list[str]] = []
    for path, b in group.items():
        if runs and group[runs[-1][0]].device == b.device:
            runs[-1].append(path)
        else:
            runs.append([path])
    parts = []
    for paths in runs:
        halves = [_high_half(group[p]) for p in paths]
        if len({h.shape[1] for h in halves}) == 1:  # e.g. every B is (out, r): one copy, no flattening
            keys = torch.cat(halves).view(-1)
        else:
            keys = torch.cat([h.reshape(-1) for h in halves])
        keys &= 0x7FFF  # drop the sign: |b|
        offsets = [0]
        for p in paths:
            offsets.append(offsets[-1] + group[p].numel())
        parts.append(_Part(paths, [group[p] for p in paths], keys, offsets))
    return parts


def _histogram(keys: list[Tensor], bins: int) -> Tensor:
    """Counts of each key value over several 1-D int tensors, summed on the first one's device."""
    hist = torch.zeros(bins, dtype=torch.int64, device=keys[0].device)
    for key in keys:
        counts = torch.bincount(key, minlength=bins)
        hist += counts if counts.device == hist.device else counts.to(hist.device)
    return hist


def _select_digit(hist: Tensor, remaining: int) -> tuple[int, int]:
    """Largest digit d with at least ``remaining`` entries at digits >= d, and the count above d."""
    above = torch.flip(hist, [0]).cumsum(0)  # above[i]: entries at the i+1 largest digits
    pos = int(torch.searchsorted(above, remaining))
    return hist.numel() - 1 - pos, int(above[pos - 1]) if pos > 0 else 0


def _gather_bucket(part: _Part, high: int) -> None:
    """Positions and exact 31-bit patterns of the part's entries whose high key is ``high``."""
    index = (part.keys == high).nonzero().squeeze(1)
    starts = torch.tensor(part.offsets, device=index.device)
    bounds = torch.searchsorted(index, starts).tolist()  # one small transfer: a count per tensor
    bits = []
    for t, (lo, hi) in enumerate(pairwise(bounds)):
        if hi > lo:
            values = part.tensors[t].detach().reshape(-1)[index[lo:hi] - part.offsets[t]]
            bits.append(values.float().view(torch.int32) & 0x7FFFFFFF)
    part.index, part.bounds = index, bounds
    part.bits = torch.cat(bits) if bits else torch.zeros(0, dtype=torch.int32, device=index.device)


def _calibrate_group(group: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Masks keeping exactly k entries of a group (paths in sorted order): two radix passes.

    Pass 1 histograms the high key of every entry; the bucket holding the k-th largest |b| is
    found from the counts. Pass 2 histograms the low key of that bucket's entries only (a small
    fraction), giving the exact 31-bit threshold. Everything stays on the tensors' devices; the
    host reads only scalars and one count per tensor.
    """
    parts = _parts(group)
    n = sum(p.offsets[-1] for p in parts)
    k = keep_count(n, sparsity)
    hist = _histogram([p.keys for p in parts], _HIGH_BINS)
    if int(hist[_NONFINITE_HIGH:].sum()):
        bad = next(p for p in group if not torch.isfinite(group[p].float()).all())
        found = describe_non_finite(f"B of {bad!r}", group[bad])
        raise NonFiniteError(f"{found}; cannot calibrate a mask from it")
    high, n_above = _select_digit(hist, k)
    for part in parts:
        _gather_bucket(part, high)
    low, above_low = _select_digit(_histogram([p.bits & 0xFFFF for p in parts], _LOW_BINS), k - n_above)
    threshold, n_above = (high << 16) | low, n_above + above_low
    if threshold == 0 and n_above == 0:  # the k-th largest |b| is 0 and none is larger: all zero
        paths = list(group)
        raise CalibrationError(
            f"every B entry of the group ({len(paths)} tensors, {paths[0]!r} ... {paths[-1]!r}, {n:,} entries) "
            "is zero: a mask calibrated from it would keep entries by position only; train B first (LoRI-D)"
        )
    masks: dict[str, Tensor] = {}
    need = k - n_above  # entries equal to the threshold still to keep, in path / row-major order
    for part in parts:
        need = _part_masks(part, high, threshold, need, masks)
    return masks


def _part_masks(part: _Part, high: int, threshold: int, need: int, masks: dict[str, Tensor]) -> int:
    """Masks of a part's tensors: |b| > threshold, plus the first ``need`` ties; returns ties left."""
    for t, (path, tensor) in enumerate(zip(part.paths, part.tensors)):
        mask = part.keys[part.offsets[t]:part.offsets[t + 1]] > high  # (numel,) bool, its own storage
        lo, hi = part.bounds[t], part.bounds[t + 1]
        if hi > lo:  # the threshold bucket's entries of this tensor
            index, bits = part.index[lo:hi] - part.offsets[t], part.bits[lo:hi]
            mask[index[bits > threshold]] = True
            if need > 0:
                ties = index[bits == threshold][:need]
                mask[ties] = True
                need -= ties.numel()
        masks[path] = mask.view(tensor.shape)
    return need


def mask_density(masks: Mapping[str, Tensor]) -> float:
    """Fraction of all entries kept over a mask set."""
    kept = sum(int(m.sum()) for m in masks.values())
    return kept / max(1, sum(m.numel() for m in masks.values()))


def sparsity_by(masks: Mapping[str, Tensor], by: str = "layer") -> dict[str, float]:
    """Sparsity (fraction dropped) per ``layer``, ``projection`` or ``module`` group."""
    if by not in ("layer", "projection", "module", "matrix"):
        raise ValueError(f"sparsity_by: unknown grouping {by!r}")
    kept: dict[str, int] = {}
    total: dict[str, int] = {}
    for path, mask in masks.items():
        key = group_of(path, by)
        kept[key] = kept.get(key, 0) + int(mask.sum())
        total[key] = total.get(key, 0) + mask.numel()
    return {key: 1.0 - kept[key] / total[key] for key in total}


def sparsity_table(masks: Mapping[str, Tensor]) -> tuple[list[int], list[str], Tensor]:
    """Sparsity by (layer, projection): rows = layers, columns = projections (paper Fig. 4b)."""
    layers = sorted({layer_index(p) for p in masks if layer_index(p) is not None})
    projections = sorted({projection_name(p) for p in masks})
    kept = torch.zeros(len(layers), len(projections), dtype=torch.float64)
    total = torch.zeros_like(kept)
    for path, mask in masks.items():
        if layer_index(path) is None:
            continue
        i, j = layers.index(layer_index(path)), projections.index(projection_name(path))
        kept[i, j] += int(mask.sum())
        total[i, j] += mask.numel()
    return layers, projections, 1.0 - kept / total.clamp(min=1)


def mask_overlap(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, float]:
    """Overlap of two mask sets over the same modules.

    Returns:
        ``intersection``: |Ma ∧ Mb| / n (about (1-s)^2 for independent masks), ``jaccard``:
        |Ma ∧ Mb| / |Ma ∨ Mb|, and ``of_a``: |Ma ∧ Mb| / |Ma|.
    """
    if set(a) != set(b):
        raise ValueError(f"mask sets cover different modules: {sorted(set(a) ^ set(b))[:5]}")
    inter = union = kept_a = n = 0
    for path in a:
        if a[path].shape != b[path].shape:
            raise ValueError(f"mask shapes differ at {path!r}: {a[path].shape} vs {b[path].shape}")
        inter += int((a[path] & b[path]).sum())
        union += int((a[path] | b[path]).sum())
        kept_a += int(a[path].sum())
        n += a[path].numel()
    return {
        "intersection": inter / max(1, n),
        "jaccard": inter / max(1, union),
        "of_a": inter / max(1, kept_a),
    }
