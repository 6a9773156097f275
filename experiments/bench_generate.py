"""Benchmark batched, left-padded, KV-cached generation against one-prompt-at-a-time generation.

Both paths decode greedily the same GSM8K-style prompts in the same run; throughput is generated
tokens (up to EOS) per second.  Prints ONE JSON line with the tokens/s of each path, their ratio
(target >= 4x) and how many prompts got identical text from both paths.

    python experiments/bench_generate.py                 # the default SmolLM2-135M-Instruct
    python experiments/bench_generate.py --model PATH    # a local HF folder or .gguf
    python experiments/bench_generate.py --tiny          # a tiny random Llama (smoke test)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lori.eval.generate import generate_sequential_token_ids, generate_token_ids

NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis"]
ITEMS = ["clips", "apples", "books", "marbles", "stickers", "pencils", "cookies", "shells"]


def gsm8k_like_prompts(n: int) -> list[str]:
    """``n`` arithmetic word problems of varying length (so batches need padding)."""
    prompts = []
    for i in range(n):
        name, item = NAMES[i % len(NAMES)], ITEMS[(3 * i) % len(ITEMS)]
        a, b, c = 12 + 7 * i, 3 + i % 5, 2 + i % 4
        extra = " She then gives half of what is left to her brother." * (i % 3)
        prompts.append(
            f"{name} has {a} {item}. She buys {b} more packs with {c} {item} in each pack."
            f"{extra} How many {item} does {name} have now? Solve step by step and end with "
            f"'The final answer is N'."
        )
    return prompts


def char_tokenizer():
    """Offline char-level tokenizer with 128 ids (matches the tiny Llama's vocabulary)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\n"]
    fillers = [f"<x{i}>" for i in range(128 - len(specials) - len(chars))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars + fillers)},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    # EOS is the last filler id, which the random model rarely predicts (``</s>`` it often does)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=fillers[-1],
                                   pad_token="<pad>", unk_token="<unk>")


def load(args: argparse.Namespace):
    """(model, tokenizer) for --tiny, --model or the default base model."""
    if args.tiny:
        from lori.training.base_model import tiny_llama

        tokenizer = char_tokenizer()
        model = tiny_llama(0, max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model.eval(), tokenizer
    from lori.training.base_model import load_base_model

    return load_base_model(args.model)


def format_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Apply the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    return prompts


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path/name (default: base model)")
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama instead")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args)
    model.eval()
    prompts = format_prompts(tokenizer, gsm8k_like_prompts(args.prompts))
    generate_token_ids(model, tokenizer, prompts[:2], max_new_tokens=2, batch_size=2)  # warm-up
    batched, t_batched = timed(lambda: generate_token_ids(
        model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size))
    single, t_single = timed(lambda: generate_sequential_token_ids(
        model, tokenizer, prompts, max_new_tokens=args.max_new_tokens))
    tok_batched = sum(len(rows[0]) for rows in batched)
    tok_single = sum(len(ids) for ids in single)
    rate_b, rate_s = tok_batched / t_batched, max(tok_single, 1) / t_single
    print(json.dumps({
        "model": "tiny-random-llama" if args.tiny else (args.model or "default"),
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "batched_tokens": tok_batched, "batched_s": round(t_batched, 3),
        "batched_tokens_per_s": round(rate_b, 2),
        "sequential_tokens": tok_single, "sequential_s": round(t_single, 3),
        "sequential_tokens_per_s": round(rate_s, 2),
        "speedup": round(rate_b / rate_s, 2),
        "identical_outputs": sum(b[0] == s for b, s in zip(batched, single)),
    }))


if __name__ == "__main__":
    main()
