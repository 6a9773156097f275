"""Evaluate a model on the paper's capabilities: math, code, safety and NLU.

    gsm8k         exact match of the final number (held-out part of the training split)
    humaneval     pass@1/5/10 from n samples per problem, run in the sandbox
    mbpp          pass@k on the held-out part of MBPP, run in the sandbox
    harmbench | strongreject | donotanswer | hexphi
                  refusal rate on harmful prompts (keyword judge over the generated text)
    over_refusal  refusal rate on benign TriviaQA questions (lower is better)
    nlu | boolq | piqa | siqa | arc_challenge | arc_easy | openbookqa | hellaswag | winogrande
                  accuracy by answer-option log-likelihood and/or by generation (paper style)

Which tasks exist, their evaluation sets and how each is scored are their entries in
``lori.data.tasks`` (``Task.evaluate``, ``Task.score``); ``SCORERS`` / ``OFFICIAL_SCORERS`` map a score to
the method that computes it, so a task is scored by its entry or refused, never by a default.

``evaluate_model`` runs the tasks on a model in memory (used by ``lori eval``, ``lori merge`` and
``lori continual``).

Protocols (``EvalSettings.protocol``):

* ``lori`` (default): lori's prompts, tokenisation, answer rules and keyword judge; every item of
  each evaluation set counts (``items: all``: no dropped last batch, no de-duplicated prompts).
* ``official``: the official LoRI code's evaluation (``lori.eval.official`` has the facts and
  their file:line): its prompts and tokenisation (``lori.data.tokenize.tokenize_prompts``), greedy
  decoding with 512 new tokens for GSM8K, NLU and the HEx-PHI-style sets, HumanEval sampled as
  bigcode (temperature 0.2, top-p 0.95, no top-k, 20 samples, seed 0, 512 tokens of prompt +
  generation, bigcode's program assembly, 3 s per program), its GSM8K and NLU answer rules, its
  HEx-PHI keyword judge (reported as ``safety_score``, the fraction not jailbroken, beside lori's
  ``refusal_rate``), its item selection (``items: official``: duplicate prompts merged, the
  incomplete last batch of 64 dropped) and a float32 model with the adapter merged. The settings
  it fixes take the official value when left at lori's default and are refused otherwise.
  MBPP and over_refusal (tasks the official code lacks) keep lori's paths.

Judged text (``judge_text``): the official code reads the decoded PROMPT + generation, so numbers,
label words and keywords of the prompt count (17 of the 330 HEx-PHI prompts contain a keyword and
are "safe" whatever the model writes; a GSM8K generation without a number scores the question's
last number). Under ``protocol: official`` that reading is the default (``prompt_and_generated``) and
lori's reading of the generated text only is reported beside it, named: ``accuracy`` and
``accuracy_generated_only`` (GSM8K), ``accuracy_generate`` and ``accuracy_generate_generated_only``
(NLU), ``safety_score`` and ``safety_score_generated_only`` (safety sets); with ``judge_text:
generated`` the two swap (``..._prompt_and_generated`` beside). ``protocol: lori`` reads the
generated text only.

Held-out items (``held_out``): under ``protocol: official`` GSM8K is scored on its whole test split
in order (the official item set, 1,280 of 1,319 after ``items: official``) unless ``held_out`` is
given; under ``lori`` (and for MBPP, which the official code lacks) a held-out split of 200.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from lori.data.official_prompts import HEXPHI_SOURCES
from lori.data.prompts import NLU_ANSWER_PREFIX, check_template, format_example, nlu_answer
from lori.data.sources import DataError
from lori.data.tasks import EVAL_TASKS, TASKS, eval_tasks, expand, get_task, prompt_task  # noqa: F401 (EVAL_TASKS)
from lori.eval.answers import extract_nlu_answer
from lori.eval.errors import EvalError
from lori.eval.generate import generate
from lori.eval.metrics import ExactMatch, MultipleChoiceAccuracy, PassAtK, RefusalRate
from lori.eval.official import (
    ItemSelection,
    apply_official_eval,
    official_items,
    official_weight_problems,
)
from lori.eval.official_tasks import OfficialTasks
from lori.eval.passk import HUMANEVAL_STOP
from lori.eval.sandbox import run_many
from lori.eval.scoring import score_options

NLU_MODES = ("loglik", "generate", "both")
ITEMS = ("all", "official")
LORI_HELD_OUT = 200  # held-out items of gsm8k / mbpp when ``held_out`` is not given (lori's default)
JUDGE_TEXTS = ("generated", "prompt_and_generated")


@dataclass
class EvalSettings:
    """What to evaluate and how to generate.

    Under ``protocol: official`` the fields of ``lori.eval.official.OFFICIAL_EVAL_SETTINGS``
    (max_new_tokens, do_sample, temperature, top_p, n_samples, seed, nlu_mode, sandbox_timeout)
    are fixed: left at lori's default they take the official value (listed in
    ``protocol_changes``), set to anything else they are refused with one EvalError.

    Args:
        tasks: task names (see the module docstring); ``nlu`` = all eight NLU sets.
        max_examples: evaluate the first N items of each set (None = all of them); applied after
            the ``items`` rule.
        held_out: for tasks evaluated on a held-out split of their training pool (gsm8k, mbpp):
            the held-out size, as in the training config's ``data.held_out``. None = 200, except
            GSM8K under ``protocol: official``: its whole test split, in order (the official set).
        split_seed: the seed of that split (``data.split_seed``).
        template: prompt template: ``alpaca``, ``chat`` or ``plain`` (as in training).
        protocol: ``lori`` or ``official`` (the official LoRI code's evaluation; see the module
            docstring); ``official`` refuses ``template: chat``.
        batch_size: prompts per generation / scoring batch (speed only; the official batch of 64
            enters through ``items``).
        max_new_tokens: generation budget (code and math need a few hundred). Official: 512.
        do_sample: sample instead of greedy decoding (math, safety, NLU generation). Official: False.
        temperature: sampling temperature. Official: 0.2 (HumanEval).
        top_p: nucleus sampling threshold. Official: 0.95 (HumanEval).
        n_samples: generations per code problem; pass@k is reported for every k in (1, 5, 10)
            with k <= n_samples. With more than one, code is always sampled (temperature, top_p).
            Official: 20.
        seed: random seed of sampling. Official: 0.
        nlu_mode: ``loglik`` (answer-option log-likelihood), ``generate`` (paper style) or ``both``.
            Official: ``generate``.
        hexphi_path: folder of HEx-PHI ``category_*.csv`` files (task ``hexphi``).
        system_prompt: a system prompt for the safety tasks (HEx-PHI-style evaluation): a system
            message with ``template: chat``, else a paragraph before the instruction. Refused under
            ``official`` for the HEx-PHI-layout sets (their prompt has its own system text).
        sandbox_timeout: seconds per generated program. Official: 3.
        sandbox_workers: programs run in parallel.
        progress: progress bars.
        items: ``all`` (every item counts) or ``official`` (one item per distinct prompt with its
            last target, then only full batches of 64, as the official evaluation iterates:
            GSM8K 1,319 -> 1,280, HEx-PHI 330 -> 320; for gsm8k, the NLU sets and the safety
            sets). None = ``official`` under ``protocol: official``, ``all`` under ``lori``.
        judge_text: what the answer rules and judges read: ``generated`` (the generated text only,
            lori's fix) or ``prompt_and_generated`` (the decoded prompt + generation, exactly as the
            official code; ``protocol: official`` only). None = ``prompt_and_generated`` under
            ``official`` (the other reading reported beside it, see the module docstring),
            ``generated`` under ``lori``.
    """

    tasks: list[str] = field(default_factory=lambda: ["gsm8k"])
    max_examples: int | None = None
    held_out: int | float | None = None
    split_seed: int = 0
    template: str = "alpaca"
    protocol: Literal["lori", "official"] = "lori"
    batch_size: int = 8
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.8
    top_p: float = 0.95
    n_samples: int = 1
    seed: int = 0
    nlu_mode: str = "loglik"
    hexphi_path: str | None = None
    system_prompt: str | None = None
    sandbox_timeout: float = 5.0
    sandbox_workers: int = 2
    progress: bool = True
    items: Literal["all", "official"] | None = None
    judge_text: Literal["generated", "prompt_and_generated"] | None = None

    def __post_init__(self) -> None:
        self.protocol_changes: list[str] = apply_official_eval(self) if self.protocol == "official" else []
        self.items = self.items or "all"
        self.judge_text = self.judge_text or "generated"

    def held_out_of(self, task: str, pool: int) -> int | float:
        """The held-out size of ``task`` (gsm8k, mbpp) in a pool of ``pool`` items (see ``held_out``)."""
        if self.held_out is not None:
            return self.held_out
        return pool if self.protocol == "official" and get_task(task).whole_split_official else LORI_HELD_OUT

    def check(self) -> None:
        """Raise EvalError for settings that cannot work, before any model is loaded."""
        known = eval_tasks()  # (read now: the registry decides, a task without a score is refused here)
        unknown = [t for t in self.tasks if t not in known]
        if unknown or not self.tasks:
            raise EvalError(f"unknown evaluation task(s) {unknown or self.tasks}; choose from {list(known)}")
        if self.n_samples < 1:
            raise EvalError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.nlu_mode not in NLU_MODES:
            raise EvalError(f"nlu_mode must be one of {list(NLU_MODES)}, got {self.nlu_mode!r}")
        if self.max_examples is not None and self.max_examples < 1:
            raise EvalError(f"max_examples must be >= 1 or None, got {self.max_examples}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise EvalError("batch_size and max_new_tokens must be >= 1")
        try:
            check_template(self.protocol, self.template)
        except DataError as err:
            raise EvalError(str(err)) from None
        if self.items not in ITEMS:
            raise EvalError(f"items must be one of {list(ITEMS)}, got {self.items!r}")
        if self.judge_text not in JUDGE_TEXTS:
            raise EvalError(f"judge_text must be one of {list(JUDGE_TEXTS)}, got {self.judge_text!r}")
        if self.judge_text == "prompt_and_generated" and self.protocol != "official":
            raise EvalError("judge_text 'prompt_and_generated' is the official code's reading of the decoded "
                            "prompt + generation: it needs protocol: official")
        layout = [t for t in expand(self.tasks) if t in HEXPHI_SOURCES]
        if self.protocol == "official" and self.system_prompt and layout:
            raise EvalError(f"system_prompt cannot be used with protocol official on {layout}: their official "
                            "HEx-PHI prompt already starts with its system text (get_datasets.py:133-144); "
                            "remove system_prompt or use protocol: lori")
        for task in expand(self.tasks):
            for setting, what in TASKS[task].needs:
                if not getattr(self, setting, None):
                    raise EvalError(f"task {task!r} needs {setting}: {what}")


def _item_prompts(task: str, records: list[dict[str, Any]], settings: EvalSettings) -> list[str]:
    """The prompt strings that decide which records are duplicates (chat: the plain layout)."""
    template = "plain" if settings.template == "chat" else settings.template
    return [format_example(r, prompt_task(task), template, settings.protocol, stage="eval")[0]
            for r in records]


def eval_records(task: str, settings: EvalSettings,
                 report: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The evaluation set of ``task``: never items the matching training split trains on.

    Args:
        task: an evaluation task (not ``nlu``: one of its eight sets).
        settings: ``items`` chooses all items or the official selection (see ``EvalSettings``),
            ``max_examples`` then keeps the first N.
        report: if given, ``report[task]`` receives how many items are evaluated and why.
    """
    entry = get_task(task)
    if entry.evaluate is None:  # a group (``nlu``) or a training-only task
        raise EvalError(f"task {task!r} has no evaluation set of its own; choose from "
                        f"{[t for t in eval_tasks() if not TASKS[t].members]}")
    records = entry.evaluate(settings)
    if not records:
        raise DataError(f"task {task!r}: the evaluation set is empty")
    selection = ItemSelection("all", len(records), len(records))
    if settings.items == "official" and entry.official_items:
        indices, selection = official_items(_item_prompts(task, records, settings))
        if not indices:
            raise DataError(f"task {task!r}: items 'official' keeps no item: {selection.total} items "
                            f"({selection.total - selection.duplicates_merged} distinct prompts) fill no "
                            f"batch of {selection.batch_size}; use items: all")
        records = [records[i] for i in indices]
    if settings.max_examples:
        records = records[: settings.max_examples]
        selection = replace(selection, evaluated=len(records), max_examples=settings.max_examples)
    if report is not None:
        report[task] = selection.as_dict()
    return records


