"""Interference between adapters: ΔW cosines (paper Property 1), mask overlap, sparsity maps.

For two adapters on the same module, with ΔW_t = s_t B_t A_t (B_t d_out x r_t, A_t r_t x d_in):

    <ΔW_1, ΔW_2>_F = s_1 s_2 tr(A_1^T B_1^T B_2 A_2) = s_1 s_2 tr((B_1^T B_2)(A_2 A_1^T))
    cos(ΔW_1, ΔW_2) = <ΔW_1, ΔW_2>_F / (||ΔW_1||_F ||ΔW_2||_F)

so only r x r products are formed, never a d_out x d_in ΔW. Paper Property 1: with independent
random A_1, A_2 the cosine goes to 0 as d_in grows (about 1 / sqrt(r d_in) even for equal B);
independent masks at sparsity s overlap on about (1 - s)^2 of the entries (1% at s = 0.9).

``diagnose`` gathers them for two or more adapters and ``write_report`` writes ``diagnostics.json``,
PNG heatmaps (``lori.eval.plots``) and tensorboard scalars; ``lori diagnose`` is its command.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lori.core import Adapter, AdapterMismatchError, mask_density, mask_overlap, sparsity_table
from lori.core.atomic_files import write_text_atomic
from lori.core.masks import layer_index, projection_name


def frobenius_inner(A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor) -> Tensor:
    """<B1 A1, B2 A2>_F = tr((B1^T B2)(A2 A1^T)) in float64, without forming B A."""
    A1, B1, A2, B2 = (t.detach().to(torch.float64) for t in (A1, B1, A2, B2))
    return torch.trace((B1.T @ B2) @ (A2 @ A1.T))  # (r1 x r2)(r2 x r1)


def delta_cosine(A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor) -> float:
    """cos(B1 A1, B2 A2) over the flattened matrices; NaN when either product is zero.

    Positive scales (alpha / r) cancel, so they are not arguments.
    """
    inner = frobenius_inner(A1, B1, A2, B2)
    norm1 = frobenius_inner(A1, B1, A1, B1).clamp(min=0).sqrt()
    norm2 = frobenius_inner(A2, B2, A2, B2).clamp(min=0).sqrt()
    if norm1 == 0 or norm2 == 0:
        return math.nan
    return float((inner / (norm1 * norm2)).clamp(-1.0, 1.0))


def _check_pair(a: Adapter, b: Adapter) -> None:
    if set(a.A) != set(b.A):
        raise AdapterMismatchError(f"adapters adapt different modules, e.g. {sorted(set(a.A) ^ set(b.A))[:3]}")
    for path, shape in a.shapes.items():
        if b.shapes[path] != shape:
            raise AdapterMismatchError(f"{path}: ΔW shapes {shape} and {b.shapes[path]} differ: different bases")


def delta_cosines(a: Adapter, b: Adapter) -> dict[str, float]:
    """Signed cos(ΔW_a, ΔW_b) per adapted module (both adapters must cover the same modules)."""
    _check_pair(a, b)
    return {p: delta_cosine(a.A[p], a.B[p], b.A[p], b.B[p]) for p in a.A}


def by_layer_and_projection(values: dict[str, float]) -> tuple[list[int], list[str], Tensor]:
    """A per-module value as a (layers x projections) table; modules outside a layer are skipped."""
    layers = sorted({i for p in values if (i := layer_index(p)) is not None})
    projections = sorted({projection_name(p) for p in values if layer_index(p) is not None})
    table = torch.full((len(layers), len(projections)), math.nan, dtype=torch.float64)
    for path, value in values.items():
        if layer_index(path) is not None:
            table[layers.index(layer_index(path)), projections.index(projection_name(path))] = value
    return layers, projections, table


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) else v


def cosine_report(a: Adapter, b: Adapter) -> dict[str, Any]:
    """|cos| summary (mean, max), per module (signed) and as a layer x projection table of |cos|."""
    cos = delta_cosines(a, b)
    absolute = _finite([abs(v) for v in cos.values()])
    layers, projections, table = by_layer_and_projection({p: abs(v) for p, v in cos.items()})
    return {
        "mean_abs": sum(absolute) / len(absolute) if absolute else None,
        "max_abs": max(absolute) if absolute else None,
        "by_module": {p: _json_float(v) for p, v in cos.items()},
        "table": {"layers": layers, "projections": projections,
                  "abs_cos": [[_json_float(float(v)) for v in row] for row in table]},
    }


def overlap_report(a: Adapter, b: Adapter) -> dict[str, float] | None:
    """Mask overlap of two masked adapters with the independent-mask expectation; None if unmasked."""
    if a.masks is None or b.masks is None:
        return None
    _check_pair(a, b)
    stats = mask_overlap(a.masks, b.masks)
    stats["expected_independent"] = mask_density(a.masks) * mask_density(b.masks)  # (1-s)^2 at equal s
    return stats


def sparsity_report(adapter: Adapter) -> dict[str, Any] | None:
    """Mask sparsity overall and by (layer, projection); None for a dense adapter."""
    if adapter.masks is None:
        return None
    layers, projections, table = sparsity_table(adapter.masks)
    return {"sparsity": 1.0 - mask_density(adapter.masks), "layers": layers, "projections": projections,
            "table": table.tolist()}


# ---- the report of ``lori diagnose`` ----------------------------------------------------------
def diagnose(
    adapters: Sequence[Adapter], names: Sequence[str], output_dir: str | Path | None = None,
    tensorboard: bool = True,
) -> dict[str, Any]:
    """Cosines and mask overlaps of every pair, sparsity of every adapter; written when asked.

    Args:
        adapters: two or more adapters on the same base modules.
        names: one label per adapter (used in file names and tensorboard tags).
        output_dir: where ``diagnostics.json``, PNG heatmaps and ``tb/`` go; None writes nothing.
        tensorboard: also write tensorboard scalars (|cos| by layer per projection, overlaps) and figures.

    Returns:
        ``{"adapters": [...], "pairs": [...], "sparsity": {...}}`` as written to ``diagnostics.json``.
    """
    if len(adapters) < 2 or len(names) != len(adapters):
        raise AdapterMismatchError(f"need two or more adapters with one name each, got {len(adapters)} "
                                   f"adapters and {len(names)} names")
    report: dict[str, Any] = {
        "adapters": [{"name": n, "rank": a.rank, "scale": a.config.scale, "seed": a.config.seed,
                      "base_fingerprint": a.base_fingerprint} for n, a in zip(names, adapters)],
        "pairs": [],
        "sparsity": {n: sparsity_report(a) for n, a in zip(names, adapters)},
    }
    for (i, a), (j, b) in itertools.combinations(enumerate(adapters), 2):
        report["pairs"].append({"a": names[i], "b": names[j], "cosine": cosine_report(a, b),
                                "mask_overlap": overlap_report(a, b)})
    if output_dir is not None:
        write_report(report, Path(output_dir), tensorboard)
    return report


def write_report(report: dict[str, Any], out: Path, tensorboard: bool = True) -> None:
    """``diagnostics.json``, one |cos| and one sparsity heatmap PNG each, tensorboard scalars."""
    from lori.eval.plots import save_figure, table_figure

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "diagnostics.json", json.dumps(report, indent=2))
    figures = {}
    for pair in report["pairs"]:
        t = pair["cosine"]["table"]
        if t["layers"]:
            title = f"|cos(ΔW)| {pair['a']} vs {pair['b']} (mean {pair['cosine']['mean_abs'] or 0:.3g})"
            table = torch.tensor(t["abs_cos"], dtype=torch.float64)  # None -> nan
            figures[f"cos_{pair['a']}_vs_{pair['b']}"] = (t["layers"], t["projections"], table, title, "|cos|")
    for name, sp in report["sparsity"].items():
        if sp is not None and sp["layers"]:
            table = torch.tensor(sp["table"], dtype=torch.float64)
            figures[f"sparsity_{name}"] = (sp["layers"], sp["projections"], table,
                                           f"mask sparsity {name} ({sp['sparsity']:.3f})", "sparsity")
    for stem, args in figures.items():
        save_figure(table_figure(*args), out / f"{stem}.png")
    if tensorboard:
        _write_tensorboard(report, out / "tb", figures)


def _write_tensorboard(report: dict[str, Any], logdir: Path, figures: dict[str, tuple]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from lori.eval.plots import table_figure

    writer = SummaryWriter(str(logdir))
    try:
        for pair in report["pairs"]:
            tag, cos = f"{pair['a']}_vs_{pair['b']}", pair["cosine"]
            if cos["mean_abs"] is not None:
                writer.add_scalar(f"cos/{tag}/mean_abs", cos["mean_abs"], 0)
            t = cos["table"]
            for j, projection in enumerate(t["projections"]):
                for i, layer in enumerate(t["layers"]):  # one curve per projection, x = layer
                    if t["abs_cos"][i][j] is not None:
                        writer.add_scalar(f"cos/{tag}/{projection}", t["abs_cos"][i][j], layer)
            for key, value in (pair["mask_overlap"] or {}).items():
                writer.add_scalar(f"overlap/{tag}/{key}", value, 0)
        for name, sp in report["sparsity"].items():
            if sp is not None:
                writer.add_scalar(f"sparsity/{name}", sp["sparsity"], 0)
        for stem, args in figures.items():
            writer.add_figure(f"figures/{stem}", table_figure(*args), 0)
    finally:
        writer.close()
