"""Batched text generation that returns ONLY the newly generated text.

:func:`generate` sorts the prompts by token length (longest first), batches them with LEFT padding
so every prompt ends at the same position, runs ``model.generate(..., use_cache=True)`` (KV cache),
decodes only the tokens after the padded prompt, cuts at the first EOS and at stop strings, and
returns the results in the original prompt order.  The tokenizer's ``padding_side`` (and a pad
token borrowed from EOS, if it had none) is restored afterwards.

:func:`generate_sequential` is the one-prompt-at-a-time reference (no padding at all); greedy
decoding gives the same tokens as :func:`generate` up to floating-point ties.

:func:`generate_from_ids` takes prompts already tokenised (``lori.data.tokenize.tokenize_prompts``
under ``protocol: official``: no BOS, the official over-length rule) and returns the new token ids;
its ``max_length`` counts prompt + generated tokens per prompt (bigcode's ``max_length_generation``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria

from lori.eval.answers import truncate_at_stop

TokenIds = list[int]


class StopOnStrings(StoppingCriteria):
    """Per-sequence stop once the generated part (after ``prompt_len``) contains a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, list(stop), prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:],
                                            skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def left_padding(tokenizer: PreTrainedTokenizerBase) -> Iterator[PreTrainedTokenizerBase]:
    """Temporarily set ``padding_side="left"`` (and pad = EOS if no pad token); restore after."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _trim(ids: torch.Tensor, eos_ids: set[int], pad_id: int | None,
          keep_eos: bool = False) -> TokenIds:
    """Token ids before the first EOS (and it, with ``keep_eos``), without trailing padding."""
    out, eos = [], []
    for token in ids.tolist():
        if token in eos_ids:
            eos = [token] if keep_eos else []
            break
        out.append(token)
    while out and out[-1] == pad_id:
        out.pop()
    return out + eos


def _generate_kwargs(do_sample: bool, temperature: float, top_p: float,
                     num_return_sequences: int, max_new_tokens: int) -> dict[str, Any]:
    if num_return_sequences > 1 and not do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy is deterministic)")
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                              "num_return_sequences": num_return_sequences, "use_cache": True}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.inference_mode()
def _generate_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    prompts: Sequence[str], stop: Sequence[str] | None,
                    gen_kwargs: dict[str, Any]) -> list[TokenIds]:
    """Generate for one left-padded batch; rows are prompt-major (``num_return_sequences`` each)."""
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
    prompt_len = enc["input_ids"].shape[1]
    criteria = [StopOnStrings(tokenizer, stop, prompt_len)] if stop else None
    out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id,
                         stopping_criteria=criteria, **gen_kwargs)
    eos_ids = _eos_ids(model, tokenizer)
    return [_trim(row, eos_ids, tokenizer.pad_token_id) for row in out[:, prompt_len:].cpu()]


def _decode(tokenizer: PreTrainedTokenizerBase, ids: TokenIds, stop: Sequence[str] | None) -> str:
    return truncate_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)


def generate_token_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
    max_new_tokens: int = 256, batch_size: int = 8, do_sample: bool = False,
    temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1,
    stop: Sequence[str] | None = None, progress: bool = False, seed: int | None = None,
) -> list[list[TokenIds]]:
    """Like :func:`generate` but returns the new token ids (cut at the first EOS)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gen_kwargs = _generate_kwargs(do_sample, temperature, top_p, num_return_sequences,
                                  max_new_tokens)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    results: list[list[TokenIds]] = [[] for _ in prompts]
    try:
        with left_padding(tokenizer):
            lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
            order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
            bar = tqdm(total=len(prompts), desc="generate", disable=not progress)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                rows = _generate_batch(model, tokenizer, [prompts[i] for i in idx], stop,
                                       gen_kwargs)
                for j, i in enumerate(idx):
                    results[i] = rows[j * num_return_sequences:(j + 1) * num_return_sequences]
                bar.update(len(idx))
            bar.close()
    finally:
        model.train(was_training)
    return results


def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
    max_new_tokens: int = 256, batch_size: int = 8, do_sample: bool = False,
    temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1,
    stop: Sequence[str] | None = None, progress: bool = False, seed: int | None = None,
) -> list[list[str]]:
    """Generate continuations for many prompts, batched with left padding and the KV cache.

    Args:
        model: a causal LM (put in eval mode for the call; its mode is restored).
        tokenizer: its tokenizer (``padding_side`` is restored afterwards).
        prompts: already formatted prompts (apply any chat template beforehand).
        max_new_tokens: generation budget per sequence.
        batch_size: prompts per ``model.generate`` call.
        do_sample: sample (``True``) or greedy decode.
        temperature: sampling temperature (only with ``do_sample``).
        top_p: nucleus threshold (only with ``do_sample``).
        num_return_sequences: samples per prompt (``> 1`` needs ``do_sample``).
        stop: stop strings; a sequence stops generating once its new text contains one, and the
            returned text is cut before the earliest one.
        progress: show a tqdm bar.
        seed: ``torch.manual_seed`` before generating (sampled outputs still depend on how the
            prompts are batched).

    Returns:
        For each prompt (input order), ``num_return_sequences`` strings of NEW text only.
    """
    ids = generate_token_ids(model, tokenizer, prompts, max_new_tokens, batch_size, do_sample,
                             temperature, top_p, num_return_sequences, stop, progress, seed)
    return [[_decode(tokenizer, seq, stop) for seq in per_prompt] for per_prompt in ids]


