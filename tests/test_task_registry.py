"""The task registry (lori.data.tasks): one entry per task, every entry checked by the same battery.

A new task gets every check by adding its row to ``ROWS``; a task without a row fails "add a row".
"""

from __future__ import annotations

import pytest

from lori.data import tasks
from lori.data.prompts import format_example
from lori.data.sources import DataError, check_record
from lori.data.tasks import SCORES, TASKS, Task, get_task
from lori.eval import evaluator
from lori.eval.errors import EvalError
from lori.eval.evaluator import EvalSettings, Evaluator, eval_records, evaluate_model

# name: (kind, score, trains from shipped data)
ROWS: dict[str, tuple[str, str | None, bool]] = {
    "gsm8k": ("math", "exact_match", True),
    "humaneval": ("code", "pass_at_k", True),
    "mbpp": ("code", "pass_at_k", True),
    "harmbench": ("safety", "refusal_rate", False),
    "strongreject": ("safety", "refusal_rate", False),
    "donotanswer": ("safety", "refusal_rate", False),
    "hexphi": ("safety", "refusal_rate", False),
    "over_refusal": ("safety", "refusal_rate", False),  # lower is better: benign questions
    "nlu": ("nlu", None, True),
    **{t: ("nlu", "multiple_choice", True) for t in ("boolq", "piqa", "siqa", "arc_challenge", "arc_easy",
                                                     "openbookqa", "hellaswag", "winogrande")},
    "codealpaca": ("instruct", None, False),
    "saferpaca": ("instruct", None, False),
    "commonsense": ("instruct", None, False),
    "instruct": ("instruct", None, False),
    "safety": ("safety", None, True),
    "benign": ("safety", None, False),
}
# what `eval.tasks` accepted before the registry, in the order its error message lists them
EVAL_ORDER = ["gsm8k", "humaneval", "mbpp", "harmbench", "strongreject", "donotanswer", "hexphi",
              "over_refusal", "nlu", "boolq", "piqa", "siqa", "arc_challenge", "arc_easy", "openbookqa",
              "hellaswag", "winogrande"]


def test_every_task_has_a_row_and_matches_it():
    missing = sorted(set(TASKS) - set(ROWS))
    assert not missing, f"add a row to ROWS in tests/test_task_registry.py for {missing}"
    assert sorted(ROWS) == sorted(TASKS)
    for name, (kind, score, trains) in ROWS.items():
        entry = get_task(name)
        assert (entry.name, entry.kind, entry.score, entry.train is not None) == (name, kind, score, trains)


def test_derived_views_keep_their_names_and_order():
    assert list(tasks.EVAL_TASKS) == EVAL_ORDER == list(evaluator.EVAL_TASKS)
    assert tasks.TASK_KINDS == {name: kind for name, (kind, _, _) in ROWS.items()}
    assert tasks.HUB_PATHS["gsm8k"] == ("gsm8k", "main") and "donotanswer" not in tasks.HUB_PATHS
    assert tasks.expand(["boolq", "nlu", "gsm8k"]) == ["boolq", *TASKS["nlu"].members[1:], "gsm8k"]
    assert {tasks.prompt_task(t) for t in ("harmbench", "hexphi", "over_refusal")} == {"safety"}
    assert tasks.prompt_task("gsm8k") == "gsm8k"


@pytest.mark.parametrize("name", [n for n in EVAL_ORDER if TASKS[n].score and not TASKS[n].needs])
def test_each_evaluation_set_loads_records_of_its_kind_that_format(name):
    settings = EvalSettings(tasks=[name], max_examples=2, held_out=20)
    records = eval_records(name, settings)
    assert len(records) == 2
    for record in records:
        check_record(record, TASKS[name].kind, name)
        prompt, _ = format_example(record, tasks.prompt_task(name), "alpaca", "lori", stage="eval")
        assert prompt


def test_every_score_has_a_scorer_on_both_paths():
    assert set(evaluator.SCORERS) == set(SCORES) == set(evaluator.OFFICIAL_SCORERS)
    assert {TASKS[t].score for t in EVAL_ORDER if TASKS[t].score} == set(SCORES)


