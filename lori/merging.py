"""Merge T adapters into the base model and evaluate it on every task (paper Sec. 3.3, Table 3).

    lori merge --config configs/merge/example_tiny.yaml

One run merges one adapter set (LoRI-D, LoRI-S or LoRA adapters, one per task) with each of
``methods`` (one table row each), merges every result into the base weights, evaluates the merged
model on every task and writes:

    <output_dir>/results.md                 table: rows = merge methods, columns = task metrics + average
    <output_dir>/results.json               the same numbers, weights, densities, adapters
    <output_dir>/merge_config.yaml          the resolved config
    <output_dir>/<method>/merged_adapter/   the merged adapter (factor-space merges, save_merged)
    <output_dir>/<method>/delta_stats.json  ||ΔW||_F and nonzero fraction per module

What each method computes (``lori.core.merge``; s_t = alpha_t / r_t, w_t the weights):

    concat     W0 + Σ_t w_t s_t B_t A_t                       (eq. 6; any ranks)
    linear     W0 + s (Σ_t w_t B_t)(Σ_t w_t A_t)              (eq. 7; equal ranks and scales)
    magnitude  keep the top-``density`` |.| of each A_t and of each s_t B_t, then combine with
    ties       weights sqrt(w_t) as PEFT's add_weighted_adapter (``space: factors``, the paper's
    dare       "sparsification of the A and B matrices"), or the same operator on each ΔW_t
               (``space: delta``)

Every check (adapter dirs, DoRA, weights, densities, ranks, targets, base fingerprints) runs
before the base model loads; the base's own fingerprint is checked before any merge; the output
directory appears only complete (it is built beside the target and renamed in).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lori.core import Adapter, load_adapter, save_adapter
from lori.core.adapter import check_fits
from lori.core.io import CONFIG_FILE
from lori.core.merge import (
    LORA_METHODS,
    DeltaMerge,
    check_mergeable,
    combine,
    merge_concat,
    merge_factors,
    merge_linear,
)

ROW_NAMES = {"concat": "Concat", "linear": "Linear", "magnitude": "Magnitude", "ties": "TIES", "dare": "DARE"}
PRUNING = ("magnitude", "ties", "dare")
PAPER_DENSITY = {"magnitude": 0.3, "ties": 0.7, "dare": 0.7}  # paper Tables 8-10
# uniform weight per adapter by (number of adapters, LoRI-S?) (paper Tables 8-10)
PAPER_WEIGHTS = {(4, False): 0.4, (4, True): 0.3, (3, False): 0.5, (3, True): 0.4}

Evaluate = Callable[..., dict[str, dict[str, float]]]


class MergeConfigError(ValueError):
    """A merge config or adapter set that cannot be merged; the message names the bad value."""


@dataclass
class MergeConfig:
    """One merge run: T adapters, one table row per merge method, evaluation on every task.

    Args:
        adapters: adapter directories, one per task (lori adapters or PEFT LoRA adapters).
        names: a label per adapter, the task it was trained for (default: directory names);
            the single-task row evaluates adapter i on the eval task ``names[i]``.
        methods: merge methods, one row each: ``concat``, ``linear``, ``magnitude``, ``ties``, ``dare``.
        weights: one weight per adapter; None = the paper's uniform weights (0.4 each for four
            LoRI-D / LoRA adapters, 0.3 for LoRI-S; 0.5 / 0.4 for three).
        density: kept fraction of the pruning methods, by method (paper: magnitude 0.3, ties and
            dare 0.7); methods not named keep the paper's value.
        seed: seed of DARE's random drop.
        space: where magnitude / ties / dare act: ``factors`` (on A and B, as PEFT and the paper)
            or ``delta`` (on each ΔW = s B A).
        model: the base model, as LoRIModule's ``model`` (None / name / path / ``tiny-llama``).
        gguf_file: GGUF file inside ``model`` when it is a folder of GGUF files.
        dtype: base weight dtype.
        cache_dir: GGUF conversion cache.
        device: where the merged model is evaluated (``auto``: cuda when available, else cpu).
        output_dir: the results directory (replaced atomically).
        save_merged: write each factor-space merged adapter (loadable by PEFT and lori).
        single_task: also evaluate each adapter alone on its own task (the "Single-Task" row).
        evaluate: evaluate the merged models; false merges and writes adapters and ΔW stats only.
    """

    adapters: list[str] = field(default_factory=list)
    names: list[str] | None = None
    methods: list[Literal["concat", "linear", "magnitude", "ties", "dare"]] = field(
        default_factory=lambda: ["concat", "linear"]
    )
    weights: list[float] | None = None
    density: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    space: Literal["factors", "delta"] = "factors"
    model: str | None = "smollm2-135m-instruct"
    gguf_file: str | None = None
    dtype: str = "float32"
    cache_dir: str | None = None
    device: str = "auto"
    output_dir: str = "runs/merge"
    save_merged: bool = True
    single_task: bool = False
    evaluate: bool = True


@dataclass
class AdapterSet:
    """The loaded, checked adapters of a merge run."""

    adapters: list[Adapter]
    names: list[str]
    kind: str  # "lori" (frozen random A) or "lora"
    label: str  # the paper's "Adaptation" column: LoRI-D, LoRI-S or LoRA
    weights: list[float]


# ---- checks, before anything heavy ------------------------------------------------------------
def check_config(cfg: MergeConfig) -> None:
    """Refuse bad values in the config itself (no file is read)."""
    if len(cfg.adapters) < 2:
        raise MergeConfigError(f"merge needs two or more adapters, got {len(cfg.adapters)}: {cfg.adapters}")
    unknown = [m for m in cfg.methods if m not in LORA_METHODS]
    if unknown or not cfg.methods:
        raise MergeConfigError(
            f"unknown merge methods {unknown or cfg.methods}; choose from {list(LORA_METHODS)}"
        )
    if len(set(cfg.methods)) != len(cfg.methods):
        raise MergeConfigError(f"methods listed twice: {cfg.methods}")
    if cfg.weights is not None and len(cfg.weights) != len(cfg.adapters):
        raise MergeConfigError(
            f"{len(cfg.weights)} weights {cfg.weights} given for {len(cfg.adapters)} adapters"
        )
    for method, value in cfg.density.items():
        if method not in PRUNING:
            raise MergeConfigError(f"density given for {method!r}; only {list(PRUNING)} take a density")
        if not 0.0 < value <= 1.0:
            raise MergeConfigError(f"density for {method} must be in (0, 1], got {value!r}")
    if cfg.space not in ("factors", "delta"):
        raise MergeConfigError(f"space must be 'factors' or 'delta', got {cfg.space!r}")
    if cfg.names is not None and len(cfg.names) != len(cfg.adapters):
        raise MergeConfigError(f"{len(cfg.names)} names given for {len(cfg.adapters)} adapters")
    names = adapter_names(cfg)
    if len(set(names)) != len(names):
        raise MergeConfigError(f"adapter names must differ, got {names}; set names: [...]")


def adapter_names(cfg: MergeConfig) -> list[str]:
    return list(cfg.names) if cfg.names is not None else [Path(a).name for a in cfg.adapters]


def densities(cfg: MergeConfig) -> dict[str, float]:
    return PAPER_DENSITY | cfg.density


def _read_adapter(directory: Path) -> Adapter:
    if not directory.is_dir():
        raise MergeConfigError(f"adapter directory {str(directory)!r} does not exist")
    config_file = directory / CONFIG_FILE
    if config_file.is_file():
        peft = json.loads(config_file.read_text())
        if peft.get("use_dora"):
            raise MergeConfigError(f"{directory} is a DoRA adapter; merging takes LoRI and LoRA adapters")
    return load_adapter(directory)


def adapter_kind(adapter: Adapter) -> str:
    """``lori`` for adapters with a seeded, frozen A (LoRI, LoRA-FA), else ``lora``."""
    frozen_A = adapter.meta.get("method", "lori") in ("lori", "lora_fa") and adapter.config.seed >= 0
    return "lori" if frozen_A else "lora"


def _label(kind: str, adapters: Sequence[Adapter]) -> str:
    if kind == "lora":
        return "LoRA"
    masked = {a.masks is not None for a in adapters}
    return "LoRI-S" if masked == {True} else "LoRI-D" if masked == {False} else "LoRI-D/S"


def load_adapter_set(cfg: MergeConfig) -> AdapterSet:
    """Read the adapters and check they can be merged by every method (before the base loads)."""
    check_config(cfg)
    names = adapter_names(cfg)
    adapters = [_read_adapter(Path(d)) for d in cfg.adapters]
    kinds = {adapter_kind(a) for a in adapters}
    if len(kinds) > 1:
        kinds_by_name = {n: adapter_kind(a) for n, a in zip(names, adapters)}
        raise MergeConfigError(f"cannot merge LoRI and LoRA adapters together: {kinds_by_name}")
    kind = kinds.pop()
    label = _label(kind, adapters)
    weights = list(cfg.weights) if cfg.weights is not None else paper_weights(len(adapters), label)
    for method in cfg.methods:
        check_mergeable(adapters, weights, same_rank=needs_equal_rank(method, cfg.space))
    return AdapterSet(adapters, names, kind, label, weights)


def paper_weights(n: int, label: str) -> list[float]:
    """The paper's uniform merge weights for ``n`` adapters."""
    key = (n, label == "LoRI-S")
    if key not in PAPER_WEIGHTS:
        raise MergeConfigError(f"the paper gives merge weights for 3 or 4 adapters; give weights for {n}")
    return [PAPER_WEIGHTS[key]] * n


