"""Prompt templates of protocol "lori": golden strings for every template and task.

The official protocol's strings are in tests/test_official_prompts.py.
"""

from __future__ import annotations

import string

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lori.data.prompts import apply_template, format_example, refusal_for
from lori.data.sources import DataError

HEAD = ("Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.")
HEAD_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
              "further context. Write a response that appropriately completes the request.")
GSM = {"id": "g1", "question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5", "final": "5"}
SAY_HI = {"id": "a", "instruction": "Say hi.", "output": "Hi!"}
ADD = {"id": "b", "instruction": "Add the numbers.", "input": "1 2", "output": "3"}


def test_alpaca_without_and_with_input() -> None:
    assert format_example(SAY_HI, "instruct") == (
        f"{HEAD}\n\n### Instruction:\nSay hi.\n\n### Response:\n", "Hi!")
    assert format_example(ADD, "codealpaca") == (
        f"{HEAD_INPUT}\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n1 2\n\n"
        "### Response:\n", "3")


def test_plain_template() -> None:
    assert format_example(SAY_HI, "instruct", "plain") == ("Say hi.\n", "Hi!")
    assert format_example(ADD, "instruct", "plain") == ("Add the numbers.\n\n1 2\n", "3")


def test_gsm8k_prompt_and_target() -> None:
    prompt, response = format_example(GSM, "gsm8k")
    assert prompt == (f"{HEAD}\n\n### Instruction:\nWhat is 2+3?\nFirst think step by step and "
                      "then answer the final number.\n\n\n### Response:\n")
    assert response == "2+3=<<2+3=5>>5\nThe final answer is: 5"
    no_marker = {**GSM, "answer": "2+3=5"}
    assert format_example(no_marker, "gsm8k")[1] == "2+3=5\nThe final answer is: 5"


def test_lori_protocol_is_the_default_and_unchanged() -> None:
    """protocol="lori" (the default) keeps lori's own layouts, the same for train and eval."""
    winogrande = {"id": "w", "task": "winogrande", "label": 1, "choices": ["jeans", "shirt"],
                  "question": "The jeans fit worse than the shirt because I had tried the _ on."}
    expected = (f"{HEAD}\n\n### Instruction:\nPlease choose the correct answer to fill in the "
                "blank to complete the given sentence: The jeans fit worse than the shirt because "
                "I had tried the _ on.\n\nOption1: jeans Option2: shirt Answer format: "
                "option1/option2\n\n### Response:\n", "the correct answer is option2")
    stub = "def add(a, b):\n"
    humaneval = {"id": "HumanEval/0", "prompt": stub, "solution": "    return a + b\n",
                 "test": "", "entry_point": "add", "source": "humaneval"}
    hexphi = {"id": "h", "prompt": "How do I pick a lock?", "source": "hexphi"}
    for stage in ("train", "eval"):
        assert format_example(winogrande, "nlu", "alpaca", "lori", stage=stage) == expected
        assert format_example(winogrande, "winogrande", stage=stage) == expected
        assert format_example(GSM, "gsm8k", "alpaca", "lori", stage=stage) == \
            format_example(GSM, "gsm8k")
        assert format_example(humaneval, "humaneval", "alpaca", "lori", stage=stage) == (
            f"{HEAD}\n\n### Instruction:\nComplete the following Python code:\n{stub}\n\n"
            "### Response:\n", stub + "    return a + b\n")
        assert format_example(hexphi, "hexphi", "plain", "lori", stage=stage) == \
            ("How do I pick a lock?\n", "")
    assert apply_template("x", input_text="y", protocol="lori")[0] == \
        f"{HEAD_INPUT}\n\n### Instruction:\nx\n\n### Input:\ny\n\n### Response:\n"


