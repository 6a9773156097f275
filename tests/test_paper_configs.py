"""The paper's settings as configs: hyperparameters vs Appendix D, dry-run sizes vs the paper.

Reference values are typed here from the paper (Tables 1, 2, 4-10, 13, 14), independently of the
YAML files, so a wrong number in a config fails a test.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import asdict
from pathlib import Path
from typing import Union

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy, StrategyRegistry
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

from lori.commands.continual_command import parse_continual_config
from lori.commands.dryrun_command import dry_run, format_table, main
from lori.commands.lightning_cli import parse_config, parse_fit_config
from lori.core import LoRIConfig, LoRIConfigError, calibrate, get_B, inject_lori
from lori.core.io import CONFIG_FILE, AdapterFileError
from lori.core.masks import keep_count
from lori.eval.evaluator import EvalSettings
from lori.training.base_model import tiny_llama
from lori.training.baselines import OPTIONS, BaselineOptions
from lori.training.baselines.methods import resolved_options
from lori.training.continual import ContinualConfig, ContinualConfigError
from lori.training.memory_model import adapter_shape, sparse_trainable
from lori.training.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parent.parent
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
TRAINER = sorted((ROOT / "configs" / "trainer").glob("*.yaml"))
MERGE = sorted((ROOT / "configs" / "paper" / "merge").glob("*.yaml"))
CONTINUAL = sorted((ROOT / "configs" / "paper" / "continual").glob("*.yaml"))
MODELS = {"llama3_8b": "meta-llama/Meta-Llama-3-8B", "mistral_7b": "mistralai/Mistral-7B-v0.1"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASK_OF_TABLE = {"nlu": ("instruct", 1), "gsm8k": ("gsm8k", 3), "codealpaca": ("codealpaca", 2),
                 "saferpaca": ("saferpaca", 1)}  # Tables 4, 5, 6, 7: data task, epochs

# Appendix D, Tables 4-7: (task, model, r) -> (alpha LoRI-D, alpha LoRI-S, lr LoRI-D, lr LoRI-S)
APPENDIX_D = {
    ("nlu", "llama3_8b", 32): (64, 64, 5e-5, 5e-4), ("nlu", "llama3_8b", 64): (128, 128, 5e-5, 1e-4),
    ("nlu", "mistral_7b", 32): (64, 64, 1e-5, 1e-4), ("nlu", "mistral_7b", 64): (128, 128, 1e-5, 1e-4),
    ("gsm8k", "llama3_8b", 32): (64, 64, 5e-5, 5e-4), ("gsm8k", "llama3_8b", 64): (128, 128, 5e-5, 1e-3),
    ("gsm8k", "mistral_7b", 32): (64, 64, 5e-5, 5e-4), ("gsm8k", "mistral_7b", 64): (32, 64, 1e-4, 5e-4),
    ("codealpaca", "llama3_8b", 32): (64, 64, 5e-5, 5e-4), ("codealpaca", "llama3_8b", 64): (128, 128, 1e-5, 1e-4),
    ("codealpaca", "mistral_7b", 32): (64, 64, 5e-5, 5e-4), ("codealpaca", "mistral_7b", 64): (128, 128, 1e-5, 1e-4),
    ("saferpaca", "llama3_8b", 32): (64, 64, 5e-5, 5e-4), ("saferpaca", "llama3_8b", 64): (128, 128, 1e-5, 1e-4),
    ("saferpaca", "mistral_7b", 32): (64, 64, 5e-5, 5e-4), ("saferpaca", "mistral_7b", 64): (128, 128, 1e-5, 1e-4),
}
# "# Params (%)" of LoRI-D and LoRI-S (Tables 1, 2, 13, 14): (model, r) -> (D, D %, S, S %)
PAPER_PARAMS = {
    ("llama3_8b", 32): (44e6, 0.54, 4.4e6, 0.05), ("llama3_8b", 64): (88e6, 1.07, 8.8e6, 0.11),
    ("mistral_7b", 32): (44e6, 0.60, 4.4e6, 0.06), ("mistral_7b", 64): (88e6, 1.18, 8.8e6, 0.12),
}
# exact B entries: 32 layers x r x (4096 q + 1024 k + 1024 v + 4096 o + 14336 gate + 14336 up + 4096 down)
EXACT_DENSE = {32: 44_040_192, 64: 88_080_384}


def _key(path: Path) -> tuple[str, str, int]:
    """(task, model, r) of configs/paper/<model>_r<r>_<task>.yaml."""
    model, rank, task = path.stem.rsplit("_", 2)
    return task, model, int(rank.removeprefix("r"))


def _ids(path: Path) -> str:
    return str(path.relative_to(ROOT / "configs"))


def test_every_paper_setting_has_a_config():
    keys = {_key(p) for p in PAPER}
    assert keys == set(APPENDIX_D), sorted(set(APPENDIX_D) ^ keys)


@pytest.mark.parametrize("path", PAPER + TRAINER, ids=_ids)
def test_yaml_parses_with_the_lori_cli(path):
    cfg = parse_config(path)
    LoRIConfig.from_dict(dict(cfg["model"]["lori"]))
    PipelineConfig(**cfg["pipeline"])


@pytest.mark.parametrize("path", PAPER, ids=_ids)
def test_paper_config_matches_appendix_d(path):
    task, model, r = _key(path)
    alpha_d, alpha_s, lr_d, lr_s = APPENDIX_D[task, model, r]
    data_task, epochs = TASK_OF_TABLE[task]
    cfg = parse_config(path)
    m, lori, data, trainer, pipe = cfg["model"], cfg["model"]["lori"], cfg["data"], cfg["trainer"], cfg["pipeline"]
    assert m["model"] == MODELS[model]
    # Table 5 prints dropout 0.05; the official code sets it to 0 (utils.disable_dropout): the protocol's value
    assert (lori["r"], lori["alpha"], lori["dropout"], list(lori["target_modules"])) == (r, alpha_d, 0.0, TARGETS)
    assert (lori["sparsity"], lori["granularity"]) == (0.9, "model")
    assert cfg["protocol"] == "official" and m["protocol"] == "official" and data["protocol"] == "official"
    assert (m["weight_decay"], m["gradient_clipping"], trainer["gradient_clip_val"]) == (0.0, "per_tensor", 1.0)
    assert data["max_prompt_length"] == 256
    assert (pipe["sparse_alpha"] or lori["alpha"]) == alpha_s
    assert m["lr"] == pytest.approx(lr_d) and pipe["sparse_lr"] == pytest.approx(lr_s)
    assert (m["warmup_steps"], m["scheduler"]) == (0, "constant")
    assert (pipe["dense_epochs"], pipe["sparse_epochs"]) == (epochs, epochs)
    assert (data["task"], data["max_length"], data["held_out"]) == (data_task, 512, 0)
    assert data["batch_size"] * trainer["devices"] * trainer["num_nodes"] * trainer["accumulate_grad_batches"] == 32
    # frozen base in bf16, adapter fp32 (lori casts); no autocast, which bf16-true would not allow
    assert (m["dtype"], trainer["precision"]) == ("bfloat16", "32-true")
    assert pipe["output_dir"] == f"runs/paper/{path.stem}"


def test_mistral_r64_gsm8k_alpha_inconsistency_is_kept_and_noted():
    path = ROOT / "configs" / "paper" / "mistral_7b_r64_gsm8k.yaml"
    cfg = parse_config(path)
    assert (cfg["model"]["lori"]["alpha"], cfg["pipeline"]["sparse_alpha"]) == (32, 64)
    others = [p for p in PAPER if p != path]
    assert all(parse_config(p)["pipeline"]["sparse_alpha"] is None for p in others)


def test_every_task_shares_one_A_seed():
    """The official code gives every task of a base model the same A (torch's default generator after
    the same set-up, train_lori.py): paper mode draws every task's A from one seed, and says why."""
    seeds = {path.stem: yaml.safe_load(path.read_text())["model"]["lori"]["seed"] for path in PAPER + CONTINUAL}
    assert set(seeds.values()) == {0}, seeds


