"""A lori adapter through EleutherAI's lm-evaluation-harness (``--model hf --model_args pretrained=...,peft=...``).

Two tiny LoRI runs (A seeds 0 and 1) on a random Llama saved as a Hugging Face folder, and their
concat merge (``lori merge``): lm-eval's ``hf`` model loads the base with ``peft=`` the LoRI-S
adapter (or the merged one) and generates on a local task holding the shipped GSM8K items
(``lori.eval.lm_eval_task``, no hub); every item's prompt and greedy text equal ``lori eval``'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import tiny_config, write_config

from lori.commands import eval_command, merge_command
from lori.commands.pipeline_command import pipeline
from lori.eval.evaluator import EvalSettings
from lori.eval.generate import generate
from lori.eval.lm_eval_task import lm_eval_items, write_lm_eval_task
from lori.training.base_model import load_base_model, tiny_llama, tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval")

ITEMS, NEW_TOKENS, HELD_OUT = 3, 10, 32
SETTINGS = dict(tasks=["gsm8k"], max_examples=ITEMS, max_new_tokens=NEW_TOKENS, held_out=HELD_OUT,
                batch_size=1, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A saved base, two LoRI-S adapters of it and their concat merge."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    tokenizer = tiny_tokenizer()
    base = tmp / "base"
    tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=1024).save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapters = []
    for seed in (0, 1):
        work = tmp / f"seed{seed}"
        work.mkdir()
        cfg = tiny_config(work)
        cfg["model"].update(model=str(base), lr=0.05)
        cfg["model"]["lori"]["seed"] = seed
        cfg["pipeline"].update(held_out_loss=False, checkpoint_every=100)  # no checkpoint: nothing resumes here
        pipeline(["--config", str(write_config(work, cfg))])
        adapters.append(str(work / "run" / "lori_s"))
    merge = {"base_model": str(base), "adaptation": "lori_s", "adapters": adapters, "tasks": ["a", "b"],
             "method": ["concat"], "weights": [0.5, 0.5], "evaluate": [], "output_dir": str(tmp / "merge"),
             "device": "cpu"}
    (tmp / "merge.yaml").write_text(yaml.safe_dump(merge))
    merge_command.main(["--config", str(tmp / "merge.yaml")])
    return tmp, base, {"lori_s": Path(adapters[0]), "merged": tmp / "merge" / "concat" / "merged_adapter"}


def lori_eval_outputs(tmp: Path, base: Path, adapter: Path) -> dict[str, str]:
    """``lori eval --adapter`` unmerged: the generated text by item id.

    Unmerged, lori computes x W0^T + s (x A^T) B^T as PEFT's LoRA layer does (the logits are bit for bit
    PEFT's on this project's CPU); merged into W0 (lori eval's default) they differ by rounding, which gave
    the same text here too but could flip a near-tie on another machine.
    """
    out = tmp / f"eval_{adapter.parent.name}_{adapter.name}"
    args = ["--model", str(base), "--adapter", str(adapter), "--merge", "false", "--output_dir", str(out)]
    eval_command.main(args + [f"--eval.{k}={json.dumps(v)}" for k, v in SETTINGS.items()])
    samples = json.loads((out / "samples.json").read_text())["gsm8k"]
    return {s["id"]: s["output"] for s in samples}


def harness_samples(tmp: Path, base: Path, adapter: Path, monkeypatch) -> list[dict]:
    """lm-eval's ``hf`` model with ``peft=`` on the local task: its logged samples, in item order."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = tmp / "lm_eval_task"
    write_lm_eval_task(tasks, EvalSettings(**SETTINGS), name="lori_gsm8k_tiny")
    results = simple_evaluate(
        model="hf", model_args=f"pretrained={base},peft={adapter},dtype=float32,device=cpu", tasks=["lori_gsm8k_tiny"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True,
        limit=ITEMS, batch_size=1,
    )
    return sorted(results["samples"]["lori_gsm8k_tiny"], key=lambda s: s["doc_id"])


@pytest.mark.parametrize("which", ["lori_s", "merged"])
def test_lm_eval_generates_what_lori_eval_generates(runs, which, monkeypatch):
    tmp, base, adapters = runs
    adapter = adapters[which]
    items = lm_eval_items(EvalSettings(**SETTINGS))
    lori = lori_eval_outputs(tmp, base, adapter)
    harness = harness_samples(tmp, base, adapter, monkeypatch)
    assert len(harness) == len(items) == ITEMS and all(lori.values())
    for item, sample in zip(items, harness):
        assert sample["doc"]["id"] == item["id"]
        assert sample["arguments"][0][0] == item["prompt"]  # lm-eval's context is lori's prompt string
        assert sample["resps"][0][0] == lori[item["id"]]  # and its greedy text lori eval's
    # the adapter is in play: the base alone writes something else for at least one item
    model, tokenizer = load_base_model(str(base))
    alone = [o[0] for o in generate(model, tokenizer, [i["prompt"] for i in items], max_new_tokens=NEW_TOKENS,
                                    batch_size=1)]
    assert alone != [lori[i["id"]] for i in items]


def test_the_exported_task_holds_lori_evals_items_and_prompts(tmp_path):
    settings = EvalSettings(**SETTINGS)
    path = write_lm_eval_task(tmp_path, settings, name="t")
    task = yaml.safe_load(path.read_text())
    assert task["output_type"] == "generate_until" and task["generation_kwargs"]["max_gen_toks"] == NEW_TOKENS
    assert task["generation_kwargs"]["do_sample"] is False and task["generation_kwargs"]["until"] == []
    rows = [json.loads(line) for line in Path(task["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()]
    assert rows == lm_eval_items(settings) and len(rows) == ITEMS
    assert all(r["prompt"].endswith("### Response:\n") for r in rows)  # lori's alpaca layout, untouched


def test_merged_adapter_card_names_the_merge(runs):
    tmp, _, adapters = runs
    card = (adapters["merged"] / "README.md").read_text()
    assert "- merged-concat" in card and "library_name: peft" in card
    assert "Merged by `lori merge` (concat)" in card
    assert str(tmp / "merge" / "concat" / "merged_adapter") in card  # the final path, not the temporary one
    assert ".tmp-" not in card
