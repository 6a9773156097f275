"""Prompt templates: a record of a task becomes a ``(prompt, response)`` pair of strings.

Task content (what goes into the instruction and the response):

* GSM8K: the question followed by ``GSM8K_QUESTION_SUFFIX``; the response is the GSM8K
  solution with its ``#### N`` line rewritten to ``The final answer is: N``.
* NLU: the LLM-Adapters ``commonsense_170k`` instructions (e.g. ``Please choose the
  correct answer to the question: ...\\n\\nAnswer1: a Answer2: b\\n\\nAnswer format:
  answer1/answer2``); the response is ``the correct answer is answer2``.
* Code: an MBPP description with its asserts, or for HumanEval ``CODE_COMPLETION`` around
  the stub; the response is a complete program (HumanEval: stub + canonical body).
* Instruct (CodeAlpaca, Saferpaca) and safety records: instruction / input / output as given.

Templates (``template=``):

* ``"alpaca"``: the Stanford Alpaca prompt (with its "paired with an input" variant).
* ``"plain"``: the instruction (and input) alone, ending in a newline.
* ``"chat"``: ``tokenizer.apply_chat_template`` with the instruction as the user turn and the
  response as the assistant turn (for instruct models; needs ``tokenizer=``).

Protocols (``protocol=``, see ``lori.core.protocol.PROTOCOLS``):

* ``"lori"`` (default): the layouts above.
* ``"official"``: the strings of the official LoRI code (``lori.data.official_prompts``), byte
  for byte, whatever ``template`` says, for every task that code has: GSM8K, the instruct sets
  (CodeAlpaca, Saferpaca, commonsense_170k; also the ``instruct`` task and the ``safety``
  training pairs, in the no-input Saferpaca layout), NLU training (the commonsense_170k layout
  around the NLU instruction), NLU evaluation (``stage="eval"``: the 16-space ``get_default``
  layout), HumanEval evaluation (the stripped stub) and the harmful-prompt evaluation sets
  (HEx-PHI and the HarmBench / StrongREJECT / Do-Not-Answer sets standing in for it, by the
  task name or the record's ``source``). Tasks the official code does not have (MBPP, HumanEval
  training, benign / over-refusal prompts) fall back to the lori layout of ``template``. The
  official code has no chat template: ``template="chat"`` with ``protocol="official"`` is refused.
"""

from __future__ import annotations

from typing import Any

from lori.core.protocol import ProtocolError, check_protocol
from lori.data import official_prompts as official
from lori.data.sources import REFUSALS, DataError, gsm8k_final, refusal_for  # noqa: F401 (re-exported)
from lori.data.tasks import task_kind

TEMPLATES = ("alpaca", "chat", "plain")
STAGES = ("train", "eval")
ALPACA_HEADER = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.")
ALPACA_HEADER_INPUT = ("Below is an instruction that describes a task, paired with an input "
                       "that provides further context. Write a response that appropriately "
                       "completes the request.")
GSM8K_QUESTION_SUFFIX = "\nFirst think step by step and then answer the final number.\n"
GSM8K_ANSWER_PREFIX = "The final answer is: "
NLU_ANSWER_PREFIX = "the correct answer is "
CODE_COMPLETION = "Complete the following Python code:\n{prompt}"
# NLU task: (opening, option word, separator between options, separator before the format)
_NLU_STYLE = {
    "piqa": ("Please choose the correct solution to the question: ", "Solution", "\n\n", "\n\n"),
    "hellaswag": ("Please choose the correct ending to complete the given sentence: ", "Ending",
                  " ", "\n\n"),
    "winogrande": ("Please choose the correct answer to fill in the blank to complete the given "
                   "sentence: ", "Option", " ", " "),
    **{t: ("Please choose the correct answer to the question: ", "Answer", " ", "\n\n")
       for t in ("siqa", "arc_challenge", "arc_easy", "openbookqa")},
}


def gsm8k_response(answer: str, final: str | None = None) -> str:
    """A GSM8K solution whose ``#### N`` line becomes ``The final answer is: N``."""
    if "####" in answer:
        head, _, tail = answer.rpartition("####")
        return f"{head}{GSM8K_ANSWER_PREFIX}{tail.strip()}"
    final = final or gsm8k_final(answer) or ""
    return f"{answer.rstrip()}\n{GSM8K_ANSWER_PREFIX}{final}"


