"""Small sweeps over ``lori pipeline`` runs for the ablation notebooks (paper Figs. 4 and 5).

    base = load_config(DEFAULT_CONFIG)                       # or toy_config(workdir)
    grid = expand_grid({"model.lori.sparsity": [0.5, 0.9], "pipeline.sparse_lr": [1e-3, 1e-2]})
    rows = run_sweep(base, grid, "runs/ablations/sparsity_lr", run)   # run(argv) -> summary
    rows[0]  # {"model.lori.sparsity": 0.5, "pipeline.sparse_lr": 0.001, "sparse_loss": ..., ...}

Each grid point is one ``run(["--config", "<root>/<name>/config.yaml"])`` into its own
``output_dir`` (``<root>/<name>``); ``lori.ablation`` passes ``lori pipeline`` itself as ``run``
(the notebooks and experiments/ import the sweeps from there). A point whose ``summary.json``
exists is read, not run, so a notebook re-executed over the same root only plots; a point
interrupted half way continues (the pipeline resumes its stages). A point directory holding a
*different* config is refused: the pipeline would otherwise reuse stages trained with other settings.

For the merge-weights ablation (Fig. 4d), ``merge_weight_sweep`` merges trained adapters with
``lori.core.merge`` for several uniform weights and measures the merged model's held-out loss on
every task (``held_out_loss``: token-mean NLL of the response tokens, as in training).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from lori.core import (
    Adapter,
    LoRIConfigError,
    apply_adapter,
    lori_layers,
    merge_concat,
    merge_linear,
    merge_linear_eq8,
    unload,
)

__all__ = [
    "DEFAULT_CONFIG",
    "MERGES",
    "REPO_ROOT",
    "TOY_MODEL",
    "AblationError",
    "Runner",
    "base_model",
    "expand_grid",
    "format_rows",
    "get_key",
    "held_out_loss",
    "load_config",
    "merge_weight_sweep",
    "merged_losses",
    "pivot",
    "point_config",
    "point_name",
    "run_point",
    "run_sweep",
    "set_key",
    "summary_row",
    "task_data",
    "toy_config",
    "with_overrides",
    "write_toy_gsm8k",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "experiment" / "default.yaml"
TOY_MODEL = "tiny-llama"

# runs one pipeline from ``lori pipeline`` arguments and returns its summary
Runner = Callable[[list[str]], dict[str, Any]]


class AblationError(LoRIConfigError):
    """A sweep that cannot run as asked (bad key, a point directory holding another config)."""


# ---- configs --------------------------------------------------------------------------------
def load_config(path: str | Path) -> dict[str, Any]:
    """A pipeline YAML as a plain dict."""
    return yaml.safe_load(Path(path).read_text())


def get_key(config: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``config["model"]["lori"]["sparsity"]`` for ``key = "model.lori.sparsity"``."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def set_key(config: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in place, creating missing sections; refuses to descend into a value."""
    *parents, last = key.split(".")
    node = config
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise AblationError(f"cannot set {key!r}: {part!r} holds a value ({child!r}), not a section")
        node = child
    node[last] = value


def with_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with each dotted key of ``overrides`` set."""
    config = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        set_key(config, key, value)
    return config


def expand_grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the axes, first axis slowest: one overrides dict per point."""
    for key, values in axes.items():
        if len(values) == 0:
            raise AblationError(f"axis {key!r} has no values")
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def point_name(overrides: Mapping[str, Any]) -> str:
    """Directory name of a grid point: ``sparsity=0.9_sparse_lr=0.005`` (last key parts)."""
    if not overrides:
        return "base"
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in overrides.items()]
    return re.sub(r"[^A-Za-z0-9=.,_+-]", "-", "_".join(parts))


# ---- running a sweep ------------------------------------------------------------------------
def point_config(base: Mapping[str, Any], overrides: Mapping[str, Any], output_dir: Path) -> dict[str, Any]:
    """The full config of one point: base, its overrides, and its own ``pipeline.output_dir``."""
    return with_overrides(base, {**overrides, "pipeline.output_dir": str(output_dir)})


