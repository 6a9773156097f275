"""The ``README.md`` card of every adapter lori writes, in the form of the released LoRI adapters' cards.

    ---                                 front matter: base_model, library_name (peft; transformers for a
    base_model: ...                     fully fine-tuned model dir), pipeline_tag, license, tags
    ---
    # Model Card for <dir name>         the sections of the Hugging Face template, in the released cards'
    ## Model Details ... ## Uses ...    order (tomg-group-umd/LoRI-D_code_llama3_rank_64, LoRI-S_safety_...):
    ## How to Get Started               loading with PEFT, with lori, with lm-evaluation-harness
    ## Training Details                 method, r, alpha, sparsity, granularity, A seed, steps, data, lr,
    ### Mask                            protocol; the mask file
    ## Evaluation / ### Results         what ``lori eval --adapter DIR`` measured (updated in place,
    ...                                 ``lori.training.card_results``)

Facts come from what trained the adapter (the LightningModule's hyperparameters, the DataModule's,
the adapter's ``lori_meta.json``) or from the merge that made it; rendering is plain text. A card is
written after the adapter directory, atomically (``write_text_atomic``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lori.core.atomic_files import write_text_atomic
from lori.core.io import MASKS_FILE, META_FILE
from lori.training.base_model import DEFAULT_MODEL_NAME
from lori.training.baselines.registry import Method, find_method
from lori.training.card_results import CARD_FILE, RESULTS_END, results_lines, results_marker
from lori.training.fit_settings import CALIBRATION_MASKS

PAPER = "https://arxiv.org/abs/2504.07448"
OFFICIAL_CODE = "https://github.com/juzhengz/LoRI"
# what the front matter names a base that lori knows by another name, and known bases' licenses
HUB_IDS = {DEFAULT_MODEL_NAME: "HuggingFaceTB/SmolLM2-135M-Instruct"}
LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0", "meta-llama/Meta-Llama-3-8B": "llama3",
            "mistralai/Mistral-7B-v0.1": "apache-2.0", "mistralai/Mistral-7B-v0.3": "apache-2.0"}
NOT_EVALUATED = "Not evaluated yet: `lori eval --adapter {dir}` writes its results here."
CITATION = """```bibtex
@article{zhang2025lori,
title={LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank Adaptation},
author={Zhang, Juzheng and You, Jiacheng and Panda, Ashwinee and Goldstein, Tom},
journal={arXiv preprint arXiv:2504.07448},
year={2025}
}
```"""


@dataclass
class CardFacts:
    """What a card says about one adapter directory.

    Args:
        directory: the adapter directory (the card's name is its last part).
        base_model: the base as lori loads it (a lori name, a local path or a hub id).
        method: ``lori``, a baseline (``lora``, ``dora``, ...), ``full`` or ``merge:<method>``.
        stage: ``lori_d``, ``lori_s``, ``task`` (continual), a ``lori fit`` label or ``merged``.
        library: ``peft`` (an adapter dir) or ``transformers`` (a full model dir).
        lori: the LoRIConfig as a dict (r, alpha, dropout, target_modules, sparsity, granularity,
            seed), or for a PEFT baseline its rank and alpha.
        steps: optimizer steps of the stage.
        lr: learning rate of the stage.
        protocol: ``lori`` or ``official``.
        data: the DataModule's settings (task, train_file, held_out, split_seed, template, ...).
        mask_file: the mask this adapter trained under or was calibrated into (a path).
        trainable: trainable parameter count of the stage.
        losses: held-out loss before / after the stage, when measured.
        merge: for a merged adapter: method, weights, density and the merged adapters.
        results: ``lori eval`` results by task (``card_results`` fills them).
        location: the path the card's loading snippets name, when ``directory`` is a temporary
            directory that will be renamed there (None = ``directory``).
    """

    directory: Path
    base_model: str
    method: str
    stage: str
    library: str = "peft"
    lori: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    lr: float | None = None
    protocol: str = "lori"
    data: dict[str, Any] = field(default_factory=dict)
    mask_file: str | None = None
    trainable: int | None = None
    losses: dict[str, float] = field(default_factory=dict)
    merge: dict[str, Any] | None = None
    results: dict[str, Any] = field(default_factory=dict)
    location: str | None = None

    @property
    def path(self) -> str:
        return self.location or str(self.directory)

    @property
    def name(self) -> str:
        return Path(self.path).resolve().name

    @property
    def hub_base(self) -> str:
        return HUB_IDS.get(self.base_model, self.base_model)

    @property
    def entry(self) -> Method | None:
        """The method's registry entry (None for a merge)."""
        return find_method(self.method)

    @property
    def staged(self) -> bool:
        """A run of the LoRI method: its stages (LoRI-D, LoRI-S, a continual phase) name the adapter."""
        return self.entry is not None and self.entry.runs_pipeline

    @property
    def label(self) -> str:
        """``LoRI-S``, ``LoRA``, ``merged (concat)``: what the adapter is, in a few words."""
        if self.merge is not None:
            return f"merged adapter ({self.merge['method']})"
        if self.staged:  # a pipeline stage, a continual phase, or a `lori fit` of method lori
            continual = f"LoRI-{'S' if self.mask_file else 'D'} continual (task phase)"  # masked_task or not
            return {"lori_d": "LoRI-D", "lori_s": "LoRI-S", "task": continual}.get(self.stage, self.entry.label)
        return self.method if self.entry is None else self.entry.label

    @property
    def task(self) -> str | None:
        return self.data.get("task")


def base_license(base_model: str) -> str:
    """The base's license: a known hub id's, a local base's front matter ``license:``, else ``unknown``."""
    known = LICENSES.get(HUB_IDS.get(base_model, base_model))
    if known:
        return known
    readme = Path(base_model) / CARD_FILE
    if readme.is_file():
        front = readme.read_text(errors="replace").split("---")
        for line in front[1].splitlines() if len(front) > 2 else []:
            if line.startswith("license:"):
                return line.split(":", 1)[1].strip() or "unknown"
    return "unknown"


def _front_matter(f: CardFacts) -> str:
    if f.merge is not None:
        tags = ["lori", f"merged-{f.merge['method']}", *(str(a["task"]) for a in f.merge["adapters"])]
    else:
        continual = f"lori-{'s' if f.mask_file else 'd'}-continual"
        stage = {"lori_d": "lori-d", "lori_s": "lori-s", "task": continual}.get(f.stage, f.method)
        tags = ["lori", stage if f.staged else f.method, *([str(f.task)] if f.task else [])]
    lines = ["---", f"base_model: {f.hub_base}", f"library_name: {f.library}", "pipeline_tag: text-generation",
             f"license: {base_license(f.base_model)}", "tags:", *(f"- {t}" for t in dict.fromkeys(tags)), "---"]
    return "\n".join(lines)


def _intro(f: CardFacts) -> list[str]:
    return [
        f"# Model Card for {f.name}",
        f"This adapter was trained with lori, an implementation of [LoRI: Reducing Cross-Task Interference in "
        f"Multi-Task Low-Rank Adaptation]({PAPER}).",
        "**LoRI** (LoRA with Reduced Interference) freezes the projection matrices $A$ as random projections and "
        "sparsifies the matrices $B$ with task-specific masks: W = W0 + (alpha / r) (B ⊙ M) A.",
    ]


def _details(f: CardFacts) -> list[str]:
    r = f.lori.get("r")
    task = f" on {f.task}" if f.task else ""
    kind = "a full fine-tuned model" if f.library == "transformers" else f"a {f.label} adapter"
    kind_line = ("Causal language model" if f.library == "transformers"
                 else "Low-Rank Adaptation (LoRA) adapter for Causal Language Models")
    renamed = f.hub_base != f.base_model
    return [
        "## Model Details", "### Model Description",
        f"{f.name} is {kind} for the `{f.hub_base}` base model, trained{task} with lori"
        + (f" at rank {r}." if r else "."),
        "- **Developed by:** the user who ran lori (see Training Details for the run)",
        f"- **Model type:** {kind_line}, {f.label}",
        "- **Language(s) (NLP):** English",
        f"- **License:** {base_license(f.base_model)} (the base model's)",
        f"- **Finetuned from model:** `{f.hub_base}`" + (f" (lori loads `{f.base_model}`)" if renamed else ""),
        "### Model Sources",
        f"- **Method repository:** [{OFFICIAL_CODE}]({OFFICIAL_CODE}) (the authors' code)",
        f"- **Paper:** [{PAPER}]({PAPER})",
    ]


def _uses(f: CardFacts) -> list[str]:
    return [
        "## Uses", "### Direct Use",
        f"Load it on top of `{f.hub_base}` (see How to Get Started) for {f.task or 'the task it was trained on'}.",
        "### Downstream Use",
        "LoRI adapters merge with little cross-task interference (`lori merge`) and a safety adapter can be trained "
        "further on a task inside the task's mask (`lori continual`).",
        "### Out-of-Scope Use",
        "Not for generating harmful, biased or unethical content, nor as a standalone model: it needs its base model.",
        "## Bias, Risks, and Limitations",
        f"It inherits the biases and risks of `{f.hub_base}` and of its training data. Performance depends on the "
        "base model, the data and the sparsity; merging does not isolate tasks perfectly.",
        "### Recommendations",
        "Read the base model's card, and evaluate on your own task before deploying.",
    ]


def _get_started(f: CardFacts) -> list[str]:
    d = f.path
    if f.library == "transformers":
        python = [
            "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{d}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{d}")', "```",
        ]
        lm_eval = f"lm_eval --model hf --model_args pretrained={d},dtype=float32 --tasks gsm8k"
        return ["## How to Get Started with the Model", "With transformers:", *python,
                "With lori:", "```bash", f"lori eval --config configs/eval/default.yaml --model {d}", "```",
                "With lm-evaluation-harness:", "```bash", lm_eval, "```"]
    python = [
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "from peft import PeftModel",
        f'base_model = AutoModelForCausalLM.from_pretrained("{f.hub_base}")',
        f'model = PeftModel.from_pretrained(base_model, "{d}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{f.hub_base}")', "```",
    ]
    lori_api = [
        "```python", "from lori.core import apply_adapter, load_adapter",
        "from lori.training.module import build_model",
        f'model, tokenizer = build_model("{f.base_model}", None, "float32", None)',
        f'apply_adapter(model, load_adapter("{d}"))', "```",
    ]
    mask_note = (" B is saved dense, zero outside the mask, so a plain LoRA loader gives lori's outputs."
                 if f.mask_file else "")
    return [
        "## How to Get Started with the Model", f"With PEFT:{mask_note}", *python,
        "With lori (evaluate, or load in Python):", "```bash",
        f"lori eval --config configs/eval/default.yaml --model {f.base_model} --adapter {d}", "```", *lori_api,
        "With lm-evaluation-harness (any of its tasks):", "```bash",
        f"lm_eval --model hf --model_args pretrained={f.hub_base},peft={d},dtype=float32 --tasks gsm8k", "```",
    ]


