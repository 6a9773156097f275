"""A continual_set's adaptations (lori.training.continual_sets): --adaptation picks LoRI-D or LoRI-S,
fills only what the config leaves at its default, and a missing or stray choice stops in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lori.commands.continual_command import parse_continual_config
from lori.commands.main import main
from lori.training.continual_sets import ContinualSet, ContinualSetError, continual_settings

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GSM8K = CONFIGS / "paper" / "continual" / "llama3_8b_r32_safety_then_gsm8k.yaml"
SET = ContinualSet(safety_run="runs/s/", task_run="runs/t", output_prefix="out/c", lr={"lori_d": 1e-5, "lori_s": 1e-4})


def test_each_adaptation_derives_its_phase_2():
    d, s = (continual_settings(SET, a) for a in ("lori_d", "lori_s"))
    assert d == {"continual": {"safety_adapter": "runs/s/lori_d", "masked_task": False, "task_mask": None,
                               "task_lr": 1e-5, "output_dir": "out/c_lori_d"}, "model": {"lr": 1e-5}}
    assert s["continual"] == {"safety_adapter": "runs/s/lori_s", "masked_task": True, "task_lr": 1e-4,
                              "task_mask": "runs/t/calibration/masks.safetensors", "output_dir": "out/c_lori_s"}
    with pytest.raises(ContinualSetError, match="this set has lori_d"):
        continual_settings(ContinualSet("a", "b", "c", {"lori_d": 1e-5}), "lori_s")


def test_what_the_command_line_sets_wins():
    cfg = parse_continual_config(GSM8K, "--adaptation", "lori_s", "--continual.output_dir", "mine",
                                 "--continual.task_lr", "0.001")
    cont = cfg["continual"]
    assert (cont["output_dir"], cont["task_lr"], cfg["model"]["lr"]) == ("mine", 0.001, 5.0e-4)
    assert cont["safety_adapter"] == "runs/paper/llama3_8b_r32_saferpaca/lori_s" and cont["masked_task"] is True


@pytest.mark.parametrize(("config", "options", "words"), [
    (GSM8K, [], "pick it with --adaptation (got None; this set has lori_d, lori_s)"),
    (CONFIGS / "experiment" / "continual_safety_gsm8k.yaml", ["--adaptation", "lori_d"], "has none"),
])
def test_a_missing_or_stray_adaptation_stops_in_one_line(capsys, config, options, words):
    with pytest.raises(SystemExit) as err:
        main(["continual", "--config", str(config), *options])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and lines[0].startswith("lori: error: ") and words in lines[0]
