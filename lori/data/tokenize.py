"""Tokenisation of task records into ``input_ids`` / ``attention_mask`` / ``labels``.

Each record is formatted once into ``(prompt, response)`` strings (``lori.data.prompts``),
then tokenised once through ``datasets.Dataset.from_list(...).map(...)`` (batched, Arrow
storage). Prompt and response are encoded separately and concatenated, so the boundary
between them is exact: ``labels`` is ``-100`` over every prompt token (and later over
padding) and equals ``input_ids`` over the response tokens, so the loss is on the response
only. EOS is appended to the response.

``protocol="lori"`` (default): the prompt is encoded with the tokenizer's special tokens (e.g.
BOS), the response without them (for ``template="chat"`` EOS is only appended when the rendered
turn does not already contain it). Truncation to ``max_length`` keeps the start of the prompt
and cuts the response from the end (such an example loses its EOS and is counted as
*truncated*). An example whose prompt alone fills ``max_length`` (no room for a single response
token) would train on nothing, so it is *dropped* and counted. Every record is kept, duplicates
included.

``protocol="official"`` (the official LoRI code, ``src/get_datasets.py`` at 9183468,
``tokenize_batch_element`` l.309-372): prompt and response are both encoded with
``add_special_tokens=False`` (no BOS), EOS is appended to the response (l.328), and the
over-length rule is ``official_truncate``: if ``len(prompt) + len(response + EOS) >
max_length`` the prompt keeps its first ``max_prompt_length`` tokens (l.337-339); if that is
still too long the response keeps its first ``max_length - max_prompt_length`` tokens (l.346-347,
which may cut the EOS). Nothing is dropped; the report counts the cut prompts and responses.
Records with the same prompt string become one example (dict semantics of the official loaders:
at the first occurrence, with the last occurrence's target; ``official_prompts.unique_prompts``).
A prompt or response whose tokens contain EOS is refused (the official code asserts, l.324-326).

``TokenizationReport`` carries the counts.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import datasets
import torch

from lori.data.official_prompts import unique_prompts
from lori.data.prompts import check_template, format_example
from lori.data.sources import DataError

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


@dataclass
class TokenizationReport:
    """Counts of one ``tokenize_records`` call."""

    total: int
    kept: int
    dropped: int
    truncated: int
    max_length: int
    prompt_truncated: int = 0
    duplicates: int = 0
    protocol: str = "lori"

    def __str__(self) -> str:
        text = (f"{self.kept}/{self.total} examples kept (max_length={self.max_length}): "
                f"{self.dropped} dropped (prompt >= max_length), {self.truncated} truncated")
        if self.protocol == "official":
            text += (f", {self.prompt_truncated} prompts cut, {self.duplicates} duplicate "
                     "prompts merged (protocol official)")
        return text


def _eos_id(tokenizer: Any) -> int | None:
    return getattr(tokenizer, "eos_token_id", None)


def pad_id_of(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else EOS, else 0."""
    for value in (getattr(tokenizer, "pad_token_id", None), _eos_id(tokenizer)):
        if value is not None:
            return int(value)
    return 0


def pack_example(prompt_ids: Sequence[int], response_ids: Sequence[int],
                 max_length: int) -> dict[str, Any] | None:
    """Concatenate prompt and response ids with labels on the response; ``None`` if dropped."""
    room = max_length - len(prompt_ids)
    if room <= 0 or not response_ids:
        return None
    kept = list(response_ids[:room])
    ids = list(prompt_ids) + kept
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [IGNORE_INDEX] * len(prompt_ids) + kept,
            "truncated": len(kept) < len(response_ids)}


def official_truncate(prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int,
                      max_prompt_length: int) -> tuple[list[int], list[int]]:
    """The official over-length rule (get_datasets.py:336-347), ``response_ids`` ending in EOS.

    If ``len(prompt) + len(response) > max_length`` the prompt keeps its first
    ``max_prompt_length`` tokens; if the sum is still above ``max_length`` the response keeps its
    first ``max_length - max_prompt_length`` tokens.
    """
    prompt, response = list(prompt_ids), list(response_ids)
    if len(prompt) + len(response) > max_length:
        prompt = prompt[:max_prompt_length]
    if len(prompt) + len(response) > max_length:
        response = response[:max_length - max_prompt_length]
    return prompt, response


def _check_no_eos(ids: Sequence[Sequence[int]], eos: int | None, texts: Sequence[str],
                  what: str) -> None:
    for row, text in zip(ids, texts):
        if eos is not None and eos in row:
            raise DataError(f"protocol official: a {what} contains the EOS token (the official "
                            f"code refuses it): {text[:80]!r}")


