"""Every shipped YAML parses with the parser of the command that runs it, and holds valid settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lori.commands import eval_command
from lori.commands import merge_command as merging
from lori.commands.continual_command import parse_continual_config
from lori.commands.lightning_cli import parse_config, parse_configs, parse_fit_config
from lori.commands.main import main
from lori.core import LoRIConfig
from lori.eval.evaluator import EvalSettings
from lori.training.continual import ContinualConfig
from lori.training.moved_configs import MovedConfigError, check, replacement
from lori.training.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(ROOT.rglob("*.yaml"))
DEFAULT = ROOT / "experiment" / "default.yaml"
PAPER_CONFIG = ROOT / "paper" / "llama3_8b_r32_gsm8k.yaml"


def kind(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    if parts[0] == "eval":
        return "eval"
    if "merge" in parts:
        return "merge"
    if parts[0] == "trainer":
        return "trainer"
    if parts[0] == "method":
        return "method"
    if "reported" in parts:  # the paper's numbers (tests/test_paper_configs.py checks them)
        return "table"
    if "continual" in (yaml.safe_load(path.read_text()) or {}):
        return "continual"
    if "continual" in parts:  # the paper's continual settings (schema in the file header)
        return "paper-continual"
    return "train"


def check_training(cfg) -> None:
    lori = LoRIConfig.from_dict(dict(cfg["model"]["lori"]))
    assert 0.0 <= lori.sparsity < 1.0


def test_configs_exist():
    kinds = {kind(p) for p in CONFIGS}
    assert {"train", "eval", "merge", "trainer", "continual"} <= kinds


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_yaml_parses(path):
    what = kind(path)
    if what == "train":
        cfg = parse_config(path)
        check_training(cfg)
        pipe = PipelineConfig(**cfg["pipeline"])
        assert (pipe.dense_steps > 0 or pipe.dense_epochs) and (pipe.sparse_steps > 0 or pipe.sparse_epochs)
    elif what == "continual":  # a continual_set runs one adaptation (its first here; both: test_paper_configs.py)
        lrs = (yaml.safe_load(path.read_text()).get("continual_set") or {}).get("lr") or {}
        cfg = parse_continual_config(path, *(["--adaptation", next(iter(lrs))] if lrs else []))
        check_training(cfg)
        ContinualConfig(**cfg["continual"])
        EvalSettings(**cfg["eval"]).check()
    elif what == "eval":
        cfg = eval_command.build_parser().parse_args(["--config", str(path)])
        EvalSettings(**cfg["eval"].as_dict()).check()
    elif what == "merge":  # an adapter set runs one row (its first here; every row: tests/test_paper_configs.py)
        rows = (yaml.safe_load(path.read_text()).get("adapter_set") or {}).get("rows") or {}
        row = [["--method", m, "--adaptation", a] for m, by in rows.items() for a in by][:1]
        cfg, _ = merging.parse_config(path, *(row[0] if row else []))
        assert len(cfg.adapters) >= 2 and cfg.output_dir
    elif what == "trainer":  # a preset composes with an experiment config
        cfg = parse_configs(DEFAULT, path)
        assert cfg["trainer"]["strategy"] is not None
    elif what == "method":  # an overlay switching a paper config's method (with what that method needs)
        cfg = parse_fit_config("--config", str(PAPER_CONFIG), "--config", str(path))
        assert cfg["model"]["method"] == path.stem
        assert cfg["trainer"]["callbacks"][0]["init_args"]["directory"] == f"runs/paper/{path.stem}/llama3_8b_r32_gsm8k"
    else:
        assert isinstance(yaml.safe_load(path.read_text()), dict)


# ---- removed configs: one line naming the composed command that replaces each -----------------------
TASKS = ["nlu", "gsm8k", "codealpaca", "saferpaca"]
METHODS = ["full", "lora", "dora", "vera", "ia3", "lora_fa", "lora_frozen_a", "adalora", "rslora", "pissa", "loraplus"]
NOW = {"lora_frozen_a": "lori_d"}  # the removed files name methods by their names then
SWITCH = {m: "--config configs/method/full.yaml" if m == "full" else f"--model.method {NOW.get(m, m)}" for m in METHODS}
REMOVED = {  # configs/paper/baselines/*.yaml and configs/experiment/<method>.yaml -> what replaces them
    **{f"configs/paper/baselines/llama3_8b_r32_{t}_{m}.yaml": f"--config configs/paper/llama3_8b_r32_{t}.yaml {SWITCH[m]}"
       for t in TASKS for m in METHODS},
    **{f"configs/experiment/{'full_ft' if m == 'full' else m}.yaml":
       f"--config configs/experiment/default.yaml --model.method {NOW.get(m, m)}" for m in METHODS},
}


@pytest.mark.parametrize("old", sorted(REMOVED))
def test_a_removed_config_names_its_replacement_in_one_line(old, capsys, monkeypatch):
    monkeypatch.chdir(ROOT.parent)
    assert not Path(old).exists()
    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", old])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and lines == [f"lori: error: {old} was removed (one config per setting now): "
                                             f"use lori fit {REMOVED[old]}"]
    if "baselines" in old:  # lori dryrun's own spelling: --method, the paper config as a path
        method = next(m for m in sorted(METHODS, key=len, reverse=True) if old.endswith(f"_{m}.yaml"))
        paper = old.replace("baselines/", "").replace(f"_{method}.yaml", ".yaml")
        with pytest.raises(MovedConfigError) as moved:
            check(["dryrun", old])
        assert str(moved.value).endswith(f"use lori dryrun --method {NOW.get(method, method)} {paper}")


def test_replacement_commands_run_the_removed_settings():
    """Two of the replacements, parsed as lori fit would: the method and the adapter dir the old file had."""
    args = REMOVED["configs/paper/baselines/llama3_8b_r32_codealpaca_vera.yaml"].split()
    cfg = parse_fit_config(*[str(ROOT.parent / a) if a.endswith(".yaml") else a for a in args])
    assert cfg["model"]["method"] == "vera"
    assert cfg["trainer"]["callbacks"][0]["init_args"]["directory"] == "runs/paper/vera/llama3_8b_r32_codealpaca"
    args = REMOVED["configs/experiment/full_ft.yaml"].split()
    cfg = parse_fit_config(*[str(ROOT.parent / a) if a.endswith(".yaml") else a for a in args])
    assert cfg["model"]["method"] == "full" and cfg["trainer"]["max_steps"] == 20
    args = REMOVED["configs/experiment/lora_frozen_a.yaml"].split()  # renamed: the same run as lori_d
    cfg = parse_fit_config(*[str(ROOT.parent / a) if a.endswith(".yaml") else a for a in args])
    assert cfg["model"]["method"] == "lori_d" and cfg["trainer"]["max_steps"] == 20
    assert cfg["trainer"]["callbacks"][0]["init_args"]["directory"] == "runs/lori_d/default"  # not runs/default/lori_d


def _output_dirs(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "output_dir" and isinstance(v, str)] + [
            d for v in node.values() for d in _output_dirs(v)]
    return [d for v in node for d in _output_dirs(v)] if isinstance(node, list) else []


def test_a_baseline_fit_writes_outside_every_shipped_run_dir():
    """``lori fit --model.method M`` writes parent/M/name (checkpoints, logs under parent/M): beside the
    run dirs, never inside one, so method lori_d is never confused with a pipeline's lori_d/ stage."""
    from pathlib import PurePosixPath

    from lori.training.baselines import all_methods
    from lori.training.fit_settings import method_output_dir

    shipped = {path: yaml.safe_load(path.read_text()) or {} for path in CONFIGS}
    runs = {PurePosixPath(d) for cfg in shipped.values() for d in _output_dirs(cfg)}
    outs = [cfg["pipeline"]["output_dir"] for cfg in shipped.values() if "output_dir" in (cfg.get("pipeline") or {})]
    assert len(outs) >= 17 and PurePosixPath("runs/paper/llama3_8b_r32_gsm8k") in runs
    for out in outs:
        for method in (m.name for m in all_methods() if not m.runs_pipeline):
            adapter = PurePosixPath(method_output_dir(out, method))
            assert adapter != PurePosixPath(out) / "lori_d"
            for run in runs:
                assert not adapter.is_relative_to(run) and not run.is_relative_to(adapter.parent), (out, method, run)


