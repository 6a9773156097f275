"""lori's GSM8K evaluation items as a local EleutherAI lm-evaluation-harness task (no hub).

    <directory>/<name>.jsonl    one item a line: {"id", "prompt", "final"}, ``prompt`` the exact string
                                ``lori eval`` generates from (``Evaluator.prompts``)
    <directory>/<name>.yaml     output_type generate_until, doc_to_text "{{prompt}}", greedy, stops at
                                EOS only (as lori's GSM8K), max_gen_toks = ``max_new_tokens``
    <directory>/.datasets_cache/    what ``datasets`` builds from the JSONL (not the user's cache)

Run it on a lori adapter (lori saves PEFT LoRA files: B dense, zero outside the mask)::

    lm_eval --model hf --model_args pretrained=BASE,peft=runs/default/lori_s,dtype=float32 \\
        --include_path DIR --tasks NAME --log_samples --output_path OUT

lm-eval tokenises the prompt as lori does (the tokenizer's own special tokens), so with batch
size 1 its generations are those of ``lori eval --merge false --eval.batch_size 1`` text for text
(tests/test_lm_eval.py; merged, the weights differ by rounding). Its score is the
harness's flexible-extract exact match (last number in the text), close to but not lori's answer
rule (``lori.eval.answers``). ``protocol: official`` tokenises without BOS and is not exported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lori.eval.errors import EvalError
from lori.eval.evaluator import EvalSettings, Evaluator, eval_records

TASK = "gsm8k"
# lm-eval's own gsm8k "flexible-extract": the last number of the generation, then exact match
_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{final}}}}"
generation_kwargs:
  until: []
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "\\\\.$"]
"""


def lm_eval_items(settings: EvalSettings, tokenizer: Any = None) -> list[dict[str, Any]]:
    """The GSM8K items ``lori eval`` evaluates under ``settings``, each with its prompt string.

    Args:
        settings: ``held_out``, ``split_seed``, ``max_examples``, ``items`` and ``template`` as in lori eval.
        tokenizer: needed for ``template: chat`` only (the chat template makes the prompt string).
    """
    if settings.protocol != "lori":
        raise EvalError("an lm-eval task gets prompt strings; protocol official tokenises without BOS "
                        "(lori.data.tokenize): export with protocol lori")
    records = eval_records(TASK, settings)
    prompts = Evaluator(None, tokenizer, settings).prompts(TASK, records)
    return [{"id": r["id"], "prompt": p, "final": r["final"]} for r, p in zip(records, prompts)]


def write_lm_eval_task(
    directory: str | Path, settings: EvalSettings | None = None, name: str = "lori_gsm8k", tokenizer: Any = None,
) -> Path:
    """Write the items and the task YAML into ``directory`` (lm-eval's ``--include_path``).

    Args:
        directory: created if missing.
        settings: the ``lori eval`` settings whose items and ``max_new_tokens`` to export (default: lori's).
        name: the lm-eval task name.
        tokenizer: for ``template: chat``.

    Returns:
        The YAML file.
    """
    settings = settings or EvalSettings(tasks=[TASK])
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in lm_eval_items(settings, tokenizer)))
    path = directory / f"{name}.yaml"
    cache = json.dumps(str((directory / ".datasets_cache").resolve()))  # not the user's datasets cache
    path.write_text(_YAML.format(name=name, data=json.dumps(str(data.resolve())), cache=cache,
                                 max_gen_toks=settings.max_new_tokens))
    return path