# ---- dry run -------------------------------------------------------------------------------
@pytest.mark.parametrize("model,r", sorted(PAPER_PARAMS))
def test_dry_run_counts_match_the_paper(model, r):
    row = dry_run(ROOT / "configs" / "paper" / f"{model}_r{r}_gsm8k.yaml")
    d, d_pct, s, s_pct = PAPER_PARAMS[model, r]
    assert row["trainable_lori_d"] == EXACT_DENSE[r]
    assert row["trainable_lori_s"] == keep_count(EXACT_DENSE[r], 0.9)  # 4,404,019 / 8,808,038
    assert round(row["trainable_lori_d"] / 1e6) == d / 1e6
    assert round(row["trainable_lori_s"] / 1e5) == s / 1e5
    # the paper divides by base + adapter (A and B) entries, as PEFT's print_trainable_parameters;
    # it prints Mistral-7B r=64 LoRI-D as 1.18% where that gives 1.189% (truncated, not rounded)
    assert abs(row["percent_lori_d"] - d_pct) < 0.01
    assert abs(row["percent_lori_s"] - s_pct) < 0.006
    assert row["base_params"] == {"llama3_8b": 8_030_261_248, "mistral_7b": 7_241_732_096}[model]


@pytest.mark.parametrize("path", PAPER, ids=_ids)
def test_dry_run_of_every_paper_config(path):
    task, model, r = _key(path)
    row = dry_run(path)
    assert (row["arch"], row["r"], row["global_batch"]) == (model, r, 32)
    assert row["trainable_lori_d"] == EXACT_DENSE[r]
    assert row["alpha"] == APPENDIX_D[task, model, r][0] and row["sparse_alpha"] == APPENDIX_D[task, model, r][1]
    assert 0 < row["memory_gib_lori_s"]["total"] < 100


def test_dry_run_with_strategy_presets():
    config = ROOT / "configs" / "paper" / "llama3_8b_r32_gsm8k.yaml"
    rows = {p.stem: dry_run(config, p) for p in TRAINER}
    assert {k: r["plan"]["strategy"] for k, r in rows.items()} == {
        "ddp": "ddp", "fsdp": "fsdp", "deepspeed_zero2": "zero2", "deepspeed_zero3": "zero3"}
    assert all(r["global_batch"] == 32 and r["plan"]["world"] == 8 for r in rows.values())
    assert rows["fsdp"]["plan"]["checkpointing"]
    total = {k: r["memory_gib_lori_d"]["total"] for k, r in rows.items()}
    assert total["fsdp"] < total["deepspeed_zero3"] < total["deepspeed_zero2"] < total["ddp"]
    assert total["fsdp"] < 24  # the paper trained on 8 x A5000 (24 GB) with FSDP
    assert "fsdp x8 +ckpt" in format_table(list(rows.values()))


def _with(tmp_path: Path, config: Path, model: dict | None = None, trainer: dict | None = None) -> Path:
    raw = yaml.safe_load(config.read_text())
    raw["model"].update(model or {})
    raw["trainer"].update(trainer or {})
    out = tmp_path / config.name
    out.write_text(yaml.safe_dump(raw))
    return out


