"""An adapter set's rows (lori.training.merge_sets): --adaptation and --method pick one; the row fills
only what the config leaves unset; a plain merge config is untouched."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import yaml

from lori.commands import merge_command as merging
from lori.commands.main import main
from lori.training.merge_run import MergeConfig
from lori.training.merge_sets import MergeRow, MergeSet, MergeSetError

SET = {
    "runs": ["runs/a/task_x", "runs/a/task_y", "runs/a/task_z/"],
    "output_prefix": "out/xyz",
    "rows": {"concat": {"lori_d": {"weight": 0.5, "single_task": True}, "lora": {"weight": 0.4}},
             "ties": {"lora": {"weight": 0.3, "density": 0.6}}},
}


def _config(tmp_path, **top) -> str:
    cfg = {"base_model": "tiny", "tasks": ["x", "y", "z"], "evaluate": [], "adapter_set": SET, **top}
    path = tmp_path / "set.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def test_a_row_fills_adapters_weights_density_single_task_and_output_dir():
    cfg = MergeConfig(tasks=["x", "y", "z"], method="ties", adaptation="lora", adapter_set=SET)
    assert cfg.adapters == ["runs/a/lora/task_x", "runs/a/lora/task_y", "runs/a/lora/task_z"]  # as lori fit writes
    assert (cfg.weights, cfg.density, cfg.single_task, cfg.output_dir) == ([0.3] * 3, 0.6, False, "out/xyz_ties_lora")
    cfg = MergeConfig(method="cat", adaptation="lori_d", adapter_set=MergeSet.from_value(SET))  # PEFT's name
    assert cfg.adapters == ["runs/a/task_x/lori_d", "runs/a/task_y/lori_d", "runs/a/task_z/lori_d"]  # pipeline stages
    assert (cfg.weights, cfg.density, cfg.single_task, cfg.output_dir) == ([0.5] * 3, None, True, "out/xyz_concat_lori_d")
    assert cfg.adapter_set.rows["ties"]["lora"] == MergeRow(weight=0.3, density=0.6)


def test_what_the_config_sets_wins_over_the_row():
    cfg = MergeConfig(method="concat", adaptation="lori_d", adapter_set=SET, weights=[1.0, 2.0, 3.0],
                      single_task=False, output_dir="mine", adapters=["p", "q", "r"])
    assert (cfg.adapters, cfg.weights, cfg.single_task, cfg.output_dir) == (["p", "q", "r"], [1.0, 2.0, 3.0], False, "mine")
    assert MergeConfig(**{**asdict(cfg), "adapter_set": SET}) == cfg  # filling is idempotent


def test_a_plain_config_keeps_its_defaults():
    cfg = MergeConfig(adapters=["a", "b"])
    assert (cfg.output_dir, cfg.single_task, cfg.weights, cfg.density, cfg.adapter_set) == ("runs/merge", False, None,
                                                                                           None, None)


@pytest.mark.parametrize(("options", "words"), [
    ([], ["pick it with --method and --adaptation", "concat (lori_d, lora), ties (lora)"]),
    (["--adaptation", "lori_s", "--method", "concat"], ["no row --method concat --adaptation lori_s"]),
    (["--adaptation", "lora", "--method", "[concat, ties]"], ["one of its table rows", "--method concat,ties"]),
])
def test_a_missing_row_stops_in_one_line(tmp_path, capsys, options, words):
    with pytest.raises(SystemExit) as err:
        main(["merge", "--config", _config(tmp_path), *options])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and lines[0].startswith("lori: error: ")
    assert all(w in lines[0] for w in words), lines[0]
    with pytest.raises(MergeSetError):
        MergeSet.from_value(SET).row("dare", "lora")


def test_the_written_config_holds_what_the_row_filled(tmp_path):
    cfg, _, text = merging.parse_args(["--config", _config(tmp_path), "--adaptation", "lora", "--method", "ties"])
    written = yaml.safe_load(text)
    assert {k: written[k] for k in ("adapters", "weights", "density", "single_task", "output_dir")} == {
        "adapters": cfg.adapters, "weights": [0.3] * 3, "density": 0.6, "single_task": False,
        "output_dir": "out/xyz_ties_lora"}
    again, _, _ = merging.parse_args(["--config", str(_write(tmp_path, text))])  # rerunning it runs the same row
    assert asdict(again) == asdict(cfg)


def _write(tmp_path, text):
    path = tmp_path / "written.yaml"
    path.write_text(text)
    return path
