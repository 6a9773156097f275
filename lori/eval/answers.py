"""Answer extraction from GENERATED text (callers pass only the new tokens, never the prompt).

* GSM8K: the number after the last "The final answer is" (the paper's target phrase) if present,
  else the last number in the text; commas, ``$``, ``%`` and trailing periods are normalised and
  numbers compare by value (``"3.0" == "3"``, ``"1,000" == "1000"``).
* Commonsense NLU (the LLM-Adapters / DoRA generation protocol): the model writes a label word such
  as ``answer3``/``solution1``/``option2``/``ending4``/``true``/``false``; the FIRST label word of
  the task found in the generation is the prediction.  Matching is case-insensitive and on word
  boundaries (the reference uses a bare, case-sensitive ``re.findall``).
* :func:`truncate_at_stop`: cut a generation at the earliest stop string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

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