def test_dry_run_memory_follows_the_dtype(tmp_path):
    """bf16 base: 2 bytes per weight (Llama-3-8B: 16 GB, not 32); A, B, gradient and AdamW: fp32."""
    config = ROOT / "configs" / "paper" / "llama3_8b_r32_gsm8k.yaml"
    gib = 1024**3
    bf16 = dry_run(config)
    fp32 = dry_run(_with(tmp_path, config, model={"dtype": "float32"}))
    mixed = dry_run(_with(tmp_path, config, model={"dtype": "float32"}, trainer={"precision": "bf16-mixed"}))
    assert (bf16["plan"]["weight_bytes"], bf16["plan"]["compute_bytes"]) == (2, 2)
    assert (fp32["plan"]["weight_bytes"], fp32["plan"]["compute_bytes"]) == (4, 4)
    assert (mixed["plan"]["weight_bytes"], mixed["plan"]["compute_bytes"]) == (4, 2)
    d = bf16["memory_gib_lori_d"]
    assert d["weights"] == pytest.approx(8_030_261_248 * 2 / gib, abs=0.01)  # 14.96 GiB = 16.1 GB
    assert fp32["memory_gib_lori_d"]["weights"] == pytest.approx(8_030_261_248 * 4 / gib, abs=0.01)
    assert d["optimizer"] == pytest.approx(EXACT_DENSE[32] * 12 / gib, abs=0.01)  # fp32 grad + 2 states
    assert d["optimizer"] == fp32["memory_gib_lori_d"]["optimizer"]  # the adapter is fp32 either way
    assert d["adapter"] == fp32["memory_gib_lori_d"]["adapter"]
    assert d["casts"] == 0 and fp32["memory_gib_lori_d"]["casts"] == 0
    # fp32 base under autocast: only the LM head's 16-bit copy (the fused layers recast W0 in backward)
    assert mixed["memory_gib_lori_d"]["casts"] == pytest.approx(128256 * 4096 * 2 / gib, rel=0.01)
    assert fp32["memory_gib_lori_d"]["activations"] > 1.5 * d["activations"]  # fp32 activations (norms fp32 in both)
    # the chunked loss: one chunk's logits, not 4 x 512 x 128k of them (2.4 GiB before)
    assert d["logits"] < 0.25
    assert bf16["memory_gib_lori_d"]["total"] < 30 < fp32["memory_gib_lori_d"]["total"]


@pytest.mark.parametrize("granularity", ["model", "module", "projection", "layer", "matrix"])
def test_dry_run_lori_s_count_equals_real_calibration(granularity):
    model = tiny_llama()
    inject_lori(model, LoRIConfig(r=4, sparsity=0.0))
    with torch.no_grad():
        for b in get_B(model).values():
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(b.numel())))
    B = get_B(model)
    masks = calibrate(B, 0.9, granularity)
    kept = sum(int(m.sum()) for m in masks.values())
    assert sparse_trainable(tuple((p, b.numel()) for p, b in B.items()), 0.9, granularity) == kept


def test_dry_run_builds_each_architecture_once():
    adapter_shape.cache_clear()
    for path in PAPER:
        dry_run(path)
    assert adapter_shape.cache_info().misses == 4  # 2 architectures x 2 ranks


def test_dry_run_main_prints_a_table(capsys):
    main([str(ROOT / "configs" / "paper" / "mistral_7b_r64_gsm8k.yaml")])
    out = capsys.readouterr().out
    assert "mistral_7b_r64_gsm8k" in out and "32/64" in out and "88M (1.19%)" in out


def test_dry_run_refuses_an_unknown_model(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  model: someone/unknown-model\n")
    with pytest.raises(SystemExit) as err:
        main([str(path)])
    assert err.value.code == 2 and "no architecture config" in capsys.readouterr().err


# ---- strategy presets ----------------------------------------------------------------------
def _strategy(path: Path) -> Strategy | str:
    """Instantiate a preset's trainer.strategy the way LightningCLI does (jsonargparse)."""
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Union[str, Strategy])
    raw = yaml.safe_load(path.read_text())["trainer"]["strategy"]
    return parser.instantiate(parser.parse_object({"strategy": raw})).strategy


def test_ddp_preset():
    assert _strategy(ROOT / "configs" / "trainer" / "ddp.yaml") == "ddp"
    assert StrategyRegistry["ddp"]["strategy"] is DDPStrategy


def test_fsdp_preset_wraps_and_checkpoints_decoder_layers():
    path = ROOT / "configs" / "trainer" / "fsdp.yaml"
    cfg = parse_config(path)
    args = cfg["trainer"]["strategy"]["init_args"]
    assert args["auto_wrap_policy"] == {LlamaDecoderLayer, MistralDecoderLayer}
    assert cfg["model"]["gradient_checkpointing"] is True  # the model setting every strategy shares
    strategy = _strategy(path)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"]  # frozen W0 and trainable B share FSDP units
    assert strategy.sharding_strategy.name == "FULL_SHARD"


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_presets(name, stage):
    path = ROOT / "configs" / "trainer" / f"{name}.yaml"
    args = parse_config(path)["trainer"]["strategy"]["init_args"]
    assert (args["stage"], args["exclude_frozen_parameters"]) == (stage, True)
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (optional): the preset is parsed, not instantiated")
    strategy = _strategy(path)
    assert strategy.config["zero_optimization"]["stage"] == stage


