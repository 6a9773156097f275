"""Batched generation and option scoring on a tiny random Llama with an offline char tokenizer."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lori.eval.generate import (
    generate,
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