# the one-row files of configs/paper/merge/ -> the adapter set's config and the options that pick the row
MERGE_ROWS = [(m, a) for m in ("concat", "linear") for a in ("lora", "lori_d", "lori_s")] + [
    (m, "lora") for m in ("magnitude", "ties", "dare")]
ROWS_REMOVED = {
    **{f"configs/paper/merge/{s}_{m}_{a}.yaml": f"lori merge --config configs/paper/merge/{s}.yaml --adaptation {a} --method {m}"
       for s in ("llama3_8b_3tasks", "llama3_8b_4tasks", "mistral_7b_4tasks") for m, a in MERGE_ROWS},
    **{f"configs/paper/continual/llama3_8b_r32_safety_then_{t}_{a}.yaml":  # and of configs/paper/continual/
       f"lori continual --config configs/paper/continual/llama3_8b_r32_safety_then_{t}.yaml --adaptation {a}"
       for t in ("nlu", "gsm8k", "codealpaca") for a in ("lori_d", "lori_s")},
}


@pytest.mark.parametrize("old", sorted(ROWS_REMOVED))
def test_a_removed_row_config_names_the_row_that_replaces_it(old, capsys, monkeypatch):
    monkeypatch.chdir(ROOT.parent)
    assert not Path(old).exists()
    with pytest.raises(SystemExit) as err:
        main([ROWS_REMOVED[old].split()[1], "--config", old])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2
    assert lines == [f"lori: error: {old} was removed (one config per setting now): use {ROWS_REMOVED[old]}"]


def test_a_row_replacement_command_parses(monkeypatch):  # a merge's and a continual run's
    monkeypatch.chdir(ROOT.parent)
    cfg, _ = merging.parse_config(*ROWS_REMOVED["configs/paper/merge/llama3_8b_3tasks_linear_lori_s.yaml"].split()[3:])
    assert (cfg.method, cfg.adaptation, cfg.weights) == ("linear", "lori_s", [0.4] * 3)
    assert cfg.output_dir == "runs/paper/merge/llama3_8b_3tasks_linear_lori_s"
    assert replacement("configs/paper/merge/llama3_8b_3tasks_ties_lori_s.yaml") is None  # no such row, ever
    cfg = parse_continual_config(*ROWS_REMOVED["configs/paper/continual/llama3_8b_r32_safety_then_nlu_lori_s.yaml"]
                                 .split()[3:])
    assert cfg["continual"]["output_dir"] == "runs/paper/continual/llama3_8b_r32_safety_then_nlu_lori_s"
    assert cfg["continual"]["task_mask"] == "runs/paper/llama3_8b_r32_nlu/calibration/masks.safetensors"


def test_an_existing_or_unrelated_missing_config_is_not_reported_as_moved(tmp_path):
    check(["fit", "--config", str(DEFAULT)])
    check(["fit", "--config", str(tmp_path / "configs" / "experiment" / "mine.yaml")])
    assert replacement("configs/paper/baselines/llama3_8b_r32_gsm8k_qlora.yaml") is None