# ---- merge and continual-learning configs ---------------------------------------------------
# Appendix D Tables 8-10: (model, number of adapters) -> weight per (method, adaptation)
MERGE_WEIGHTS = {("llama3_8b", 4): (0.4, 0.3), ("mistral_7b", 4): (0.4, 0.3), ("llama3_8b", 3): (0.5, 0.4)}
DENSITY = {"concat": None, "linear": None, "magnitude": 0.3, "ties": 0.7, "dare": 0.7}
TASKS = {4: ["nlu", "gsm8k", "codealpaca", "saferpaca"], 3: ["nlu", "gsm8k", "codealpaca"]}
OUTPUTS = {parse_config(p)["pipeline"]["output_dir"] for p in PAPER}
MERGE_REPORTED = ROOT / "configs" / "paper" / "reported" / "merge.yaml"
# The 27 one-row files configs/paper/merge/<set>_<method>_<adaptation>.yaml that the 3 adapter sets replace
# (git show 9702a99:configs/paper/merge/<file>): each adapter's weight, density, single_task. Every one
# also had the set's base_model, tasks, evaluate, eval (below), protocol official, dtype float32, adapters
# runs/paper/<model>_r32_<task>/<adaptation> (LoRA: runs/paper/lora/<model>_r32_<task>) and output_dir
# runs/paper/merge/<file stem>.
OLD_MERGE_SETS = {  # set -> base_model, eval:
    "llama3_8b_3tasks": ("meta-llama/Meta-Llama-3-8B", {"batch_size": 16}),
    "llama3_8b_4tasks": ("meta-llama/Meta-Llama-3-8B", {"batch_size": 16, "hexphi_path": "data/paper/HEx-PHI"}),
    "mistral_7b_4tasks": ("mistralai/Mistral-7B-v0.1", {"batch_size": 16, "hexphi_path": "data/paper/HEx-PHI"}),
}
OLD_MERGE_ROWS = {
    "llama3_8b_3tasks_concat_lora": (0.5, None, False),
    "llama3_8b_3tasks_concat_lori_d": (0.5, None, True),
    "llama3_8b_3tasks_concat_lori_s": (0.4, None, False),
    "llama3_8b_3tasks_dare_lora": (0.5, 0.7, False),
    "llama3_8b_3tasks_linear_lora": (0.5, None, False),
    "llama3_8b_3tasks_linear_lori_d": (0.5, None, False),
    "llama3_8b_3tasks_linear_lori_s": (0.4, None, False),
    "llama3_8b_3tasks_magnitude_lora": (0.5, 0.3, False),
    "llama3_8b_3tasks_ties_lora": (0.5, 0.7, False),
    "llama3_8b_4tasks_concat_lora": (0.4, None, False),
    "llama3_8b_4tasks_concat_lori_d": (0.4, None, True),
    "llama3_8b_4tasks_concat_lori_s": (0.3, None, False),
    "llama3_8b_4tasks_dare_lora": (0.4, 0.7, False),
    "llama3_8b_4tasks_linear_lora": (0.4, None, False),
    "llama3_8b_4tasks_linear_lori_d": (0.4, None, False),
    "llama3_8b_4tasks_linear_lori_s": (0.3, None, False),
    "llama3_8b_4tasks_magnitude_lora": (0.4, 0.3, False),
    "llama3_8b_4tasks_ties_lora": (0.4, 0.7, False),
    "mistral_7b_4tasks_concat_lora": (0.4, None, False),
    "mistral_7b_4tasks_concat_lori_d": (0.4, None, True),
    "mistral_7b_4tasks_concat_lori_s": (0.3, None, False),
    "mistral_7b_4tasks_dare_lora": (0.4, 0.7, False),
    "mistral_7b_4tasks_linear_lora": (0.4, None, False),
    "mistral_7b_4tasks_linear_lori_d": (0.4, None, False),
    "mistral_7b_4tasks_linear_lori_s": (0.3, None, False),
    "mistral_7b_4tasks_magnitude_lora": (0.4, 0.3, False),
    "mistral_7b_4tasks_ties_lora": (0.4, 0.7, False),
}


def _old_merge_row(stem: str) -> tuple[str, str, str, dict, dict]:
    """(set, method, adaptation, the removed file's top-level settings, its eval:) of OLD_MERGE_ROWS[stem]."""
    merge_set, method, adaptation = re.fullmatch(r"(\w+?_\dtasks)_(\w+?)_(lora|lori_d|lori_s)", stem).groups()
    model, n = merge_set.rsplit("_", 1)[0], int(merge_set[-6])
    base_model, evaluation = OLD_MERGE_SETS[merge_set]
    weight, density, single_task = OLD_MERGE_ROWS[stem]
    adapters = [f"runs/paper/lora/{model}_r32_{t}" if adaptation == "lora" else f"runs/paper/{model}_r32_{t}/{adaptation}"
                for t in TASKS[n]]
    old = {"base_model": base_model, "adaptation": adaptation, "adapters": adapters, "tasks": TASKS[n],
           "protocol": "official", "method": method, "weights": [weight] * n, "density": density,
           "evaluate": ["nlu", "gsm8k", "humaneval", "hexphi"][:n], "dtype": "float32", "single_task": single_task,
           "output_dir": f"runs/paper/merge/{stem}"}
    return merge_set, method, adaptation, old, evaluation