def run_point(
    base: Mapping[str, Any], overrides: Mapping[str, Any], root: str | Path, run: Runner, name: str | None = None,
) -> dict[str, Any]:
    """Run one grid point (or read its ``summary.json``); returns the pipeline summary.

    Args:
        base: the base config (as ``load_config`` returns it).
        overrides: dotted keys to change, e.g. ``{"model.lori.sparsity": 0.5}``.
        root: the sweep's directory; the point runs in ``root/point_name(overrides)``.
        run: ``run(argv) -> summary`` (``lori.ablation.run_point``: ``lori pipeline`` itself).
        name: the point's directory name instead of ``point_name(overrides)``.

    Raises:
        AblationError: the point's directory holds a config other than this one.
    """
    out = Path(root) / (name or point_name(overrides))
    config = point_config(base, overrides, out)
    config_file, summary_file = out / "config.yaml", out / "summary.json"
    if config_file.is_file() and load_config(config_file) != config:
        raise AblationError(
            f"{out} holds a run of another config (base config or settings changed); "
            "delete that directory or choose another root"
        )
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return run(["--config", str(config_file)])


def _loss(stats: Mapping[str, Any], key: str) -> float:
    value = stats.get(key)
    return float("nan") if value is None else float(value)


def summary_row(summary: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """One table row: the point's overrides and the numbers of its ``summary.json``."""
    d, s = summary.get("lori_d", {}), summary.get("lori_s", {})
    return {
        **overrides,
        "base_loss": _loss(d, "val_loss_before"),
        "dense_loss": _loss(d, "val_loss_after"),
        "sparse_loss": _loss(s, "val_loss_after"),
        "mask_sparsity": s.get("mask_sparsity", float("nan")),
        "calibration_step": d.get("calibration", {}).get("step"),
        "trainable_dense": d.get("trainable"),
        "trainable_sparse": s.get("trainable"),
        "output_dir": summary.get("pipeline", {}).get("output_dir"),
    }


def run_sweep(
    base: Mapping[str, Any], grid: Sequence[Mapping[str, Any]], root: str | Path, run: Runner,
) -> list[dict[str, Any]]:
    """Run (or read) every grid point in order; one ``summary_row`` per point."""
    names = [point_name(o) for o in grid]
    if len(set(names)) != len(names):
        raise AblationError(f"grid points share a directory name: {names}")
    return [summary_row(run_point(base, overrides, root, run), overrides) for overrides in grid]


def pivot(
    rows: Sequence[Mapping[str, Any]], row_key: str, col_key: str, value: str,
) -> tuple[list[Any], list[Any], list[list[float]]]:
    """``rows`` as a matrix: (row values, column values, ``matrix[i][j]``), NaN where missing."""
    row_values = sorted({r[row_key] for r in rows})
    col_values = sorted({r[col_key] for r in rows})
    matrix = [[float("nan")] * len(col_values) for _ in row_values]
    for r in rows:
        matrix[row_values.index(r[row_key])][col_values.index(r[col_key])] = float(r[value])
    return row_values, col_values, matrix


def format_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as a fixed-width text table of ``columns`` (floats with 4 decimals, keys shortened)."""

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    names = [c.rsplit(".", 1)[-1] for c in columns]
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(n)] + [len(line[i]) for line in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.rjust(w) for n, w in zip(names, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


# ---- toy size ---------------------------------------------------------------------------------
def write_toy_gsm8k(path: str | Path, n: int = 16, op: str = "+") -> Path:
    """A GSM8K-style JSONL file of ``n`` one-step problems (``op`` ``+`` adds, ``*`` multiplies)."""
    rows = []
    for i in range(n):
        a, b = i + 2, (2 * i + 1) % 9 + 2
        if op == "+":
            question, result = f"Tom has {a} apples and buys {b} more. How many now?", a + b
        elif op == "*":
            question, result = f"Ann packs {a} boxes of {b} pens. How many pens?", a * b
        else:
            raise AblationError(f"unknown toy operation {op!r}; use '+' or '*'")
        rows.append({"question": question, "answer": f"{a}{op}{b}=<<{a}{op}{b}={result}>>{result}\n#### {result}"})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_config(workdir: str | Path, op: str = "+", steps: int = 2) -> dict[str, Any]:
    """A seconds-long config: the tiny random Llama on a toy GSM8K file written into ``workdir``."""
    data_file = write_toy_gsm8k(Path(workdir) / f"toy_gsm8k_{'add' if op == '+' else 'mul'}.jsonl", op=op)
    return {
        "seed_everything": 0,
        "model": {"model": TOY_MODEL, "lori": {"r": 4, "alpha": 8, "sparsity": 0.9, "dropout": 0.0, "seed": 0},
                  "lr": 0.05},
        "data": {"task": "gsm8k", "train_file": str(data_file), "held_out": 4, "max_length": 64,
                 "batch_size": 2},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_model_summary": False,
                    "enable_progress_bar": False, "log_every_n_steps": 1},
        "pipeline": {"dense_steps": steps, "sparse_steps": steps, "checkpoint_every": 100},
    }


# ---- merge weights (Fig. 4d) -------------------------------------------------------------------
def task_data(config: Mapping[str, Any], tokenizer: Any) -> Any:
    """The config's ``TaskDataModule`` with ``tokenizer``, ready to give held-out batches."""
    from lori.data.datamodule import TaskDataModule

    datamodule = TaskDataModule(**config["data"])
    datamodule.set_tokenizer(tokenizer)
    return datamodule


def base_model(config: Mapping[str, Any]) -> tuple[nn.Module, Any]:
    """The config's base model (eval mode) and tokenizer, as the pipeline builds them."""
    from lori.training.module import build_model

    m = config["model"]
    model, tokenizer = build_model(m.get("model"), m.get("gguf_file"), m.get("dtype", "float32"), m.get("cache_dir"))
    return model.eval(), tokenizer


@torch.no_grad()
def held_out_loss(model: nn.Module, loader: Any) -> float:
    """Token-mean NLL over the response tokens (labels != -100) of every batch of ``loader``."""
    total, count = 0.0, 0
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]  # (b, t-1, vocab), (b, t-1)
        total += float(F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return total / max(1, count)


MERGES = {"concat": merge_concat, "linear": merge_linear, "linear_eq8": merge_linear_eq8}  # linear: PEFT's


def merged_losses(
    model: nn.Module, adapter: Adapter | None, loaders: Mapping[str, Any],
) -> dict[str, float]:
    """Held-out loss on every task of ``model`` with ``adapter`` applied (None = the base)."""
    if lori_layers(model):
        unload(model, merge=False)  # back to the exact base weights
    if adapter is not None:
        apply_adapter(model, adapter)
    return {task: held_out_loss(model, loader) for task, loader in loaders.items()}


def merge_weight_sweep(
    model: nn.Module, adapters: Sequence[Adapter], loaders: Mapping[str, Any], weights: Sequence[float],
    methods: Sequence[str] = ("concat",),
) -> list[dict[str, Any]]:
    """For each method and uniform weight w: merge with weights [w] * T, loss on every task.

    Args:
        model: the base model (eval mode); adapters are applied and removed again.
        adapters: one trained adapter per task.
        loaders: held-out dataloaders by task name.
        weights: the uniform merge weights to try (paper Fig. 4d: 0.2, 0.3, 0.4).
        methods: ``concat`` (eq. 5-6), ``linear`` (PEFT's, as the official code) and/or
            ``linear_eq8`` (the paper's eq. 8 as printed).

    Returns:
        Rows ``{"method", "weight", "task", "loss"}``.
    """
    rows = []
    for method in methods:
        if method not in MERGES:
            raise AblationError(f"unknown merge method {method!r}; choose from {sorted(MERGES)}")
        for w in weights:
            merged = MERGES[method](adapters, [w] * len(adapters))
            for task, loss in merged_losses(model, merged, loaders).items():
                rows.append({"method": method, "weight": w, "task": task, "loss": loss})
    merged_losses(model, None, {})  # leave the base model as it came
    return rows