@torch.inference_mode()
def generate_sequential_token_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
    max_new_tokens: int = 256, stop: Sequence[str] | None = None, progress: bool = False,
) -> list[TokenIds]:
    """Greedy reference: one unpadded prompt at a time; new token ids cut at the first EOS."""
    was_training = model.training
    model.eval()
    gen_kwargs = _generate_kwargs(False, 1.0, 1.0, 1, max_new_tokens)
    eos_ids = _eos_ids(model, tokenizer)
    if not eos_ids and tokenizer.pad_token_id is None:
        raise ValueError("the model/tokenizer define neither an EOS nor a pad token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    out: list[TokenIds] = []
    try:
        for prompt in tqdm(prompts, desc="generate (sequential)", disable=not progress):
            enc = tokenizer(prompt, return_tensors="pt").to(model.device)
            prompt_len = enc["input_ids"].shape[1]
            criteria = [StopOnStrings(tokenizer, stop, prompt_len)] if stop else None
            row = model.generate(**enc, pad_token_id=pad_id, stopping_criteria=criteria,
                                 **gen_kwargs)[0, prompt_len:]
            out.append(_trim(row.cpu(), eos_ids, pad_id))
    finally:
        model.train(was_training)
    return out


def generate_sequential(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
    max_new_tokens: int = 256, stop: Sequence[str] | None = None, progress: bool = False,
) -> list[str]:
    """Greedy one-at-a-time reference path (used by tests and the benchmark); new text only."""
    ids = generate_sequential_token_ids(model, tokenizer, prompts, max_new_tokens, stop, progress)
    return [_decode(tokenizer, seq, stop) for seq in ids]


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token rows padded on the left to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


@torch.inference_mode()
def _generate_id_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       rows: Sequence[Sequence[int]], budgets: Sequence[int],
                       stop: Sequence[str] | None, keep_eos: bool, pad_id: int,
                       gen_kwargs: dict[str, Any]) -> list[TokenIds]:
    """One left-padded batch of token rows; each row's new ids cut to its own budget."""
    n = gen_kwargs["num_return_sequences"]
    top = max(budgets)
    if top <= 0:  # no room at all (bigcode returns the prompt itself: an empty completion)
        return [[] for _ in range(len(rows) * n)]
    ids, mask = _left_pad(rows, pad_id)
    criteria = [StopOnStrings(tokenizer, stop, ids.shape[1])] if stop else None
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                         pad_token_id=pad_id, stopping_criteria=criteria,
                         **{**gen_kwargs, "max_new_tokens": top})
    new = out[:, ids.shape[1]:].cpu()
    eos_ids = _eos_ids(model, tokenizer)
    return [_trim(new[j, :max(budgets[j // n], 0)], eos_ids, pad_id, keep_eos)
            for j in range(new.shape[0])]


def generate_from_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 256, batch_size: int = 8,
    do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
    num_return_sequences: int = 1, max_length: int | None = None,
    stop: Sequence[str] | None = None, keep_eos: bool = False, progress: bool = False,
    seed: int | None = None,
) -> list[list[TokenIds]]:
    """Generate from prompts given as token ids (left-padded batches, longest first).

    Args:
        model: a causal LM (put in eval mode for the call; its mode is restored).
        tokenizer: its tokenizer (pad id, EOS and the stop strings' decoding).
        prompt_ids: one token list per prompt, used as given (no special tokens added).
        max_new_tokens: generation budget per sequence.
        batch_size: prompts per ``model.generate`` call.
        do_sample: sample (``top_k`` 0: nucleus only) or greedy decode.
        temperature: sampling temperature (only with ``do_sample``).
        top_p: nucleus threshold (only with ``do_sample``).
        num_return_sequences: samples per prompt (``> 1`` needs ``do_sample``).
        max_length: a limit on prompt + new tokens per prompt (each prompt gets
            ``min(max_new_tokens, max_length - len(prompt))`` new tokens, none if that is <= 0).
        stop: stop strings: a sequence stops generating once its new text contains one (the
            returned ids are NOT cut at them: cut the decoded text).
        keep_eos: keep the EOS token that ended a sequence as its last id.
        progress: show a tqdm bar.
        seed: ``torch.manual_seed`` before generating.

    Returns:
        For each prompt (input order), ``num_return_sequences`` lists of new token ids, cut at the
        first EOS (excluded unless ``keep_eos``) and at the prompt's budget.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gen_kwargs = _generate_kwargs(do_sample, temperature, top_p, num_return_sequences,
                                  max_new_tokens)
    budgets = [max_new_tokens if max_length is None else min(max_new_tokens, max_length - len(p))
               for p in prompt_ids]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    n = num_return_sequences
    results: list[list[TokenIds]] = [[] for _ in prompt_ids]
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
            idx = order[start:start + batch_size]
            rows = _generate_id_batch(model, tokenizer, [prompt_ids[i] for i in idx],
                                      [budgets[i] for i in idx], stop, keep_eos, pad_id,
                                      gen_kwargs)
            for j, i in enumerate(idx):
                results[i] = rows[j * n:(j + 1) * n]
    finally:
        model.train(was_training)
    return results