@functools.cache
def _merge_set_args(merge_set: str) -> dict:
    """configs/paper/merge/<set>.yaml as `lori merge` parses it (top level, no row picked yet)."""
    merging = pytest.importorskip("lori.commands.merge_command")
    args = merging.build_parser().parse_args(["--config", str(ROOT / "configs" / "paper" / "merge" / f"{merge_set}.yaml")])
    return {k: v for k, v in args.as_dict().items() if k not in ("eval", "config")}


def _settings(cfg) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k != "adapter_set"}


def test_merge_sets_cover_tables_8_to_10():
    assert sorted(p.stem for p in MERGE) == sorted(OLD_MERGE_SETS)
    rows = {f"{s}_{m}_{a}" for s in OLD_MERGE_SETS for m, by in _merge_set_args(s)["adapter_set"]["rows"].items()
            for a in by}
    assert rows == set(OLD_MERGE_ROWS) and len(rows) == 27


@pytest.mark.parametrize("stem", sorted(OLD_MERGE_ROWS))
def test_merge_set_row_is_the_removed_file(stem):
    """`lori merge --config <set>.yaml --adaptation A --method M` resolves to every setting the removed file had."""
    from lori.training.merge_run import MergeConfig

    merge_set, method, adaptation, old, _ = _old_merge_row(stem)
    cfg = MergeConfig(**{**_merge_set_args(merge_set), "method": method, "adaptation": adaptation})
    assert _settings(cfg) == _settings(MergeConfig(**old))
    # and what the paper sets, typed independently (Appendix D Tables 8-10)
    model, n = merge_set.rsplit("_", 1)[0], len(cfg.adapters)
    lora_or_d, s = MERGE_WEIGHTS[model, n]
    assert (cfg.base_model, cfg.tasks) == (MODELS[model], TASKS[n])
    assert cfg.weights == [s if adaptation == "lori_s" else lora_or_d] * n and cfg.density == DENSITY[method]
    assert cfg.single_task == ((method, adaptation) == ("concat", "lori_d"))  # the table's Single-Task row
    for adapter, task in zip(cfg.adapters, cfg.tasks):
        if adaptation != "lora":  # a lori_d/ or lori_s/ folder that a paper config writes
            run, stage = adapter.rsplit("/", 1)
            assert run in OUTPUTS and run.endswith(f"{model}_r32_{task}") and stage == adaptation


@pytest.mark.parametrize("stem", ["llama3_8b_3tasks_linear_lori_s", "llama3_8b_4tasks_concat_lori_d",
                                  "mistral_7b_4tasks_ties_lora"])
def test_merge_set_row_parses_with_lori_merge(stem):
    """The command line picks the row; the resolved config written beside the results says what ran."""
    merging = pytest.importorskip("lori.commands.merge_command")
    from lori.training.merge_run import MergeConfig

    merge_set, method, adaptation, old, evaluation = _old_merge_row(stem)
    cfg, settings, text = merging.parse_args(["--config", str(ROOT / "configs" / "paper" / "merge" / f"{merge_set}.yaml"),
                                              "--adaptation", adaptation, "--method", method])
    assert _settings(cfg) == _settings(MergeConfig(**old))
    assert settings == EvalSettings(**evaluation, protocol="official")
    assert settings.held_out_of("gsm8k", 1319) == 1319  # all GSM8K test problems
    assert settings.judge_text == "prompt_and_generated"  # the official reading (lori's beside it in results)
    written = yaml.safe_load(text)
    assert {k: written[k] for k in ("adapters", "weights", "single_task", "output_dir")} == {
        k: old[k] for k in ("adapters", "weights", "single_task", "output_dir")}


def test_merge_reported_table_has_every_row():
    table = yaml.safe_load(MERGE_REPORTED.read_text())
    assert set(table["sets"]) == set(OLD_MERGE_SETS)
    for merge_set, entry in table["sets"].items():
        width = 5 + (merge_set.endswith("4tasks"))  # NLU, GSM8K, HumanEval pass@1/5/10 (, HEx-PHI)
        assert {f"{merge_set}_{row}" for row in entry["rows"]} == {s for s in OLD_MERGE_ROWS if s.startswith(merge_set)}
        assert all(len(v) == width for v in [entry["single_task"], *entry["rows"].values()]), merge_set
    assert table["sets"]["llama3_8b_4tasks"]["rows"]["ties_lora"] == [72.6, 24.0, 32.5, 46.3, 51.7, 77.8]  # Table 3


# Fig. 3 (continual learning): the task's benchmark and its paper evaluation settings
CONTINUAL_BENCH = {"nlu": ("nlu", {"nlu_mode": "generate"}),
                   "gsm8k": ("gsm8k", {"held_out": None, "items": "official"}),  # held_out None: the official set
                   "codealpaca": ("humaneval", {"n_samples": 20, "temperature": 0.2, "top_p": 0.95})}


CONTINUAL_RUNS = [(t, a) for t in ("nlu", "gsm8k", "codealpaca") for a in ("lori_d", "lori_s")]  # Fig. 3


@functools.cache
def _continual(task: str, adaptation: str):
    """`lori continual --config configs/paper/continual/llama3_8b_r32_safety_then_<task>.yaml --adaptation A`, parsed."""
    path = ROOT / "configs" / "paper" / "continual" / f"llama3_8b_r32_safety_then_{task}.yaml"
    return parse_continual_config(path, "--adaptation", adaptation)


