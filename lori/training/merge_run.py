"""Merge T adapters into the base model and evaluate it on every task (paper Sec. 3.3, Table 3).

    run_merge(MergeConfig(adapters=[...], method=["concat", "ties"], evaluate=[...]))
    lori merge --config configs/merge/example_tiny.yaml                   (lori.commands.merge_command)

One run merges one adapter set (LoRI-D, LoRI-S or LoRA adapters, one per task) with each of its
merge methods (one table row each), adds every result into the base weights, evaluates the merged
model on every benchmark and writes:

    <output_dir>/results.md                 rows = merge methods, columns = task metrics + average
    <output_dir>/results.json               the same numbers, weights, densities, adapters
    <output_dir>/merge_config.yaml          the resolved config
    <output_dir>/<method>/merged_adapter/   the merged adapter (factor-space merges, save_merged), README.md card
    <output_dir>/<method>/delta_stats.json  ||ΔW||_F and nonzero fraction per module

What each method computes (``lori.core.merge``; s_t = alpha_t / r_t, w_t the weights; PEFT's
combination type, which the official code passes to ``add_weighted_adapter``, in brackets):

    concat [cat]        W0 + Σ_t w_t s_t B_t A_t                       (eq. 5-6; any ranks)
    linear [linear]     W0 + (Σ_t √(w_t s_t) B_t)(Σ_t √(w_t s_t) A_t)  (PEFT's and the official code's
                        linear; equal ranks)
    linear_eq8          W0 + s (Σ_t w_t B_t)(Σ_t w_t A_t)              (the paper's eq. 8 as printed;
                        equal ranks and scales; lori protocol only)
    magnitude [magnitude_prune], ties [ties], dare [dare_linear], dare_ties [dare_ties]:
                        PEFT's operator on the A_t (weights √(w_t s_t)) and on the B_t
                        (``space: factors``, the paper's "sparsification of the A and B matrices"),
                        or the same operator on each ΔW_t with weights w_t (``space: delta``)

``protocol: official`` merges as src/merge_3_loras.py / merge_4_loras.py do: float32 base
(l.47-51), density 0.7 wherever none is given (l.36), factor space only, DARE as PEFT 0.12.0
(no 1 / density rescale); ``protocol: lori`` (default) allows ``space: delta``, ``linear_eq8``,
other dtypes, the paper's per-method densities, and rescales DARE. PEFT's names are accepted
for the methods under both.

Every check (adapter dirs, DoRA, adaptation, weights, densities, ranks, targets, base
fingerprints, evaluation settings and data) runs before the base model loads; the base's own
fingerprint is checked before any merge; a merge that would put NaN or inf into a base weight is
refused before that weight changes (and the base is restored); the output directory appears only
complete, and holds one run at a time (``lori.training.run_lock``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lori.core import Adapter, LoRIConfigError, load_adapter, save_adapter
from lori.core.adapter import check_fits
from lori.core.io import CONFIG_FILE, atomic_directory
from lori.core.merge import (
    ALIASES,
    METHODS,
    PEFT_TYPES,
    PRUNING,
    DeltaMerge,
    check_mergeable,
    iter_merged_deltas,
    merge_factors,
)
from lori.eval.merge_table import results_table, row_average, table_columns
from lori.training import run_lock
from lori.training.baselines.registry import find_method
from lori.training.merge_sets import MergeSet, row_settings
from lori.training.model_card import facts_from_merge, write_card

ROW_NAMES = {"concat": "Concat", "linear": "Linear", "linear_eq8": "Linear (eq. 8)", "magnitude": "Magnitude",
             "ties": "TIES", "dare": "DARE", "dare_ties": "DARE-TIES"}
LABELS = {"lori_d": "LoRI-D", "lori_s": "LoRI-S", "lora": "LoRA"}
PAPER_DENSITY = {"magnitude": 0.3, "ties": 0.7, "dare": 0.7, "dare_ties": 0.7}  # paper Tables 8-10
OFFICIAL_DENSITY = 0.7  # merge_3_loras.py / merge_4_loras.py l.36: --density default, for every method
FACTOR_ONLY = ("concat", "linear", "linear_eq8")  # merged in factor space whatever ``space`` says
# uniform weight per adapter by (number of adapters, LoRI-S?) (paper Tables 8-10)
PAPER_WEIGHTS = {(4, False): 0.4, (4, True): 0.3, (3, False): 0.5, (3, True): 0.4}

MergeMethod = Literal["concat", "linear", "linear_eq8", "magnitude", "ties", "dare", "dare_ties", "cat",
                      "magnitude_prune", "dare_linear"]
# evaluate(model, tokenizer, tasks) -> {task: {metric: value}}
Evaluate = Callable[[nn.Module, Any, list[str]], dict[str, dict[str, float]]]


class MergeConfigError(LoRIConfigError):
    """A merge config or adapter set that cannot be merged; the message names the bad value."""


@dataclass
class MergeConfig:
    """One merge run: T adapters, one table row per merge method, evaluation on every benchmark.

    Args:
        base_model: the base model, as LoRIModule's ``model`` (name, folder, hub id, ``tiny-llama``).
        adaptation: ``lori_d``, ``lori_s`` or ``lora``: what the adapters must be (checked);
            None = whatever they are.
        adapters: adapter directories, one per task (lori adapters or PEFT LoRA adapters).
        tasks: the task each adapter was trained for, as labels (default: directory names).
        method: a merge method or a list of them, one table row each: ``concat``, ``linear``
            (PEFT's), ``linear_eq8`` (paper eq. 8), ``magnitude``, ``ties``, ``dare``, ``dare_ties``;
            PEFT's names ``cat``, ``magnitude_prune``, ``dare_linear`` are accepted.
        weights: one weight per adapter; None = the paper's uniform weights (0.4 each for four
            LoRI-D / LoRA adapters, 0.3 for LoRI-S; 0.5 / 0.4 for three).
        density: kept fraction for magnitude / ties / dare / dare_ties: one number, or one per
            method; None = the protocol's: ``lori`` the paper's (magnitude 0.3, the others 0.7),
            ``official`` 0.7 for every method (the official scripts' default).
        evaluate: the benchmarks (``lori.eval.evaluator`` task names) run on every merged model;
            empty = merge and write adapters and ΔW stats only.
        output_dir: the results directory (replaced as a whole when the run finishes); None = the
            row's (``adapter_set``), else ``runs/merge``.
        seed: seed of DARE's random drop (a generator of its own; the same drops as PEFT's when
            torch's default generator is at ``manual_seed(seed)`` at PEFT's first drop).
        space: where the pruning methods act: ``factors`` (on A and B, as PEFT and the paper)
            or ``delta`` (on each ΔW = s B A; ``lori`` protocol only).
        protocol: ``lori`` or ``official`` (merge as the official code: see the module docstring).
        dare_rescale: DARE divides the kept entries by the density; None = the protocol's
            (``lori`` True as DARE and current PEFT, ``official`` False as PEFT 0.12.0).
        majority_sign_method: TIES's sign election, ``total`` (PEFT's default) or ``frequency``.
        single_task: also evaluate each adapter alone on ``evaluate[i]`` (the "Single-Task" row;
            ``evaluate`` then lists one benchmark per adapter, in order); None = the row's, else False.
        save_merged: write each factor-space merged adapter (loadable by PEFT and lori).
        gguf_file: GGUF file inside ``base_model`` when it is a folder of GGUF files.
        dtype: base weight dtype (``official``: float32 only).
        cache_dir: GGUF conversion cache.
        device: where the merged model is evaluated (``auto``: cuda when available, else cpu).
        adapter_set: training runs and table rows (``lori.training.merge_sets.MergeSet``): ``method``
            and ``adaptation`` pick one row, which fills ``adapters``, ``weights``, ``density``,
            ``single_task`` and ``output_dir`` where they are unset (empty or None).
    """

    base_model: str | None = "smollm2-135m-instruct"
    adaptation: Literal["lori_d", "lori_s", "lora"] | None = None
    adapters: list[str] = field(default_factory=list)
    tasks: list[str] | None = None
    method: MergeMethod | list[MergeMethod] = "concat"
    weights: list[float] | None = None
    density: float | dict[str, float] | None = None
    evaluate: list[str] = field(default_factory=list)
    output_dir: str | None = None
    seed: int = 0
    space: Literal["factors", "delta"] = "factors"
    protocol: Literal["lori", "official"] = "lori"
    dare_rescale: bool | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"
    single_task: bool | None = None
    save_merged: bool = True
    gguf_file: str | None = None
    dtype: str = "float32"
    cache_dir: str | None = None
    device: str = "auto"
    adapter_set: MergeSet | None = None

    def __post_init__(self) -> None:
        """Fill what ``adapter_set``'s row gives where it is unset; then the plain defaults."""
        if self.adapter_set is not None:
            self.adapter_set = MergeSet.from_value(self.adapter_set)
            row = row_settings(self.adapter_set, self.methods, self.adaptation)
            for key, value in row.items():
                if getattr(self, key) in (None, []):
                    setattr(self, key, value)
        self.output_dir = "runs/merge" if self.output_dir is None else self.output_dir
        self.single_task = bool(self.single_task)

    @property
    def methods(self) -> list[str]:
        """The methods by lori's names (PEFT's names mapped: ``cat`` -> ``concat`` ...)."""
        given = [self.method] if isinstance(self.method, str) else list(self.method)
        return [ALIASES.get(m, m) for m in given]

    @property
    def rescale(self) -> bool:
        """Whether DARE divides by the density."""
        return self.protocol == "lori" if self.dare_rescale is None else self.dare_rescale

    @property
    def names(self) -> list[str]:
        return list(self.tasks) if self.tasks is not None else [Path(a).name for a in self.adapters]

    def density_of(self, method: str) -> float:
        """The kept fraction of a pruning method: given, else the protocol's default."""
        default = OFFICIAL_DENSITY if self.protocol == "official" else PAPER_DENSITY[method]
        if isinstance(self.density, dict):
            given = {ALIASES.get(m, m): v for m, v in self.density.items()}
            return default if given.get(method) is None else float(given[method])
        return default if self.density is None else float(self.density)


