"""Multiple-choice scoring by option log-likelihood (the lm-eval-harness protocol).

For a context ``x`` and option ``y`` the score is ``log p(y | x)`` summed over the option's
tokens.  Tokenisation follows lm-eval-harness: ``whole = encode(x + y)``, ``n = len(encode(x))``,
the option tokens are ``whole[n:]`` (so a BPE merge across the boundary is handled the same way
for every option; a trailing space of the context is moved to the option first).  Sequences are
batched with RIGHT padding (a causal model's outputs at real positions do not depend on padding to
their right), sorted by length, and scored with a float32 ``log_softmax``.

Normalisations: ``"sum"`` (total log-likelihood, lm-eval ``acc``), ``"mean"`` (per option token)
and ``"chars"`` (per character of the option, lm-eval ``acc_norm``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

Normalize = Literal["sum", "mean", "chars"]


def _split_space(context: str, option: str) -> tuple[str, str]:
    """Move a trailing space of the context to the option (lm-eval-harness convention)."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + option
    return context, option


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str,
                option: str) -> tuple[list[int], list[int]]:
    """``(context ids, option ids)`` such that their concatenation is ``encode(context+option)``."""
    context, option = _split_space(context, option)
    whole = tokenizer(context + option)["input_ids"]
    n_ctx = len(tokenizer(context)["input_ids"])
    if n_ctx >= len(whole):
        raise ValueError(f"option {option!r} adds no tokens to context {context[-40:]!r}")
    return whole[:n_ctx], whole[n_ctx:]


def _truncate(ctx: list[int], opt: list[int], max_length: int | None) -> tuple[list[int], int]:
    """Full sequence (left-truncated to ``max_length``) and the option's start position in it."""
    seq = ctx + opt
    if max_length is not None and len(seq) > max_length:
        if len(opt) >= max_length:
            raise ValueError(f"an option of {len(opt)} tokens exceeds max_length={max_length}")
        seq = seq[-max_length:]
    return seq, len(seq) - len(opt)


@torch.inference_mode()
def _score_batch(model: PreTrainedModel, seqs: list[list[int]], starts: list[int],
                 pad_id: int) -> list[tuple[float, int]]:
    """``(sum log p(option tokens), number of option tokens)`` for right-padded sequences."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_lp = logprobs.gather(-1, ids[:, 1:].to(logits.device).unsqueeze(-1)).squeeze(-1).cpu()
    out = []
    for row, (seq, start) in enumerate(zip(seqs, starts)):
        # option token at position p is predicted by the logits at p - 1
        out.append((float(token_lp[row, start - 1:len(seq) - 1].double().sum()), len(seq) - start))
    return out


def option_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, contexts: Sequence[str],
    options: Sequence[Sequence[str]], batch_size: int = 8, max_length: int | None = None,
    progress: bool = False,
) -> list[list[tuple[float, int]]]:
    """``(log p(option | context), option token count)`` for every option of every context."""
    if len(contexts) != len(options):
        raise ValueError(f"{len(contexts)} contexts but {len(options)} option lists")
    flat: list[tuple[int, int, list[int], int]] = []
    for i, (ctx, opts) in enumerate(zip(contexts, options)):
        if not opts:
            raise ValueError(f"context {i} has no options")
        for j, opt in enumerate(opts):
            c_ids, o_ids = encode_pair(tokenizer, ctx, opt)
            if not c_ids:
                raise ValueError("the context must encode to at least one token (e.g. a BOS)")
            seq, start = _truncate(c_ids, o_ids, max_length)
            flat.append((i, j, seq, start))
    flat.sort(key=lambda item: -len(item[2]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(o) for o in options]
    was_training = model.training
    model.eval()
    try:
        for b in tqdm(range(0, len(flat), batch_size), desc="score", disable=not progress):
            chunk = flat[b:b + batch_size]
            scores = _score_batch(model, [c[2] for c in chunk], [c[3] for c in chunk], pad_id)
            for (i, j, _, _), score in zip(chunk, scores):
                result[i][j] = score
    finally:
        model.train(was_training)
    return result


def _normalised(logprob: float, n_tokens: int, option: str, normalize: Normalize) -> float:
    if normalize == "sum":
        return logprob
    if normalize == "mean":
        return logprob / n_tokens
    if normalize == "chars":
        return logprob / max(len(option), 1)
    raise ValueError(f"normalize must be 'sum', 'mean' or 'chars', got {normalize!r}")


def score_options(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, contexts: Sequence[str],
    options: Sequence[Sequence[str]], batch_size: int = 8, normalize: Normalize = "sum",
    max_length: int | None = None, progress: bool = False,
) -> list[int]:
    """Index of the most likely option for each context.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (any padding side; it is not used for padding here).
        contexts: the question prompts.
        options: per context, the candidate continuations (e.g. ``" answer1"`` or the answer text).
        batch_size: sequences (context + one option) per forward pass.
        normalize: ``"sum"``, ``"mean"`` (per token) or ``"chars"`` (per character).
        max_length: left-truncate longer sequences to this many tokens.
        progress: show a tqdm bar.

    Returns:
        The argmax option index per context (ties go to the first option).
    """
    scores = option_logprobs(model, tokenizer, contexts, options, batch_size, max_length, progress)
    picks = []
    for opts, per_ctx in zip(options, scores):
        values = [_normalised(lp, n, opt, normalize) for opt, (lp, n) in zip(opts, per_ctx)]
        picks.append(max(range(len(values)), key=values.__getitem__))
    return picks
