"""The paper-claim experiments run end to end at toy size (so they cannot rot) and write their
results and plots."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def load(name: str):
    sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(f"exp_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_single_task(tmp_path):
    """Each kind of method (LoRI pipeline, PEFT LoRA, own optimizer, AdaLoRA schedule, PiSSA conversion,
    VeRA, full fine-tuning) trains, saves, reloads and is measured; one more in its own process."""
    some = ["lori", "lora", "lora_fa", "adalora", "pissa", "vera", "full"]
    results = load("single_task").main(["--tiny", "--in-process", "--out", str(tmp_path), "--methods", *some])
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"base", "LoRI-D", "LoRI-S", *some[1:]}
    assert rows["LoRI-S"]["trainable"] == round(0.1 * rows["LoRI-D"]["trainable"])
    assert rows["lora_fa"]["trainable"] == rows["LoRI-D"]["trainable"] < rows["lora"]["trainable"]  # A frozen
    assert rows["pissa"]["trainable"] == rows["lora"]["trainable"] < rows["full"]["trainable"]
    assert rows["vera"]["trainable"] < rows["LoRI-D"]["trainable"]
    for name, row in rows.items():
        if name != "base":
            assert row["steps"] == 3 and row["median_step_s"] > 0 and row["memory_mib"] is not None, name
    for method in ("LoRI-D", "LoRI-S", "lora", "lora_fa", "pissa"):
        assert rows[method]["loss/gsm8k"] < rows["base"]["loss/gsm8k"], method  # each learned something
    table = (tmp_path / "single_task.md").read_text()
    assert all(f"| {name} |" in table for name in rows) and "RSS growth" in table
    assert (tmp_path / "single_task.png").is_file()
    assert json.loads((tmp_path / "single_task.json").read_text())["rows"] == results["rows"]
    # the default: a process per method (ia3 runs now, vera is read back from vera/rows.json)
    again = load("single_task").main(["--tiny", "--out", str(tmp_path), "--methods", "vera", "ia3"])
    assert [r["method"] for r in again["rows"]] == ["base", "vera", "ia3"]
    assert again["rows"][1]["loss/gsm8k"] == rows["vera"]["loss/gsm8k"]
    assert again["memory"] == "peak RSS" and again["rows"][2]["memory_mib"] > 100  # the process, base model included


def _merge_root(tmp_path_factory) -> Path:
    """One root for both merge experiments: the shared-A comparison reuses merge_tasks' runs."""
    return tmp_path_factory.getbasetemp() / "merge_tasks_experiment"


def test_merge_tasks(tmp_path_factory):
    out = _merge_root(tmp_path_factory)
    results = load("merge_tasks").main(["--tiny", "--out", str(out)])
    names = [r["model"] for r in results["rows"]]
    assert {"base", "LoRI-D concat", "LoRI-D linear", "LoRI-D linear_eq8", "LoRI-S concat", "LoRI-S linear"} <= set(
        names)
    diag = results["diagnostics"]["add-mul"]
    assert 0.0 <= diag["lori_d_mean_abs_cos"] < 0.5
    assert diag["lori_s_mask_overlap"]["intersection"] < 0.05  # ~ (1 - s)^2 = 0.01
    merges = [r for r in results["rows"] if "method" in r]
    assert len(merges) == 6 and all(r["retained_gain"] == r["retained_gain"] for r in merges)  # not NaN
    assert (out / "merge_tasks.png").is_file()


def test_merge_shared_vs_independent_A(tmp_path_factory):
    out = _merge_root(tmp_path_factory)
    results = load("merge_shared_vs_independent_A").main(["--tiny", "--out", str(out)])
    settings = results["settings"]
    assert settings["independent"]["a_seeds"] == {"add": 0, "mul": 1}
    assert settings["shared"]["a_seeds"] == {"add": 0, "mul": 0}
    assert settings["shared"]["runs"] == {"add": "add", "mul": "mul_A0"}  # the seed-0 run serves both settings
    indep, shared = results["summary"]["independent"], results["summary"]["shared"]
    for stage in ("lori_d", "lori_s"):
        assert shared[stage]["mean_abs_cos"] > indep[stage]["mean_abs_cos"]  # one A: updates share a row space
        assert set(shared[stage]["retained_gain"]) == {"concat", "linear", "linear_eq8"}
    assert indep["lori_d"]["mean_abs_cos"] < 0.5
    assert indep["lori_s"]["mask_overlap"] < 0.05 and indep["lori_s"]["mask_overlap_independent"] > 0
    assert len(results["table"].splitlines()) == 2 + 4
    saved = json.loads((out / "merge_shared_vs_independent_A.json").read_text())
    assert saved["summary"] == results["summary"]


