"""Tokenisation, collation and the TaskDataModule, with a char-level tokenizer built here."""

from __future__ import annotations

import json
import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lori.data import DataError, TaskDataModule
from lori.data.tokenize import (
    IGNORE_INDEX,
    collate,
    tokenize_prompts,
    tokenize_records,
    tokenize_records_with_report,
)

SAY_HI = {"id": "a", "instruction": "Say hi.", "output": "Hi!"}  # plain prompt "Say hi.\n"
LONG = {"id": "b", "instruction": "Tell a story.", "output": "Once upon a time."}


def char_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per character; ids 0-3 are <pad> <unk> <s> </s>; optional BOS prefix."""
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    if bos:
        model.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture
def char_tok() -> PreTrainedTokenizerFast:
    return char_tokenizer()


def test_labels_cover_response_only(char_tok) -> None:
    ds = tokenize_records([SAY_HI], char_tok, "instruct", "plain", max_length=64)
    assert ds.column_names == ["input_ids", "attention_mask", "labels"]
    row = ds[0]
    n_prompt = len("Say hi.\n")
    assert row["input_ids"] == char_tok("Say hi.\nHi!")["input_ids"] + [3]  # EOS appended
    assert row["labels"] == [IGNORE_INDEX] * n_prompt + row["input_ids"][n_prompt:]
    assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_bos_is_part_of_the_prompt() -> None:
    tok = char_tokenizer(bos=True)
    row = tokenize_records([SAY_HI], tok, "instruct", "plain", max_length=64)[0]
    assert row["input_ids"][0] == 2 and row["input_ids"].count(2) == 1
    assert row["labels"][: 1 + len("Say hi.\n")] == [IGNORE_INDEX] * 9
    assert row["labels"][9:] == row["input_ids"][9:] and row["labels"][-1] == 3


def test_alpaca_prompt_tokens_are_masked(char_tok) -> None:
    row = tokenize_records([SAY_HI], char_tok, "instruct", "alpaca", max_length=512)[0]
    n_labelled = sum(label != IGNORE_INDEX for label in row["labels"])
    assert n_labelled == len("Hi!") + 1


def test_truncation_and_dropping(char_tok) -> None:
    ds, report = tokenize_records_with_report([SAY_HI, LONG], char_tok, "instruct", "plain",
                                              max_length=10)
    # "Say hi.\n" (8) keeps 2 response tokens; "Tell a story.\n" (14) cannot fit: dropped
    assert (report.total, report.kept, report.dropped, report.truncated) == (2, 1, 1, 1)
    row = ds[0]
    assert len(row["input_ids"]) == 10 and row["input_ids"][-1] != 3  # EOS cut off
    assert row["labels"] == [IGNORE_INDEX] * 8 + row["input_ids"][8:]
    _, report = tokenize_records_with_report([SAY_HI], char_tok, "instruct", "plain",
                                             max_length=8)
    assert report.kept == 0 and report.dropped == 1
    ds, report = tokenize_records_with_report([], char_tok, "instruct", max_length=8)
    assert len(ds) == 0 and report.total == 0


def test_collate_right_and_left_padding(char_tok) -> None:
    ds = tokenize_records([SAY_HI, LONG], char_tok, "instruct", "plain", max_length=64)
    short, long_ = ds[0], ds[1]
    n_short, n_long = len(short["input_ids"]), len(long_["input_ids"])
    right = collate([short, long_], pad_id=0)
    assert right["input_ids"].shape == (2, n_long) and right["input_ids"].dtype == torch.long
    assert right["input_ids"][0, n_short:].eq(0).all()
    assert right["attention_mask"][0].tolist() == [1] * n_short + [0] * (n_long - n_short)
    assert right["labels"][0, n_short:].eq(IGNORE_INDEX).all()
    assert right["labels"][1].tolist() == long_["labels"]
    left = collate([short, long_], pad_id=0, padding_side="left")
    assert left["input_ids"][0, : n_long - n_short].eq(0).all()
    assert left["input_ids"][0, n_long - n_short:].tolist() == short["input_ids"]
    assert left["labels"][0, : n_long - n_short].eq(IGNORE_INDEX).all()
    assert collate([short], pad_id=0, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0
    with pytest.raises(ValueError):
        collate([short], pad_id=0, padding_side="middle")


def test_tokenize_prompts(char_tok) -> None:
    ds = tokenize_prompts([SAY_HI, LONG], char_tok, "instruct", "plain")
    assert ds[0]["input_ids"] == char_tok("Say hi.\n")["input_ids"] and ds[1]["index"] == 1
    cut = tokenize_prompts([LONG], char_tok, "instruct", "plain", max_length=4)
    assert cut[0]["input_ids"] == char_tok("ry.\n")["input_ids"]  # keeps the end
    batch = collate([ds[0], ds[1]], pad_id=0, padding_side="left")
    assert batch["index"] == [0, 1] and batch["input_ids"][0, 0] == 0


def test_chat_eos_not_doubled() -> None:
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    row = tokenize_records([SAY_HI], tok, "instruct", "chat", max_length=256)[0]
    assert row["input_ids"].count(3) == 2  # one </s> per turn, none added
    response = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert response == tok("Hi!</s>\n", add_special_tokens=False)["input_ids"]


def _gsm8k_module(**kwargs) -> TaskDataModule:
    kwargs = {"task": "gsm8k", "max_length": 1024, "batch_size": 4, **kwargs}
    module = TaskDataModule(**kwargs)
    module.set_tokenizer(char_tokenizer())
    return module


def test_gsm8k_default_split_and_loaders() -> None:
    module = _gsm8k_module(max_train_examples=12, held_out=200)
    module.check_data()
    assert len(module.held_out_records) == 200
    full = TaskDataModule(held_out=200)
    full.set_tokenizer(char_tokenizer())
    full.check_data()
    assert len(full.train_records) == 1119 and len(full.held_out_records) == 200
    assert {r["id"] for r in full.train_records}.isdisjoint(r["id"] for r in full.held_out_records)
    assert [r["id"] for r in module.train_records] == [r["id"] for r in full.train_records[:12]]
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    pad = batch["attention_mask"] == 0
    assert batch["labels"][pad].eq(IGNORE_INDEX).all()
    assert module.reports["train"].kept == 12


def test_train_shuffle_is_seeded_and_val_keeps_last_batch() -> None:
    orders = []
    for _ in range(2):
        module = _gsm8k_module(max_train_examples=8, held_out=10, eval_batch_size=4)
        module.setup("fit")
        orders.append([b["input_ids"].sum(1).tolist() for b in module.train_dataloader()])
        assert [len(b["input_ids"]) for b in module.val_dataloader()] == [4, 4, 2]
    assert orders[0] == orders[1]
    other = _gsm8k_module(max_train_examples=8, held_out=10, shuffle_seed=1)
    other.setup("fit")
    assert [b["input_ids"].sum(1).tolist() for b in other.train_dataloader()] != orders[0]


def test_generation_dataloader_left_pads() -> None:
    module = _gsm8k_module(held_out=3, max_train_examples=4)
    batch = next(iter(module.generation_dataloader(batch_size=3)))
    assert batch["input_ids"].shape[0] == 3 and batch["index"] == [0, 1, 2]
    assert batch["attention_mask"][:, -1].eq(1).all()  # left padding: prompts end together


def test_local_train_file_and_tokenizer_path(tmp_path) -> None:
    rows = [{"prompt_text": f"Repeat {i}.", "completion": str(i)} for i in range(10)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tok_dir = tmp_path / "tok"
    char_tokenizer().save_pretrained(tok_dir)
    module = TaskDataModule(task="instruct", tokenizer=str(tok_dir), train_file=str(path),
                            field_map={"instruction": "prompt_text", "output": "completion"},
                            held_out=0.2, template="plain", batch_size=3, max_length=32)
    module.setup("fit")
    assert len(module.train_dataset) == 8 and len(module.val_dataset) == 2
    assert sum(len(b["input_ids"]) for b in module.train_dataloader()) == 8  # no drop_last
    no_val = TaskDataModule(task="instruct", tokenizer=str(tok_dir), train_file=str(path),
                            field_map={"instruction": "prompt_text", "output": "completion"},
                            held_out=0)
    assert no_val.val_dataloader() == []


def test_clear_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="no tokenizer"):
        TaskDataModule(task="gsm8k").check_data()
    with pytest.raises(DataError, match="cannot load tokenizer"):
        TaskDataModule(task="gsm8k", tokenizer=str(tmp_path / "missing")).check_data()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    module = TaskDataModule(task="gsm8k", train_file=str(empty))
    module.set_tokenizer(char_tokenizer())
    with pytest.raises(DataError, match="no records"):
        module.setup("fit")
    with pytest.raises(DataError, match="train_file"):
        TaskDataModule(task="codealpaca").check_data()
    with pytest.raises(DataError, match="unknown task"):
        TaskDataModule(task="sql").check_data()
    with pytest.raises(DataError, match="does not fit"):
        _gsm8k_module(held_out=5000).check_data()
    with pytest.raises(DataError, match="unknown template"):
        _gsm8k_module(template="vicuna").check_data()
    with pytest.raises(DataError, match="every training example was dropped"):
        _gsm8k_module(max_length=16, max_train_examples=4).setup("fit")


# ---- protocol "official" (get_datasets.py tokenize_batch_element l.309-372) -----------------

GSM = {"id": "g", "question": "What is 20+3?", "answer": "2+3=5\n#### 5", "final": "5"}
GSM_PROMPT = ("What is 20+3?\nAnswer the above question. First think step by step and then "
              "answer the final number.\n")  # 100 characters = 100 tokens of char_tokenizer
GSM_TARGET = "2+3=5\nThe final answer is:  5"  # 29 tokens, 30 with EOS


def _chars(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_official_no_bos_eos_appended_labels_on_the_response() -> None:
    tok = char_tokenizer(bos=True)  # lori would put BOS before the prompt
    lori_row = tokenize_records([GSM], tok, "gsm8k", max_length=512)[0]
    assert lori_row["input_ids"][0] == 2
    ds, report = tokenize_records_with_report([GSM], tok, "gsm8k", max_length=512,
                                              protocol="official")
    row = ds[0]
    assert (len(GSM_PROMPT), len(GSM_TARGET)) == (100, 29)
    assert row["input_ids"] == _chars(tok, GSM_PROMPT) + _chars(tok, GSM_TARGET) + [3]
    assert 2 not in row["input_ids"] and row["input_ids"][-1] == 3
    assert row["labels"] == [IGNORE_INDEX] * 100 + row["input_ids"][100:]
    assert row["attention_mask"] == [1] * 130
    assert (report.kept, report.dropped, report.truncated, report.prompt_truncated) == (1, 0, 0, 0)


@pytest.mark.parametrize(("max_length", "max_prompt_length", "n_prompt", "n_response"), [
    (130, 64, 100, 30),  # 100 + 30 fits exactly: nothing cut
    (129, 99, 99, 30),   # one too long: the prompt keeps its first 99 tokens, which is enough
    (120, 64, 64, 30),   # the prompt cut to 64 makes it fit: the response keeps its EOS
    (80, 64, 64, 16),    # still too long: the response keeps max_length - max_prompt_length = 16
    (110, 105, 100, 5),  # a prompt shorter than max_prompt_length stays; the response keeps 5
])
def test_official_over_length_rule(char_tok, max_length, max_prompt_length, n_prompt,
                                   n_response) -> None:
    ds, report = tokenize_records_with_report([GSM], char_tok, "gsm8k", max_length=max_length,
                                              protocol="official",
                                              max_prompt_length=max_prompt_length)
    row = ds[0]
    full_response = _chars(char_tok, GSM_TARGET) + [3]
    assert row["input_ids"] == (_chars(char_tok, GSM_PROMPT)[:n_prompt]
                                + full_response[:n_response])
    assert row["labels"] == [IGNORE_INDEX] * n_prompt + full_response[:n_response]
    assert (report.kept, report.dropped) == (1, 0)  # nothing is dropped under official
    assert report.prompt_truncated == int(n_prompt < 100)
    assert report.truncated == int(n_response < 30)


def test_official_keeps_what_lori_drops(char_tok) -> None:
    # the prompt alone (100) fills max_length 100: lori drops it, official cuts the prompt
    _, lori = tokenize_records_with_report([GSM], char_tok, "gsm8k", max_length=100)
    assert (lori.kept, lori.dropped) == (0, 1)
    ds, report = tokenize_records_with_report([GSM], char_tok, "gsm8k", max_length=100,
                                              protocol="official", max_prompt_length=50)
    assert (report.kept, report.dropped) == (1, 0) and len(ds[0]["input_ids"]) == 80
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_records([GSM], char_tok, "gsm8k", max_length=256, protocol="official")
    with pytest.raises(DataError, match="unknown protocol 'paper'"):
        tokenize_records([GSM], char_tok, "gsm8k", protocol="paper")


def test_official_duplicate_prompts_first_position_last_target(char_tok) -> None:
    records = [{"id": "1", "instruction": "Say hi.", "output": "Hi!"},
               {"id": "2", "instruction": "Say bye.", "output": "Bye!"},
               {"id": "3", "instruction": "Say hi.", "output": "Hello!"}]
    ds, report = tokenize_records_with_report(records, char_tok, "instruct", max_length=512,
                                              protocol="official")
    assert (report.total, report.kept, report.duplicates, report.dropped) == (3, 2, 1, 0)
    responses = [[t for t, label in zip(r["input_ids"], r["labels"]) if label != IGNORE_INDEX]
                 for r in ds]
    assert responses == [_chars(char_tok, "Hello!") + [3], _chars(char_tok, "Bye!") + [3]]
    prompts = ["".join(char_tok.convert_ids_to_tokens(
        [t for t, label in zip(r["input_ids"], r["labels"]) if label == IGNORE_INDEX])) for r in ds]
    assert "Say hi." in prompts[0] and "Say bye." in prompts[1]
    # lori keeps every example
    assert len(tokenize_records(records, char_tok, "instruct", max_length=512)) == 3


def test_official_refuses_eos_inside_the_text(char_tok) -> None:
    record = {"id": "e", "instruction": "Say hi.", "output": "Hi!</s>"}
    with pytest.raises(DataError, match="response contains the EOS token"):
        tokenize_records([record], char_tok, "instruct", max_length=512, protocol="official")


def test_official_eval_prompts() -> None:
    tok = char_tokenizer(bos=True)
    ds = tokenize_prompts([GSM], tok, "gsm8k", protocol="official")  # max_length 512 / 256
    assert ds[0]["input_ids"] == _chars(tok, GSM_PROMPT)  # no BOS, nothing cut
    # the gold target decides: 100 + 30 > 120, so the prompt keeps its first 64 tokens
    cut = tokenize_prompts([GSM], tok, "gsm8k", protocol="official", max_length=120,
                           max_prompt_length=64)
    assert cut[0]["input_ids"] == _chars(tok, GSM_PROMPT)[:64]
    fits = tokenize_prompts([GSM], tok, "gsm8k", protocol="official", max_length=130,
                            max_prompt_length=64)
    assert fits[0]["input_ids"] == _chars(tok, GSM_PROMPT)
    # HumanEval as bigcode: the stripped stub, the tokenizer's special tokens, first max_length
    stub = {"id": "HumanEval/0", "prompt": "\ndef add(a, b):\n", "solution": "    return a+b\n",
            "test": "", "entry_point": "add", "source": "humaneval"}
    he = tokenize_prompts([stub], tok, "humaneval", protocol="official")
    assert he[0]["input_ids"] == [2] + _chars(tok, "def add(a, b):")
    short = tokenize_prompts([stub], tok, "humaneval", protocol="official", max_length=5)
    assert short[0]["input_ids"] == [2] + _chars(tok, "def ")
    assert tokenize_prompts([stub], tok, "humaneval")[0]["input_ids"][0] == 2  # lori: with BOS


def _instruct_module(tmp_path, n: int = 10, **kwargs) -> TaskDataModule:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"Repeat {i}.", "output": str(i)})
                              for i in range(n)))
    module = TaskDataModule(**{"task": "instruct", "train_file": str(path), "held_out": 0,
                               "template": "plain", "batch_size": 3, "max_length": 512,
                               **kwargs})
    module.set_tokenizer(char_tokenizer())
    return module


def test_official_drops_the_incomplete_last_batch(tmp_path) -> None:
    lori = _instruct_module(tmp_path)
    assert [len(b["input_ids"]) for b in lori.train_dataloader()] == [3, 3, 3, 1]
    official = _instruct_module(tmp_path, protocol="official")
    loader = official.train_dataloader()
    assert [len(b["input_ids"]) for b in loader] == [3, 3, 3] and len(loader) == 3
    # the first 9 of lori's epoch permutation: dropping the tail keeps the order
    sampler = lori.train_dataloader().sampler
    assert len(list(sampler)) == 10 and list(loader.sampler) == list(sampler)[:9]
    # examples per optimizer step = global_batch_size: (10 // 6) * 6 = 6 per epoch
    grouped = _instruct_module(tmp_path, protocol="official", global_batch_size=6)
    assert [len(b["input_ids"]) for b in grouped.train_dataloader()] == [3, 3]
    with pytest.raises(DataError, match="fill no batch of 12"):
        _instruct_module(tmp_path, protocol="official", global_batch_size=12).train_dataloader()


def test_official_sampler_resumes_and_splits_ranks() -> None:
    from lori.data.datamodule import ResumableSampler

    data = list(range(10))
    plain = list(ResumableSampler(data, batch_size=3, seed=5))
    s = ResumableSampler(data, batch_size=3, seed=5, step_examples=6)
    assert list(s) == plain[:6] and len(s) == 6
    s.set_epoch(1)
    epoch1 = list(s)
    s.set_epoch(1)
    s.skip_batches = 1
    assert list(s) == epoch1[3:]  # a resumed epoch skips its trained batch
    assert list(s) == epoch1
    ranks = [ResumableSampler(data, 2, 5, num_replicas=2, rank=k, step_examples=4) for k in (0, 1)]
    r0, r1 = (list(r) for r in ranks)
    assert len(r0) == len(r1) == len(ranks[0]) == 4 and sorted(r0 + r1) == sorted(plain[:8])
    with pytest.raises(DataError, match="multiple"):
        ResumableSampler(data, 2, 5, num_replicas=2, step_examples=3)


def test_official_settings_are_checked(tmp_path) -> None:
    with pytest.raises(DataError, match="no chat template"):
        _instruct_module(tmp_path, protocol="official", template="chat").check_data()
    with pytest.raises(DataError, match="max_prompt_length=512, max_length=512"):
        _instruct_module(tmp_path, protocol="official", max_prompt_length=512).check_data()
    with pytest.raises(DataError, match="unknown protocol 'paper'"):
        _instruct_module(tmp_path, protocol="paper").check_data()
    module = _instruct_module(tmp_path, protocol="official", max_prompt_length=100)
    module.setup("fit")
    assert module.reports["train"].protocol == "official"
    assert "protocol official" in str(module.reports["train"])
    batch = next(iter(module.generation_dataloader(module.train_records[:2], batch_size=2)))
    assert 2 not in batch["input_ids"].tolist()[0]  # no BOS in official eval prompts


def test_paper_sets_without_a_file_are_refused() -> None:
    for task in ("codealpaca", "saferpaca", "commonsense"):
        with pytest.raises(DataError, match="commonsense_170k and HEx-PHI are not available "
                                            "offline\\): set train_file"):
            TaskDataModule(task=task).check_data()