def needs_equal_rank(method: str, space: str) -> bool:
    return method == "linear" or (method in PRUNING and space == "factors")


# ---- merging ------------------------------------------------------------------------------
def merge_result(aset: AdapterSet, method: str, cfg: MergeConfig) -> Adapter | None:
    """The merged adapter of a factor-space merge; None for a ΔW-space merge."""
    ads, w = aset.adapters, aset.weights
    if method == "concat":
        return merge_concat(ads, w)
    if method == "linear":
        return merge_linear(ads, w)
    if cfg.space == "factors":
        return merge_factors(ads, w, method, densities(cfg)[method], cfg.seed)
    return None


def merged_deltas(
    aset: AdapterSet, method: str, cfg: MergeConfig, merged: Adapter | None
) -> Iterator[tuple[str, Tensor]]:
    """(path, ΔW) per module, one at a time (a full set of dense ΔW is a model's worth of memory).

    ΔW-space merges draw DARE's drops module by module in the same order as ``merge_deltas``.
    """
    if merged is not None:
        for path in merged.A:
            yield path, merged.delta(path)
        return
    generator = torch.Generator().manual_seed(cfg.seed)
    density = densities(cfg).get(method, 1.0)
    for path in aset.adapters[0].A:
        deltas = [a.delta(path) for a in aset.adapters]
        yield path, combine(deltas, aset.weights, method, density, generator)