@pytest.mark.parametrize("key", CONTINUAL_RUNS, ids="_".join)
def test_continual_config(key):
    (task, adaptation), model, r = key, "llama3_8b", 32
    cfg = _continual(task, adaptation)
    cont = cfg["continual"]
    assert ContinualConfig(**cont).task_steps >= 1  # the run uses task_epochs; steps must still be valid
    safety_cfg = parse_config(ROOT / "configs" / "paper" / f"{model}_r{r}_saferpaca.yaml")
    task_cfg = parse_config(ROOT / "configs" / "paper" / f"{model}_r{r}_{task}.yaml")
    # phase 2: the task's Appendix D learning rate (LoRI-D or LoRI-S column) and epochs
    _, _, lr_d, lr_s = APPENDIX_D[task, model, r]
    assert cont["task_lr"] == pytest.approx(lr_s if adaptation == "lori_s" else lr_d)
    assert cont["task_epochs"] == TASK_OF_TABLE[task][1] == task_cfg["pipeline"]["dense_epochs"]
    # phase 1: the paper run's Saferpaca adapter; LoRI-S trains inside the task's calibrated masks
    assert cont["safety_adapter"] == f"{safety_cfg['pipeline']['output_dir']}/{adaptation}"
    if adaptation == "lori_s":
        assert cont["masked_task"] is True
        assert cont["task_mask"] == f"{task_cfg['pipeline']['output_dir']}/calibration/masks.safetensors"
        # M_t comes from the task's own LoRI-D run: it must draw the safety adapter's A (one seed for all)
        assert task_cfg["model"]["lori"]["seed"] == safety_cfg["model"]["lori"]["seed"]
    else:
        assert cont["masked_task"] is False and cont["task_mask"] is None
    assert not cont["protect_safety"]
    assert (cont["evaluate_base"], cont["checkpoint_every"], cont["held_out_loss"]) == (False, 100, False)  # as the 6 files
    assert cont["output_dir"] == f"runs/paper/continual/{model}_r{r}_safety_then_{task}_{adaptation}"  # as before
    # the paper run's model, data, trainer, precision and batch
    m, lori = cfg["model"], cfg["model"]["lori"]
    alpha = APPENDIX_D["saferpaca", model, r][0]
    # the official evaluates fp32 merged weights between phases: an fp32 base with bf16 autocast
    assert m["model"] == MODELS[model] and m["dtype"] == "float32" and cfg["protocol"] == "official"
    assert m["lr"] == cont["task_lr"]  # the model's lr is phase 2's too
    assert (lori["r"], lori["alpha"], lori["dropout"], list(lori["target_modules"])) == (r, alpha, 0.0, TARGETS)
    assert lori["seed"] == safety_cfg["model"]["lori"]["seed"]  # A is the safety adapter's
    assert (m["scheduler"], m["warmup_steps"], m["loss_normalization"]) == ("constant", 0, "sequence_sum")
    assert cfg["data"] == safety_cfg["data"]
    assert cfg["task_data"] == task_cfg["data"] and cfg["task_data"]["task"] == TASK_OF_TABLE[task][0]
    assert cfg["trainer"]["precision"] == "bf16-mixed" and task_cfg["trainer"]["precision"] == "32-true"
    assert {**cfg["trainer"], "precision": None} == {**task_cfg["trainer"], "precision": None}
    trainer = cfg["trainer"]
    assert (cfg["task_data"]["batch_size"] * trainer["devices"] * trainer["num_nodes"]
            * trainer["accumulate_grad_batches"]) == 32
    # evaluation: HEx-PHI (+ HarmBench offline) refusal and the task's benchmark, paper settings
    settings = EvalSettings(**cfg["eval"])
    settings.check()
    bench, extra = CONTINUAL_BENCH[task]
    assert settings.tasks == ["hexphi", "harmbench", bench]
    assert settings.hexphi_path == "data/paper/HEx-PHI" and settings.max_examples is None
    assert settings.protocol == "official" and not settings.do_sample
    assert {k: getattr(settings, k) for k in extra} == extra


@pytest.mark.parametrize("key", CONTINUAL_RUNS, ids="_".join)
def test_continual_config_inputs_are_checked_at_run_time(key, tmp_path, monkeypatch):
    cont = ContinualConfig(**_continual(*key)["continual"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ContinualConfigError, match="safety_adapter"):
        cont.check()
    (tmp_path / cont.safety_adapter).mkdir(parents=True)
    (tmp_path / cont.safety_adapter / CONFIG_FILE).write_text("{}")
    if cont.task_mask is not None:
        with pytest.raises(ContinualConfigError, match="task_mask"):
            cont.check()
        (tmp_path / cont.task_mask).parent.mkdir(parents=True)
        (tmp_path / cont.task_mask).write_bytes(b"")
    with pytest.raises(AdapterFileError):  # present, so read now: an empty stand-in is not an adapter
        cont.check()


def test_continual_configs_cover_figure_3():
    assert sorted(p.stem for p in CONTINUAL) == [f"llama3_8b_r32_safety_then_{t}" for t in ("codealpaca", "gsm8k", "nlu")]
    assert all(set(yaml.safe_load(p.read_text())["continual_set"]["lr"]) == {"lori_d", "lori_s"} for p in CONTINUAL)


@pytest.mark.parametrize("task", ["nlu", "gsm8k", "codealpaca"])
def test_continual_adaptations_differ_only_in_what_the_set_derives(task):
    """LoRI-D and LoRI-S of one task share every setting but the phase-1 adapter, the mask, the lr and
    the output (lori.training.continual_sets); test_continual_config checks those against the paper."""
    derived = {"continual": {"safety_adapter", "masked_task", "task_mask", "task_lr", "output_dir"}, "model": {"lr"}}
    d, s = ({k: v for k, v in _continual(task, a).as_dict().items() if k != "adaptation"} for a in ("lori_d", "lori_s"))
    for section, keys in derived.items():
        assert {k for k in d[section] if d[section][k] != s[section][k]} == keys, section
        for k in keys:
            d[section].pop(k), s[section].pop(k)
    assert d == s


# ---- a paper config runs end to end (tiny model, tiny data, CPU) ----------------------------
@pytest.mark.slow
def test_paper_config_runs_the_pipeline_on_a_tiny_model(tmp_path):
    """configs/paper/mistral_7b_r64_gsm8k.yaml with only the model, data file and device swapped."""
    import json

    from lori.commands.pipeline_command import pipeline

    data = tmp_path / "gsm8k_train.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(40)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    summary = pipeline([
        "--config", str(ROOT / "configs" / "paper" / "mistral_7b_r64_gsm8k.yaml"),
        "--model.model", "tiny-llama", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
        "--data.train_file", str(data), "--data.max_length", "96", "--data.max_prompt_length", "48",
        "--pipeline.output_dir", str(out),
        "--pipeline.dense_epochs", "1", "--pipeline.sparse_epochs", "1",
    ])
    # protocol official drops the incomplete last global batch: 40 examples / (4 x 8) -> 1 step, not 2
    assert summary["lori_d"]["steps"] == summary["lori_s"]["steps"] == 1
    alphas = [json.loads((out / s / "adapter_config.json").read_text())["lora_alpha"] for s in ("lori_d", "lori_s")]
    assert alphas == [32, 64]  # the two alphas of Table 5
    assert summary["lori_s"]["trainable"] == keep_count(summary["lori_d"]["trainable"], 0.9)


