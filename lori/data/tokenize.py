"""Tokenisation of task records into ``input_ids`` / ``attention_mask`` / ``labels``.

Each record is formatted once into ``(prompt, response)`` strings (``lori.data.prompts``),
then tokenised once through ``datasets.Dataset.from_list(...).map(...)`` (batched, Arrow
storage). Prompt and response are encoded separately and concatenated, so the boundary
between them is exact: ``labels`` is ``-100`` over every prompt token (and later over
padding) and equals ``input_ids`` over the response tokens, so the loss is on the response
only. The prompt is encoded with the tokenizer's special tokens (e.g. BOS), the response
without them, and EOS is appended to the response (for ``template="chat"`` only when the
rendered turn does not already contain the EOS token).

Truncation to ``max_length`` keeps the start of the prompt and cuts the response from the
end (such an example loses its EOS and is counted as *truncated*). An example whose prompt
alone fills ``max_length`` (no room for a single response token) would train on nothing,
so it is *dropped* and counted; ``TokenizationReport`` carries both counts.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import datasets
import torch

from lori.data.prompts import format_example

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

    def __str__(self) -> str:
        return (f"{self.kept}/{self.total} examples kept (max_length={self.max_length}): "
                f"{self.dropped} dropped (prompt >= max_length), {self.truncated} truncated")


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


def _fingerprint(texts: Sequence[Any], *parts: Any) -> str:
    """A cache fingerprint of the formatted texts and the settings (no pickling of closures)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8"))
    for text in texts:
        digest.update(repr(text).encode("utf-8"))
    return digest.hexdigest()[:32]


def tokenize_records_with_report(records: list[dict[str, Any]], tokenizer: Any, task: str,
                                 template: str = "alpaca", max_length: int = 256,
                                 paper_compat: bool = False, stage: str = "train",
                                 ) -> tuple[datasets.Dataset, TokenizationReport]:
    """Like ``tokenize_records`` and also returns the drop / truncation counts."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    pairs = [format_example(r, task, template, paper_compat, stage=stage, tokenizer=tokenizer)
             for r in records]
    ds = datasets.Dataset.from_dict({"input_ids": [], "attention_mask": [], "labels": []})
    truncated = 0
    if pairs:
        raw = datasets.Dataset.from_list([{"prompt": p, "response": r} for p, r in pairs])
        fingerprint = _fingerprint(pairs, getattr(tokenizer, "name_or_path", ""),
                                   len(tokenizer), max_length, template)
        encoded = raw.map(_encoder(tokenizer, max_length, template == "chat"), batched=True,
                          remove_columns=["prompt", "response"], new_fingerprint=fingerprint,
                          desc=f"tokenizing {task}")
        kept = [i for i, k in enumerate(encoded["keep"]) if k]
        truncated = sum(encoded.select(kept)["truncated"])
        if kept:
            ds = encoded.select(kept).remove_columns(["keep", "truncated"])
    report = TokenizationReport(len(records), len(ds), len(records) - len(ds), truncated,
                                max_length)
    log.info("tokenize %s: %s", task, report)
    return ds, report


def tokenize_records(records: list[dict[str, Any]], tokenizer: Any, task: str,
                     template: str = "alpaca", max_length: int = 256,
                     paper_compat: bool = False, stage: str = "train") -> datasets.Dataset:
    """Tokenise records into a Dataset with ``input_ids``, ``attention_mask``, ``labels``.

    Args:
        records: records of ``task`` (``lori.data.sources`` schemas).
        tokenizer: a Hugging Face tokenizer (fast or slow).
        task: the task name, e.g. ``"gsm8k"``.
        template: ``"alpaca"``, ``"chat"`` or ``"plain"``.
        max_length: the longest sequence; see the module docstring for truncation.
        paper_compat: reproduce the original whitespace of the prompts.
        stage: ``"train"`` or ``"eval"`` prompt layout.

    Returns:
        A Dataset with one row per kept example.
    """
    return tokenize_records_with_report(records, tokenizer, task, template, max_length,
                                        paper_compat, stage)[0]


def tokenize_prompts(records: list[dict[str, Any]], tokenizer: Any, task: str,
                     template: str = "alpaca", paper_compat: bool = False,
                     max_length: int | None = None) -> datasets.Dataset:
    """Prompt-only encodings for generation / evaluation (``stage="eval"`` layout).

    Columns: ``input_ids``, ``attention_mask`` and ``index`` (position in ``records``). With
    ``max_length`` a longer prompt keeps its last tokens (the end holds the response cue).
    """
    prompts = [format_example(r, task, template, paper_compat, stage="eval",
                              tokenizer=tokenizer)[0] for r in records]
    raw = datasets.Dataset.from_list([{"prompt": p, "index": i} for i, p in enumerate(prompts)])

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        ids = tokenizer(batch["prompt"], add_special_tokens=template != "chat")["input_ids"]
        ids = [x[-max_length:] if max_length else x for x in ids]
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}

    fingerprint = _fingerprint(prompts, getattr(tokenizer, "name_or_path", ""), max_length)
    return raw.map(encode, batched=True, remove_columns=["prompt"],
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