def _hyperparameters(f: CardFacts) -> list[str]:
    lori = f.lori
    baseline = f.entry is not None and f.entry.family != "lori"
    rows = [("Method", f"{f.label} (lori fit baseline)" if baseline else f.label)]
    rows += [(name, lori[key]) for name, key in (
        ("Adapter rank (r)", "r"), ("LoRA alpha", "alpha"), ("LoRA dropout", "dropout"),
        ("Target modules", "target_modules")) if key in lori]
    if f.entry is not None and f.entry.sparsifies and f.stage in ("lori_d", "lori_s", "task"):  # a stage with a mask
        sparsity = lori.get("sparsity")
        rows.append(("Sparsity", f"{sparsity} (mask calibrated from this dense B)" if f.stage == "lori_d"
                     else sparsity))
        rows.append(("Mask granularity", lori.get("granularity")))
    if f.entry is not None and f.entry.family == "lori" and f.merge is None:
        rows.append(("A seed", lori.get("seed")))
    rows += [("Steps", f.steps), ("Learning rate", f.lr), ("Trainable parameters", f.trainable),
             ("Protocol", f.protocol)]
    rows += [(f"Held-out loss {k}", round(v, 4)) for k, v in f.losses.items()]
    return [f"- {name}: {_value(v)}" for name, v in rows if v is not None]


