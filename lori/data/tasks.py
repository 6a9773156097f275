"""The task registry: one ``Task`` entry per task name, and every lookup by task name.

An entry says what a task is: its record schema (``kind``, a ``SCHEMAS`` key of
``lori.data.sources``), its shipped training pool (``train``), its evaluation set (``evaluate``) and
how that set is scored (``score``, looked up in ``lori.eval.evaluator.SCORERS``), its hub copy, and
what the official protocol does with it. Everything that dispatches on a task name reads the entry:
the DataModule (``default_records``, ``load_local``), the prompts (``task_kind``) and the evaluator
(``EVAL_TASKS``, ``expand``, ``prompt_task``). An unknown name fails in one line listing the known
ones (``get_task``).

Adding a task of an existing kind is one ``Task(...)`` in ``TASKS`` (and its row in
tests/test_task_registry.py); docs/extending.md walks through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from lori.data.sources import (
    NLU_TASKS,
    SCHEMAS,
    DataError,
    as_int,
    check_record,
    humaneval_record,
    load_benign,
    load_donotanswer,
    load_gsm8k,
    load_harmbench,
    load_hexphi,
    load_humaneval,
    load_mbpp,
    load_nlu,
    load_strongreject,
    math_record,
    mbpp_record,
    nlu_from_hf,
    read_rows,
    safety_train_records,
    split_records,
)

Records = list[dict[str, Any]]
Score = Literal["exact_match", "pass_at_k", "multiple_choice", "refusal_rate"]
SCORES: tuple[str, ...] = ("exact_match", "pass_at_k", "multiple_choice", "refusal_rate")


class EvalSource(Protocol):
    """What an evaluation loader reads of the settings (``lori.eval.evaluator.EvalSettings`` is one)."""

    protocol: str
    split_seed: int
    hexphi_path: str | None

    def held_out_of(self, task: str, pool: int) -> int | float:
        """The held-out size of ``task`` in a training pool of ``pool`` items."""
        ...


@dataclass(frozen=True)
class Task:
    """One task: what its records are, where they come from, how its evaluation set is scored.

    Attributes:
        name: the name configs use (``data.task``, ``eval.tasks``).
        kind: the record schema and prompt layout: ``math``, ``code``, ``nlu``, ``instruct`` or ``safety``.
        train: the shipped training pool (before the train / held-out split); None: ``train_file`` only.
        evaluate: the evaluation set, given the evaluation settings; None: not an evaluation task.
        score: how ``evaluate``'s records are scored: ``exact_match`` (final answer), ``pass_at_k``
            (programs run in the sandbox), ``multiple_choice`` (accuracy over the options) or
            ``refusal_rate`` (keyword judge over the generations).
        prompt_as: format the records as this task (``safety`` for the refusal sets); None: as itself.
        hub: ``datasets.load_dataset(path, name)`` of the task's hub copy (``hub_records``).
        native_row: parser of a row in the data set's own layout (MBPP ``text``, HumanEval
            ``canonical_solution``) into a record, used by ``load_local`` / ``hub_records``.
        official_items: the official evaluation batches it (duplicate prompts merged, the last
            incomplete batch of 64 dropped: ``items: official``).
        official_run: under ``protocol: official`` it runs the official way (``lori.eval.official_tasks``).
        whole_split_official: under ``protocol: official`` its evaluation set is its whole shipped
            split in the shipped order (GSM8K test), unless ``held_out`` is given.
        members: a group of tasks (``nlu``: the eight NLU sets), evaluated one by one.
        needs: evaluation settings it cannot run without: ``(setting, what it is)``.
    """

    name: str
    kind: str
    train: Callable[[], Records] | None = None
    evaluate: Callable[[EvalSource], Records] | None = None
    score: Score | None = None
    prompt_as: str | None = None
    hub: tuple[str, str | None] | None = None
    native_row: Callable[[dict[str, Any], str], dict[str, Any] | None] | None = None
    official_items: bool = False
    official_run: bool = False
    whole_split_official: bool = False
    members: tuple[str, ...] = ()
    needs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in SCHEMAS:
            raise DataError(f"task {self.name!r}: unknown kind {self.kind!r}; choose one of {list(SCHEMAS)}")
        if self.score is not None and self.score not in SCORES:
            raise DataError(f"task {self.name!r}: unknown score {self.score!r}; choose one of {list(SCORES)}")
        if (self.evaluate is None) != (self.score is None):
            raise DataError(f"task {self.name!r}: an evaluation set needs a score and a score an evaluation "
                            "set: give both evaluate= and score=, or neither (a training-only task)")
        if self.members and self.evaluate is not None:
            raise DataError(f"task {self.name!r}: a group evaluates its members; give it no evaluate=")

    @property
    def evaluable(self) -> bool:
        """Whether ``eval.tasks`` may name it (it has a scored evaluation set, or is a group)."""
        return self.score is not None or bool(self.members)


def _held_out_part(name: str, load: Callable[[], Records],
                   official_order: bool = False) -> Callable[[EvalSource], Records]:
    """The held-out part of a training pool: never items the matching training split trains on."""

    def evaluate(src: EvalSource) -> Records:
        pool = load()
        records = split_records(pool, src.held_out_of(name, len(pool)), src.split_seed)[1]
        if official_order and src.protocol == "official":  # the official code reads the test split in its order
            position = {id(r): i for i, r in enumerate(pool)}
            records.sort(key=lambda r: position[id(r)])
        return records

    return evaluate


def _category_number(category: Any) -> int:
    tail = str(category or "").rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _hexphi(src: EvalSource) -> Records:
    records = load_hexphi(src.hexphi_path or "")
    if src.protocol == "official":  # tasks/hexphi/test.jsonl lists the categories in numeric order, 1 to 11
        records.sort(key=lambda r: _category_number(r.get("category")))
    return records


def _native_code(parse: Callable[[dict[str, Any], str], dict[str, Any]]
                 ) -> Callable[[dict[str, Any], str], dict[str, Any] | None]:
    """``parse`` for a row in a code data set's own layout (MBPP ``text``, HumanEval
    ``canonical_solution``); None for any other row."""
    return lambda row, rid: parse(row, rid) if "text" in row or "canonical_solution" in row else None


def _refusal_set(name: str, load: Callable[[], Records], official: bool = True) -> Task:
    """A set of prompts scored by the refusal rate of the generations (formatted as safety prompts)."""
    return Task(name, "safety", evaluate=lambda src: load(), score="refusal_rate", prompt_as="safety",
                official_items=official, official_run=official)


_NLU_HUB: dict[str, tuple[str, str | None]] = {
    "boolq": ("google/boolq", None), "piqa": ("ybisk/piqa", None),
    "siqa": ("allenai/social_i_qa", None), "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"), "openbookqa": ("allenai/openbookqa", "main"),
    "hellaswag": ("Rowan/hellaswag", None), "winogrande": ("allenai/winogrande", "winogrande_xl"),
}


def _nlu_task(name: str) -> Task:
    return Task(name, "nlu", train=lambda: load_nlu(name, "train"), evaluate=lambda src: load_nlu(name, "test"),
                score="multiple_choice", hub=_NLU_HUB[name], official_items=True, official_run=True)


# The paper's training sets as the official code loads them (get_datasets.py:43, 58, 217):
# gsm8k/main, zwhe99/commonsense_170k (the NLU training set: instruction / input / output rows),
# sahil2801/CodeAlpaca-20k; Saferpaca and HEx-PHI are files of the official repository.
# The order of the evaluation tasks is the order of ``EVAL_TASKS`` (error messages list it).
_ENTRIES: tuple[Task, ...] = (
    Task("gsm8k", "math", train=load_gsm8k, evaluate=_held_out_part("gsm8k", load_gsm8k, official_order=True),
         score="exact_match", hub=("gsm8k", "main"), official_items=True, official_run=True,
         whole_split_official=True),
    Task("humaneval", "code", train=load_humaneval, evaluate=lambda src: load_humaneval(), score="pass_at_k",
         hub=("openai_humaneval", None), native_row=_native_code(humaneval_record), official_run=True),
    Task("mbpp", "code", train=load_mbpp, evaluate=_held_out_part("mbpp", load_mbpp), score="pass_at_k",
         hub=("google-research-datasets/mbpp", None), native_row=_native_code(mbpp_record)),
    _refusal_set("harmbench", lambda: load_harmbench("test")),
    _refusal_set("strongreject", load_strongreject),
    _refusal_set("donotanswer", load_donotanswer),
    Task("hexphi", "safety", evaluate=_hexphi, score="refusal_rate", prompt_as="safety", official_items=True,
         official_run=True, needs=(("hexphi_path", "a folder of HEx-PHI category_*.csv files"),)),
    # benign TriviaQA questions: a refusal rate where lower is better (the safety training set mixes in NQ-open)
    _refusal_set("over_refusal", lambda: load_benign("trivia_qa"), official=False),
    Task("nlu", "nlu", train=lambda: [r for t in NLU_TASKS for r in load_nlu(t)], members=NLU_TASKS),
    *(_nlu_task(t) for t in NLU_TASKS),
    Task("codealpaca", "instruct", hub=("sahil2801/CodeAlpaca-20k", None)),
    Task("saferpaca", "instruct"),
    Task("commonsense", "instruct", hub=("zwhe99/commonsense_170k", None)),
    Task("instruct", "instruct"),
    Task("safety", "safety", train=safety_train_records),
    Task("benign", "safety"),
)
TASKS: dict[str, Task] = {t.name: t for t in _ENTRIES}


def get_task(name: str) -> Task:
    """The entry of ``name``; raises DataError listing the known names if there is none."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def task_kind(task: str) -> str:
    """The record schema name (``SCHEMAS`` key) of ``task``; raises DataError if unknown."""
    return get_task(task).kind


