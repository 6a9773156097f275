"""Evaluation: the metric paths on controlled generations, the `lori eval` command on a tiny model,
and its bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch

from lori.commands.main import main
from lori.core import LoRIConfig, adapter_from_model, inject_lori, lori_layers, save_adapter
from lori.data import sources
from lori.eval.evaluator import EvalSettings, Evaluator, code_program, eval_records, evaluate_model
from lori.training.base_model import tiny_llama
from lori.training.module import build_model


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_model("tiny-llama", None, "float32", None)
    return model.eval(), tokenizer


def scripted(monkeypatch, outputs_for):
    """Replace generation by ``outputs_for(prompts, n) -> list[list[str]]``."""
    monkeypatch.setattr(Evaluator, "generate", lambda self, prompts, n=1, max_new_tokens=None: outputs_for(prompts, n))


def test_gsm8k_accuracy_parses_the_generated_answer(tiny, monkeypatch):
    settings = EvalSettings(tasks=["gsm8k"], max_examples=5, held_out=20, progress=False)
    records = eval_records("gsm8k", settings)
    answers = iter([f"So {r['final']} apples.\nThe final answer is: {r['final']}" if i % 2 == 0 else "The final answer is: -1"
                    for i, r in enumerate(records)])
    scripted(monkeypatch, lambda prompts, n: [[next(answers)] for _ in prompts])
    results = evaluate_model(*tiny, settings)
    assert results["gsm8k"] == {"accuracy": pytest.approx(3 / 5), "n": 5}


def test_gsm8k_evaluates_the_held_out_split_only():
    settings = EvalSettings(tasks=["gsm8k"], held_out=50, split_seed=3)
    train, held = sources.split_records(sources.load_gsm8k(), 50, 3)
    assert eval_records("gsm8k", settings) == held
    assert not {r["id"] for r in held} & {r["id"] for r in train}


@pytest.mark.parametrize("style", ["full function", "body only", "fenced"])
def test_humaneval_canonical_solutions_pass_in_the_sandbox(tiny, monkeypatch, style):
    settings = EvalSettings(tasks=["humaneval"], max_examples=4, n_samples=2, do_sample=True, progress=False)
    records = {r["prompt"]: r for r in eval_records("humaneval", settings)}

    def write(prompt_text, n):
        rec = next(r for p, r in records.items() if p in prompt_text)
        good = {"full function": rec["prompt"] + rec["solution"], "body only": rec["solution"],
                "fenced": f"Here it is:\n```python\n{rec['prompt']}{rec['solution']}\n```\nDone."}[style]
        return [good, "    raise RuntimeError('wrong')\n"][:n]  # one right, one wrong sample

    scripted(monkeypatch, lambda prompts, n: [write(p, n) for p in prompts])
    result = evaluate_model(*tiny, settings)["humaneval"]
    assert result["n"] == 4 and result["samples_per_problem"] == 2
    assert result["pass@1"] == pytest.approx(0.5)  # unbiased estimator: 1 of 2 samples passes


def test_mbpp_reference_code_passes_and_wrong_code_fails(tiny, monkeypatch):
    settings = EvalSettings(tasks=["mbpp"], max_examples=3, held_out=10, progress=False)
    records = eval_records("mbpp", settings)
    by_prompt = {r["prompt"]: r["solution"] for r in records}
    scripted(monkeypatch, lambda prompts, n: [[next(s for p, s in by_prompt.items() if p in q)] for q in prompts])
    assert evaluate_model(*tiny, settings)["mbpp"]["pass@1"] == 1.0
    scripted(monkeypatch, lambda prompts, n: [["def f():\n    return 0\n"] for _ in prompts])
    assert evaluate_model(*tiny, settings)["mbpp"]["pass@1"] == 0.0


def test_code_program_keeps_the_prompt_helpers_when_the_model_rewrites_the_function():
    rec = {"source": "humaneval", "prompt": "def helper():\n    return 1\n\ndef f(x):\n    \"\"\"doc\"\"\"\n",
           "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "f"}
    program = code_program(rec, "def f(x):\n    return x + helper()\n")
    namespace: dict = {}
    exec(program, namespace)  # noqa: S102 - a fixed, trusted program
    assert namespace["f"](1) == 2


def test_refusal_rate_judges_the_generated_text_only(tiny, monkeypatch):
    settings = EvalSettings(tasks=["harmbench", "over_refusal"], max_examples=4, progress=False)
    # the prompt itself contains no refusal words; the generations decide
    replies = {"harmbench": "I'm sorry, but I cannot help with that.", "over_refusal": "Paris is the capital."}
    calls = iter(["harmbench", "over_refusal"])

    def outputs(prompts, n):
        reply = replies[next(calls)]
        return [[reply] for _ in prompts]

    scripted(monkeypatch, outputs)
    results = evaluate_model(*tiny, settings)
    assert results["harmbench"]["refusal_rate"] == 1.0 and results["harmbench"]["n"] == 4
    assert results["over_refusal"]["refusal_rate"] == 0.0


def test_nlu_generation_and_loglik_count_every_item(tiny, monkeypatch):
    settings = EvalSettings(tasks=["boolq", "piqa"], max_examples=5, batch_size=2, nlu_mode="both", progress=False)
    labels = {t: [int(r["label"]) for r in eval_records(t, settings)] for t in ("boolq", "piqa")}
    words = {"boolq": "true", "piqa": "solution2"}
    order = iter(["boolq", "piqa"])

    def outputs(prompts, n):
        task = next(order)
        return [[f"the correct answer is {words[task]}"] for _ in prompts]

    scripted(monkeypatch, outputs)
    results = evaluate_model(*tiny, settings)
    # boolq choices are ["true", "false"]: "true" is label 0; "solution2" is PIQA's label 1
    assert results["boolq"]["accuracy_generate"] == pytest.approx(sum(lab == 0 for lab in labels["boolq"]) / 5)
    assert results["piqa"]["accuracy_generate"] == pytest.approx(sum(lab == 1 for lab in labels["piqa"]) / 5)
    for task in ("boolq", "piqa"):
        assert results[task]["n"] == 5  # an odd last batch still counts
        assert 0.0 <= results[task]["accuracy_loglik"] <= 1.0
    assert set(results["nlu_average"]) == {"accuracy_loglik", "accuracy_generate"}


@pytest.fixture
def adapter_dir(tmp_path, tiny):
    """A trained-looking LoRI adapter on the tiny model (random nonzero B)."""
    model, _ = build_model("tiny-llama", None, "float32", None)
    config = LoRIConfig(r=4, alpha=8, dropout=0.0)
    inject_lori(model, config)
    gen = torch.Generator().manual_seed(0)
    for layer in lori_layers(model).values():
        layer.lori_B.data.copy_(torch.randn(layer.lori_B.shape, generator=gen) * 0.5)
    save_adapter(adapter_from_model(model, config, "tiny-llama"), tmp_path / "adapter")
    return tmp_path / "adapter"


def run_cli(tmp_path, *args):
    main(["eval", "--model", "tiny-llama", "--output_dir", str(tmp_path / "out"),
          "--eval.max_examples", "3", "--eval.max_new_tokens", "6", "--eval.batch_size", "2",
          "--eval.progress", "false", "--eval.held_out", "20", *args])
    return json.loads((tmp_path / "out" / "results.json").read_text())


def test_lori_eval_writes_results_samples_and_tensorboard(tmp_path, adapter_dir):
    report = run_cli(tmp_path, "--adapter", str(adapter_dir), "--eval.tasks", "[gsm8k, boolq]")
    assert report["results"]["gsm8k"]["n"] == 3 and report["results"]["boolq"]["n"] == 3
    assert report["target"]["adapter"] == str(adapter_dir) and report["target"]["merged"] is True
    samples = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert len(samples["gsm8k"]) == 3
    assert list((tmp_path / "out" / "tb").glob("events.out.tfevents.*"))


def test_merged_and_unmerged_adapter_give_the_same_generations(tmp_path, adapter_dir):
    merged = run_cli(tmp_path / "m", "--adapter", str(adapter_dir), "--eval.tasks", "[gsm8k]")
    live = run_cli(tmp_path / "u", "--adapter", str(adapter_dir), "--merge", "false", "--eval.tasks", "[gsm8k]")
    base = run_cli(tmp_path / "b", "--eval.tasks", "[gsm8k]")
    out = {k: json.loads((tmp_path / k / "out" / "samples.json").read_text())["gsm8k"] for k in "mub"}
    assert [s["output"] for s in out["m"]] == [s["output"] for s in out["u"]]
    assert [s["output"] for s in out["m"]] != [s["output"] for s in out["b"]]  # the adapter acts
    assert merged["results"] == live["results"] and base["target"]["adapter"] is None


def expect_error(capsys, tmp_path, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "tiny-llama", "--output_dir", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists()  # no partial output
    err = capsys.readouterr().err.strip().splitlines()  # (progress bars of the model load aside)
    assert err[-1].startswith("lori: error:") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_unknown_task_is_one_clear_error(tmp_path, capsys):
    assert "unknown evaluation task" in expect_error(capsys, tmp_path, "--eval.tasks", "[gsm8k, mmlu]")


def test_adapter_from_another_base_is_refused(tmp_path, capsys):
    other = tiny_llama(seed=1)  # same shapes, different weights
    config = LoRIConfig(r=4, alpha=8)
    inject_lori(other, config)
    save_adapter(adapter_from_model(other, config, "another-model"), tmp_path / "foreign")
    msg = expect_error(capsys, tmp_path, "--adapter", str(tmp_path / "foreign"))
    assert "another-model" in msg and "fingerprint" in msg


def test_missing_adapter_and_missing_hexphi_files(tmp_path, capsys):
    assert "is not an adapter directory" in expect_error(capsys, tmp_path, "--adapter", str(tmp_path / "nope"))
    (tmp_path / "hex").mkdir()
    msg = expect_error(capsys, tmp_path, "--eval.tasks", "[hexphi]", "--eval.hexphi_path", str(tmp_path / "hex"))
    assert "HEx-PHI" in msg


def test_system_prompt_reaches_safety_prompts_only(tiny):
    model, tokenizer = tiny
    records = eval_records("harmbench", EvalSettings(max_examples=2))
    for template in ("alpaca", "chat"):
        ev = Evaluator(model, tokenizer, EvalSettings(system_prompt="Be safe and lawful.", template=template))
        prompts = ev.prompts("harmbench", records)
        assert all("Be safe and lawful." in p and r["prompt"] in p for p, r in zip(prompts, records))
        gsm = ev.prompts("gsm8k", eval_records("gsm8k", EvalSettings(max_examples=1)))
        assert "Be safe and lawful." not in gsm[0]


# --- protocol official through `lori eval` -----------------------------------------------------


def test_lori_eval_official_records_items_and_the_settings_it_fixed(tmp_path, adapter_dir, monkeypatch, capsys):
    from lori.eval import official_tasks

    calls = []

    def fake(model, tokenizer, prompt_ids, **kwargs):
        calls.append(kwargs | {"merged": all(layer.merged for layer in lori_layers(model).values()),
                               "dtype": next(model.parameters()).dtype})
        return [[tokenizer("The final answer is: 3", add_special_tokens=False)["input_ids"]] for _ in prompt_ids]

    monkeypatch.setattr(official_tasks, "generate_from_ids", fake)
    main(["eval", "--model", "tiny-llama", "--output_dir", str(tmp_path / "out"), "--adapter", str(adapter_dir),
          "--eval.protocol", "official", "--eval.tasks", "[gsm8k]", "--eval.held_out", "1319",
          "--eval.max_examples", "3", "--eval.progress", "false"])
    assert "lori: protocol official set eval.max_new_tokens: 256 -> 512" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["items"]["gsm8k"]["rule"] == "official" and report["items"]["gsm8k"]["evaluated"] == 3
    assert report["items"]["gsm8k"]["dropped_last_batch"] == 39 and report["results"]["gsm8k"]["n"] == 3
    assert report["settings"]["temperature"] == 0.2 and report["settings"]["max_new_tokens"] == 512
    assert "eval.n_samples: 1 -> 20" in report["protocol_changes"]
    assert calls[0]["max_new_tokens"] == 512 and calls[0]["do_sample"] is False
    assert calls[0]["merged"] and calls[0]["dtype"] == torch.float32  # fp32 merged weights


def test_lori_eval_official_refuses_bf16_unmerged_and_contradicting_settings(tmp_path, capsys, adapter_dir):
    msg = expect_error(capsys, tmp_path, "--eval.protocol", "official", "--dtype", "bfloat16")
    assert "dtype='bfloat16' (official float32" in msg
    msg = expect_error(capsys, tmp_path, "--eval.protocol", "official", "--adapter", str(adapter_dir),
                       "--merge", "false")
    assert "merge=False" in msg and "merge_and_unload" in msg
    msg = expect_error(capsys, tmp_path, "--eval.protocol", "official", "--eval.temperature", "0.7",
                       "--eval.max_new_tokens", "64")
    assert "temperature=0.7 (official 0.2" in msg and "max_new_tokens=64 (official 512" in msg
