"""Interference diagnostics between adapters: ΔW cosines (Property 1), mask overlap, sparsity maps.

    lori diagnose --adapters runs/math/lori_s runs/code/lori_s --output runs/diagnose
      -> diagnostics.json, cos_<a>_vs_<b>.png, sparsity_<name>.png, tb/ (tensorboard scalars)

The measures are ``lori.eval.interference``'s. Adapters holding NaN or inf are refused when read;
each output file is written atomically, and the output directory holds one run at a time
(``lori.training.run_lock``).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lori.core import Adapter, AdapterMismatchError, load_adapter
from lori.core.atomic_files import write_text_atomic
from lori.eval.interference import cosine_report, overlap_report, sparsity_report
from lori.training import run_lock


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
    from lori.training.callbacks import save_figure, table_figure

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

    from lori.training.callbacks import table_figure

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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``lori diagnose --adapters DIR DIR [...] --output DIR [--names a b] [--tensorboard false]``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lori diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=str, nargs="+", required=True, help="adapter directories")
    parser.add_argument("--names", type=str, nargs="+", default=None,
                        help="labels (default: the directory names)")
    parser.add_argument("--output", type=str, required=True, help="output directory")
    parser.add_argument("--tensorboard", type=bool, default=True, help="write tensorboard scalars and figures")
    args = parser.parse_args(argv)
    dirs = [Path(d) for d in args.adapters]
    names = args.names or _unique_names(dirs)
    adapters = [load_adapter(d) for d in dirs]
    with run_lock.holding(args.output):
        report = diagnose(adapters, names, args.output, args.tensorboard)
    for pair in report["pairs"]:
        overlap = pair["mask_overlap"]
        extra = "" if overlap is None else (f", mask overlap {overlap['intersection']:.4f} "
                                            f"(independent: {overlap['expected_independent']:.4f})")
        mean = pair["cosine"]["mean_abs"]
        print(f"{pair['a']} vs {pair['b']}: mean |cos(ΔW)| {mean if mean is None else f'{mean:.4g}'}{extra}")
    print(f"written: {Path(args.output) / 'diagnostics.json'}")
    return report


def _unique_names(dirs: Sequence[Path]) -> list[str]:
    """Directory names, prefixed by their parent's name where two would clash."""
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):
        names = [f"{d.parent.name}_{d.name}" for d in dirs]
    return names