@dataclass
class AdapterSet:
    """The loaded, checked adapters of a merge run."""

    adapters: list[Adapter]
    names: list[str]
    adaptation: str  # lori_d, lori_s or lora
    weights: list[float]

    @property
    def label(self) -> str:
        return LABELS[self.adaptation]


# ---- checks, before anything heavy ------------------------------------------------------------
def check_config(cfg: MergeConfig) -> None:
    """Refuse bad values in the config itself (no file is read)."""
    n = len(cfg.adapters)
    if n < 2:
        raise MergeConfigError(f"merge needs two or more adapters, got {n}: {cfg.adapters}")
    methods = cfg.methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise MergeConfigError(
            f"bad merge method list {cfg.method}; use each of {list(METHODS)} at most once "
            f"(PEFT's names {sorted(ALIASES)} stand for {[ALIASES[a] for a in sorted(ALIASES)]})"
        )
    if cfg.weights is not None and len(cfg.weights) != n:
        raise MergeConfigError(f"{len(cfg.weights)} weights {cfg.weights} given for {n} adapters")
    if cfg.tasks is not None and len(cfg.tasks) != n:
        raise MergeConfigError(f"{len(cfg.tasks)} tasks {cfg.tasks} given for {n} adapters")
    if len(set(cfg.names)) != n:
        raise MergeConfigError(f"adapter labels must differ, got {cfg.names}; set tasks: [...]")
    _check_density(cfg)
    if cfg.protocol == "official":
        _check_official(cfg)
    if cfg.single_task and len(cfg.evaluate) != n:
        raise MergeConfigError(
            f"single_task evaluates adapter i on evaluate[i]: give one benchmark per adapter, "
            f"got {cfg.evaluate}"
        )