# ---- baselines: Tables 1, 2, 11, 12 (a paper config + --model.method, lori.training.fit_settings) ---
BASELINE_TASKS = ["nlu", "gsm8k", "codealpaca", "saferpaca"]
BASELINE_METHODS = ["full", "lora", "dora", "vera", "ia3", "lora_fa", "lori_d", "adalora", "rslora", "pissa",
                    "loraplus"]
BASELINES = [(t, m) for t in BASELINE_TASKS for m in BASELINE_METHODS]
REPORTED = ROOT / "configs" / "paper" / "reported" / "baselines.yaml"
# "# Params (%)" and results of Llama-3-8B, r = 32 (Tables 11 and 12; FFT, LoRA, DoRA also Tables 1, 2);
# lori_d (LoRI-D alone, named lora_frozen_a before) is a second reading of the LoRA-FA row
ROW = {"full": "FFT", "lora": "LoRA", "dora": "DoRA", "vera": "VeRA", "ia3": "IA3", "lora_fa": "LoRA-FA",
       "lori_d": "LoRA-FA", "adalora": "AdaLoRA", "rslora": "rsLoRA", "pissa": "PiSSA", "loraplus": "LoRA+"}
BASELINE_PARAMS = {"FFT": "8.03G (100%)", "LoRA": "84M (1.03%)", "DoRA": "85M (1.05%)", "VeRA": "1.38M (0.02%)",
                   "IA3": "1.70M (0.02%)", "LoRA-FA": "44M (0.54%)", "AdaLoRA": "84M (1.03%)",
                   "rsLoRA": "84M (1.03%)", "PiSSA": "84M (1.03%)", "LoRA+": "84M (1.03%)"}
TABLE_11_AVG = {"FFT": 83.1, "LoRA": 87.1, "VeRA": 69.8, "IA3": 79.5, "LoRA-FA": 87.0, "AdaLoRA": 86.4,
                "rsLoRA": 82.3, "PiSSA": 80.7, "LoRA+": 78.5, "DoRA": 87.1}
TABLE_12 = {  # GSM8K, HumanEval pass@1, pass@5, pass@10, HEx-PHI
    "FFT": (58.8, 30.5, 39.3, 41.7, 94.8), "LoRA": (64.4, 34.7, 46.4, 50.8, 91.6), "VeRA": (30.6, 32.4, 45.1, 50.9, 74.7),
    "IA3": (48.0, 32.7, 45.6, 51.5, 85.4), "LoRA-FA": (64.8, 42.9, 57.5, 64.2, 94.1),
    "AdaLoRA": (63.3, 33.5, 45.0, 49.4, 91.9), "rsLoRA": (61.3, 28.4, 35.5, 38.3, 98.1),
    "PiSSA": (61.3, 32.0, 40.3, 43.3, 97.8), "LoRA+": (61.7, 33.0, 42.7, 46.0, 98.8), "DoRA": (65.4, 33.1, 44.0, 48.6, 93.6),
}
# the method options the paper runs use (what the removed configs/paper/baselines/ files spelled out)
PAPER_OPTIONS = {"ia3": {"feedforward_modules": ["down_proj"]}, "adalora": {"target_r": 21, "orth_reg_weight": 0.5},
                 "loraplus": {"loraplus_lr_ratio": 16.0}, "vera": {"projection_prng_key": 0, "d_initial": 0.1}}


def _baseline_id(key: tuple[str, str]) -> str:
    return "_".join(key)


def _composed_args(task: str, method: str) -> list[str]:
    """`lori fit` arguments of a baseline: the paper's LoRI config with the method switched (full: an overlay)."""
    switch = ["--config", str(ROOT / "configs" / "method" / "full.yaml")] if method == "full" else ["--model.method", method]
    return ["--config", str(ROOT / "configs" / "paper" / f"llama3_8b_r32_{task}.yaml"), *switch]