class BaseWeights:
    """The adapted modules' base weights, kept on CPU so every row starts from the exact base."""

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        self.model = model
        self.saved = {p: model.get_submodule(p).weight.detach().to("cpu", copy=True) for p in paths}

    @torch.no_grad()
    def restore(self) -> None:
        for path, weight in self.saved.items():
            self.model.get_submodule(path).weight.copy_(weight)


def apply_merge(model: nn.Module, deltas: Iterator[tuple[str, Tensor]]) -> dict[str, dict[str, float]]:
    """Add each ΔW into its base weight (fp32, cast back); returns ||ΔW||_F and nonzero fraction."""
    stats = {}
    for path, delta in deltas:
        DeltaMerge(model, {path: delta}).merge()
        stats[path] = {"norm": float(delta.norm()), "nonzero": float((delta != 0).float().mean())}
    return stats


# ---- the run -------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_base(cfg: MergeConfig, aset: AdapterSet) -> tuple[nn.Module, Any]:
    """The base model and tokenizer, refused unless every adapter fits it (shapes and fingerprint)."""
    from lori.module import build_model

    model, tokenizer = build_model(cfg.model, cfg.gguf_file, cfg.dtype, cfg.cache_dir)
    for name, adapter in zip(aset.names, aset.adapters):
        try:
            check_fits(model, adapter, strict_base=True)
        except ValueError as err:
            raise type(err)(f"adapter {name!r} does not fit base {cfg.model!r}: {err}") from None
    return model.to(_device(cfg.device)).eval(), tokenizer


