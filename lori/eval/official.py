"""The official LoRI code's evaluation protocol (``EvalSettings.protocol = "official"``).

Reference: github.com/juzhengz/LoRI at 9183468. GSM8K, the NLU sets and HEx-PHI go through
``src/eval_model.py`` (``evaluate``, l.289-339); HumanEval through the bigcode harness
(``bigcode/main.py``, ``bigcode/bigcode_eval/``) as ``scripts/codealpaca_*.sh`` launch it. This
module holds what that protocol fixes, as data with its source, and the pure functions lori's
evaluator (``lori.eval.evaluator``) uses to reproduce it:

* :data:`OFFICIAL_EVAL_SETTINGS`: the ``EvalSettings`` fields the protocol fixes, with the value
  and the file:line that sets it (the same policy as ``lori.core.protocol.apply_official``: a field at
  lori's default takes the official value, any other value is refused);
* :func:`official_items`: which items the official evaluation actually scores. It iterates
  ``get_batch_iterator`` (src/get_datasets.py:375-467) with ``batch_size`` 64 (eval_model.py:348,
  the scripts pass none), ``shuffle=False``, ``n_epochs=1``: the loaders key the examples by
  prompt, so duplicate prompts become ONE item (at the first occurrence, with the LAST target;
  l.34-38), and the incomplete last batch is never yielded (l.433-443). GSM8K's 1,319 test
  problems give 20 x 64 = 1,280 items, HEx-PHI's 330 give 320, SIQA's 1,954 rows (1,930
  distinct prompts) give 1,920. HumanEval (bigcode) scores all 164 problems;
* :func:`bigcode_candidate` / :func:`bigcode_program`: how bigcode turns one generated sequence
  into the program it runs (bigcode_eval/utils.py:380-418, tasks/humaneval.py:71-88,
  tasks/custom_metrics/code_eval.py:146);
* :func:`check_official_model` / :func:`merged_weights`: the official code evaluates a float32
  model with the adapter merged into its weights (src/eval_model.py:272-284,
  merge_3_loras.py:47-66, bigcode/main.py:97-99 and 344-348).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from lori.core import lori_layers
from lori.core.protocol import Fixed
from lori.data.official_prompts import unique_prompts
from lori.eval.answers import truncate_at_stop
from lori.eval.errors import EvalError
from lori.eval.passk import HUMANEVAL_STOP_OFFICIAL

OFFICIAL_EVAL_BATCH = 64  # src/eval_model.py:348 (--batch_size default; no script passes one)
OFFICIAL_MAX_NEW_TOKENS = 512  # src/eval_model.py:308
OFFICIAL_MAX_LENGTH_GENERATION = 512  # bigcode/main.py:91-93: prompt + generated tokens
OFFICIAL_DTYPE = "float32"  # src/eval_model.py:272-276, merge_3_loras.py:47-51, bigcode --precision fp32

# The EvalSettings fields the official protocol fixes (keys are EvalSettings field names).
OFFICIAL_EVAL_SETTINGS: tuple[Fixed, ...] = (
    Fixed("max_new_tokens", OFFICIAL_MAX_NEW_TOKENS,
          "src/eval_model.py:308 (GSM8K, NLU, HEx-PHI; HumanEval: bigcode --max_length_generation "
          "512 = prompt + generated tokens, bigcode/main.py:91-93)"),
    Fixed("do_sample", False,
          "src/eval_model.py:309 (do_sample=args.sample, store_true l.351; no script passes --sample)"),
    Fixed("temperature", 0.2, "scripts/codealpaca_llama3_r_32.sh:47,88 (bigcode --temperature 0.2)"),
    Fixed("top_p", 0.95, "bigcode/bigcode_eval/arguments.py:26-28 (default, not passed)"),
    Fixed("n_samples", 20, "scripts/codealpaca_llama3_r_32.sh:48,89 (bigcode --n_samples 20)"),
    Fixed("seed", 0, "bigcode/bigcode_eval/arguments.py:36-38; src/eval_model.py:344"),
    Fixed("nlu_mode", "generate",
          "src/eval_model.py:307-328 (the NLU answer is read from a greedy generation)"),
    Fixed("sandbox_timeout", 3.0, "bigcode/bigcode_eval/tasks/humaneval.py:50 (timeout=3.0)"),
)


# The EvalSettings fields whose default (None) the official protocol reads the official way; any value
# may be given instead (lori's own reading, another item count). Keys are EvalSettings field names.
OFFICIAL_EVAL_DEFAULTS: tuple[Fixed, ...] = (
    Fixed("items", "official",
          "src/get_datasets.py:34-38, 433-443 (duplicate prompts merged, the incomplete last batch of 64 dropped)"),
    Fixed("judge_text", "prompt_and_generated",
          "src/eval_model.py:325-328 (batch_decode of prompt + new tokens is what the rules and the judge read)"),
    Fixed("held_out", "the whole GSM8K test split, in order",
          "src/eval_model.py:300 (split='test'), src/get_datasets.py:42-47 (load_dataset('gsm8k', 'main', split): "
          "all 1,319 problems, in order)"),
)
# lori's default of the same fields, as the change line names it
_LORI_DEFAULTS = {"items": "all", "judge_text": "generated", "held_out": 200}


def _equal(a: Any, b: Any) -> bool:
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def apply_official_eval(settings: Any) -> list[str]:
    """Put the fields of :data:`OFFICIAL_EVAL_SETTINGS` at their official values, in place.

    A field at lori's default (the dataclass default) takes the official value; a field at the
    official value stays; any other value is a contradiction (``lori.core.protocol.apply_official``'s
    policy for the training settings).

    Args:
        settings: a ``lori.eval.evaluator.EvalSettings`` (any dataclass with those fields).

    Fields of :data:`OFFICIAL_EVAL_DEFAULTS` left at None take the official value too (``held_out``
    stays None: ``EvalSettings.held_out_of`` resolves it per task), and any value is accepted there.

    Returns:
        One ``eval.<field>: old -> new`` line per field changed.

    Raises:
        EvalError: one line listing every field set to another value, with the official value.
    """
    defaults = {f.name: f.default for f in fields(settings)}
    changed, conflicts = [], []
    for fixed in OFFICIAL_EVAL_SETTINGS:
        value = getattr(settings, fixed.key)
        if _equal(value, fixed.value):
            continue
        if _equal(value, defaults[fixed.key]):
            setattr(settings, fixed.key, fixed.value)
            changed.append(f"eval.{fixed.key}: {value!r} -> {fixed.value!r}")
        else:
            conflicts.append(f"{fixed.key}={value!r} (official {fixed.value!r}: {fixed.source})")
    if conflicts:
        raise EvalError("protocol official fixes evaluation settings set otherwise here: " + "; ".join(conflicts)
                        + " -- remove them or use protocol: lori")
    for default in OFFICIAL_EVAL_DEFAULTS:
        if getattr(settings, default.key) is not None:
            continue
        if default.key == "held_out":  # per task, see EvalSettings.held_out_of; only GSM8K has an official set
            if "gsm8k" in getattr(settings, "tasks", ()):
                changed.append(f"eval.held_out: 200 -> {default.value}")
            continue
        setattr(settings, default.key, default.value)
        changed.append(f"eval.{default.key}: {_LORI_DEFAULTS[default.key]!r} -> {default.value!r}")
    return changed


def check_official_model(settings: Any, dtype: Any, merge: bool = True) -> None:
    """Under ``protocol: official``, refuse a model that is not float32 with its adapter merged.

    The official code evaluates ``AutoModelForCausalLM.from_pretrained(torch_dtype=torch.float32)``
    with ``PeftModel.merge_and_unload()`` (src/eval_model.py:272-284, merge_3_loras.py:47-66,
    bigcode/main.py:97-99 fp32 and l.344-348). Called by ``lori eval`` / ``lori merge`` before
    anything loads.

    Args:
        settings: the evaluation settings (nothing is checked under ``protocol: lori``).
        dtype: the weight dtype the command loads (``"float32"``, ``"bfloat16"``, a torch dtype).
        merge: whether the adapter is merged into the weights.
    """
    if settings.protocol != "official":
        return
    name = str(dtype).removeprefix("torch.")
    problems = [] if name in (OFFICIAL_DTYPE, "float") else [
        f"dtype={dtype!r} (official float32: src/eval_model.py:272-276)"]
    if not merge:
        problems.append("merge=False (official: the adapter merged into the weights, PeftModel.merge_and_unload, "
                        "src/eval_model.py:283-284)")
    if problems:
        raise EvalError("protocol official evaluates float32 merged weights: " + "; ".join(problems)
                        + " -- remove them or use eval.protocol: lori")


def _other_dtypes(model: Any) -> list[str]:
    return sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                   if p.is_floating_point() and p.dtype != torch.float32})


def check_float32(model: Any, fix: str = "load the model in float32") -> None:
    """Raise EvalError (naming ``fix``) if a floating-point weight of ``model`` is not float32."""
    if dtypes := _other_dtypes(model):
        raise EvalError(f"protocol official evaluates float32 weights (src/eval_model.py:272-276), "
                        f"this model has {dtypes}: {fix}")


def official_weight_problems(model: Any) -> list[str]:
    """Why ``model`` is not what the official code evaluates (float32, every adapter merged)."""
    dtypes = _other_dtypes(model)
    unmerged = [path for path, layer in lori_layers(model).items() if not layer.merged]
    problems = [f"weights in {dtypes} (official float32)"] if dtypes else []
    if unmerged:
        problems.append(f"{len(unmerged)} LoRI layers not merged (e.g. {unmerged[0]})")
    return problems


@contextlib.contextmanager
def merged_weights(model: Any) -> Iterator[Any]:
    """Evaluate on merged float32 weights, then restore the live adapter bit for bit.

    Every unmerged LoRI layer is merged (W0 + s B A, computed in fp32); the base weights are kept
    on the CPU meanwhile and copied back afterwards, so training can go on (``lori continual``).

    Raises:
        EvalError: a floating-point weight that is not float32.
    """
    check_float32(model)
    layers = [layer for layer in lori_layers(model).values() if not layer.merged]
    saved = [layer.base_layer.weight.detach().to("cpu", copy=True) for layer in layers]
    try:
        for layer in layers:
            layer.merge()
        yield model
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                layer.base_layer.weight.copy_(weight)
                layer.merged = False


def evaluation_weights(model: Any, settings: Any) -> contextlib.AbstractContextManager[Any]:
    """:func:`merged_weights` under ``protocol: official``, the live model otherwise."""
    return merged_weights(model) if settings.protocol == "official" else contextlib.nullcontext(model)


@dataclass(frozen=True)
class ItemSelection:
    """How many items of an evaluation set were scored, and why.

    Attributes:
        rule: ``official`` (duplicate prompts merged, incomplete last batch dropped) or ``all``.
        total: items in the evaluation set.
        evaluated: items scored.
        duplicates_merged: items folded into an earlier item with the same prompt.
        dropped_last_batch: distinct prompts of the incomplete last batch of ``batch_size``.
        batch_size: the official batch size (``official`` rule only).
        max_examples: the ``max_examples`` cap applied after the rule (None = none).
    """

    rule: str
    total: int
    evaluated: int
    duplicates_merged: int = 0
    dropped_last_batch: int = 0
    batch_size: int | None = None
    max_examples: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The selection for results.json, with a one-line reason."""
        why = {"official": "protocol official: one item per distinct prompt (the last target), "
                           f"the incomplete last batch of {self.batch_size} dropped, as "
                           "get_batch_iterator (src/get_datasets.py:416-443)",
               "all": "every item counts"}[self.rule]
        if self.max_examples is not None:
            why += f"; capped at max_examples={self.max_examples}"
        return {"rule": self.rule, "total": self.total, "evaluated": self.evaluated,
                "duplicates_merged": self.duplicates_merged,
                "dropped_last_batch": self.dropped_last_batch, "batch_size": self.batch_size,
                "max_examples": self.max_examples, "why": why}


