"""Evaluate a base model, an adapter directory or a merged model and write the results (``lori eval``).

    run_eval(EvalTarget(model="tiny-llama", adapter="runs/default/lori_s"), EvalSettings(tasks=["gsm8k"]))

Writes ``<output_dir>/results.json`` (metrics by task, what was evaluated and how many items of
each set and why, the settings ``eval.protocol: official`` fixed, timing),
``<output_dir>/samples.json`` (every generation, for inspection) and tensorboard scalars under
``<output_dir>/tb``; the results also go into the Results section of the adapter's card (its
README.md, when lori wrote it: ``lori.training.card_results``). Settings, evaluation sets and the
adapter file are checked before the model loads (an adapter holding NaN or inf is refused); nothing
is written unless the evaluation finishes, and then the directory is replaced whole. One run at a
time per output_dir (``lori.training.run_lock``). Under ``eval.protocol: official`` the model is
evaluated in float32 with the adapter merged (the official code's ``torch_dtype=float32`` and
``merge_and_unload``, src/eval_model.py:272-284): another ``dtype`` or ``merge: false`` is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lori.core import apply_adapter, load_adapter, merge_lori
from lori.core.io import atomic_directory
from lori.eval.evaluator import EvalSettings, evaluate_model, load_eval_sets
from lori.eval.official import check_official_model
from lori.training import run_lock
from lori.training.card_results import update_card_results
from lori.training.module import build_model
from lori.training.quantize import QuantizeError, check_quantize


@dataclass
class EvalTarget:
    """What to evaluate.

    Args:
        model: base model: ``smollm2-135m-instruct`` (embedded default), ``tiny-llama``, a local
            Hugging Face directory (e.g. a merged model saved by ``lori merge``) or a hub id.
        gguf_file: GGUF file name inside ``model`` when it is a directory of GGUF files.
        dtype: weight dtype (``float32``, ``bfloat16``); ``eval.protocol: official`` needs float32.
        cache_dir: where converted GGUF models are cached.
        quantize: store the base's linear layers in ``nf4``, ``fp4`` or ``int8`` (bitsandbytes, as
            ``model.quantize`` in training); the adapter is then evaluated unmerged (``merge: false``).
        adapter: an adapter directory (lori's, or a PEFT LoRA directory as released); None = the
            base model alone.
        mask_file: masks for a released adapter (the original code's torch file or lori's).
        merge: fold the adapter into the base weights before evaluating (base-model speed);
            ``eval.protocol: official`` needs it.
        strict_base: refuse an adapter whose recorded base-model fingerprint differs.
        output_dir: where results.json, samples.json and tb/ go.
    """

    model: str = "smollm2-135m-instruct"
    gguf_file: str | None = None
    dtype: str = "float32"
    cache_dir: str | None = None
    quantize: str | None = None
    adapter: str | None = None
    mask_file: str | None = None
    merge: bool = True
    strict_base: bool = True
    output_dir: str = "runs/eval"


def load_target(target: EvalTarget) -> tuple[Any, Any, dict[str, Any]]:
    """Model and tokenizer with the adapter applied (and merged); the adapter is read first."""
    adapter = load_adapter(target.adapter, target.mask_file) if target.adapter else None
    model, tokenizer = build_model(target.model, target.gguf_file, target.dtype, target.cache_dir, target.quantize)
    info: dict[str, Any] = {"model": target.model, "adapter": target.adapter, "quantize": target.quantize}
    if adapter is not None:
        apply_adapter(model, adapter, strict_base=target.strict_base)
        if target.merge:
            merge_lori(model)
        info |= {"adapter_config": adapter.config.to_dict(), "merged": target.merge,
                 "stage": adapter.meta.get("stage")}
    model.eval()
    return model, tokenizer, info


def check_quantized_target(target: EvalTarget, settings: EvalSettings) -> None:
    """Refuse, before anything loads, a ``quantize`` that cannot run, or an adapter to merge into it."""
    check_quantize(target.quantize, model=target.model, gguf_file=target.gguf_file, protocol=settings.protocol)
    if target.quantize is not None and target.adapter is not None and target.merge:
        raise QuantizeError(f"quantize {target.quantize!r} with merge: true: merging into a quantized base would "
                            "round W0 + ΔW to 4/8 bits again; evaluate the adapter unmerged (--merge false), or "
                            "merged on the unquantized base (no quantize)")


@run_lock.locks_output_dir("target")
def run_eval(target: EvalTarget, settings: EvalSettings) -> dict[str, Any]:
    """Evaluate and write the results (holding the output_dir's lock); returns what results.json holds."""
    check_official_model(settings, target.dtype, target.merge or target.adapter is None)
    check_quantized_target(target, settings)
    items: dict[str, Any] = {}
    eval_sets = load_eval_sets(settings, items)  # bad tasks / data stop here, before the model loads
    model, tokenizer, info = load_target(target)
    scalars: list[tuple[str, float]] = []
    samples: dict[str, Any] = {}
    t0 = time.perf_counter()
    results = evaluate_model(model, tokenizer, settings, lambda tag, v: scalars.append((tag, v)), eval_sets, samples)
    report = {"target": info, "settings": asdict(settings), "results": results, "items": items,
              "protocol_changes": settings.protocol_changes, "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(target.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out) as tmp:  # all or nothing
        (tmp / "results.json").write_text(json.dumps(report, indent=2))
        (tmp / "samples.json").write_text(json.dumps(samples, indent=1))
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(tmp / "tb")) as writer:
            for tag, value in scalars:
                writer.add_scalar(tag, value, 0)
    if target.adapter:  # the adapter's card (README.md, written by lori) gets these results in place
        update_card_results(target.adapter, report, out / "results.json")
    return report