def nlu_instruction(record: dict[str, Any]) -> str:
    """The LLM-Adapters commonsense instruction of an NLU record."""
    task, question = record["task"], record["question"].strip()
    if task == "boolq":
        question = question if question.endswith("?") else question + "?"
        return ("Please answer the following question with true or false, question: "
                f"{question}\n\nAnswer format: true/false")
    if task not in _NLU_STYLE:
        raise DataError(f"record {record.get('id')}: unknown NLU task {task!r}")
    opening, word, sep, before = _NLU_STYLE[task]
    if task == "siqa" and record.get("context"):
        question = f"{record['context'].strip()} {question}"
    options = sep.join(f"{word}{i}: {c}" for i, c in enumerate(record["choices"], 1))
    answers = "/".join(f"{word.lower()}{i}" for i in range(1, len(record["choices"]) + 1))
    return f"{opening}{question}\n\n{options}{before}Answer format: {answers}"


def nlu_answer(record: dict[str, Any]) -> str:
    """The answer word of an NLU record: ``true``, ``solution1``, ``answer3``, ..."""
    label = int(record["label"])
    if not 0 <= label < len(record["choices"]):
        raise DataError(f"record {record.get('id')}: label {label} outside the choices")
    if record["task"] == "boolq":
        return str(record["choices"][label])
    return f"{_NLU_STYLE[record['task']][1].lower()}{label + 1}"


def task_content(record: dict[str, Any], task: str) -> tuple[str, str, str]:
    """The ``(instruction, input, response)`` of a record, before any template."""
    kind = task_kind(task)
    if kind == "math":
        return (record["question"].strip() + GSM8K_QUESTION_SUFFIX, "",
                gsm8k_response(record["answer"], record.get("final")))
    if kind == "nlu":
        return nlu_instruction(record), "", NLU_ANSWER_PREFIX + nlu_answer(record)
    if kind == "code":
        if record.get("source") == "humaneval":
            return (CODE_COMPLETION.format(prompt=record["prompt"]), "",
                    record["prompt"] + record["solution"])
        return record["prompt"], "", record["solution"]
    if kind == "instruct":
        return record["instruction"], record.get("input") or "", record["output"]
    return record["prompt"], "", record.get("response") or ""


def _alpaca(instruction: str, input_text: str) -> str:
    if input_text:
        return (f"{ALPACA_HEADER_INPUT}\n\n### Instruction:\n{instruction}\n\n"
                f"### Input:\n{input_text}\n\n### Response:\n")
    return f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def check_template(protocol: str, template: str | None = None) -> None:
    """Raise DataError for an unknown protocol, or for ``template="chat"`` with ``"official"``.

    The protocol name is checked by ``lori.core.protocol.check_protocol`` (the one list,
    ``PROTOCOLS``); its ProtocolError becomes a DataError with the same message.
    """
    try:
        check_protocol(protocol)
    except ProtocolError as err:
        raise DataError(str(err)) from None
    if protocol == "official" and template == "chat":
        raise DataError("template 'chat' cannot be used with protocol 'official': the official "
                        "LoRI code has no chat template (use template 'alpaca' or 'plain')")


def _chat(user: str, response: str, tokenizer: Any) -> tuple[str, str]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' needs a tokenizer that has a chat_template")
    messages = [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], tokenize=False)
    return prompt, full[len(prompt):] if full.startswith(prompt) else response


def apply_template(instruction: str, response: str = "", *, input_text: str = "",
                   template: str = "alpaca", protocol: str = "lori",
                   tokenizer: Any = None) -> tuple[str, str]:
    """Wrap raw instruction / input / response text in a template.

    Args:
        instruction: the task instruction.
        response: the target text (empty for generation prompts).
        input_text: optional extra input (Alpaca "### Input:" section).
        template: one of ``TEMPLATES`` (ignored under ``protocol="official"``).
        protocol: ``"lori"``, or ``"official"`` for the official instruct layout (20-space
            CodeAlpaca / Saferpaca / commonsense_170k f-string, ``official_prompts.instruct_prompt``).
        tokenizer: needed for ``template="chat"``.

    Returns:
        ``(prompt, response)``; the model is trained on ``response`` given ``prompt``.
    """
    check_template(protocol, template)
    if protocol == "official":
        return official.instruct_prompt(instruction, input_text), response
    if template == "alpaca":
        return _alpaca(instruction, input_text), response
    user = f"{instruction}\n\n{input_text}" if input_text else instruction
    if template == "chat":
        return _chat(user, response, tokenizer)
    if template == "plain":
        return (user if user.endswith("\n") else user + "\n"), response
    raise ValueError(f"unknown template {template!r}; choose one of {list(TEMPLATES)}")