def _check_density(cfg: MergeConfig) -> None:
    if isinstance(cfg.density, dict):
        given = {ALIASES.get(m, m): v for m, v in cfg.density.items()}
    else:
        given = {m: cfg.density for m in PRUNING}
        if cfg.density is not None and not set(cfg.methods) & set(PRUNING):
            raise MergeConfigError(
                f"density={cfg.density!r} given but none of the methods {cfg.methods} takes one "
                f"(only {list(PRUNING)} do); set density: null"
            )
    for method, value in given.items():
        if method not in PRUNING:
            raise MergeConfigError(f"density given for {method!r}; only {list(PRUNING)} take a density")
        if value is not None and not 0.0 < value <= 1.0:
            raise MergeConfigError(f"density must be in (0, 1], got density={value!r}")


def _check_official(cfg: MergeConfig) -> None:
    """What ``protocol: official`` cannot do: the official code merges in fp32, in factor space, with PEFT."""
    if cfg.dtype != "float32":
        raise MergeConfigError(
            f"protocol official merges on a float32 base (merge_3_loras.py l.47-51: torch_dtype=torch.float32), "
            f"got dtype={cfg.dtype!r}; set dtype: float32 or protocol: lori"
        )
    if cfg.space != "factors":
        raise MergeConfigError(
            f"protocol official merges in factor space as PEFT's add_weighted_adapter, got space={cfg.space!r}; "
            f"set space: factors or protocol: lori"
        )
    if "linear_eq8" in cfg.methods:
        raise MergeConfigError(
            "linear_eq8 (the paper's eq. 8) is not a PEFT combination type the official code can run; "
            "use linear (PEFT's) or protocol: lori"
        )