def official_items(prompts: Sequence[str],
                   batch_size: int = OFFICIAL_EVAL_BATCH) -> tuple[list[int], ItemSelection]:
    """The items the official evaluation scores, as indices into ``prompts``.

    One index per distinct prompt, in the order of first occurrence, pointing at the prompt's
    LAST occurrence (whose target the official dict keeps); then only full batches of
    ``batch_size``: the first ``(distinct // batch_size) * batch_size`` of them.

    Args:
        prompts: the formatted prompt of every item, in dataset order.
        batch_size: the official evaluation batch size (64).

    Returns:
        ``(indices, selection)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    unique = unique_prompts(prompts)
    kept = len(unique) // batch_size * batch_size
    selection = ItemSelection("official", len(prompts), kept, len(prompts) - len(unique),
                              len(unique) - kept, batch_size)
    return [last for _, last in unique[:kept]], selection


def bigcode_candidate(tokenizer: Any, prompt: str, ids: Sequence[int]) -> str:
    """The program text bigcode keeps from one generated sequence (before the tests).

    bigcode appends the tokenizer's EOS to the stop words (bigcode_eval/generation.py:78-79), so
    it decodes with ``skip_special_tokens=False, clean_up_tokenization_spaces=False`` after
    dropping a leading BOS (utils.py:382-391; without an EOS token: ``skip_special_tokens=True``,
    ``clean_up_tokenization_spaces=True``, l.404-406), cuts the decoded text at the prompt's
    CHARACTER length and keeps ``prompt +`` the rest cut at the first stop word
    (tasks/humaneval.py:78-88).

    Args:
        tokenizer: the model's tokenizer.
        prompt: the prompt string (``doc["prompt"].strip()``).
        ids: the whole sequence: prompt ids (with the tokenizer's BOS, if any) + generated ids
            (ending with the EOS that stopped it, if any).
    """
    ids = list(ids)
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        if ids and ids[0] == getattr(tokenizer, "bos_token_id", None):
            ids = ids[1:]
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        stops: tuple[str, ...] = (*HUMANEVAL_STOP_OFFICIAL, eos)
    else:
        text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        stops = HUMANEVAL_STOP_OFFICIAL
    return prompt + truncate_at_stop(text[len(prompt):], stops)


def bigcode_program(candidate: str, test: str, entry_point: str) -> str:
    """``candidate + "\\n" + reference``, reference = ``"\\n" + test + "\\n" + "check(<entry>)"``.

    (tasks/humaneval.py:71-75 builds the reference, custom_metrics/code_eval.py:146 joins them.)
    """
    return candidate + "\n" + "\n" + test + "\n" + f"check({entry_point})"
