"""Every shipped YAML parses with the parser of the command that runs it, and holds valid settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lori.commands import eval_command
from lori.commands import merge_command as merging
from lori.commands.continual_command import parse_continual_config
from lori.commands.lightning_cli import parse_config, parse_configs
from lori.core import LoRIConfig
from lori.eval.evaluator import EvalSettings
from lori.training.continual import ContinualConfig
from lori.training.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(ROOT.rglob("*.yaml"))
DEFAULT = ROOT / "experiment" / "default.yaml"


def kind(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    if parts[0] == "eval":
        return "eval"
    if "merge" in parts:
        return "merge"
    if parts[0] == "trainer":
        return "trainer"
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
    elif what == "continual":
        cfg = parse_continual_config(path)
        check_training(cfg)
        ContinualConfig(**cfg["continual"])
        EvalSettings(**cfg["eval"]).check()
    elif what == "eval":
        cfg = eval_command.build_parser().parse_args(["--config", str(path)])
        EvalSettings(**cfg["eval"].as_dict()).check()
    elif what == "merge":
        merging.parse_config(path)
    elif what == "trainer":  # a preset composes with an experiment config
        cfg = parse_configs(DEFAULT, path)
        assert cfg["trainer"]["strategy"] is not None
    else:
        assert isinstance(yaml.safe_load(path.read_text()), dict)