def eval_tasks() -> tuple[str, ...]:
    """The names ``eval.tasks`` accepts, in registry order."""
    return tuple(name for name, t in TASKS.items() if t.evaluable)


def expand(tasks: list[str]) -> list[str]:
    """Task names with each group replaced by its members, first occurrence kept."""
    out: list[str] = []
    for task in tasks:
        for name in get_task(task).members or (task,):
            if name not in out:
                out.append(name)
    return out


def prompt_task(task: str) -> str:
    """The task name a record of evaluation task ``task`` is formatted with."""
    return get_task(task).prompt_as or task


# views derived from the registry (their names predate it)
TASK_KINDS: dict[str, str] = {name: t.kind for name, t in TASKS.items()}
HUB_PATHS: dict[str, tuple[str, str | None]] = {name: t.hub for name, t in TASKS.items() if t.hub}
EVAL_TASKS: tuple[str, ...] = eval_tasks()


def default_records(task: str) -> Records:
    """The shipped data pool of ``task`` (before the train / held-out split)."""
    train = get_task(task).train
    if train is None:
        raise DataError(f"task {task!r} ships no training data here (CodeAlpaca, Saferpaca, "
                        "commonsense_170k and HEx-PHI are not available offline): set train_file "
                        "to a local file")
    return train()