def _read_adapter(directory: Path) -> Adapter:
    if not directory.is_dir():
        raise MergeConfigError(f"adapter directory {str(directory)!r} does not exist")
    config_file = directory / CONFIG_FILE
    if config_file.is_file() and json.loads(config_file.read_text()).get("use_dora"):
        raise MergeConfigError(f"{directory} is a DoRA adapter; merging takes LoRI and LoRA adapters")
    return load_adapter(directory)


def adaptation_of(adapter: Adapter) -> str:
    """``lori_d`` / ``lori_s`` for a seeded, frozen A (LoRI, lori_d), else ``lora``.

    ``lora_fa`` (older still) and ``lora_frozen_a`` are old names of method lori_d in lori adapter
    dirs (seed >= 0); PEFT LoRA-FA dirs carry no LoRI seed (-1) and read as ``lora``.
    """
    entry = find_method(adapter.meta.get("method", "lori"))
    frozen_A = entry is not None and entry.frozen_seeded_a and adapter.config.seed >= 0
    if not frozen_A:
        return "lora"
    return "lori_s" if adapter.masks is not None else "lori_d"


def load_adapter_set(cfg: MergeConfig) -> AdapterSet:
    """Read the adapters and check they can be merged by every method (before the base loads)."""
    check_config(cfg)
    adapters = [_read_adapter(Path(d)) for d in cfg.adapters]
    found = {name: adaptation_of(a) for name, a in zip(cfg.names, adapters)}
    kinds = set(found.values())
    if len(kinds) > 1:
        raise MergeConfigError(f"adapters of different kinds cannot be merged together: {found}")
    adaptation = kinds.pop()
    if cfg.adaptation is not None and cfg.adaptation != adaptation:
        raise MergeConfigError(f"adaptation is {cfg.adaptation!r} but the adapters are {adaptation!r}: {found}")
    weights = list(cfg.weights) if cfg.weights is not None else paper_weights(len(adapters), adaptation)
    for method in cfg.methods:
        check_mergeable(adapters, weights, same_rank=needs_equal_rank(method, cfg.space),
                        same_scale=method == "linear_eq8")
    return AdapterSet(adapters, cfg.names, adaptation, weights)


def paper_weights(n: int, adaptation: str) -> list[float]:
    """The paper's uniform merge weights for ``n`` adapters."""
    key = (n, adaptation == "lori_s")
    if key not in PAPER_WEIGHTS:
        raise MergeConfigError(f"the paper gives merge weights for 3 or 4 adapters; give weights for {n}")
    return [PAPER_WEIGHTS[key]] * n


def needs_equal_rank(method: str, space: str) -> bool:
    return method in ("linear", "linear_eq8") or (method in PRUNING and space == "factors")


# ---- merging ------------------------------------------------------------------------------
def _density(cfg: MergeConfig, method: str) -> float:
    return cfg.density_of(method) if method in PRUNING else 1.0