def official_example(record: dict[str, Any], task: str,
                     stage: str = "train") -> tuple[str, str] | None:
    """The official code's ``(prompt, target)`` of a record, or None for a task it lacks.

    Per task (``lori.data.official_prompts`` has the strings and their lines):

    * gsm8k: question + the official suffix; target = solution with ``####`` rewritten.
    * instruct / codealpaca / saferpaca / commonsense: the 20-space instruct layout with the
      record's input (if truthy); target = ``output``.
    * safety, ``stage="train"`` (the Saferpaca stand-in): the no-input instruct layout around the
      harmful or benign prompt; target = its ``response``.
    * safety, ``stage="eval"``, of a HEx-PHI-like source (``official_prompts.HEXPHI_SOURCES``, by
      task name or ``record["source"]``): the HEx-PHI prompt; target ``"The answer is"``.
    * NLU, ``stage="train"``: the 20-space commonsense_170k layout around the NLU instruction;
      ``stage="eval"``: the 16-space ``get_default`` layout. Target
      ``"the correct answer is <label word>"`` (as in commonsense_170k and tasks/*/test.json).
    * humaneval, ``stage="eval"``: the stripped stub (bigcode); target = the canonical body
      (not used by bigcode).

    MBPP, HumanEval training and benign safety prompts at evaluation return None (the caller
    falls back to the lori layout).
    """
    kind = task_kind(task)
    if kind == "math":
        return official.gsm8k_pair(record["question"], record["answer"])
    if kind == "instruct":
        return official.instruct_prompt(record["instruction"], record.get("input")), \
            f"{record['output']}"
    if kind == "nlu":
        target = NLU_ANSWER_PREFIX + nlu_answer(record)
        if stage == "eval":
            return official.default_prompt(nlu_instruction(record)), target
        return official.instruct_prompt(nlu_instruction(record)), target
    if kind == "safety" and stage == "eval":
        if task in official.HEXPHI_SOURCES or record.get("source") in official.HEXPHI_SOURCES:
            return official.hexphi_prompt(record["prompt"]), official.HEXPHI_TARGET
        return None
    if kind == "safety":
        return official.instruct_prompt(record["prompt"]), f"{record.get('response') or ''}"
    if record.get("source") == "humaneval" and stage == "eval":
        return official.humaneval_prompt(record["prompt"]), record["solution"]
    return None


def format_example(record: dict[str, Any], task: str, template: str = "alpaca",
                   protocol: str = "lori", *, stage: str = "train",
                   tokenizer: Any = None) -> tuple[str, str]:
    """The ``(prompt, response)`` strings of one record of ``task``.

    Args:
        record: a record in the schema of ``task`` (see ``lori.data.sources``).
        task: a task name (``gsm8k``, ``mbpp``, ``nlu``, ``boolq``, ``safety``, ...).
        template: ``"alpaca"``, ``"chat"`` or ``"plain"``; ignored under ``protocol="official"``
            for the tasks the official code has (see ``official_example``).
        protocol: ``"lori"`` or ``"official"`` (see the module docstring).
        stage: ``"train"`` or ``"eval"``; selects the official evaluation layouts (NLU,
            HumanEval, HEx-PHI); the lori layouts are the same for both stages.
        tokenizer: needed for ``template="chat"``.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {list(TEMPLATES)}")
    check_template(protocol, template)
    if protocol == "official":
        pair = official_example(record, task, stage)
        if pair is not None:
            return pair
    instruction, input_text, response = task_content(record, task)
    return apply_template(instruction, response, input_text=input_text, template=template,
                          tokenizer=tokenizer)
