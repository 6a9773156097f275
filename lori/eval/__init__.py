"""Evaluation: sandboxed code execution, pass@k, answer parsing, refusal judges, metrics,
batched generation and option scoring; the evaluation tasks (``lori.eval.evaluator``: GSM8K,
HumanEval, MBPP, the safety and NLU sets) and interference between adapters
(``lori.eval.interference``).

Names are imported lazily, so ``import lori.eval.sandbox`` does not pull in torch/transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExecResult": "sandbox", "run_program": "sandbox", "run_many": "sandbox",
    "isolation_report": "sandbox",
    "pass_at_k": "passk", "estimate_pass_at_k": "passk", "humaneval_program": "passk",
    "evaluate_humaneval": "passk", "HUMANEVAL_STOP": "passk",
    "extract_gsm8k_answer": "answers", "gsm8k_gold": "answers", "gsm8k_correct": "answers",
    "normalize_number": "answers", "extract_nlu_answer": "answers", "extract_choice": "answers",
    "nlu_label_index": "answers", "truncate_at_stop": "answers", "NLU_LABELS": "answers",
    "official_gsm8k_answer": "answers", "official_gsm8k_correct": "answers",
    "official_nlu_answer": "answers", "OFFICIAL_NLU_LABELS": "answers",
    "Judge": "judge", "KeywordJudge": "judge", "LLMJudge": "judge", "REFUSAL_KEYWORDS": "judge",
    "OfficialKeywordJudge": "judge", "official_jailbroken": "judge",
    "OFFICIAL_JAILBREAK_KEYWORDS": "judge", "HUMANEVAL_STOP_OFFICIAL": "passk",
    "EvalError": "errors", "OFFICIAL_EVAL_SETTINGS": "official", "official_items": "official",
    "ItemSelection": "official", "bigcode_candidate": "official", "bigcode_program": "official",
    "merged_weights": "official", "check_official_model": "official",
    "ExactMatch": "metrics", "PassAtK": "metrics", "RefusalRate": "metrics",
    "MultipleChoiceAccuracy": "metrics",
    "generate": "generate", "generate_token_ids": "generate", "generate_from_ids": "generate",
    "generate_sequential": "generate", "generate_sequential_token_ids": "generate",
    "score_options": "scoring", "option_logprobs": "scoring",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lori.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lori.eval.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
