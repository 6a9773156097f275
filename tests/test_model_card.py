"""Every adapter lori writes carries a README.md card in the form of the released LoRI adapters' cards.

The two released cards (/work/shared/paper/model_card_*.md, copied under tests/data/) are parsed into
front-matter keys and headings: the first is Markdown; the second is the page's rendered text (no
``#`` marks, no front matter), whose headings are the lines naming a heading of the Hugging Face
model card template both follow. A card lori writes must hold each released card's headings, at
their levels, in their order; its values are the run's; ``lori eval`` updates its results in place.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from pipeline_helpers import tiny_config, write_config
from test_baselines import _module, _trainer, tiny  # noqa: F401 - tiny is a fixture
from torch.utils.data import DataLoader

from lori.commands import eval_command
from lori.commands.pipeline_command import pipeline
from lori.training.callbacks import SaveAdapter
from lori.training.card_results import read_card_results, update_card_results

DATA = Path(__file__).parent / "data"
RELEASED = {"markdown": DATA / "model_card_LoRI-D_code_llama3_rank_64.md",
            "rendered": DATA / "model_card_LoRI-S_safety_llama3_rank_64.md"}
TEMPLATE = Path(huggingface_hub.__file__).parent / "templates" / "modelcard_template.md"
HEADING = re.compile(r"^(#{1,6}) (.+?)\s*$")


def _title(text: str) -> str:
    """A heading's title without the template's ``[optional]`` and a card's own model name."""
    text = text.replace("[optional]", "").strip()
    return "Model Card for" if text.startswith("Model Card for") else text


def template_levels() -> dict[str, int]:
    """Heading title -> level in Hugging Face's model card template."""
    found = (HEADING.match(line) for line in TEMPLATE.read_text().splitlines())
    return {_title(m[2]): len(m[1]) for m in found if m}


def markdown_card(text: str) -> tuple[dict, list[tuple[int, str]]]:
    """Front matter and (level, title) of every heading outside code blocks."""
    front = {}
    if text.startswith("---\n"):
        head, text = text[4:].split("\n---\n", 1)
        front = yaml.safe_load(head)
    headings, fenced = [], False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (m := HEADING.match(line)):
            headings.append((len(m[1]), _title(m[2])))
    return front, headings


def rendered_card(text: str) -> list[tuple[int, str]]:
    """The headings of a card's rendered text: lines that are a template heading (its level)."""
    levels = template_levels()
    return [(levels[_title(line)], _title(line)) for line in text.splitlines() if _title(line) in levels]


def in_order(wanted: list, got: list) -> bool:
    """``wanted`` is a subsequence of ``got``."""
    rest = iter(got)
    return all(item in rest for item in wanted)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    cfg = tiny_config(tmp)
    pipeline(["--config", str(write_config(tmp, cfg))])
    return tmp, cfg


def test_released_cards_parse_into_their_sections():
    front, md = markdown_card(RELEASED["markdown"].read_text())
    rendered = rendered_card(RELEASED["rendered"].read_text())
    assert set(front) == {"base_model", "library_name", "pipeline_tag", "license"}
    assert md[:3] == [(1, "Model Card for"), (2, "Model Details"), (3, "Model Description")] and len(md) == 19
    assert (2, "Technical Specifications") in rendered and (4, "Software") in rendered and len(rendered) == 24


@pytest.mark.parametrize("stage", ["lori_d", "lori_s"])
def test_card_has_the_released_cards_sections_in_their_order(run, stage):
    tmp, _ = run
    front, ours = markdown_card((tmp / "run" / stage / "README.md").read_text())
    released_front, md = markdown_card(RELEASED["markdown"].read_text())
    assert set(released_front) <= set(front)
    assert front["library_name"] == released_front["library_name"] == "peft"
    assert front["pipeline_tag"] == released_front["pipeline_tag"]
    for name, released in (("markdown", md), ("rendered", rendered_card(RELEASED["rendered"].read_text()))):
        assert in_order(released, ours), (name, [h for h in released if h not in ours])
    assert len(ours) == len(set(ours))  # every section once


