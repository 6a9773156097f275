"""lori.ablation: grids, point directories, skipping finished points, toy data, merge sweeps."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_tiny_llama

from lori import ablation as ab
from lori.core import LoRIConfig, adapter_from_model, inject_lori, lori_layers
from lori.data.tasks import load_local

BASE = {"model": {"lori": {"sparsity": 0.9, "r": 4}, "lr": 0.01}, "pipeline": {"dense_steps": 3}}


def fake_summary(config: dict) -> dict:
    s = config["model"]["lori"]["sparsity"]
    return {
        "pipeline": config["pipeline"],
        "lori_d": {"val_loss_before": 2.0, "val_loss_after": 1.5, "trainable": 100,
                   "calibration": {"step": config["pipeline"]["dense_steps"]}},
        "lori_s": {"val_loss_after": 1.0 + s, "trainable": round(100 * (1 - s)), "mask_sparsity": s},
    }


class FakeRunner:
    """Stands in for ``lori.commands.pipeline_command.pipeline``: writes summary.json from the config it is given."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, argv: list[str]) -> dict:
        assert argv[0] == "--config"
        config = yaml.safe_load(open(argv[1]))
        self.calls.append(config["pipeline"]["output_dir"])
        summary = fake_summary(config)
        with open(f"{config['pipeline']['output_dir']}/summary.json", "w") as f:
            json.dump(summary, f)
        return summary


def test_expand_grid_is_the_cartesian_product_first_axis_slowest():
    grid = ab.expand_grid({"model.lori.sparsity": [0.5, 0.9], "pipeline.sparse_lr": [1e-3, 1e-2, 0.1]})
    assert len(grid) == 6
    assert grid[0] == {"model.lori.sparsity": 0.5, "pipeline.sparse_lr": 1e-3}
    assert grid[3] == {"model.lori.sparsity": 0.9, "pipeline.sparse_lr": 1e-3}
    assert ab.expand_grid({}) == [{}]
    with pytest.raises(ab.AblationError, match="'a' has no values"):
        ab.expand_grid({"a": []})


def test_overrides_are_deep_copies_and_refuse_descending_into_values():
    config = ab.with_overrides(BASE, {"model.lori.sparsity": 0.5, "data.held_out": 4})
    assert config["model"]["lori"] == {"sparsity": 0.5, "r": 4}
    assert config["data"] == {"held_out": 4}
    assert BASE["model"]["lori"]["sparsity"] == 0.9 and "data" not in BASE
    assert ab.get_key(config, "model.lori.r") == 4
    assert ab.get_key(config, "model.nothing.here", "x") == "x"
    with pytest.raises(ab.AblationError, match="'lr' holds a value"):
        ab.with_overrides(BASE, {"model.lr.value": 1})


def test_point_names_are_short_distinct_and_safe():
    assert ab.point_name({"model.lori.sparsity": 0.9, "pipeline.sparse_lr": 0.005}) == "sparsity=0.9_sparse_lr=0.005"
    assert ab.point_name({}) == "base"
    assert "/" not in ab.point_name({"data.train_file": "/tmp/a b.jsonl"})
    with pytest.raises(ab.AblationError, match="share a directory name"):
        ab.run_sweep(BASE, [{"a.x": 1}, {"b.x": 1}], "unused", run=FakeRunner())


def test_sweep_runs_each_point_once_then_reads_the_results(tmp_path):
    grid = ab.expand_grid({"model.lori.sparsity": [0.5, 0.9], "pipeline.dense_steps": [2, 4]})
    runner = FakeRunner()
    rows = ab.run_sweep(BASE, grid, tmp_path, run=runner)
    assert len(runner.calls) == 4 and len(set(runner.calls)) == 4
    for row, overrides in zip(rows, grid):
        assert row.items() >= overrides.items()
        assert row["sparse_loss"] == 1.0 + overrides["model.lori.sparsity"]
        assert row["calibration_step"] == overrides["pipeline.dense_steps"]
        assert row["output_dir"] == str(tmp_path / ab.point_name(overrides))
        saved = yaml.safe_load((tmp_path / ab.point_name(overrides) / "config.yaml").read_text())
        assert saved == ab.point_config(BASE, overrides, tmp_path / ab.point_name(overrides))
    again = ab.run_sweep(BASE, grid, tmp_path, run=runner)
    assert len(runner.calls) == 4  # nothing rerun: every summary.json was read
    assert again == rows


def test_an_unfinished_point_is_continued_and_another_config_is_refused(tmp_path):
    runner = FakeRunner()
    overrides = {"model.lori.sparsity": 0.5}
    ab.run_point(BASE, overrides, tmp_path, run=runner)
    (tmp_path / "sparsity=0.5" / "summary.json").unlink()  # interrupted before the summary
    ab.run_point(BASE, overrides, tmp_path, run=runner)
    assert len(runner.calls) == 2
    changed = ab.with_overrides(BASE, {"pipeline.dense_steps": 30})
    with pytest.raises(ab.AblationError, match="another config"):
        ab.run_point(changed, overrides, tmp_path, run=runner)
    summary = ab.run_point(changed, overrides, tmp_path, run=runner, name="other")
    assert summary["pipeline"]["output_dir"] == str(tmp_path / "other")


def test_summary_row_reports_missing_losses_as_nan():
    row = ab.summary_row({"lori_d": {"reused": True}, "lori_s": {}}, {"k": 1})
    assert row["k"] == 1 and math.isnan(row["dense_loss"]) and math.isnan(row["sparse_loss"])


