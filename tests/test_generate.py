"""Batched generation and option scoring on a tiny random Llama with an offline char tokenizer."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lori.eval.generate import (
    _trim,
    generate,
    generate_from_ids,
    generate_sequential,
    generate_sequential_token_ids,
    generate_token_ids,
)
from lori.eval.scoring import encode_pair, option_logprobs, score_options

VOCAB = 128
PROMPTS = [
    "Q: what is 2+2?",
    "hi",
    "The quick brown fox jumps over",
    "def f(x):",
    "A longer prompt with several words in it, to force padding.",
    "x",
]


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """Char-level tokenizer: 4 specials + printable ASCII + filler tokens = 128 ids; BOS prepended."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\n"]
    fillers = [f"<x{i}>" for i in range(VOCAB - len(specials) - len(chars))]
    vocab = {tok: i for i, tok in enumerate(specials + chars + fillers)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_char_tokenizer()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, num_hidden_layers=2, vocab_size=VOCAB,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return LlamaForCausalLM(cfg).eval()


def test_tokenizer_round_trip(tokenizer):
    ids = tokenizer("ab c")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 5
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab c"


def test_batched_greedy_equals_sequential(model, tokenizer):
    tokenizer.padding_side = "right"
    batched = generate_token_ids(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4)
    single = generate_sequential_token_ids(model, tokenizer, PROMPTS, max_new_tokens=12)
    assert [b[0] for b in batched] == single
    assert tokenizer.padding_side == "right"  # restored
    assert any(len(s) == 12 for s in single)


def test_generate_returns_only_new_text_in_order(model, tokenizer):
    texts = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3, progress=True)
    reference = generate_sequential(model, tokenizer, PROMPTS, max_new_tokens=10)
    assert [t[0] for t in texts] == reference
    for prompt, (text,) in zip(PROMPTS, texts):
        direct = tokenizer(prompt, return_tensors="pt")
        full = model.generate(**direct, max_new_tokens=10, do_sample=False, pad_token_id=0)
        new = tokenizer.decode(full[0, direct["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text == new
        assert not text.startswith(prompt)


def test_batch_size_does_not_change_greedy_output(model, tokenizer):
    a = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=1)
    b = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=len(PROMPTS))
    assert a == b


def test_stop_strings_truncate(model, tokenizer):
    full = generate(model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=6)
    stop_char = next(ch for (t,) in full for ch in t[2:] if ch.strip())
    cut = generate(model, tokenizer, PROMPTS, max_new_tokens=16, batch_size=6, stop=[stop_char])
    for (f,), (c,) in zip(full, cut):
        assert c == f.split(stop_char)[0]
        assert stop_char not in c


def test_sampling_is_seeded_and_shaped(model, tokenizer):
    kw = {"max_new_tokens": 6, "batch_size": 4, "do_sample": True, "temperature": 1.0,
          "top_p": 0.9, "num_return_sequences": 3, "seed": 123}
    a = generate(model, tokenizer, PROMPTS, **kw)
    b = generate(model, tokenizer, PROMPTS, **kw)
    assert a == b
    assert len(a) == len(PROMPTS) and all(len(x) == 3 for x in a)
    with pytest.raises(ValueError):
        generate(model, tokenizer, PROMPTS, num_return_sequences=2)


def test_pad_token_is_restored_when_missing(model):
    tok = make_char_tokenizer()
    tok.pad_token = None
    out = generate(model, tok, PROMPTS[:3], max_new_tokens=4, batch_size=3)
    assert len(out) == 3 and tok.pad_token is None


def _direct_logprob(model, tokenizer, context: str, option: str) -> float:
    ctx_ids, opt_ids = encode_pair(tokenizer, context, option)
    ids = torch.tensor([ctx_ids + opt_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(ctx_ids) + k - 1, t]) for k, t in enumerate(opt_ids))


def test_scoring_matches_direct_logprobs(model, tokenizer):
    contexts = ["Question: pick one.", "hi", "Which animal barks? Answer:"]
    options = [[" answer1", " answer2", " a"], ["x", "yy", "zzz", "w"], [" dog", " cat"]]
    scores = option_logprobs(model, tokenizer, contexts, options, batch_size=3)
    for ctx, opts, per_ctx in zip(contexts, options, scores):
        for opt, (lp, n) in zip(opts, per_ctx):
            assert lp == pytest.approx(_direct_logprob(model, tokenizer, ctx, opt), abs=1e-4)
            assert n == len(encode_pair(tokenizer, ctx, opt)[1])
    for norm in ("sum", "mean", "chars"):
        picks = score_options(model, tokenizer, contexts, options, batch_size=2, normalize=norm)
        for ctx, opts, per_ctx, pick in zip(contexts, options, scores, picks):
            direct = [_direct_logprob(model, tokenizer, ctx, o) for o in opts]
            denom = {"sum": [1] * len(opts), "mean": [n for _, n in per_ctx],
                     "chars": [len(o) for o in opts]}[norm]
            values = [d / k for d, k in zip(direct, denom)]
            assert pick == max(range(len(values)), key=values.__getitem__)