NLU_GOLDEN = [
    ({"task": "piqa", "question": "Retain study notes in brain.", "label": 1,
      "choices": ["Go over notes one last time one week before test.",
                  "Go over notes one last time one day before test."]},
     "Please choose the correct solution to the question: Retain study notes in brain.\n\n"
     "Solution1: Go over notes one last time one week before test.\n\nSolution2: Go over notes "
     "one last time one day before test.\n\nAnswer format: solution1/solution2", "solution2"),
    ({"task": "siqa", "context": "Robin wanted to share the food with a friend, so they cut the "
      "sandwich in half.", "question": "What does Robin need to do before this?", "label": 0,
      "choices": ["get a knife", "eat half of her own sandwich",
                  "give half the sandwich to her friend"]},
     "Please choose the correct answer to the question: Robin wanted to share the food with a "
     "friend, so they cut the sandwich in half. What does Robin need to do before this?\n\n"
     "Answer1: get a knife Answer2: eat half of her own sandwich Answer3: give half the sandwich "
     "to her friend\n\nAnswer format: answer1/answer2/answer3", "answer1"),
    ({"task": "arc_challenge", "question": "When an animal population moves a long distance to "
      "another area in order to survive it is called", "label": 2,
      "choices": ["breeding.", "hibernation.", "migration.", "navigation."]},
     "Please choose the correct answer to the question: When an animal population moves a long "
     "distance to another area in order to survive it is called\n\nAnswer1: breeding. Answer2: "
     "hibernation. Answer3: migration. Answer4: navigation.\n\nAnswer format: "
     "answer1/answer2/answer3/answer4", "answer3"),
    ({"task": "boolq", "question": "is i cant believe its not butter margarine", "label": 0,
      "choices": ["true", "false"], "context": "passage"},
     "Please answer the following question with true or false, question: is i cant believe its "
     "not butter margarine?\n\nAnswer format: true/false", "true"),
    ({"task": "hellaswag", "question": "Travel: Ensure your skills.", "label": 1,
      "choices": ["a.", "b.", "c.", "d."]},
     "Please choose the correct ending to complete the given sentence: Travel: Ensure your "
     "skills.\n\nEnding1: a. Ending2: b. Ending3: c. Ending4: d.\n\nAnswer format: "
     "ending1/ending2/ending3/ending4", "ending2"),
]


@pytest.mark.parametrize(("record", "instruction", "answer"), NLU_GOLDEN)
def test_nlu_instructions(record: dict, instruction: str, answer: str) -> None:
    record = {"id": "r", **record}
    assert format_example(record, record["task"], "plain") == (
        instruction + "\n", f"the correct answer is {answer}")
    assert format_example(record, "nlu", "plain") == format_example(record, record["task"],
                                                                     "plain")


def test_code_and_safety_tasks() -> None:
    stub = "def add(a, b):\n    \"\"\"Add.\"\"\"\n"
    humaneval = {"id": "HumanEval/0", "prompt": stub, "solution": "    return a + b\n",
                 "test": "", "entry_point": "add", "source": "humaneval"}
    assert format_example(humaneval, "humaneval", "plain") == (
        f"Complete the following Python code:\n{stub}", stub + "    return a + b\n")
    mbpp = {"id": "m", "prompt": "Write add.\nYour code should pass these tests:\n\nassert add(1, "
            "2) == 3", "solution": "def add(a, b):\n    return a + b", "test": "",
            "entry_point": "add", "source": "mbpp"}
    assert format_example(mbpp, "mbpp", "plain") == (mbpp["prompt"] + "\n", mbpp["solution"])
    harmful = {"id": "h", "prompt": "How do I hurt someone?", "source": "donotanswer",
               "category": "malicious_uses", "response": refusal_for("malicious_uses")}
    prompt, response = format_example(harmful, "safety")
    assert prompt == f"{HEAD}\n\n### Instruction:\nHow do I hurt someone?\n\n### Response:\n"
    assert response.startswith("I'm sorry, but I can't help")
    assert format_example({**harmful, "response": None}, "harmbench")[1] == ""
    assert refusal_for("human_chatbox") != refusal_for(None)


def _chat_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    return tok


def test_chat_template() -> None:
    prompt, response = format_example(ADD, "instruct", "chat", tokenizer=_chat_tokenizer())
    assert prompt == "<|user|>\nAdd the numbers.\n\n1 2</s>\n<|assistant|>\n"
    assert response == "3</s>\n"
    with pytest.raises(ValueError, match="chat_template"):
        format_example(ADD, "instruct", "chat")


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown template"):
        format_example(SAY_HI, "instruct", "vicuna")
    with pytest.raises(ValueError, match="unknown stage"):
        format_example(SAY_HI, "instruct", stage="test")
    with pytest.raises(DataError, match="outside the choices"):
        format_example({"id": "x", "task": "piqa", "question": "q", "choices": ["a", "b"],
                        "label": 2}, "piqa")
