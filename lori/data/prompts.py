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

``paper_compat=True`` reproduces the whitespace of the original code (LoRI, built on the
DoRA / LLM-Adapters scripts), where the Alpaca template is a triple-quoted f-string inside
indented code, so every line after the first carries that indentation: 20 spaces in the
training template, 16 in the NLU evaluation template (``stage="eval"``). The training
template also keeps the trailing spaces after the header sentence ("request.  " without an
input, "request. " with one) and indented blank separator lines; the NLU evaluation template
has "request. " (no input) and empty separator lines. Lines inside a multi-line instruction
are not indented (they come from the data). Other tasks are evaluated with the training
layout. ``paper_compat`` only affects ``"alpaca"``.
"""

from __future__ import annotations

from typing import Any

from lori.data.sources import DataError, NLU_TASKS, gsm8k_final, task_kind

TEMPLATES = ("alpaca", "chat", "plain")
STAGES = ("train", "eval")
TRAIN_INDENT = 20
EVAL_INDENT = 16
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
# Responses of the Do-Not-Answer training pairs (safety substitute), by risk area.
REFUSALS: dict[str, str] = {
    "human_chatbox": "I'm not able to help with this the way a person could. Please reach out "
    "to someone you trust or to a qualified professional, who can give you the support you "
    "need.",
    "misinformation_harms": "I can't give reliable advice on this. Please consult a qualified "
    "professional or an authoritative source before acting on it.",
    "default": "I'm sorry, but I can't help with that request. It could cause harm to people, "
    "and I won't assist with it.",
}


def refusal_for(category: str | None) -> str:
    """The refusal used as the response to a harmful prompt of ``category``."""
    return REFUSALS.get(category or "default", REFUSALS["default"])


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


def _alpaca_paper(instruction: str, input_text: str, indent: int, training: bool) -> str:
    """The Alpaca prompt with the whitespace of the original (indented) f-strings."""
    pad, blank = " " * indent, " " * indent if training else ""
    header = ALPACA_HEADER_INPUT if input_text else ALPACA_HEADER
    trail = (" " if input_text else "  ") if training else ("" if input_text else " ")
    sections = [("### Instruction:", instruction)]
    if input_text:
        sections.append(("### Input:", input_text))
    body = f"\n{blank}\n".join(f"{pad}{title}\n{pad}{text}" for title, text in sections)
    return f"{header}{trail}\n\n{body}\n{blank}\n{pad}### Response:\n{pad}"


def _chat(user: str, response: str, tokenizer: Any) -> tuple[str, str]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' needs a tokenizer that has a chat_template")
    messages = [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], tokenize=False)
    return prompt, full[len(prompt):] if full.startswith(prompt) else response


def apply_template(instruction: str, response: str = "", *, input_text: str = "",
                   template: str = "alpaca", paper_compat: bool = False,
                   indent: int = TRAIN_INDENT, training: bool = True,
                   tokenizer: Any = None) -> tuple[str, str]:
    """Wrap raw instruction / input / response text in a template.

    Args:
        instruction: the task instruction.
        response: the target text (empty for generation prompts).
        input_text: optional extra input (Alpaca "### Input:" section).
        template: one of ``TEMPLATES``.
        paper_compat: reproduce the original indented whitespace (alpaca only).
        indent: spaces of indentation under ``paper_compat``.
        training: the training (True) or evaluation (False) whitespace variant.
        tokenizer: needed for ``template="chat"``.

    Returns:
        ``(prompt, response)``; the model is trained on ``response`` given ``prompt``.
    """
    if template == "alpaca":
        if paper_compat:
            return _alpaca_paper(instruction, input_text, indent, training), response
        return _alpaca(instruction, input_text), response
    user = f"{instruction}\n\n{input_text}" if input_text else instruction
    if template == "chat":
        return _chat(user, response, tokenizer)
    if template == "plain":
        return (user if user.endswith("\n") else user + "\n"), response
    raise ValueError(f"unknown template {template!r}; choose one of {list(TEMPLATES)}")


def format_example(record: dict[str, Any], task: str, template: str = "alpaca",
                   paper_compat: bool = False, *, stage: str = "train",
                   tokenizer: Any = None) -> tuple[str, str]:
    """The ``(prompt, response)`` strings of one record of ``task``.

    Args:
        record: a record in the schema of ``task`` (see ``lori.data.sources``).
        task: a task name (``gsm8k``, ``mbpp``, ``nlu``, ``boolq``, ``safety``, ...).
        template: ``"alpaca"``, ``"chat"`` or ``"plain"``.
        paper_compat: reproduce the original whitespace (see the module docstring).
        stage: ``"train"`` or ``"eval"``; under ``paper_compat`` NLU evaluation prompts use
            the 16-space layout, everything else the 20-space training layout.
        tokenizer: needed for ``template="chat"``.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")
    instruction, input_text, response = task_content(record, task)
    nlu_eval = stage == "eval" and (task == "nlu" or task in NLU_TASKS)
    indent = EVAL_INDENT if nlu_eval else TRAIN_INDENT
    return apply_template(instruction, response, input_text=input_text, template=template,
                          paper_compat=paper_compat, indent=indent, training=not nlu_eval,
                          tokenizer=tokenizer)