def run_merge(
    cfg: MergeConfig, eval_settings: Any = None, evaluate: Evaluate | None = None,
    config_text: str | None = None,
) -> dict[str, Any]:
    """Check, merge with every method, evaluate, and write the results directory.

    Args:
        cfg: the merge run.
        eval_settings: ``lori.evaluate.EvalSettings`` (its ``tasks`` are the table's tasks).
        evaluate: ``evaluate_model(model, tokenizer, settings)``; default
            ``lori.evaluate.evaluate_model``.
        config_text: the resolved YAML, written beside the results.

    Returns:
        The results (as in ``results.json``).
    """
    aset = load_adapter_set(cfg)
    tasks = _check_evaluation(cfg, aset, eval_settings)
    if cfg.evaluate:
        evaluate = evaluate or _default_evaluate()
    model, tokenizer = load_base(cfg, aset)
    base = BaseWeights(model, list(aset.adapters[0].A))
    results = _results_header(cfg, aset, tasks)
    with _building(Path(cfg.output_dir)) as tmp:
        if cfg.single_task and cfg.evaluate:
            results["rows"].append(_single_task_row(model, tokenizer, aset, eval_settings, evaluate, base))
        for method in cfg.methods:
            row = _merge_row(model, tokenizer, aset, method, cfg, eval_settings, evaluate, tmp / method)
            base.restore()
            results["rows"].append(row)
        for row in results["rows"]:
            row["average"] = row_average(row["scores"], tasks)
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
        (tmp / "results.md").write_text(results_table(results) + "\n")
        if config_text is not None:
            (tmp / "merge_config.yaml").write_text(config_text)
    return results


def _check_evaluation(cfg: MergeConfig, aset: AdapterSet, settings: Any) -> list[str]:
    """The tasks of the table; refuses an evaluation that cannot run as configured."""
    if not cfg.evaluate:
        return []
    tasks = list(_get(settings, "tasks") or [])
    if not tasks:
        raise MergeConfigError("evaluate is true but eval.tasks is empty; list tasks or set evaluate: false")
    missing = [n for n in aset.names if n not in tasks]
    if cfg.single_task and missing:
        raise MergeConfigError(
            f"single_task evaluates adapter i on task names[i]; {missing} are not in eval.tasks {tasks}"
        )
    return tasks


@contextlib.contextmanager
def _building(target: Path) -> Iterator[Path]:
    """A directory built beside ``target`` that replaces it only when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        old = target.parent / f".{target.name}.old"
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _get(settings: Any, key: str) -> Any:
    return settings.get(key) if isinstance(settings, dict) else getattr(settings, key, None)


def _default_evaluate() -> Evaluate:
    from lori.evaluate import evaluate_model

    return evaluate_model


def _results_header(cfg: MergeConfig, aset: AdapterSet, tasks: list[str]) -> dict[str, Any]:
    adapters = [
        {"name": n, "path": str(p), "rank": a.rank, "scale": a.config.scale,
         "base_fingerprint": a.base_fingerprint}
        for n, p, a in zip(aset.names, cfg.adapters, aset.adapters)
    ]
    return {"adaptation": aset.label, "kind": aset.kind, "tasks": tasks, "weights": aset.weights,
            "adapters": adapters, "config": asdict(cfg), "rows": []}


def _merge_row(
    model: nn.Module, tokenizer: Any, aset: AdapterSet, method: str, cfg: MergeConfig, settings: Any,
    evaluate: Evaluate | None, out: Path,
) -> dict[str, Any]:
    merged = merge_result(aset, method, cfg)
    stats = apply_merge(model, merged_deltas(aset, method, cfg, merged))
    out.mkdir(parents=True)
    (out / "delta_stats.json").write_text(json.dumps(stats, indent=2))
    if merged is not None and cfg.save_merged:
        save_adapter(merged, out / "merged_adapter")
    density = densities(cfg)[method] if method in PRUNING else None
    scores = evaluate(model, tokenizer, settings) if cfg.evaluate else {}
    space = "factors" if merged is not None else "delta"
    return {"method": method, "merging": ROW_NAMES[method], "adaptation": aset.label,
            "weights": aset.weights, "density": density, "space": space, "scores": scores}


def _single_task_row(
    model: nn.Module, tokenizer: Any, aset: AdapterSet, settings: Any, evaluate: Evaluate,
    base: BaseWeights,
) -> dict[str, Any]:
    """Each adapter alone (weight 1) on its own task: the reference row."""
    scores: dict[str, dict[str, float]] = {}
    for name, adapter in zip(aset.names, aset.adapters):
        apply_merge(model, ((p, adapter.delta(p)) for p in adapter.A))
        scores |= {name: evaluate(model, tokenizer, replace(settings, tasks=[name]))[name]}
        base.restore()
    return {"method": "single", "merging": "Single-Task", "adaptation": aset.label, "weights": None,
            "density": None, "space": None, "scores": scores}


# ---- the table -----------------------------------------------------------------------------
def row_average(scores: dict[str, dict[str, float]], tasks: Sequence[str]) -> float | None:
    """Mean over tasks of each task's first (primary) metric; None when a task has no score."""
    primary = [next(iter(scores[t].values())) for t in tasks if scores.get(t)]
    return sum(primary) / len(primary) if primary and len(primary) == len(tasks) else None


