"""Answer extraction from GENERATED text (callers pass only the new tokens, never the prompt).

* GSM8K: the number after the last "The final answer is" (the paper's target phrase) if present,
  else the last number in the text; commas, ``$``, ``%`` and trailing periods are normalised and
  numbers compare by value (``"3.0" == "3"``, ``"1,000" == "1000"``).
* Commonsense NLU (the LLM-Adapters / DoRA generation protocol): the model writes a label word such
  as ``answer3``/``solution1``/``option2``/``ending4``/``true``/``false``; the FIRST label word of
  the task found in the generation is the prediction.  Matching is case-insensitive and on word
  boundaries (the reference uses a bare, case-sensitive ``re.findall``).
* :func:`truncate_at_stop`: cut a generation at the earliest stop string.

The official LoRI code's rules (``protocol: official``; github.com/juzhengz/LoRI at 9183468,
``src/eval_model.py``) are here too, as facts of that code, beside lori's:

* :func:`official_gsm8k_answer` (``extract_answer_gsm8k``, l.174-196): commas removed; numbers are
  ``re.findall(r"-?\\d+\\.?\\d*")``; none -> ``inf``; if ``"The final answer is: "`` occurs, the first
  number between its FIRST occurrence and the next one (``split(...)[1]``), else (or if that part
  has no number) the last number of the text; ``float``. The gold is the same rule on the
  official target; a prediction is right iff the floats are equal.
* :func:`official_nlu_answer` (``extract_answer_commonsense``, l.129-161): commas removed, the
  part after the last ``"### Response:"``, the first ``re.findall`` match of the task's label
  words (case-sensitive, no word boundaries), ``""`` when none; right iff the strings are equal.

The official code applies them to ``prompt + generation`` (it decodes the whole sequence,
l.325-328); lori passes the generated text only unless ``EvalSettings.judge_text`` asks for the
official reading (see ``lori.eval.evaluator``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from math import inf

FINAL_ANSWER_PHRASE = "The final answer is"
_NUMBER = re.compile(r"-?(?:\$\s?)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_FINAL = re.compile(re.escape(FINAL_ANSWER_PHRASE), re.IGNORECASE)

_ANSWERS = [f"answer{i}" for i in range(1, 6)]
NLU_LABELS: dict[str, list[str]] = {
    "boolq": ["true", "false"],
    "piqa": ["solution1", "solution2"],
    "social_i_qa": _ANSWERS[:3],
    "arc_challenge": _ANSWERS,
    "arc_easy": _ANSWERS,
    "openbookqa": _ANSWERS[:4],
    "hellaswag": [f"ending{i}" for i in range(1, 5)],
    "winogrande": ["option1", "option2"],
}
_ALIASES = {"siqa": "social_i_qa", "socialiqa": "social_i_qa", "arcc": "arc_challenge",
            "arce": "arc_easy", "obqa": "openbookqa", "hellas": "hellaswag", "winog": "winogrande"}


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string (the stop string is dropped)."""
    cut = len(text)
    for s in stop or ():
        if s:
            pos = text.find(s)
            if pos != -1:
                cut = min(cut, pos)
    return text[:cut]


def normalize_number(text: str | None) -> str | None:
    """Canonical form of a number string: ``"$1,000.00"`` -> ``"1000"``, ``"3.50"`` -> ``"3.5"``.

    Returns ``None`` when ``text`` is not a number.
    """
    if text is None:
        return None
    cleaned = re.sub(r"[\s$,%]", "", text).rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def extract_gsm8k_answer(generated: str) -> str | None:
    """The predicted final number of a GSM8K generation, normalised, or ``None``.

    The first number after the last "The final answer is" wins; without that phrase (or with no
    number after it) the last number in the whole text is used.
    """
    phrases = list(_FINAL.finditer(generated))
    if phrases:
        match = _NUMBER.search(generated, phrases[-1].end())
        if match:
            return normalize_number(match.group())
    return _last_number(generated)


def gsm8k_gold(answer: str) -> str | None:
    """Gold number from a GSM8K ``answer`` field (``"... #### 42"``) or a plain number string."""
    if "####" in answer:
        return normalize_number(answer.split("####")[-1].strip())
    plain = normalize_number(answer.strip())
    return plain if plain is not None else _last_number(answer)


def numbers_equal(pred: str | None, gold: str | None) -> bool:
    """Value equality of two number strings; ``None`` never matches."""
    a, b = normalize_number(pred), normalize_number(gold)
    return a is not None and b is not None and Decimal(a) == Decimal(b)