@pytest.mark.parametrize("run", ["unprotected", "protected", "dense"])
def test_continual(tmp_path_factory, run):
    out = tmp_path_factory.getbasetemp() / "continual_experiment"
    if not (out / "continual.json").is_file():
        load("continual").main(["--tiny", "--out", str(out)])
    results = json.loads((out / "continual.json").read_text())["runs"][run]["results"]
    assert {"safety", "task"} <= set(results)
    assert "refusal_rate" in results["task"]["harmbench"]
    assert (out / run / "continual.png").is_file()


def test_bench_train_toy_size_both_precisions(tmp_path, capsys):
    bench = load("bench_train")
    methods = ["floor", "lori_d", "lori_s", "lora"]
    bench.main(["--sizes", "toy", "--precision", "fp32", "bf16", "--steps", "1", "--warmup", "0",
                "--rss-repeats", "0", "--methods", *methods])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [(r["size"], r["precision"], r["dtype"]) for r in lines] == [
        ("toy", "fp32", "float32"), ("toy", "bf16", "bfloat16")]
    fp32, bf16 = lines
    assert bf16["adapter_dtype"] == "float32" and set(bf16["step_ms"]) == set(methods)
    ratios = bf16["ratios"]
    for key in ("floor_bf16_vs_fp32", "lori_s_vs_floor", "lori_s_vs_lora"):
        assert ratios[key] > 0 and key in ratios["met"]
    # AdamW state stays fp32 in bf16 mode: the same bytes as fp32 LoRI-S, 0.1x fp32 LoRI-D
    assert bf16["optimizer_state_bytes"]["lori_s"] == fp32["optimizer_state_bytes"]["lori_s"]
    assert abs(ratios["opt_state_lori_s_bf16_vs_lori_d_fp32"] - 0.10) < 0.005
    assert bf16["trainable"]["lori_s"] == bf16["trainable"]["lori_s_mask"]
    results = tmp_path / "bench.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in lines))
    bench.main(["--table", str(results)])
    table = capsys.readouterr().out
    assert "toy bf16" in table and "bf16 floor / fp32 floor" in table
    peak = bench.rss_child(bench.parse_args(["--precision", "bf16"]), "toy", "lori_s")  # the child's work
    assert peak["peak"] > 0 and "over_base" in peak


@pytest.mark.slow
def test_bench_memory_toy_size(tmp_path):
    """experiments/bench_memory.py --tiny: every part runs and gives its ratios (slow: fresh processes)."""
    out = tmp_path / "bench_memory.json"
    results = load("bench_memory").main(["--tiny", "--out", str(out), "--workdir", str(tmp_path / "work")])
    parts = results["parts"]
    assert set(parts) == {"base_bytes", "rss", "pipeline", "base_loss", "checkpointing", "llama3"}
    assert parts["base_loss"]["losses"]["lori_nf4"] == parts["base_loss"]["losses"]["transformers_nf4"]
    assert parts["base_bytes"]["nf4_bytes"] < parts["base_bytes"]["fp32_bytes"]
    assert abs(parts["llama3"]["nf4"]["ratio"] - 1) <= 0.05 and parts["llama3"]["met"]
    for part, key in (("rss", "nf4_vs_fp32"), ("checkpointing", "peak_vs_plain"), ("checkpointing", "time_vs_plain")):
        assert parts[part][key] > 0, (part, key)
    assert 0 < parts["pipeline"]["mask_overlap"] <= 1 and set(parts["pipeline"]["nf4_vs_fp32_relative"])
    assert json.loads(out.read_text())["parts"]["llama3"]["commit"]