def test_the_reported_table_covers_every_baseline_of_tables_11_and_12():
    table = yaml.safe_load(REPORTED.read_text())
    assert table["model"] == "llama3_8b_r32" and set(table["methods"]) == set(BASELINE_METHODS)
    widths = {task: len(table["columns"][task]) for task in BASELINE_TASKS}
    assert widths == {"nlu": 9, "gsm8k": 1, "codealpaca": 3, "saferpaca": 1}
    for method, row in table["methods"].items():
        name = ROW[method]
        assert row["row"] == name and row["params"] == BASELINE_PARAMS[name]
        assert {task: len(row[task]) for task in BASELINE_TASKS} == widths, method
        *nlu, avg = row["nlu"]
        assert avg == TABLE_11_AVG[name] and sum(nlu) / 8 == pytest.approx(avg, abs=0.05)
        assert (*row["gsm8k"], *row["codealpaca"], *row["saferpaca"]) == TABLE_12[name]


@pytest.mark.parametrize("key", BASELINES, ids=_baseline_id)
def test_baseline_config_is_lori_d_with_another_method(key):
    """Sec. 3.1: "the same hyperparameters for PEFT baselines as for LoRI-D" - model, data, trainer, epochs."""
    task, method = key
    cfg = parse_fit_config(*_composed_args(task, method))
    ref = parse_config(ROOT / "configs" / "paper" / f"llama3_8b_r32_{task}.yaml")
    mine, theirs = cfg["model"].as_dict(), ref["model"].as_dict()
    assert mine.pop("method") == method and theirs.pop("method") == "lori"
    options = BaselineOptions.from_value(mine.pop("baseline"))
    options = resolved_options(method, LoRIConfig.from_dict(dict(mine["lori"])), options)
    theirs.pop("baseline")
    assert set(options) == set(OPTIONS.get(method, ())) and options.items() >= PAPER_OPTIONS.get(method, {}).items()
    trainer, ref_trainer = cfg["trainer"].as_dict(), ref["trainer"].as_dict()
    if method == "full":  # trained weights need fp32 masters: fp32 weights, bf16 autocast
        assert (mine.pop("dtype"), theirs.pop("dtype")) == ("float32", "bfloat16")
        assert (trainer.pop("precision"), ref_trainer.pop("precision")) == ("bf16-mixed", "32-true")
    assert mine == theirs and cfg["data"] == ref["data"]
    extra = {k for k in trainer if trainer[k] != ref_trainer.get(k)}
    assert extra == {"max_epochs", "callbacks", "logger"}
    assert cfg["trainer"]["max_epochs"] == ref["pipeline"]["dense_epochs"] == TASK_OF_TABLE[task][1]
    save, ckpt = cfg["trainer"]["callbacks"]
    run = f"runs/paper/{method}/llama3_8b_r32_{task}"
    assert save["class_path"] == "lori.training.callbacks.SaveAdapter"
    assert (save["init_args"]["directory"], save["init_args"]["stage"]) == (run, method)
    assert ckpt["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint"
    args = ckpt["init_args"]
    assert (args["dirpath"], args["save_last"], args["save_top_k"]) == (f"{run}_ckpt", True, 0)
    assert args["every_n_train_steps"] == ref["pipeline"]["checkpoint_every"] == 100
    logs = cfg["trainer"]["logger"]
    assert logs["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    assert (logs["init_args"]["save_dir"], logs["init_args"]["name"], logs["init_args"]["version"]) == (
        f"runs/paper/{method}", "tb", f"llama3_8b_r32_{task}")


def test_full_fine_tuning_of_a_bf16_config_without_the_overlay_is_refused():
    with pytest.raises(LoRIConfigError, match="method .full.*float32"):
        parse_fit_config("--config", str(ROOT / "configs" / "paper" / "llama3_8b_r32_gsm8k.yaml"),
                         "--model.method", "full")


def test_lora_merge_inputs_are_written_by_the_lora_baseline_configs():
    """Every LoRA adapter a merge config reads is what `lori fit --config <paper config> --model.method lora` writes."""
    from lori.training.merge_run import MergeConfig

    paper = [ROOT / "configs" / "paper" / f"{m}_r32_{t}.yaml" for m in MODELS for t in BASELINE_TASKS]
    outputs = {parse_fit_config("--config", str(p), "--model.method", "lora")["trainer"]["callbacks"][0]
               ["init_args"]["directory"] for p in paper}
    lora = {a for s in OLD_MERGE_SETS for a in MergeConfig(**{**_merge_set_args(s), "adaptation": "lora"}).adapters}
    assert {a.rsplit("/", 1)[1].split("_r32_")[0] for a in lora} == set(MODELS)
    assert lora <= outputs


def _paper_format(n: int) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_baseline_dry_run_counts_match_the_paper(method):
    row = dry_run(ROOT / "configs" / "paper" / "llama3_8b_r32_gsm8k.yaml", method=method)
    count, pct = BASELINE_PARAMS[ROW[method]].split()
    pct = float(pct.strip("(%)"))
    assert row["method"] == method and _paper_format(row["trainable"]) == count
    assert abs(row["percent"] - pct) < 0.006  # of base + adapter entries, as PEFT prints it
    assert f"{method}: " in format_table([row])


def test_dry_run_method_option(capsys):
    main(["--method", "dora", str(ROOT / "configs" / "paper" / "llama3_8b_r32_gsm8k.yaml")])
    assert "dora: 85M (1.05%)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        main(["--method", "qlora", str(ROOT / "configs" / "paper" / "llama3_8b_r32_gsm8k.yaml")])
    assert err.value.code == 2 and "unknown method 'qlora'" in capsys.readouterr().err