def merge_result(aset: AdapterSet, method: str, cfg: MergeConfig, order: Sequence[str] | None = None) -> Adapter | None:
    """The merged adapter of a factor-space merge; None for a ΔW-space merge.

    ``order``: module paths in the base model's order (DARE draws module by module in it, as PEFT).
    """
    if method not in FACTOR_ONLY and cfg.space == "delta":
        return None
    return merge_factors(aset.adapters, aset.weights, method, _density(cfg, method), cfg.seed, cfg.rescale,
                         cfg.majority_sign_method, order)


def merged_deltas(
    aset: AdapterSet, method: str, cfg: MergeConfig, merged: Adapter | None, order: Sequence[str] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """(path, ΔW) per module, one at a time (a full set of dense ΔW is a model's worth of memory)."""
    if merged is not None:
        for path in merged.A:
            yield path, merged.delta(path)
        return
    yield from iter_merged_deltas(aset.adapters, aset.weights, method, _density(cfg, method), cfg.seed, cfg.rescale,
                                  cfg.majority_sign_method, order)


class BaseWeights:
    """The adapted modules' base weights, kept on CPU so every row starts from the exact base."""

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        self.model = model
        self.saved = {p: model.get_submodule(p).weight.detach().to("cpu", copy=True) for p in paths}

    @torch.no_grad()
    def restore(self) -> None:
        for path, weight in self.saved.items():
            self.model.get_submodule(path).weight.copy_(weight)

    @contextlib.contextmanager
    def restored_on_error(self) -> Iterator[None]:
        """Restore the base if the block fails (a merge refused half-way leaves no merged module)."""
        try:
            yield
        except BaseException:
            self.restore()
            raise


def apply_merge(model: nn.Module, deltas: Iterator[tuple[str, Tensor]]) -> dict[str, dict[str, float]]:
    """Add each ΔW into its base weight (fp32, cast back); returns ||ΔW||_F and nonzero fraction."""
    stats = {}
    for path, delta in deltas:
        DeltaMerge(model, {path: delta}).merge()
        stats[path] = {"norm": float(delta.norm()), "nonzero": float((delta != 0).float().mean())}
    return stats


# ---- the run -------------------------------------------------------------------------------
def make_evaluator(cfg: MergeConfig, settings: Any) -> Evaluate:
    """``lori.eval.evaluator.evaluate_model`` on a subset of ``cfg.evaluate``; settings and evaluation
    data are checked and loaded here, before the base model."""
    from lori.eval.evaluator import EvalSettings, evaluate_model, load_eval_sets
    from lori.eval.official import check_official_model

    settings = settings if settings is not None else EvalSettings()
    check_official_model(settings, cfg.dtype)  # eval.protocol official: a float32 base (merged: always)
    sets = {task: load_eval_sets(replace(settings, tasks=[task])) for task in cfg.evaluate}

    def evaluate(model: nn.Module, tokenizer: Any, tasks: list[str]) -> dict[str, dict[str, float]]:
        eval_sets = {name: records for task in tasks for name, records in sets[task].items()}
        return evaluate_model(model, tokenizer, replace(settings, tasks=tasks), eval_sets=eval_sets)

    return evaluate


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_base(cfg: MergeConfig, aset: AdapterSet) -> tuple[nn.Module, Any]:
    """The base model and tokenizer, refused unless every adapter fits it (shapes and fingerprint)."""
    from lori.training.module import build_model

    model, tokenizer = build_model(cfg.base_model, cfg.gguf_file, cfg.dtype, cfg.cache_dir)
    for name, adapter in zip(aset.names, aset.adapters):
        try:
            check_fits(model, adapter, strict_base=True)
        except ValueError as err:
            raise type(err)(f"adapter {name!r} does not fit base {cfg.base_model!r}: {err}") from None
    return model.to(_device(cfg.device)).eval(), tokenizer


@run_lock.locks_output_dir("cfg")
def run_merge(
    cfg: MergeConfig, eval_settings: Any = None, evaluate: Evaluate | None = None,
    config_text: str | None = None,
) -> dict[str, Any]:
    """Check, merge with every method, evaluate, and write the results directory.

    Args:
        cfg: the merge run.
        eval_settings: ``lori.eval.evaluator.EvalSettings`` for everything but the tasks (``cfg.evaluate``).
        evaluate: ``evaluate(model, tokenizer, tasks)``; default: ``make_evaluator(cfg, eval_settings)``.
        config_text: the resolved YAML, written beside the results.

    Returns:
        The results (as in ``results.json``).
    """
    aset = load_adapter_set(cfg)
    if cfg.evaluate and evaluate is None:
        evaluate = make_evaluator(cfg, eval_settings)
    model, tokenizer = load_base(cfg, aset)
    base = BaseWeights(model, list(aset.adapters[0].A))
    order = [path for path, _ in model.named_modules()]
    results = _results_header(cfg, aset)
    with base.restored_on_error(), atomic_directory(Path(cfg.output_dir)) as tmp:
        if cfg.single_task:
            results["rows"].append(_single_task_row(model, tokenizer, aset, cfg.evaluate, evaluate, base))
        for method in cfg.methods:
            row = _merge_row(model, tokenizer, aset, method, cfg, evaluate, tmp / method, order)
            base.restore()
            results["rows"].append(row)
        results["columns"] = table_columns(results["rows"])
        for row in results["rows"]:
            row["average"] = row_average(row["scores"], [t for t, _ in results["columns"]])
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (tmp / "results.md").write_text(results_table(results) + "\n")
        if config_text is not None:
            (tmp / "merge_config.yaml").write_text(config_text)
    return results


def _results_header(cfg: MergeConfig, aset: AdapterSet) -> dict[str, Any]:
    adapters = [
        {"task": n, "path": str(p), "rank": a.rank, "scale": a.config.scale,
         "base_fingerprint": a.base_fingerprint}
        for n, p, a in zip(aset.names, cfg.adapters, aset.adapters)
    ]
    return {"adaptation": aset.adaptation, "protocol": cfg.protocol, "evaluate": list(cfg.evaluate),
            "weights": aset.weights, "adapters": adapters, "config": asdict(cfg), "rows": []}


def _merge_row(
    model: nn.Module, tokenizer: Any, aset: AdapterSet, method: str, cfg: MergeConfig,
    evaluate: Evaluate | None, out: Path, order: Sequence[str] | None = None,
) -> dict[str, Any]:
    merged = merge_result(aset, method, cfg, order)
    stats = apply_merge(model, merged_deltas(aset, method, cfg, merged, order))
    out.mkdir(parents=True)
    (out / "delta_stats.json").write_text(json.dumps(stats, indent=2))
    if merged is not None and cfg.save_merged:
        save_adapter(merged, out / "merged_adapter")
        sources = [{"task": n, "path": str(p), "weight": w} for n, p, w in zip(aset.names, cfg.adapters, aset.weights)]
        write_card(facts_from_merge(out / "merged_adapter", merged, method, sources,
                                    Path(cfg.output_dir) / out.name / "merged_adapter"))  # its README.md
    scores = evaluate(model, tokenizer, list(cfg.evaluate)) if cfg.evaluate else {}
    return {"method": method, "merging": ROW_NAMES[method], "adaptation": aset.label,
            "combination_type": PEFT_TYPES.get(method), "protocol": cfg.protocol, "weights": aset.weights,
            "density": cfg.density_of(method) if method in PRUNING else None,
            "dare_rescale": cfg.rescale if method in ("dare", "dare_ties") else None,
            "space": "factors" if merged is not None else "delta", "scores": scores}


def _single_task_row(
    model: nn.Module, tokenizer: Any, aset: AdapterSet, benchmarks: list[str], evaluate: Evaluate,
    base: BaseWeights,
) -> dict[str, Any]:
    """Each adapter alone (weight 1) on its own benchmark: the reference row."""
    scores: dict[str, dict[str, float]] = {}
    for adapter, benchmark in zip(aset.adapters, benchmarks):
        apply_merge(model, ((p, adapter.delta(p)) for p in adapter.A))
        scores |= evaluate(model, tokenizer, [benchmark])
        base.restore()
    return {"method": "single", "merging": "Single-Task", "adaptation": aset.label, "weights": None,
            "density": None, "space": None, "scores": scores}