def load_eval_sets(settings: EvalSettings,
                   report: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Check the settings and load every evaluation set (cheap; before the model loads).

    Args:
        settings: the evaluation settings.
        report: if given, filled with the item selection of every task (see :func:`eval_records`).
    """
    settings.check()
    return {task: eval_records(task, settings, report) for task in expand(settings.tasks)}


# --- code -------------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.S)


def extract_code(completion: str) -> str:
    """The code of a completion: the first fenced block if there is one, else the text."""
    match = _FENCE.search(completion)
    return match.group(1) if match else completion


def _defines(code: str, name: str | None) -> bool:
    return bool(name) and re.search(rf"^\s*def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def code_program(record: dict[str, Any], completion: str) -> str:
    """A runnable test program for one completion of a code problem.

    An instruction-tuned model writes the whole function (the paper's prompt asks it to complete
    the code): the prompt's stub is kept first (its imports and helpers) and the completion's
    definition replaces it. A completion that only continues the stub is appended to it, cut at
    the first new top-level statement (Codex-style).
    """
    code = extract_code(completion)
    entry, test = record["entry_point"], record["test"]
    if record.get("source") == "humaneval":
        if _defines(code, entry):
            return f"{record['prompt']}\n    pass\n\n{code}\n\n{test}\ncheck({entry})\n"
        body = code
        for stop in HUMANEVAL_STOP:
            body = body.split(stop, 1)[0]
        return f"{record['prompt']}{body}\n\n{test}\ncheck({entry})\n"
    return f"{code}\n\n{test}\n"  # MBPP: the tests are asserts on the function


def _pass_ks(n: int) -> list[int]:
    return [k for k in (1, 5, 10) if k <= n]


# --- the evaluators ---------------------------------------------------------------------------


class Evaluator:
    """Runs the tasks on one model; results are plain floats by task and metric."""

    def __init__(self, model: Any, tokenizer: Any, settings: EvalSettings) -> None:
        self.model, self.tokenizer, self.s = model, tokenizer, settings
        self.samples: dict[str, list[dict[str, Any]]] = {}
        self.official = OfficialTasks(model, tokenizer, settings)

    def prompts(self, task: str, records: list[dict[str, Any]]) -> list[str]:
        system = self.s.system_prompt if prompt_task(task) == "safety" else None
        if system and self.s.template == "chat":
            return [self.tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": r["prompt"]}],
                tokenize=False, add_generation_prompt=True) for r in records]
        if system:
            records = [{**r, "prompt": f"{system}\n\n{r['prompt']}"} for r in records]
        return [format_example(r, prompt_task(task), self.s.template, self.s.protocol,
                               stage="eval", tokenizer=self.tokenizer)[0] for r in records]

    def generate(self, prompts: list[str], n: int = 1, max_new_tokens: int | None = None) -> list[list[str]]:
        s = self.s
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens or s.max_new_tokens,
                        batch_size=s.batch_size, do_sample=s.do_sample or n > 1, temperature=s.temperature,
                        top_p=s.top_p, num_return_sequences=n, progress=s.progress, seed=s.seed)

    def run(self, task: str, records: list[dict[str, Any]]) -> dict[str, float]:
        """Score ``records`` of ``task`` by its entry's ``score`` (the official way for an ``official_run``
        task under ``protocol: official``); a task without a score is an EvalError, never a default."""
        entry = get_task(task)
        if entry.score is None:
            raise EvalError(f"task {task!r} has no score (a training-only task); choose from {list(eval_tasks())}")
        if self.s.protocol == "official" and entry.official_run:
            return self.run_official(task, records)
        return SCORERS[entry.score](self, task, records)

    def run_official(self, task: str, records: list[dict[str, Any]]) -> dict[str, float]:
        """A task of the official code, run its way (``lori.eval.official_tasks``)."""
        metrics, self.samples[task] = OFFICIAL_SCORERS[get_task(task).score](self.official, task, records)
        return metrics

    def exact_match(self, task: str, records: list[dict[str, Any]]) -> dict[str, float]:
        """Accuracy of the final answer (math records: ``final``) parsed from the generated text."""
        outputs = [o[0] for o in self.generate(self.prompts(task, records))]
        metric = ExactMatch()
        metric.update(outputs, [r["final"] for r in records])
        self.samples[task] = [{"id": r["id"], "output": o, "gold": r["final"]} for r, o in zip(records, outputs)]
        return {"accuracy": float(metric.compute()), "n": len(records)}

    def code(self, task: str, records: list[dict[str, Any]]) -> dict[str, float]:
        n = self.s.n_samples
        completions = self.generate(self.prompts(task, records), n=n)
        programs = [code_program(r, c) for r, comps in zip(records, completions) for c in comps]
        results = run_many(programs, workers=self.s.sandbox_workers, timeout=self.s.sandbox_timeout)
        passed = [sum(res.passed for res in results[i * n:(i + 1) * n]) for i in range(len(records))]
        metric = PassAtK(ks=_pass_ks(n))
        metric.update([n] * len(records), passed)
        self.samples[task] = [{"id": r["id"], "completions": c, "passed": p}
                              for r, c, p in zip(records, completions, passed)]
        out = {k: float(v) for k, v in metric.compute().items()}
        return out | {"n": len(records), "samples_per_problem": n}

    def refusal(self, task: str, records: list[dict[str, Any]]) -> dict[str, float]:
        prompts = self.prompts(task, records)
        outputs = [o[0] for o in self.generate(prompts, max_new_tokens=min(self.s.max_new_tokens, 128))]
        metric = RefusalRate()
        metric.update([r["prompt"] for r in records], outputs)
        verdicts = metric.judge([r["prompt"] for r in records], outputs)
        self.samples[task] = [{"id": r["id"], "output": o, "refused": bool(v)}
                              for r, o, v in zip(records, outputs, verdicts)]
        return {"refusal_rate": float(metric.compute()), "n": len(records)}

    def nlu(self, task: str, records: list[dict[str, Any]]) -> dict[str, float]:
        prompts = self.prompts(task, records)
        labels = [int(r["label"]) for r in records]
        out: dict[str, float] = {"n": len(records)}
        if self.s.nlu_mode in ("loglik", "both"):
            options = [[nlu_answer({**r, "label": i}) for i in range(len(r["choices"]))] for r in records]
            contexts = [p + NLU_ANSWER_PREFIX for p in prompts]
            picks = score_options(self.model, self.tokenizer, contexts, options, batch_size=self.s.batch_size,
                                  progress=self.s.progress)
            metric = MultipleChoiceAccuracy([task])
            metric.update(picks, labels, task)
            out["accuracy_loglik"] = float(metric.compute()["average"])
        if self.s.nlu_mode in ("generate", "both"):
            outputs = [o[0] for o in self.generate(prompts, max_new_tokens=min(self.s.max_new_tokens, 32))]
            metric = MultipleChoiceAccuracy([task])
            metric.update([extract_nlu_answer(task, o) for o in outputs], labels, task)
            out["accuracy_generate"] = float(metric.compute()["average"])
        return out


Scorer = Callable[[Any, str, list[dict[str, Any]]], Any]
# a task entry's ``score`` (lori.data.tasks.SCORES) -> the method that scores it; one table per protocol path
SCORERS: dict[str, Scorer] = {"exact_match": Evaluator.exact_match, "pass_at_k": Evaluator.code,
                              "multiple_choice": Evaluator.nlu, "refusal_rate": Evaluator.refusal}
OFFICIAL_SCORERS: dict[str, Scorer] = {
    "exact_match": OfficialTasks.exact_match, "pass_at_k": OfficialTasks.code,
    "multiple_choice": OfficialTasks.nlu, "refusal_rate": OfficialTasks.refusal}


def evaluate_model(
    model: Any, tokenizer: Any, settings: EvalSettings, logger: Callable[[str, float], None] | None = None,
    eval_sets: dict[str, list[dict[str, Any]]] | None = None, samples: dict[str, Any] | None = None,
    items: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` on every task of ``settings``.

    Args:
        model: a causal LM (any adapters merged or active; under ``protocol: official`` float32
            with every adapter merged, see :func:`merged_weights`).
        tokenizer: its tokenizer.
        settings: tasks and generation options.
        logger: called as ``logger(tag, value)`` for every metric (e.g. a tensorboard writer).
        eval_sets: evaluation sets already loaded by :func:`load_eval_sets`.
        samples: if given, filled with the per-item outputs by task.
        items: if given (and ``eval_sets`` is not), filled with the item selection by task.

    Returns:
        ``{task: {metric: value}}``; with several NLU tasks also ``nlu_average``.

    Raises:
        EvalError: under ``protocol: official``, a model that is not float32 or not merged.
    """
    if settings.protocol == "official" and (problems := official_weight_problems(model)):
        raise EvalError("protocol official evaluates float32 merged weights: " + "; ".join(problems))
    eval_sets = eval_sets if eval_sets is not None else load_eval_sets(settings, items)
    evaluator = Evaluator(model, tokenizer, settings)
    results: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for task, records in eval_sets.items():
            results[task] = evaluator.run(task, records)
    nlu = [t for t in results if t in TASKS["nlu"].members]
    if len(nlu) > 1:
        results["nlu_average"] = {  # (every accuracy: both readings of the generated answer under official)
            key: sum(results[t][key] for t in nlu) / len(nlu)
            for key in results[nlu[0]] if key.startswith("accuracy") and all(key in results[t] for t in nlu)
        }
    if logger is not None:
        for task, metrics in results.items():
            for name, value in metrics.items():
                if name not in ("n", "samples_per_problem"):
                    logger(f"eval/{task}/{name}", value)
    if samples is not None:
        samples.update(evaluator.samples)
    return results


def headline(task: str, metrics: dict[str, float]) -> tuple[str, float]:
    """The one number the paper reports for a task (accuracy, pass@1, safety score, refusal rate)."""
    for key in ("accuracy", "pass@1", "safety_score", "refusal_rate", "accuracy_generate", "accuracy_loglik"):
        if key in metrics:
            return key, metrics[key]
    raise EvalError(f"no headline metric for {task}: {sorted(metrics)}")