def gsm8k_correct(generated: str, gold: str) -> bool:
    """Is the generation's extracted answer equal to the gold answer?"""
    return numbers_equal(extract_gsm8k_answer(generated), gsm8k_gold(gold))


def canonical_task(name: str) -> str:
    """Map a dataset name (``"ARC-Challenge"``, ``"SIQA"``, ...) to a key of :data:`NLU_LABELS`."""
    key = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if key in NLU_LABELS:
        return key
    squashed = key.replace("_", "")
    for candidate in NLU_LABELS:
        if candidate.replace("_", "") == squashed:
            return candidate
    if squashed in _ALIASES:
        return _ALIASES[squashed]
    raise KeyError(f"unknown NLU task {name!r}; known: {sorted(NLU_LABELS)}")


def extract_choice(generated: str, labels: Sequence[str]) -> int:
    """Index of the FIRST label word found in the generation, or ``-1`` if none is present."""
    if not labels:
        raise ValueError("labels must not be empty")
    ordered = sorted(labels, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, ordered)) + r")\b", re.IGNORECASE)
    match = pattern.search(generated)
    if match is None:
        return -1
    lowered = [label.lower() for label in labels]
    return lowered.index(match.group(1).lower())


def extract_nlu_answer(task: str, generated: str) -> int:
    """Predicted label index for a commonsense task (e.g. ``"answer3"`` -> 2), or ``-1``."""
    return extract_choice(generated, NLU_LABELS[canonical_task(task)])


def nlu_label_index(task: str, label: str | int) -> int:
    """Index of a gold label (``"option2"`` -> 1); integers are returned unchanged."""
    if isinstance(label, int):
        return label
    labels = [x.lower() for x in NLU_LABELS[canonical_task(task)]]
    return labels.index(label.strip().lower())


# --- the official LoRI code's rules (protocol "official") ------------------------------------

OFFICIAL_ANSWER_PROMPT = "The final answer is: "  # src/eval_model.py:12
OFFICIAL_RESPONSE_MARK = "### Response:"  # src/eval_model.py:131
_OFFICIAL_NUMBER = re.compile(r"-?\d+\.?\d*")  # src/eval_model.py:176, 182
_OFFICIAL_ANSWERS = tuple(f"answer{i}" for i in range(1, 6))
# the label words each official regex alternates over (src/eval_model.py:132-161), by lori's task key
OFFICIAL_NLU_LABELS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": _OFFICIAL_ANSWERS,
    "arc_challenge": _OFFICIAL_ANSWERS,
    "arc_easy": _OFFICIAL_ANSWERS,
    "openbookqa": _OFFICIAL_ANSWERS,
    "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"),
}


def official_gsm8k_answer(text: str) -> float:
    """The official GSM8K reading of ``text`` (src/eval_model.py:174-196); ``inf`` if no number.

    Example: ``"So 3 + 4 = 7. The final answer is: 7"`` -> ``7.0``; ``"no idea"`` -> ``inf``.
    """
    text = text.replace(",", "")
    numbers = _OFFICIAL_NUMBER.findall(text)
    if not numbers:
        return inf
    segments = text.split(OFFICIAL_ANSWER_PROMPT)
    after = _OFFICIAL_NUMBER.findall(segments[1]) if len(segments) > 1 else []
    return float(after[0] if after else numbers[-1])


def official_gsm8k_correct(text: str, target: str) -> bool:
    """Official GSM8K accuracy of one item: the two readings are equal floats (l.207-213)."""
    return official_gsm8k_answer(text) == official_gsm8k_answer(target)


def official_nlu_answer(task: str, text: str) -> str:
    """The official commonsense reading (src/eval_model.py:129-161): a label word or ``""``.

    Args:
        task: an NLU task name (``boolq``, ``siqa``, ``ARC-Challenge``, ...).
        text: the text to read (the official code reads prompt + generation).
    """
    words = OFFICIAL_NLU_LABELS[canonical_task(task)]
    text = text.replace(",", "").split(OFFICIAL_RESPONSE_MARK)[-1]
    found = re.findall("|".join(words), text.strip())
    return found[0] if found else ""


def official_nlu_index(task: str, answer: str) -> int:
    """Position of an official reading in the task's label words; ``-1`` for ``""``."""
    return OFFICIAL_NLU_LABELS[canonical_task(task)].index(answer) if answer else -1