def parse_row(task: str, row: dict[str, Any], rid: str, where: str) -> dict[str, Any]:
    """Turn one raw row (hub, JSON, JSONL or CSV) of ``task`` into a checked record."""
    entry = get_task(task)
    kind = entry.kind
    if kind == "nlu" and isinstance(row.get("choices"), list):  # already in the nlu schema
        rec = {"id": rid, **row, "task": row.get("task") or task, "label": as_int(row.get("label"))}
        return check_record(rec, kind, where)
    if kind == "nlu":
        return nlu_from_hf(row.get("task") or task, row, rid, where)
    if entry.native_row is not None and (native := entry.native_row(row, rid)) is not None:
        return check_record(native, kind, where)
    if kind == "math":
        return check_record({**row, **math_record(row, rid)}, kind, where)
    if kind == "instruct":
        return check_record({"id": rid, **row, "input": row.get("input") or ""}, kind, where)
    return check_record({"id": rid, "source": task, **row}, kind, where)


def load_local(path: str | Path, task: str,
               field_map: dict[str, str] | None = None) -> Records:
    """Records of ``task`` from a user's JSON / JSONL / CSV file.

    Args:
        path: the file.
        task: a key of ``TASKS``; fixes the schema the rows must satisfy.
        field_map: ``{schema_field: file_field}`` renames, e.g. ``{"output": "completion"}``.
    """
    records = []
    for i, (where, row) in enumerate(read_rows(path)):
        row = {**row, **{k: row.get(v) for k, v in (field_map or {}).items()}}
        records.append(parse_row(task, row, str(row.get("id", f"{Path(path).stem}-{i}")), where))
    return records


def hub_records(task: str, split: str = "train") -> Records:
    """``datasets.load_dataset`` of the task's hub copy, e.g. ``("gsm8k", "main")``.

    Needs a reachable hub (or the ``datasets`` cache); a failed load is a one-line DataError.
    """
    import datasets

    entry = TASKS.get(task)
    if entry is None or entry.hub is None:
        raise DataError(f"no hub path for {task!r}; known: {sorted(HUB_PATHS)}")
    hub_path, name = entry.hub
    try:
        rows = datasets.load_dataset(hub_path, name, split=split)
    except (OSError, ValueError) as err:  # no network, unknown data set, offline cache miss
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot load {hub_path!r} ({task}, split {split!r}) from the hub: "
                        f"{first} (no hub here? set data.train_file to a local copy)") from err
    return [parse_row(task, dict(row), f"{task}-{split}-{i}", f"{hub_path}[{split}] record {i}")
            for i, row in enumerate(rows)]