def test_scoring_rejects_bad_input(model, tokenizer):
    with pytest.raises(ValueError):
        score_options(model, tokenizer, ["a"], [["x"], ["y"]])
    with pytest.raises(ValueError):
        score_options(model, tokenizer, ["a"], [["x"]], normalize="bogus")


# --- generation from token ids (protocol official) --------------------------------------------


def test_generate_from_ids_equals_generate_on_the_same_tokens(model, tokenizer):
    ids = tokenizer(PROMPTS)["input_ids"]  # with BOS, as generate() encodes them
    from_ids = generate_from_ids(model, tokenizer, ids, max_new_tokens=10, batch_size=4)
    assert from_ids == generate_token_ids(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3)
    no_bos = [row[1:] for row in ids]  # the ids are used as given: no special token is added
    assert generate_from_ids(model, tokenizer, no_bos, max_new_tokens=10, batch_size=4) != from_ids


def test_generate_from_ids_max_length_counts_prompt_and_generation(model, tokenizer):
    ids = tokenizer(PROMPTS)["input_ids"]
    limit = 20
    out = generate_from_ids(model, tokenizer, ids, max_new_tokens=50, max_length=limit, batch_size=6)
    free = generate_from_ids(model, tokenizer, ids, max_new_tokens=50, batch_size=6)
    for prompt, (seq,), (longer,) in zip(ids, out, free):
        room = max(limit - len(prompt), 0)
        assert len(seq) <= room and seq == longer[:room]  # cut at its own budget, tokens unchanged
    assert out[PROMPTS.index(PROMPTS[4])] == [[]]  # 60 prompt tokens: no room at all


class RecordingModel(torch.nn.Module):
    """Stands in for a causal LM: records generate()'s kwargs, emits ids 5, 6, EOS (2), 7, ..."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = type("Cfg", (), {"eos_token_id": 2})()
        self.calls: list[dict] = []
        self.device = torch.device("cpu")

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, **kwargs})
        rows = input_ids.shape[0] * kwargs["num_return_sequences"]
        new = torch.tensor([5, 6, 2, 7, 8] * 20)[: kwargs["max_new_tokens"]]
        return torch.cat([input_ids.repeat_interleave(kwargs["num_return_sequences"], 0),
                          new.repeat(rows, 1)], dim=1)


def test_generate_from_ids_passes_the_sampling_settings(tokenizer):
    fake = RecordingModel()
    out = generate_from_ids(fake, tokenizer, [[9, 10, 11], [12]], max_new_tokens=512, max_length=8,
                            do_sample=True, temperature=0.2, top_p=0.95, num_return_sequences=3,
                            batch_size=2, keep_eos=True, seed=0)
    call = fake.calls[0]
    assert (call["do_sample"], call["temperature"], call["top_p"], call["top_k"]) == (True, 0.2, 0.95, 0)
    assert call["num_return_sequences"] == 3 and call["max_new_tokens"] == 7  # 8 - the shortest prompt
    assert call["input_ids"].tolist() == [[9, 10, 11], [0, 0, 12]]  # left padding with the pad id
    assert call["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out == [[[5, 6, 2]] * 3, [[5, 6, 2]] * 3]  # kept EOS; the 3-token prompt's budget is 5
    greedy = generate_from_ids(fake, tokenizer, [[9]], max_new_tokens=4)
    assert greedy == [[[5, 6]]] and fake.calls[-1]["do_sample"] is False and fake.calls[-1]["top_k"] is None


def test_trim_keeps_the_eos_on_request():
    row = torch.tensor([5, 6, 2, 7, 0])
    assert _trim(row, {2}, 0) == [5, 6] and _trim(row, {2}, 0, keep_eos=True) == [5, 6, 2]
    assert _trim(torch.tensor([5, 0, 0]), {2}, 0, keep_eos=True) == [5]  # stopped, padded, no EOS