def _encoder(tokenizer: Any, max_length: int, chat: bool) -> Callable[[dict], dict]:
    """A batched ``map`` function: encode, append EOS, pack and flag dropped examples."""
    eos = _eos_id(tokenizer)
    eos_text = getattr(tokenizer, "eos_token", None)

    def encode(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        prompts = tokenizer(batch["prompt"], add_special_tokens=not chat)["input_ids"]
        responses = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
        out: dict[str, list[Any]] = {k: [] for k in
                                     ("input_ids", "attention_mask", "labels", "truncated", "keep")}
        for p, r, text in zip(prompts, responses, batch["response"]):
            if eos is not None and not (chat and eos_text and eos_text in text):
                r = [*r, eos]
            packed = pack_example(p, r, max_length) or {
                "input_ids": [], "attention_mask": [], "labels": [], "truncated": False}
            for key, value in packed.items():
                out[key].append(value)
            out["keep"].append(bool(packed["input_ids"]))
        return out

    return encode


def _official_encoder(tokenizer: Any, max_length: int,
                      max_prompt_length: int) -> Callable[[dict], dict]:
    """A batched ``map`` function for ``protocol="official"`` (tokenize_batch_element)."""
    eos = _eos_id(tokenizer)

    def encode(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        prompts = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
        responses = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
        _check_no_eos(prompts, eos, batch["prompt"], "prompt")
        _check_no_eos(responses, eos, batch["response"], "response")
        out: dict[str, list[Any]] = {k: [] for k in ("input_ids", "attention_mask", "labels",
                                                     "truncated", "prompt_truncated", "keep")}
        for p, r in zip(prompts, responses):
            full = [*r, eos] if eos is not None else list(r)
            prompt, response = official_truncate(p, full, max_length, max_prompt_length)
            ids = prompt + response
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([IGNORE_INDEX] * len(prompt) + response)
            out["truncated"].append(len(response) < len(full))
            out["prompt_truncated"].append(len(prompt) < len(p))
            out["keep"].append(True)
        return out

    return encode


def _check_lengths(max_length: int, max_prompt_length: int, protocol: str) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if protocol == "official" and not 0 < max_prompt_length < max_length:
        raise ValueError(f"protocol official needs 0 < max_prompt_length < max_length, got "
                         f"max_prompt_length={max_prompt_length}, max_length={max_length}")


def _official_unique(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One pair per distinct prompt: first position, last target (see ``unique_prompts``)."""
    return [(pairs[first][0], pairs[last][1])
            for first, last in unique_prompts([p for p, _ in pairs])]


def _fingerprint(texts: Sequence[Any], *parts: Any) -> str:
    """A cache fingerprint of the formatted texts and the settings (no pickling of closures)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8"))
    for text in texts:
        digest.update(repr(text).encode("utf-8"))
    return digest.hexdigest()[:32]


def tokenize_records_with_report(records: list[dict[str, Any]], tokenizer: Any, task: str,
                                 template: str = "alpaca", max_length: int = 256,
                                 protocol: str = "lori", stage: str = "train",
                                 max_prompt_length: int = 256,
                                 ) -> tuple[datasets.Dataset, TokenizationReport]:
    """Like ``tokenize_records`` and also returns the drop / truncation counts."""
    check_template(protocol, template)
    _check_lengths(max_length, max_prompt_length, protocol)
    pairs = [format_example(r, task, template, protocol, stage=stage, tokenizer=tokenizer)
             for r in records]
    official = protocol == "official"
    unique = _official_unique(pairs) if official else pairs
    ds = datasets.Dataset.from_dict({"input_ids": [], "attention_mask": [], "labels": []})
    truncated = prompt_truncated = 0
    if unique:
        raw = datasets.Dataset.from_list([{"prompt": p, "response": r} for p, r in unique])
        fingerprint = _fingerprint(unique, getattr(tokenizer, "name_or_path", ""),
                                   len(tokenizer), max_length, template, protocol,
                                   max_prompt_length if official else None)
        encoder = (_official_encoder(tokenizer, max_length, max_prompt_length) if official
                   else _encoder(tokenizer, max_length, template == "chat"))
        encoded = raw.map(encoder, batched=True, remove_columns=["prompt", "response"],
                          new_fingerprint=fingerprint, desc=f"tokenizing {task}")
        kept = [i for i, k in enumerate(encoded["keep"]) if k]
        truncated = sum(encoded.select(kept)["truncated"])
        if official:
            prompt_truncated = sum(encoded["prompt_truncated"])
            encoded = encoded.remove_columns(["prompt_truncated"])
        if kept:
            ds = encoded.select(kept).remove_columns(["keep", "truncated"])
    duplicates = len(pairs) - len(unique)
    report = TokenizationReport(len(records), len(ds), len(unique) - len(ds), truncated,
                                max_length, prompt_truncated, duplicates, protocol)
    log.info("tokenize %s: %s", task, report)
    return ds, report


def tokenize_records(records: list[dict[str, Any]], tokenizer: Any, task: str,
                     template: str = "alpaca", max_length: int = 256,
                     protocol: str = "lori", stage: str = "train",
                     max_prompt_length: int = 256) -> datasets.Dataset:
    """Tokenise records into a Dataset with ``input_ids``, ``attention_mask``, ``labels``.

    Args:
        records: records of ``task`` (``lori.data.sources`` schemas).
        tokenizer: a Hugging Face tokenizer (fast or slow).
        task: the task name, e.g. ``"gsm8k"``.
        template: ``"alpaca"``, ``"chat"`` or ``"plain"``.
        max_length: the longest sequence; see the module docstring for truncation.
        protocol: ``"lori"`` or ``"official"`` (prompts, special tokens, over-length rule and
            duplicate prompts; see the module docstring).
        stage: ``"train"`` or ``"eval"`` prompt layout.
        max_prompt_length: under ``protocol="official"``, the prompt tokens kept by an
            over-long example (the official config's 256); unused by ``"lori"``.

    Returns:
        A Dataset with one row per kept example (official: per distinct prompt).
    """
    return tokenize_records_with_report(records, tokenizer, task, template, max_length,
                                        protocol, stage, max_prompt_length)[0]


def tokenize_prompts(records: list[dict[str, Any]], tokenizer: Any, task: str,
                     template: str = "alpaca", protocol: str = "lori",
                     max_length: int | None = None,
                     max_prompt_length: int | None = None) -> datasets.Dataset:
    """Prompt-only encodings for generation / evaluation (``stage="eval"`` layout).

    Columns: ``input_ids``, ``attention_mask`` and ``index`` (position in ``records``); one row
    per record under both protocols (no de-duplication here: the official evaluation, which
    goes through the training iterator, also merges duplicate prompts and drops the incomplete
    last batch, get_datasets.py:416-433; ``official_prompts.unique_prompts`` gives its rows).

    * ``protocol="lori"``: the tokenizer's special tokens (e.g. BOS; none for ``chat``); with
      ``max_length`` a longer prompt keeps its last tokens (the end holds the response cue);
      ``max_prompt_length`` is unused.
    * ``protocol="official"``, every task but HumanEval (eval_model.py:289-306: the training
      iterator with ``max_length`` 512, ``max_prompt_length`` 256, the defaults here): no special
      tokens, and the prompt is cut by the official over-length rule against the record's gold
      target (``official_truncate``): if ``len(prompt) + len(target + EOS) > max_length`` the
      prompt keeps its FIRST ``max_prompt_length`` tokens.
    * ``protocol="official"``, HumanEval (bigcode_eval/utils.py:99-106, ``--max_length_generation
      512``): the tokenizer's default special tokens (e.g. BOS) and ``truncation=True`` at
      ``max_length`` (default 512; bigcode counts prompt plus generation in that budget).
    """
    check_template(protocol, template)
    official = protocol == "official"
    humaneval = official and task == "humaneval"
    if official:
        max_length = 512 if max_length is None else max_length
        max_prompt_length = 256 if max_prompt_length is None else max_prompt_length
        if not humaneval:
            _check_lengths(max_length, max_prompt_length, protocol)
    pairs = [format_example(r, task, template, protocol, stage="eval", tokenizer=tokenizer)
             for r in records]
    prompts = [p for p, _ in pairs]
    raw = datasets.Dataset.from_list([{"prompt": p, "target": t, "index": i}
                                      for i, (p, t) in enumerate(pairs)])
    eos = _eos_id(tokenizer)

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if humaneval:
            ids = tokenizer(batch["prompt"], truncation=True, max_length=max_length)["input_ids"]
        elif official:
            ids = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
            targets = tokenizer(batch["target"], add_special_tokens=False)["input_ids"]
            ids = [official_truncate(p, [*t, eos] if eos is not None else t, max_length,
                                     max_prompt_length)[0] for p, t in zip(ids, targets)]
        else:
            ids = tokenizer(batch["prompt"], add_special_tokens=template != "chat")["input_ids"]
            ids = [x[-max_length:] if max_length else x for x in ids]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}

    fingerprint = _fingerprint(pairs if official else prompts,
                               getattr(tokenizer, "name_or_path", ""), max_length, protocol,
                               max_prompt_length, task == "humaneval")
    return raw.map(encode, batched=True, remove_columns=["prompt", "target"],
                   new_fingerprint=fingerprint) if len(raw) else raw


def collate(batch: Sequence[dict[str, Any]], pad_id: int, padding_side: str = "right",
            pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Pad a list of examples into tensors.

    ``input_ids`` is padded with ``pad_id``, ``attention_mask`` with 0 and ``labels`` (if
    present) with -100, on the right (training) or the left (generation prompts). Other keys
    are passed through as lists.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(x["input_ids"]) for x in batch)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    fills = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out: dict[str, Any] = {}
    for key, fill in fills.items():
        if key in batch[0]:
            rows = [_pad(list(x[key]), width, fill, padding_side) for x in batch]
            out[key] = torch.tensor(rows, dtype=torch.long)
    for key in batch[0]:
        if key not in fills:
            out[key] = [x[key] for x in batch]
    return out


def _pad(row: list[int], width: int, fill: int, side: str) -> list[int]:
    pad = [fill] * (width - len(row))
    return row + pad if side == "right" else pad + row
