"""Interference diagnostics between adapters: ΔW cosines (Property 1), mask overlap, sparsity maps.

    lori diagnose --adapters runs/math/lori_s runs/code/lori_s --output runs/diagnose
      -> diagnostics.json, cos_<a>_vs_<b>.png, sparsity_<name>.png, tb/ (tensorboard scalars)

The measures and the report are ``lori.eval.interference``'s; this module parses and prints.
Adapters holding NaN or inf are refused when read; each output file is written atomically, and the
output directory holds one run at a time (``lori.training.run_lock``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lori.core import load_adapter
from lori.eval.interference import diagnose
from lori.training import run_lock


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