def test_pivot_places_values_and_leaves_gaps_nan():
    rows = [{"s": 0.9, "lr": 0.1, "v": 1.0}, {"s": 0.5, "lr": 0.1, "v": 2.0}, {"s": 0.5, "lr": 0.01, "v": 3.0}]
    r, c, m = ab.pivot(rows, "s", "lr", "v")
    assert r == [0.5, 0.9] and c == [0.01, 0.1]
    assert m[0] == [3.0, 2.0] and m[1][1] == 1.0 and math.isnan(m[1][0])


@pytest.mark.parametrize("op", ["+", "*"])
def test_toy_files_parse_as_gsm8k_with_correct_answers(tmp_path, op):
    path = ab.write_toy_gsm8k(tmp_path / "toy.jsonl", n=10, op=op)
    records = load_local(path, "gsm8k")
    assert len(records) == 10
    for i, r in enumerate(records):
        a, b = i + 2, (2 * i + 1) % 9 + 2
        assert str(r["final"]) == str(a + b if op == "+" else a * b)
    with pytest.raises(ab.AblationError, match="unknown toy operation"):
        ab.write_toy_gsm8k(tmp_path / "bad.jsonl", op="-")


def test_toy_config_is_a_valid_pipeline_config(tmp_path):
    from lori.commands.lightning_cli import parse_config

    config = ab.point_config(ab.toy_config(tmp_path, op="*"), {"model.lori.seed": 1}, tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    parsed = parse_config(path)
    assert parsed.model.lori.seed == 1 and parsed.pipeline.output_dir == str(tmp_path / "run")


def _batches(vocab: int, n: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 7), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100  # the prompt
        labels[1, -1] = -100  # padding
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


@torch.no_grad()
def test_held_out_loss_is_the_token_mean_over_all_batches():
    model = make_tiny_llama()
    batches = _batches(96)
    total = count = 0
    for b in batches:
        logits = model(input_ids=b["input_ids"]).logits[:, :-1]
        labels = b["labels"][:, 1:]
        total += F.cross_entropy(logits.reshape(-1, 96), labels.reshape(-1), ignore_index=-100, reduction="sum")
        count += int((labels != -100).sum())
    assert ab.held_out_loss(model, batches) == pytest.approx(float(total / count), rel=1e-5)


def _adapter(seed: int):
    """A LoRI adapter on the tiny Llama with random B (A drawn from ``seed``)."""
    config = LoRIConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=seed)
    model = make_tiny_llama()
    inject_lori(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lori_layers(model).values():
            layer.lori_B.copy_(torch.randn(layer.lori_B.shape, generator=g))
    return adapter_from_model(model, config)


def test_merge_weight_sweep_starts_at_the_base_and_leaves_the_base_unchanged():
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaders = {"t1": _batches(96), "t2": _batches(96, n=1)}
    base = ab.merged_losses(model, None, loaders)
    adapters = [_adapter(0), _adapter(1)]
    rows = ab.merge_weight_sweep(model, adapters, loaders, [0.0, 0.5], methods=("concat", "linear"))
    assert len(rows) == 2 * 2 * 2
    for row in rows:
        if row["weight"] == 0.0:
            assert row["loss"] == pytest.approx(base[row["task"]], rel=1e-6)
    moved = [r for r in rows if r["weight"] == 0.5]
    assert all(abs(r["loss"] - base[r["task"]]) > 1e-4 for r in moved)
    assert not lori_layers(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ab.AblationError, match="unknown merge method"):
        ab.merge_weight_sweep(model, adapters, loaders, [0.3], methods=("ties",))


def test_format_rows_aligns_columns_and_shortens_keys():
    text = ab.format_rows([{"model.lori.sparsity": 0.5, "loss": 1.23456}, {"model.lori.sparsity": 0.9}],
                          ["model.lori.sparsity", "loss"])
    lines = text.splitlines()
    assert lines[0].split() == ["sparsity", "loss"] and lines[1].split() == ["0.5000", "1.2346"]
    assert lines[2].split() == ["0.9000", "None"] and len({len(line) for line in lines}) == 1


@pytest.mark.parametrize("overrides", [
    {"model.lori.sparsity": 0.0, "pipeline.sparse_lr": 0.02},  # the notebooks' full-size values
    {"model.lori.granularity": "projection"},
    {"pipeline.calibrate_at_step": 5},
    {"data.task": "mbpp", "model.lori.seed": 1},
])
def test_full_size_overrides_give_valid_default_configs(tmp_path, overrides):
    from lori.commands.lightning_cli import parse_config

    config = ab.point_config(ab.load_config(ab.DEFAULT_CONFIG), overrides, tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    parsed = parse_config(path)
    for key, value in overrides.items():
        assert ab.get_key(parsed.as_dict(), key) == value


def test_lori_ablation_is_the_sweep_api_with_lori_pipeline_as_the_default_runner(tmp_path):
    from lori.training import sweeps

    assert ab.__all__ == sweeps.__all__
    assert all(getattr(ab, n) is getattr(sweeps, n) for n in sweeps.__all__ if n not in ("run_point", "run_sweep"))
    assert sweeps.REPO_ROOT == ab.REPO_ROOT and ab.DEFAULT_CONFIG.is_file()
    with pytest.raises(TypeError):  # the library runs nothing by itself: a runner is required
        sweeps.run_point(BASE, {}, tmp_path)
    run = FakeRunner()
    assert sweeps.run_sweep(BASE, [{}], tmp_path, run) == ab.run_sweep(BASE, [{}], tmp_path)  # read back
    assert run.calls == [str(tmp_path / "base")]