def _bullets(card: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^- ([^:*\n]+): (.+)$", card, re.M))


def test_card_values_are_the_runs(run):
    tmp, cfg = run
    for stage, mask in (("lori_d", tmp / "run" / "calibration" / "masks.safetensors"),
                        ("lori_s", tmp / "run" / "lori_s" / "lori_masks.safetensors")):
        card = (tmp / "run" / stage / "README.md").read_text()
        front, _ = markdown_card(card)
        values = _bullets(card)
        lori, data = cfg["model"]["lori"], cfg["data"]
        assert front["base_model"] == cfg["model"]["model"] and front["license"] == "unknown"
        assert front["tags"] == ["lori", stage.replace("_", "-"), data["task"]]
        assert values["Adapter rank (r)"] == str(lori["r"]) and float(values["LoRA alpha"]) == lori["alpha"]
        assert float(values["Sparsity"].split()[0]) == lori["sparsity"]
        assert values["Mask granularity"] == "model" and values["A seed"] == "0"
        assert values["Steps"] == str(cfg["pipeline"][f"{'dense' if stage == 'lori_d' else 'sparse'}_steps"])
        assert float(values["Learning rate"]) == cfg["model"]["lr"] and values["Protocol"] == "lori"
        assert values["task"] == data["task"] and values["train_file"] == data["train_file"]
        assert values["held_out"] == str(data["held_out"]) and values["max_length"] == str(data["max_length"])
        assert f"`{mask}`" in card and mask.is_file()
        meta = json.loads((tmp / "run" / stage / "lori_meta.json").read_text())
        assert values["Trainable parameters"] == f"{meta['meta']['trainable']:,}"
        assert f'PeftModel.from_pretrained(base_model, "{tmp / "run" / stage}")' in card
        assert f"peft={tmp / 'run' / stage}" in card  # the lm-eval command


def _eval(tmp: Path) -> dict:
    return eval_command.main(["--model", "tiny-llama", "--adapter", str(tmp / "run" / "lori_s"),
                              "--output_dir", str(tmp / "eval"), "--eval.max_examples=2", "--eval.max_new_tokens=4",
                              "--eval.held_out=4", "--eval.progress=false"])


def test_eval_writes_its_results_into_the_card_once(run):
    tmp, _ = run
    path = tmp / "run" / "lori_s" / "README.md"
    before = path.read_text()
    assert read_card_results(before) == {}
    report = _eval(tmp)
    once = path.read_text()
    results = read_card_results(once)
    assert results["gsm8k"]["metrics"] == {"accuracy": report["results"]["gsm8k"]["accuracy"]}
    assert results["gsm8k"]["n"] == 2 and results["gsm8k"]["results_file"] == str(tmp / "eval" / "results.json")
    assert once.count("### Results") == 1 and once.count("| gsm8k | accuracy |") == 1
    outside = re.compile(r"<!-- lori:results .*?<!-- /lori:results -->", re.S)
    assert outside.sub("", once) == outside.sub("", before)  # nothing else changed
    _eval(tmp)
    assert path.read_text() == once  # idempotent: the same results, one section


def test_results_of_another_task_join_the_ones_there(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# x\n### Results\n<!-- lori:results {} -->\nnone\n<!-- /lori:results -->\n## Citation\n")
    report = {"results": {"gsm8k": {"accuracy": 0.5, "n": 4}}, "settings": {"protocol": "lori"}, "target": {}}
    assert update_card_results(tmp_path, report, "a/results.json")
    report["results"] = {"mbpp": {"pass@1": 0.25, "n": 8, "samples_per_problem": 1}}
    update_card_results(tmp_path, report, "b/results.json")
    results = read_card_results(card.read_text())
    assert results["gsm8k"]["metrics"] == {"accuracy": 0.5} and results["mbpp"]["metrics"] == {"pass@1": 0.25}
    assert card.read_text().endswith("<!-- /lori:results -->\n## Citation\n")
    foreign = tmp_path / "released"
    foreign.mkdir()
    (foreign / "README.md").write_text(RELEASED["markdown"].read_text())
    assert not update_card_results(foreign, report, "c")  # a card lori did not write is left alone
    assert (foreign / "README.md").read_text() == RELEASED["markdown"].read_text()


@pytest.mark.parametrize("method, library", [("lora", "peft"), ("lori_d", "peft"), ("full", "transformers")])
def test_lori_fit_baselines_get_a_card(tiny, tmp_path, method, library):  # noqa: F811 - the fixture
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
               for ids in torch.randint(0, 128, (2, 2, 8), generator=torch.Generator().manual_seed(0))]
    trainer = _trainer(2, callbacks=[SaveAdapter(tmp_path / "out", method)])
    trainer.fit(_module(method), DataLoader(batches, batch_size=None))
    card = (tmp_path / "out" / "README.md").read_text()
    front, headings = markdown_card(card)
    assert front["library_name"] == library and front["tags"] == ["lori", method]
    values = _bullets(card)
    assert values["Steps"] == "2" and in_order(markdown_card(RELEASED["markdown"].read_text())[1], headings)
    assert ("A seed" in values) == (method == "lori_d") and "Sparsity" not in values  # no mask: no sparsity
    assert ("Adapter rank (r)" in values) == (method != "full")
    loader = "AutoModelForCausalLM.from_pretrained" if method == "full" else "PeftModel.from_pretrained"
    assert f'{loader}(' in card.split("## How to Get Started")[1].split("## Training Details")[0]


def test_a_card_that_cannot_be_written_keeps_its_results(tmp_path, monkeypatch, capsys):
    from lori.training import card_results

    text = "### Results\n<!-- lori:results {} -->\nnone\n<!-- /lori:results -->\n"
    (tmp_path / "README.md").write_text(text)

    def read_only(path, data):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(card_results, "write_text_atomic", read_only)
    report = {"results": {"gsm8k": {"accuracy": 0.5, "n": 4}}}
    assert not update_card_results(tmp_path, report, "r.json")
    assert (tmp_path / "README.md").read_text() == text
    assert capsys.readouterr().err.startswith(f"lori: the card {tmp_path / 'README.md'} keeps its old results")
