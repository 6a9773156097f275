"""Data for the LoRI tasks: sources, the task registry, prompt templates, tokenisation and a DataModule.

``TaskDataModule`` is imported lazily so that ``lori.data`` works without Lightning.
"""

from __future__ import annotations

from typing import Any

from lori.core.protocol import PROTOCOLS
from lori.data.prompts import (
    TEMPLATES,
    apply_template,
    check_template,
    format_example,
    gsm8k_response,
    nlu_answer,
    nlu_instruction,
    official_example,
    refusal_for,
    task_content,
)
from lori.data.sources import (
    NLU_TASKS,
    SCHEMAS,
    DataError,
    check_record,
    gsm8k_final,
    load_benign,
    load_donotanswer,
    load_gsm8k,
    load_harmbench,
    load_hexphi,
    load_humaneval,
    load_mbpp,
    load_nlu,
    load_strongreject,
    safety_train_records,
    split_records,
)
from lori.data.tasks import (
    EVAL_TASKS,
    TASK_KINDS,
    TASKS,
    Task,
    default_records,
    get_task,
    hub_records,
    load_local,
    task_kind,
)
from lori.data.tokenize import (
    IGNORE_INDEX,
    TokenizationReport,
    collate,
    official_truncate,
    pad_id_of,
    tokenize_prompts,
    tokenize_records,
    tokenize_records_with_report,
)

_LAZY = {"TaskDataModule"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from lori.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'lori.data' has no attribute {name!r}")


__all__ = [
    "DataError", "EVAL_TASKS", "IGNORE_INDEX", "NLU_TASKS", "PROTOCOLS", "SCHEMAS", "TASKS", "TASK_KINDS",
    "TEMPLATES", "Task", "TaskDataModule", "TokenizationReport", "apply_template", "check_record",
    "check_template", "collate", "default_records", "format_example", "get_task", "gsm8k_final",
    "gsm8k_response", "hub_records", "load_benign", "load_donotanswer", "load_gsm8k", "load_harmbench",
    "load_hexphi", "load_humaneval", "load_local", "load_mbpp", "load_nlu", "load_strongreject",
    "nlu_answer", "nlu_instruction", "official_example", "official_truncate", "pad_id_of",
    "refusal_for", "safety_train_records", "split_records", "task_content", "task_kind",
    "tokenize_prompts", "tokenize_records", "tokenize_records_with_report",
]
