"""Heatmaps of a layer x projection table (mask sparsity, |cos(ΔW)|) as matplotlib figures and PNGs.

    rows = layers, columns = projections (q_proj, k_proj, ...), colour = the value

Used by mask calibration (``lori.training.callbacks.MaskCalibration``: paper Fig. 4b / Fig. 6) and
``lori diagnose`` (``lori.eval.interference.write_report``). matplotlib is imported when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lori.core import mask_density, sparsity_table
from lori.core.atomic_files import atomic_write


def table_figure(layers: list[int], columns: list[str], table: torch.Tensor, title: str, label: str):
    """A layer x projection heatmap (rows = layers, columns = projections) as a matplotlib figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # a Figure with its own Agg canvas: no pyplot state, no global backend switch (notebooks keep theirs)
    fig = Figure(figsize=(1.2 + 0.9 * len(columns), 1.0 + 0.22 * len(layers)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(table.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("projection")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    return fig


def heatmap_figure(masks: dict[str, torch.Tensor]):
    """Mask sparsity by layer and projection as a matplotlib figure (paper Fig. 4b / Fig. 6)."""
    layers, projections, table = sparsity_table(masks)
    title = f"mask sparsity (overall {1 - mask_density(masks):.3f})"
    return table_figure(layers, projections, table, title, "sparsity")


def save_figure(fig, path: Path) -> None:
    """Write a figure as a PNG (atomically) and free it."""
    with atomic_write(path) as f:
        fig.savefig(f, dpi=100, format="png")
    fig.clear()


def save_heatmap(masks: dict[str, torch.Tensor], path: Path) -> None:
    """Sparsity by layer and projection as a PNG (paper Fig. 4b / Fig. 6)."""
    save_figure(heatmap_figure(masks), path)
