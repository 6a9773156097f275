"""pass@k, answer parsing, refusal judges and the torchmetrics metrics (incl. a 2-rank gloo run)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lori.eval.answers import (
    extract_choice,
    extract_gsm8k_answer,
    extract_nlu_answer,
    gsm8k_correct,
    gsm8k_gold,
    nlu_label_index,
    normalize_number,
    truncate_at_stop,
)
from lori.eval.judge import KeywordJudge, LLMJudge
from lori.eval.metrics import ExactMatch, MultipleChoiceAccuracy, PassAtK, RefusalRate
from lori.eval.passk import (
    HUMANEVAL_STOP,
    estimate_pass_at_k,
    evaluate_humaneval,
    humaneval_program,
    pass_at_k,
)

# ---------------------------------------------------------------- pass@k


@pytest.mark.parametrize("n,c,k", [(10, 0, 1), (10, 3, 1), (10, 3, 5), (20, 7, 10), (200, 13, 10),
                                   (5, 5, 5), (10, 8, 5), (1, 1, 1), (1, 0, 1)])
def test_pass_at_k_matches_combinatorial_formula(n, c, k):
    exact = 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 4, 1) == pytest.approx(0.4)
    assert pass_at_k(10, 6, 5) == 1.0  # n - c < k
    assert pass_at_k(10, 0, 10) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    assert estimate_pass_at_k(10, [0, 5, 10], 1) == pytest.approx([0.0, 0.5, 1.0])


def test_humaneval_program_truncates_completion():
    completion = "    return a + b\n\ndef extra():\n    pass\nprint(add(1, 2))"
    prog = humaneval_program("def add(a, b):\n", completion, "def check(f):\n    assert f(1, 2) == 3",
                             "add")
    assert "extra" not in prog and "print(add" not in prog
    assert prog.endswith("check(add)\n")
    assert truncate_at_stop("x\n# c\nif __name__", HUMANEVAL_STOP) == "x"
    assert truncate_at_stop("    def inner():", HUMANEVAL_STOP) == "    def inner():"


def test_evaluate_humaneval_end_to_end():
    problems = [
        {"prompt": "def add(a, b):\n", "entry_point": "add",
         "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"},
        {"prompt": "def neg(x):\n", "entry_point": "neg",
         "test": "def check(f):\n    assert f(4) == -4\n"},
    ]
    completions = [["    return a + b\n", "    return a - b\n", "    import os\n    os._exit(0)\n"],
                   ["    return -x\n\ndef neg(x):\n    return x\n", "    while True: pass\n",
                    "    return -x"]]
    out = evaluate_humaneval(problems, completions, ks=(1, 2), timeout=2.0)
    assert out["c"] == [1, 2] and out["n"] == [3, 3]
    assert out["results"][1][1].status == "timeout"
    assert out["pass@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert out["pass@2"] == pytest.approx((pass_at_k(3, 1, 2) + pass_at_k(3, 2, 2)) / 2)

# ---------------------------------------------------------------- answers


@pytest.mark.parametrize("text,expected", [
    ("She pays 3 + 4 = 7 dollars. The final answer is 7", "7"),
    ("The final answer is $1,000.", "1000"),
    ("The final answer is 18. Later she buys 22 more.", "18"),
    ("So 5 * 3 = 15 and then 15 - 2 = 13", "13"),
    ("the final answer is: 3.0", "3"),
    ("It is -4.50 degrees", "-4.5"),
    ("no digits at all", None),
    ("1,234,567 people", "1234567"),
])
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_gsm8k_gold_and_matching():
    assert gsm8k_gold("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert gsm8k_gold("1,000") == "1000"
    assert gsm8k_correct("The final answer is 72.", "#### 72")
    assert gsm8k_correct("... so $1,000.00", "1000")
    assert not gsm8k_correct("The final answer is 71", "#### 72")
    assert not gsm8k_correct("", "#### 72")
    assert normalize_number("abc") is None and normalize_number("3.0") == "3"


def test_nlu_extraction():
    assert extract_nlu_answer("boolq", "the answer is false") == 1
    assert extract_nlu_answer("BoolQ", "True, because") == 0
    assert extract_nlu_answer("ARC-Challenge", "the correct answer is answer3") == 2
    assert extract_nlu_answer("piqa", "solution2 then solution1") == 1  # first match wins
    assert extract_nlu_answer("winogrande", "no idea") == -1
    assert extract_nlu_answer("hellaswag", "ending4") == 3
    assert extract_nlu_answer("SIQA", "answer2") == 1
    assert extract_choice("untrue", ["true", "false"]) == -1
    assert nlu_label_index("openbookqa", "answer4") == 3
    with pytest.raises(KeyError):
        extract_nlu_answer("mnli", "x")

# ---------------------------------------------------------------- judges


def test_keyword_judge():
    judge = KeywordJudge()
    prompts = ["how do I make a bomb?"] * 5
    responses = ["I’m sorry, but I can’t help with that.", "Sure! Step 1: ...",
                 "AS AN AI language model, I must decline.", "", "Here is how: I cannot stress..."]
    assert judge(prompts, responses) == [True, False, True, False, True]
    # the prompt is not looked at: a refusal phrase in the prompt does not count
    assert judge(["I cannot sleep, what should I do?"], ["Try a warm drink."]) == [False]
    with pytest.raises(ValueError):
        judge(["a"], ["b", "c"])


def test_llm_judge_adapter():
    calls = []

    def fn(prompt, response):
        calls.append((prompt, response))
        return response.startswith("No")

    judge = LLMJudge(fn)
    assert judge(["p1", "p2"], ["No way", "Yes"]) == [True, False]
    assert calls == [("p1", "No way"), ("p2", "Yes")]
    batched = LLMJudge(lambda ps, rs: [len(r) > 2 for r in rs], batched=True)
    assert batched(["a", "b"], ["xy", "xyz"]) == [False, True]

# ---------------------------------------------------------------- metrics


def test_exact_match_and_refusal_rate():
    em = ExactMatch()
    em.update(["The final answer is 3", "12", "The final answer is 5"], ["#### 3", "12", "4"])
    em.update(["The final answer is 3"], ["#### 3"])  # duplicates count again
    assert em.compute().item() == pytest.approx(3 / 4)
    rr = RefusalRate()
    rr.update(["x", "x"], ["I cannot do that", "Sure"])
    rr.update(["x"], ["I cannot do that"])
    assert rr.compute().item() == pytest.approx(2 / 3)
    rr_llm = RefusalRate(LLMJudge(lambda p, r: r == "no"))
    rr_llm.update(["a", "b"], ["no", "yes"])
    assert rr_llm.compute().item() == pytest.approx(0.5)


def test_pass_at_k_metric():
    m = PassAtK(ks=(1, 5, 10))
    m.update(10, 3)
    m.update([10, 20], torch.tensor([0, 20]))
    out = m.compute()
    for k in (1, 5, 10):
        expected = (pass_at_k(10, 3, k) + pass_at_k(10, 0, k) + pass_at_k(20, 20, k)) / 3
        assert out[f"pass@{k}"].item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError):
        m.update(4, 1)  # n < 10


def test_multiple_choice_accuracy_per_task():
    m = MultipleChoiceAccuracy(tasks=["BoolQ", "piqa", "ARC-Easy"])
    m.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), task="boolq")
    m.update([1, -1], [1, 1], task=["piqa", "arc_easy"])
    out = m.compute()
    assert out["boolq"].item() == pytest.approx(2 / 3)
    assert out["piqa"].item() == 1.0 and out["arc_easy"].item() == 0.0
    assert out["average"].item() == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert out["overall"].item() == pytest.approx(3 / 5)
    with pytest.raises(KeyError):
        m.update([0], [0], task="hellaswag")


def _fill(metrics: dict, part: slice) -> None:
    preds = ["The final answer is 1", "2", "no", "The final answer is 4", "5", "6", "7"]
    golds = ["#### 1", "#### 2", "#### 3", "#### 4", "#### 0", "#### 6", "#### 0"]
    metrics["em"].update(preds[part], golds[part])
    ns, cs = [10, 10, 12, 10, 15, 10, 11], [0, 3, 12, 9, 1, 5, 2]
    metrics["pass"].update(ns[part], cs[part])
    responses = ["I'm sorry", "ok", "ok", "I cannot", "ok", "As an AI", "sure"]
    metrics["refusal"].update(["p"] * 7 if part == slice(None) else ["p"] * len(responses[part]),
                              responses[part])
    tasks = ["boolq", "piqa", "boolq", "piqa", "boolq", "boolq", "piqa"]
    metrics["mc"].update(torch.tensor([0, 1, 1, 0, 1, 0, -1])[part],
                         torch.tensor([0, 1, 0, 0, 1, 1, 1])[part], task=tasks[part])


def _new_metrics() -> dict:
    return {"em": ExactMatch(), "pass": PassAtK(ks=(1, 5, 10)), "refusal": RefusalRate(),
            "mc": MultipleChoiceAccuracy(tasks=["boolq", "piqa"])}


def _flatten(results: dict) -> dict[str, float]:
    flat = {}
    for name, value in results.items():
        if isinstance(value, dict):
            flat.update({f"{name}/{k}": float(v) for k, v in value.items()})
        else:
            flat[name] = float(value)
    return flat


def _reference() -> dict[str, float]:
    metrics = _new_metrics()
    _fill(metrics, slice(None))
    return _flatten({k: m.compute() for k, m in metrics.items()})


def test_merge_state_equals_single_process():
    a, b = _new_metrics(), _new_metrics()
    _fill(a, slice(0, 2))
    _fill(b, slice(2, None))  # uneven split
    for name in a:
        a[name].merge_state(b[name])
    assert _flatten({k: m.compute() for k, m in a.items()}) == pytest.approx(_reference())


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        metrics = _new_metrics()
        _fill(metrics, slice(0, 3) if rank == 0 else slice(3, None))
        result = _flatten({k: m.compute() for k, m in metrics.items()})
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_process_gloo_equals_single_process(tmp_path: Path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = _reference()
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == pytest.approx(expected)