@pytest.mark.parametrize("entry, message", [
    (dict(name="x", kind="poem"), "unknown kind 'poem'"),
    (dict(name="x", kind="math", score="bleu", evaluate=lambda s: []), "unknown score 'bleu'"),
    (dict(name="x", kind="math", evaluate=lambda s: []), "needs a score"),
    (dict(name="x", kind="math", score="exact_match"), "needs a score and a score an evaluation set"),
    (dict(name="x", kind="nlu", members=("boolq",), evaluate=lambda s: [], score="multiple_choice"),
     "a group evaluates its members"),
])
def test_an_incomplete_entry_is_refused_when_written(entry, message):
    with pytest.raises(DataError, match=message) as err:
        Task(**entry)
    assert "\n" not in str(err.value)


def test_unknown_names_fail_in_one_line_listing_the_known_ones():
    with pytest.raises(DataError, match=r"unknown task 'sqlqa'; choose one of \[.*'gsm8k'") as err:
        get_task("sqlqa")
    assert "\n" not in str(err.value)
    with pytest.raises(EvalError, match=r"unknown evaluation task\(s\) \['mmlu'\]; choose from \['gsm8k'"):
        EvalSettings(tasks=["gsm8k", "mmlu"]).check()


def test_a_task_without_a_score_is_refused_not_scored_as_a_refusal_rate(monkeypatch):
    monkeypatch.setitem(TASKS, "poems", Task("poems", "instruct"))
    with pytest.raises(EvalError, match=r"unknown evaluation task\(s\) \['poems'\]") as err:
        EvalSettings(tasks=["poems"]).check()
    assert "poems" not in str(err.value).split("choose from")[1]
    with pytest.raises(EvalError, match="'poems' has no score"):
        Evaluator(None, None, EvalSettings()).run("poems", [{"id": "a", "instruction": "i", "output": "o"}])
    for name in ("poems", "nlu"):  # no set of its own: a training-only task, a group
        with pytest.raises(EvalError, match=f"{name!r} has no evaluation set of its own"):
            eval_records(name, EvalSettings())


def test_a_missing_needed_setting_is_one_line(monkeypatch):
    monkeypatch.setitem(TASKS, "local_safety", Task("local_safety", "safety", evaluate=lambda s: [],
                                                    score="refusal_rate", needs=(("hexphi_path", "a folder"),)))
    with pytest.raises(EvalError, match="task 'local_safety' needs hexphi_path: a folder"):
        EvalSettings(tasks=["local_safety"]).check()
    with pytest.raises(EvalError, match="task 'hexphi' needs hexphi_path"):
        EvalSettings(tasks=["hexphi"]).check()


@pytest.mark.parametrize("protocol", ["lori", "official"])
@pytest.mark.parametrize("score", SCORES)
def test_run_dispatches_by_the_entry_score(monkeypatch, score, protocol):
    calls = []

    def scorer(owner, task, records):
        calls.append((type(owner).__name__, task, records))
        metrics = {"n": len(records)}
        return (metrics, []) if protocol == "official" else metrics  # official scorers also give samples

    monkeypatch.setitem(evaluator.OFFICIAL_SCORERS if protocol == "official" else evaluator.SCORERS, score, scorer)
    monkeypatch.setitem(TASKS, "new", Task("new", "math", evaluate=lambda s: [], score=score, official_run=True))
    records = [{"id": "a"}]
    assert Evaluator(None, None, EvalSettings(protocol=protocol)).run("new", records) == {"n": 1}
    owner = "OfficialTasks" if protocol == "official" else "Evaluator"
    assert calls == [(owner, "new", records)]


def test_a_new_task_is_one_entry_end_to_end(monkeypatch):
    """A math task added by one Task(...): eval.tasks accepts it, its set loads, exact_match scores it."""
    items = [{"id": f"q{i}", "question": f"{i}+1?", "answer": f"#### {i + 1}", "final": str(i + 1)} for i in range(3)]
    monkeypatch.setitem(TASKS, "addition", Task("addition", "math", evaluate=lambda s: items, score="exact_match"))
    monkeypatch.setattr(Evaluator, "generate",
                        lambda self, prompts, n=1, max_new_tokens=None: [["The final answer is: 2"] for _ in prompts])
    samples: dict = {}
    results = evaluate_model(None, None, EvalSettings(tasks=["addition"], progress=False), samples=samples)
    assert results == {"addition": {"accuracy": pytest.approx(1 / 3), "n": 3}}
    assert [s["gold"] for s in samples["addition"]] == ["1", "2", "3"]