def results_table(results: dict[str, Any]) -> str:
    """Markdown like the paper's Table 3: Merging | Adaptation | task metrics ... | Average."""
    columns = _columns(results)
    head = ["Merging", "Adaptation"] + [f"{t} {m}" for t, m in columns] + ["Average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"]:
        cells = [row["merging"], row["adaptation"]]
        cells += [_fmt(row["scores"].get(t, {}).get(m)) for t, m in columns]
        lines.append("| " + " | ".join(cells + [_fmt(row.get("average"))]) + " |")
    return "\n".join(lines)


def _columns(results: dict[str, Any]) -> list[tuple[str, str]]:
    columns: list[tuple[str, str]] = []
    for task in results["tasks"]:
        for row in results["rows"]:
            columns += [(task, m) for m in row["scores"].get(task, {}) if (task, m) not in columns]
    return columns


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}" if abs(value) <= 1.0 else f"{value:.2f}"


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return str(value)


# ---- command line --------------------------------------------------------------------------
def build_parser():
    """``lori merge`` options: a ``merge:`` group (MergeConfig) and an ``eval:`` group."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lori merge", description="Merge T adapters and evaluate on every task")
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML with merge: and eval: sections")
    parser.add_class_arguments(MergeConfig, "merge")
    _add_eval_arguments(parser)
    return parser


def _add_eval_arguments(parser) -> None:
    try:
        from lori.evaluate import EvalSettings
    except ImportError:  # evaluation not available: eval settings pass through as a mapping
        parser.add_argument("--eval", type=dict | None, default=None, help="evaluation settings")
        return
    parser.add_class_arguments(EvalSettings, "eval")


def parse_config(path: str | Path) -> tuple[MergeConfig, Any]:
    """Parse and check a merge YAML without reading adapters or loading anything."""
    parser = build_parser()
    args = parser.parse_args(["--config", str(path)])
    cfg, settings = _instantiate(parser, args)
    check_config(cfg)
    return cfg, settings


def _instantiate(parser, args) -> tuple[MergeConfig, Any]:
    init = parser.instantiate(args)
    cfg = init.merge if isinstance(init.merge, MergeConfig) else MergeConfig(**dict(init.merge))
    return cfg, init.get("eval")


def main(argv: list[str] | None = None, evaluate: Evaluate | None = None) -> dict[str, Any]:
    """``lori merge --config FILE [--merge.<option> ...]``: run and print the table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg, settings = _instantiate(parser, args)
    config_text = parser.dump(args)
    results = run_merge(cfg, settings, evaluate, config_text)
    print(results_table(results))
    print(f"written: {cfg.output_dir}/results.md, results.json")
    return results
