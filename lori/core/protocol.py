"""The training protocol: lori's own defaults, or the official LoRI code's behaviour.

``protocol: official`` (one top-level key of a ``lori pipeline`` / ``fit`` / ``continual`` config) puts
data, tokenisation, optimiser, evaluation and merging into what the authors' code did
(github.com/juzhengz/LoRI at 9183468: the protocol that produced the paper's numbers). The
behaviours it switches (prompt strings, tokenisation, per-tensor clipping, ...) live where they are
implemented; this module holds the *settings* it fixes (what the official code hard-codes, not
what its scripts pass per run: learning rate, epochs, lengths, clipping norm stay config values that
the paper configs set), each with the official value and where the official code sets it, and
applies them to a parsed config:

* a setting at lori's default is set to the official value (and the change is reported);
* a setting already at the official value is left alone;
* a setting at any other value is a contradiction: one ``ProtocolError`` lists every such key.

``protocol: lori`` changes nothing. docs/reproducing_the_paper.md tabulates both protocols.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lori.core.config import LoRIConfigError

PROTOCOLS: tuple[str, ...] = ("lori", "official")


class ProtocolError(LoRIConfigError):
    """A protocol name that does not exist, or settings that contradict the chosen protocol."""


@dataclass(frozen=True)
class Fixed:
    """One setting the official protocol fixes.

    Attributes:
        key: dotted config key (``model.weight_decay``).
        value: the official value.
        source: where the official code sets it (file:line at commit 9183468).
    """

    key: str
    value: Any
    source: str


OFFICIAL_SETTINGS: tuple[Fixed, ...] = (
    Fixed("model.weight_decay", 0.0,
          "src/apply_mask_in_backward.py:55 (MaskedAdamW weight_decay=0; the optimizer kwargs never set it)"),
    Fixed("model.betas", (0.9, 0.999), "src/apply_mask_in_backward.py:55 (AdamW defaults)"),
    Fixed("model.lori.dropout", 0.0,
          "src/train_lori.py:107 disable_dropout (src/utils.py:87-91) sets every nn.Dropout to p=0, "
          "lora_dropout=0.05 of l.87 included"),
    Fixed("model.loss_normalization", "sequence_sum",
          "src/mask_trainers.py:293-307 (sum of response-token log-probs per sequence, mean over the batch)"),
    Fixed("model.scheduler", "constant",
          "src/mask_trainers.py:322 (LambdaLR min(1, (step+1)/(warmup_steps+1)); every script has warmup 0)"),
    Fixed("model.gradient_clipping", "per_tensor",
          "src/apply_mask_in_backward.py:79-85 (clip_grad_norm_(p, max_grad_norm) for each parameter)"),
)


def check_protocol(name: str) -> str:
    """Return ``name`` if it is a protocol, else raise ProtocolError naming the choices."""
    if name not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {name!r}; choose one of {list(PROTOCOLS)}")
    return name


_MISSING = object()


def _get(config: Any, key: str) -> Any:
    """The value at a dotted key, or ``_MISSING`` when the config has no such key."""
    node = config
    for part in key.split("."):
        if node is None or not hasattr(node, "get") or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(config: Any, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def apply_official(config: Any, defaults: Any, sections: tuple[str, ...] | None = None) -> list[str]:
    """Put a parsed config's fixed settings at the official values, in place.

    Args:
        config: the parsed config (a jsonargparse Namespace or nested dicts), modified in place.
        defaults: the same structure holding the parser's defaults (lori's values).
        sections: top-level sections present in this command's config (None: every section found).

    Returns:
        One ``key: old -> new`` line per setting that was changed from lori's default.

    Raises:
        ProtocolError: settings set to a value that is neither lori's default nor the official one.
    """
    changed, conflicts = [], []
    for fixed in OFFICIAL_SETTINGS:
        section = fixed.key.split(".", 1)[0]
        if sections is not None and section not in sections:
            continue
        value, default = _get(config, fixed.key), _get(defaults, fixed.key)
        if value is _MISSING or _same(value, fixed.value):  # a key this command does not have
            continue
        if value is None or _same(value, default):
            _set(config, fixed.key, list(fixed.value) if isinstance(fixed.value, tuple) else fixed.value)
            changed.append(f"{fixed.key}: {value!r} -> {fixed.value!r}")
        else:
            conflicts.append(f"{fixed.key}={value!r} (official {fixed.value!r}: {fixed.source})")
    if conflicts:
        raise ProtocolError(
            "protocol official fixes settings this config sets otherwise: " + "; ".join(conflicts)
            + " -- remove them or use protocol: lori"
        )
    return changed
