"""Every shipped YAML parses with the lori CLI parser and holds valid LoRI settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from lori.cli import parse_config
from lori.core import LoRIConfig
from lori.pipeline import PipelineConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_yaml_parses(path):
    cfg = parse_config(path)
    lori = LoRIConfig.from_dict(dict(cfg["model"]["lori"]))
    assert 0.0 <= lori.sparsity < 1.0
    pipe = PipelineConfig(**cfg["pipeline"])
    assert pipe.dense_steps > 0 and pipe.sparse_steps > 0