def _value(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _training(f: CardFacts) -> list[str]:
    if f.merge is not None:
        merged = [f"- `{a['path']}` ({a['task']}, weight {a['weight']})" for a in f.merge["adapters"]]
        procedure = [f"Merged by `lori merge` ({f.merge['method']}" +
                     (f", density {f.merge['density']}" if f.merge.get("density") is not None else "") +
                     ") from:", *merged]
        data = ["The merged adapters' training data (see their cards)."]
    else:
        data = [f"- {k}: {_value(v)}" for k, v in f.data.items() if v is not None] or [
            "Not recorded by the run that wrote this adapter."]
        if f.data and not f.data.get("train_file"):
            data.append(f"- source: the {f.task} items lori ships (`lori.data.sources`), less the held-out part")
        procedure = [_procedure(f)]
    mask = (f"`{f.mask_file}`" + (" (in this directory: the mask B was trained under; B is zero outside it)"
                                  if Path(f.mask_file).name == MASKS_FILE else
                                  " (calibrated from this adapter's B)")) if f.mask_file else "None: B is dense."
    return ["## Training Details", "### Training Data", *data, "### Training Procedure", *procedure,
            "#### Training Hyperparameters", *_hyperparameters(f), "### Mask", mask]


def _procedure(f: CardFacts) -> str:
    if not f.staged:
        return f"One `lori fit` run of {f.label} through lori's LightningModule, data and logging."
    return {
        "lori_d": "LoRI-D: A frozen (Kaiming-uniform from the A seed), B trained dense from zero; the mask is then "
                  "calibrated from |B| with one threshold at the given sparsity.",
        "lori_s": "LoRI-S: the LoRI-D run's A, B reset to zero and trained only inside the calibrated mask.",
        "task": "Continual learning: the safety adapter's B trained further on the task, inside the task's mask "
                "(every other entry keeps its safety value)" if f.mask_file else
                "Continual learning: the safety adapter's B trained further on the task, all of B (no mask).",
    }.get(f.stage, f"Stage {f.stage} of a lori run.")


def _results_block(f: CardFacts) -> list[str]:
    body = results_lines(f.results) if f.results else [NOT_EVALUATED.format(dir=f.path)]
    return [results_marker(f.results), *body, RESULTS_END]


def _tail(f: CardFacts) -> list[str]:
    import peft
    import torch
    import transformers

    return [
        "## Evaluation", "### Results", *_results_block(f),
        "## Technical Specifications", "### Model Architecture and Objective",
        "Random frozen A and task-specific sparse masks on B: adapters of different tasks occupy nearly "
        "orthogonal subspaces, so they merge and continue training with little interference.",
        "### Compute Infrastructure", "#### Hardware", "Whatever ran the lori command (CPU or GPU).",
        "#### Software", "lori (PyTorch Lightning), Hugging Face Transformers and PEFT.",
        "## Acknowledgements",
        f"The method and the released adapters are the LoRI authors' ([{OFFICIAL_CODE}]({OFFICIAL_CODE})).",
        "## Citation", "If you use LoRI in your work, please cite:", CITATION,
        "## Model Card Contact", "Whoever trained this adapter with lori.",
        "## Framework versions",
        f"- PEFT {peft.__version__}", f"- Transformers {transformers.__version__}", f"- PyTorch {torch.__version__}",
    ]


def render_card(f: CardFacts) -> str:
    """The card's Markdown: front matter, then the released cards' sections in their order."""
    lines = [line for part in (_intro(f), _details(f), _uses(f), _get_started(f), _training(f), _tail(f))
             for line in part]
    body = "\n".join(f"\n{line}" if line.startswith("#") and i else line for i, line in enumerate(lines))
    return f"{_front_matter(f)}\n{body}\n"


def write_card(facts: CardFacts) -> Path:
    """Write ``<directory>/README.md`` atomically; returns its path."""
    path = facts.directory / CARD_FILE
    write_text_atomic(path, render_card(facts))
    return path


# ---- facts from what wrote the adapter ---------------------------------------------------------
def _stage_facts(directory: Path) -> dict[str, Any]:
    meta_file = directory / META_FILE
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def facts_from_module(directory: str | Path, module: Any, stage: str, datamodule: Any = None) -> CardFacts:
    """The facts of an adapter a LightningModule just saved to ``directory`` (after a stage or a fit).

    Args:
        directory: the saved adapter directory (its ``lori_meta.json`` gives the steps and losses).
        module: the ``LoRIModule`` that trained it (model, method, lr of this stage, protocol, LoRI config).
        stage: ``lori_d``, ``lori_s``, ``task`` or a ``lori fit`` label.
        datamodule: the stage's DataModule (its settings are the card's training data); None = not recorded.
    """
    directory = Path(directory)
    hp = module.hparams
    saved = _stage_facts(directory)
    meta = saved.get("meta", {})
    summary = meta.get("summary", {})
    method = hp.get("method", "lori")
    entry = find_method(method)
    lori = dict(saved.get("lori") or {})
    if entry is not None and entry.family != "lori":  # a baseline: the rank, alpha and dropout it reads
        lori = {k: v for k, v in module.lori_config.to_dict().items()  # (IA3 has no rank; full FT no adapter)
                if k in ("r", "alpha", "dropout") and k in entry.reads}
    data = dict(getattr(datamodule, "hparams", {}) or {})
    mask = directory / MASKS_FILE
    calibration = directory.parent / CALIBRATION_MASKS
    staged = entry is not None and entry.runs_pipeline  # stage lori_d of `lori pipeline`, not method lori_d's fit
    mask_file = (str(mask) if mask.is_file()
                 else str(calibration) if staged and stage == "lori_d" and calibration.is_file() else None)
    return CardFacts(
        directory=directory, base_model=str(hp.model), method=method, stage=stage,
        library="transformers" if entry is not None and entry.family == "full" else "peft", lori=lori,
        steps=meta.get("global_step"), lr=hp.get("lr"), protocol=hp.get("protocol", "lori"),
        data={k: data.get(k) for k in ("task", "train_file", "held_out", "split_seed", "template", "max_length",
                                       "batch_size", "global_batch_size") if k in data},
        mask_file=mask_file, trainable=meta.get("trainable"),
        losses={k.removeprefix("val_loss_"): v for k, v in summary.items() if k.startswith("val_loss_")},
    )


def write_module_card(directory: str | Path, module: Any, stage: str, datamodule: Any = None) -> Path:
    """``write_card(facts_from_module(...))``: the card of an adapter a stage or a fit just saved.

    ``datamodule`` None = the one of the Trainer the module last ran under (the stage's own).
    """
    if datamodule is None:
        datamodule = getattr(getattr(module, "_trainer", None), "datamodule", None)
    return write_card(facts_from_module(directory, module, stage, datamodule))


def facts_from_merge(directory: str | Path, merged: Any, method: str, sources: list[dict[str, Any]],
                     location: str | Path | None = None) -> CardFacts:
    """The facts of a merged adapter (``lori merge``, ``save_merged``).

    Args:
        directory: where the merged adapter was saved.
        merged: the merged ``Adapter`` (a pruning merge's density is in its meta).
        method: the merge method (lori's name).
        sources: ``{"task", "path", "weight"}`` of every merged adapter, in order.
        location: where ``directory`` ends up once the merge's output directory is renamed in place.
    """
    config = merged.config
    return CardFacts(
        directory=Path(directory), base_model=str(merged.base_model), method=f"merge:{method}", stage="merged",
        lori={"r": merged.rank, "alpha": config.alpha, "target_modules": config.target_modules},
        merge={"method": method, "density": merged.meta.get("density"), "adapters": sources},
        location=None if location is None else str(location),
    )
