"""`lori merge`: merged weights equal the explicit formulas, the table, and bad input refused early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import lori.training.module
from lori.commands.main import main as lori_main
from lori.commands.merge_command import parse_config
from lori.core import (
    Adapter,
    LoRIConfig,
    adapter_from_model,
    apply_adapter,
    base_fingerprint,
    calibrate,
    get_B,
    inject_lori,
    load_adapter,
    lori_layers,
    merge_lori,
    save_adapter,
    set_masks,
)
from lori.eval.merge_table import results_table
from lori.training.base_model import tiny_llama
from lori.training.baselines import attach, save_peft_adapter, target_paths
from lori.training.merge_run import MergeConfig, MergeConfigError, run_merge

TARGETS = ["q_proj", "v_proj", "down_proj"]
PATHS = sorted(target_paths(tiny_llama(), TARGETS))


class Recorder:
    """A fake evaluator: records the adapted weights it was shown, returns fixed scores."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []
        self.tasks: list[list[str]] = []

    def __call__(self, model, tokenizer, tasks):
        self.seen.append({p: model.get_submodule(p).weight.detach().clone() for p in PATHS})
        self.tasks.append(list(tasks))
        n = len(self.seen)
        return {t: {"acc": 0.1 * n + 0.01 * i, "pass@5": 0.5, "n": 10} for i, t in enumerate(tasks)}


@pytest.fixture(autouse=True)
def tiny_base(monkeypatch):
    """The base model is a tiny random Llama; ``other-base`` is another random one; ``tiny-llama``
    is lori's own (with the default model's tokenizer)."""
    loaded, real = [], lori.training.module.build_model

    def build(name, *args, **kwargs):
        loaded.append(name)
        if name == "tiny-llama":
            return real(name, *args, **kwargs)
        return tiny_llama(seed=1 if name == "other-base" else 0), None

    monkeypatch.setattr(lori.training.module, "build_model", build)
    return loaded


def _lori(seed: int, r: int = 4, sparsity: float | None = None, targets=TARGETS, base_seed: int = 0) -> Adapter:
    model = tiny_llama(seed=base_seed)
    cfg = LoRIConfig(r=r, alpha=2.0 * r, dropout=0.0, target_modules=targets, seed=seed)
    inject_lori(model, cfg)
    g = torch.Generator().manual_seed(100 + seed)
    for layer in lori_layers(model).values():
        layer.lori_B.data.copy_(torch.randn(layer.lori_B.shape, generator=g) * 0.05)
    if sparsity is not None:
        set_masks(model, calibrate(get_B(model), sparsity))
    return adapter_from_model(model, cfg, base_model="tiny")


def _lori_dirs(tmp_path: Path, n: int = 2, **kwargs) -> list[str]:
    return [str(save_adapter(_lori(seed, **kwargs), tmp_path / f"task{seed}")) for seed in range(n)]


def _lora_dir(tmp_path: Path, seed: int, dora: bool = False) -> str:
    """A PEFT LoRA dir as `lori fit` with method lora writes it, with A and B moved off their init."""
    model = tiny_llama()
    fingerprint = base_fingerprint(model, target_paths(model, TARGETS))
    attach(model, "dora" if dora else "lora", LoRIConfig(r=4, alpha=8.0, dropout=0.0, target_modules=TARGETS,
                                                         seed=seed))
    g = torch.Generator().manual_seed(200 + seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return str(save_peft_adapter(model, tmp_path / f"lora{seed}", "tiny", fingerprint, {"method": "lora"}))


def _run(tmp_path: Path, adapters: list[str], methods: list[str], evaluate: bool = True, **kwargs):
    recorder = Recorder()
    tasks = ["math", "code", "nlu", "safety"][: len(adapters)]
    cfg = MergeConfig(base_model="tiny", adapters=adapters, tasks=tasks, method=methods, device="cpu",
                      evaluate=tasks if evaluate else [], output_dir=str(tmp_path / "out"), **kwargs)
    results = run_merge(cfg, evaluate=recorder)
    return results, recorder


# ---- independent reference implementations, straight from the definitions -------------------
def _base() -> dict[str, torch.Tensor]:
    model = tiny_llama()
    return {p: model.get_submodule(p).weight.detach().clone() for p in PATHS}


def _prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's magnitude pruning: exactly k = int(density * numel) entries of largest |.| kept."""
    if density >= 1:
        return t
    keep = t.abs().flatten().argsort(descending=True)[: int(density * t.numel())]
    out = torch.zeros(t.numel())
    out[keep] = t.flatten()[keep]
    return out.view_as(t)


def _ties(trimmed: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Sign elected on the unweighted sum (0 counts as +); mean of the agreeing w_t x_t."""
    out = torch.zeros_like(trimmed[0]).flatten()
    flat = [t.flatten() for t in trimmed]
    for i in range(out.numel()):
        elected = 1.0 if sum(float(t[i]) for t in flat) >= 0 else -1.0
        agreeing = [w * float(t[i]) for t, w in zip(flat, weights) if float(t[i]) * elected > 0]
        out[i] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out.view_as(trimmed[0])


def _drop(t, density, g, rescale=True):
    kept = t * torch.bernoulli(torch.full_like(t, density), generator=g)
    return kept / density if rescale else kept


def _operator(method, tensors, weights, density, g, rescale=True):
    if method == "magnitude":
        return sum(w * _prune(t, density) for t, w in zip(tensors, weights))
    if method == "ties":
        return _ties([_prune(t, density) for t in tensors], weights)
    if method == "dare_ties":
        return _ties([_drop(t, density, g, rescale) for t in tensors], weights)
    return sum(w * _drop(t, density, g, rescale) for t, w in zip(tensors, weights))


def _expected(adapters: list[Adapter], method: str, w: list[float], density: float, space: str, seed: int = 0,
              rescale: bool = True):
    base, g = _base(), torch.Generator().manual_seed(seed)
    out = {}
    for p in [p for p, _ in tiny_llama().named_modules() if p in adapters[0].A]:  # the module order DARE draws in
        A = [a.A[p].float() for a in adapters]
        B = [a.B[p].float() for a in adapters]
        ws = [wt * a.config.scale for a, wt in zip(adapters, w)]
        if method == "concat":
            delta = sum(x * b @ a for a, b, x in zip(A, B, ws))
        elif method == "linear":  # PEFT's / the official code's: sqrt(w s) on each factor
            delta = sum(x**0.5 * b for b, x in zip(B, ws)) @ sum(x**0.5 * a for a, x in zip(A, ws))
        elif method == "linear_eq8":
            s = adapters[0].config.scale
            delta = s * sum(wt * b for b, wt in zip(B, w)) @ sum(wt * a for a, wt in zip(A, w))
        elif space == "delta":
            deltas = [ad.config.scale * b @ a for ad, a, b in zip(adapters, A, B)]
            delta = _operator(method, deltas, w, density, g, rescale)
        else:  # PEFT's factor-space merge: the operator on the A_t and on the B_t with weights sqrt(w_t s_t)
            roots = [x**0.5 for x in ws]
            merged_A = _operator(method, A, roots, density, g, rescale)
            delta = _operator(method, B, roots, density, g, rescale) @ merged_A
        out[p] = base[p] + delta
    return out


# ---- formulas ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [None, 0.9])
def test_lori_concat_and_linear_equal_the_formulas(tmp_path, sparsity):
    dirs = _lori_dirs(tmp_path, 3, sparsity=sparsity)
    results, rec = _run(tmp_path, dirs, ["concat", "linear", "linear_eq8"], weights=[0.3, 0.5, 0.2])
    adapters = [load_adapter(d) for d in dirs]
    assert not torch.allclose(rec.seen[1][PATHS[0]], rec.seen[2][PATHS[0]], atol=1e-4)
    for seen, method in zip(rec.seen, ["concat", "linear", "linear_eq8"]):
        want = _expected(adapters, method, [0.3, 0.5, 0.2], 1.0, "factors")
        for p in PATHS:
            assert torch.allclose(seen[p], want[p], atol=1e-6), (method, p)
    assert results["adaptation"] == ("lori_s" if sparsity else "lori_d")


@pytest.mark.parametrize("space", ["factors", "delta"])
@pytest.mark.parametrize("method", ["concat", "linear", "magnitude", "ties", "dare", "dare_ties"])
def test_lora_methods_equal_the_formulas(tmp_path, method, space):
    dirs = [_lora_dir(tmp_path, s) for s in range(3)]
    density = {"magnitude": 0.3, "ties": 0.7, "dare": 0.7, "dare_ties": 0.7}.get(method, 1.0)
    results, rec = _run(tmp_path, dirs, [method], weights=[0.4, 0.4, 0.4], space=space, seed=7)
    want = _expected([load_adapter(d) for d in dirs], method, [0.4] * 3, density, space, seed=7)
    for p in PATHS:
        assert torch.allclose(rec.seen[0][p], want[p], atol=1e-6), p
    row = results["rows"][0]
    assert row["adaptation"] == "LoRA" and row["density"] == (density if method in ("magnitude", "ties", "dare",
                                                                                    "dare_ties") else None)


def test_every_row_starts_from_the_exact_base(tmp_path):
    dirs = [_lora_dir(tmp_path, s) for s in range(2)]
    _, both = _run(tmp_path, dirs, ["dare", "ties", "concat"], weights=[0.5, 0.5])
    _, alone = _run(tmp_path, dirs, ["concat"], weights=[0.5, 0.5])
    assert all(torch.equal(both.seen[2][p], alone.seen[0][p]) for p in PATHS)


def test_merged_adapter_is_written_and_reloads_to_the_same_weights(tmp_path):
    dirs = _lori_dirs(tmp_path, 2, sparsity=0.9)
    _, rec = _run(tmp_path, dirs, ["concat", "ties"], weights=[0.3, 0.3])
    for i, method in enumerate(["concat", "ties"]):
        merged = load_adapter(tmp_path / "out" / method / "merged_adapter")
        model = tiny_llama()
        apply_adapter(model, merged)
        merge_lori(model)
        assert all(torch.allclose(model.get_submodule(p).weight, rec.seen[i][p], atol=1e-6) for p in PATHS)
        stats = json.loads((tmp_path / "out" / method / "delta_stats.json").read_text())
        assert set(stats) == set(PATHS) and all(s["norm"] > 0 for s in stats.values())


def test_concat_takes_different_ranks(tmp_path):
    dirs = [str(save_adapter(_lori(0, r=4), tmp_path / "a")), str(save_adapter(_lori(1, r=8), tmp_path / "b"))]
    _, rec = _run(tmp_path, dirs, ["concat"], weights=[0.5, 0.5])
    want = _expected([load_adapter(d) for d in dirs], "concat", [0.5, 0.5], 1.0, "factors")
    assert all(torch.allclose(rec.seen[0][p], want[p], atol=1e-6) for p in PATHS)
    assert load_adapter(tmp_path / "out" / "concat" / "merged_adapter").rank == 12


# ---- protocols -----------------------------------------------------------------------------------
def test_official_protocol_defaults_density_0_7_and_peft_0_12_dare(tmp_path):
    """protocol official: PEFT's names, density 0.7 where none is given, DARE not rescaled."""
    dirs = [_lora_dir(tmp_path, s) for s in range(3)]
    methods = ["cat", "linear", "magnitude_prune", "ties", "dare_linear", "dare_ties"]
    results, rec = _run(tmp_path, dirs, methods, weights=[0.4] * 3, protocol="official", seed=3)
    adapters = [load_adapter(d) for d in dirs]
    for seen, method in zip(rec.seen, ["concat", "linear", "magnitude", "ties", "dare", "dare_ties"]):
        want = _expected(adapters, method, [0.4] * 3, 0.7, "factors", seed=3, rescale=False)
        assert all(torch.allclose(seen[p], want[p], atol=1e-6) for p in PATHS), method
    rows = results["rows"]
    assert [r["method"] for r in rows] == ["concat", "linear", "magnitude", "ties", "dare", "dare_ties"]
    assert [r["combination_type"] for r in rows] == methods
    assert [r["density"] for r in rows] == [None, None, 0.7, 0.7, 0.7, 0.7]
    assert [r["dare_rescale"] for r in rows][4:] == [False, False] and results["protocol"] == "official"
    assert [r["merging"] for r in rows][:2] == ["Concat", "Linear"]


def test_lori_protocol_rescales_dare_and_takes_the_paper_densities(tmp_path):
    dirs = [_lora_dir(tmp_path, s) for s in range(3)]
    results, rec = _run(tmp_path, dirs, ["magnitude", "dare"], weights=[0.4] * 3, seed=3)
    adapters = [load_adapter(d) for d in dirs]
    assert [r["density"] for r in results["rows"]] == [0.3, 0.7]
    want = _expected(adapters, "dare", [0.4] * 3, 0.7, "factors", seed=3, rescale=True)
    assert all(torch.allclose(rec.seen[1][p], want[p], atol=1e-6) for p in PATHS)
    _, off = _run(tmp_path, dirs, ["dare"], weights=[0.4] * 3, seed=3, dare_rescale=False)
    assert not torch.allclose(off.seen[0][PATHS[0]], rec.seen[1][PATHS[0]], atol=1e-5)


def test_official_protocol_refuses_bfloat16(tmp_path, capsys, tiny_base):
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": _lori_dirs(tmp_path, 2), "protocol": "official",
                                             "dtype": "bfloat16"}, "float32", "'bfloat16'", "merge_3_loras.py")


def test_official_protocol_refuses_delta_space_and_eq8(tmp_path, capsys, tiny_base):
    dirs = _lori_dirs(tmp_path, 2)
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": dirs, "protocol": "official", "method": "ties",
                                             "space": "delta"}, "space='delta'")
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": dirs, "protocol": "official", "method": "linear_eq8"},
               "linear_eq8")


def test_density_for_a_method_that_takes_none(tmp_path, capsys, tiny_base):
    dirs = _lori_dirs(tmp_path, 2)
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": dirs, "method": ["cat", "linear"], "density": 0.7},
               "density=0.7", "['concat', 'linear']")
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": dirs, "method": "ties", "density": {"cat": 0.7}},
               "'concat'")


def test_a_method_named_twice(tmp_path, capsys, tiny_base):
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": _lori_dirs(tmp_path, 2), "method": ["cat", "concat"]},
               "at most once")


def test_eq8_needs_equal_scales(tmp_path, capsys, tiny_base):
    a = save_adapter(_lori(0, r=4), tmp_path / "a")
    b = _lori(1, r=4)
    b.config = LoRIConfig.from_dict(b.config.to_dict() | {"alpha": 4.0})
    b = save_adapter(b, tmp_path / "b")
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": [str(a), str(b)], "method": ["linear", "linear_eq8"]},
               "scale 1.0", "scale 2.0")


# ---- weights, table, single-task row ----------------------------------------------------------
@pytest.mark.parametrize("n,sparsity,weight", [(4, None, 0.4), (4, 0.9, 0.3), (3, None, 0.5), (3, 0.9, 0.4)])
def test_paper_default_weights(tmp_path, n, sparsity, weight):
    results, _ = _run(tmp_path, _lori_dirs(tmp_path, n, sparsity=sparsity), ["concat"], evaluate=False)
    assert results["weights"] == [weight] * n


def test_table_rows_methods_columns_tasks_and_average(tmp_path):
    dirs = _lori_dirs(tmp_path, 2)
    results, rec = _run(tmp_path, dirs, ["concat", "linear"], weights=[0.4, 0.4], single_task=True)
    assert [r["merging"] for r in results["rows"]] == ["Single-Task", "Concat", "Linear"]
    assert rec.tasks == [["math"], ["code"], ["math", "code"], ["math", "code"]]
    single = results["rows"][0]["scores"]
    assert single["math"]["acc"] == pytest.approx(0.1) and single["code"]["acc"] == pytest.approx(0.2)
    concat = results["rows"][1]
    assert concat["average"] == pytest.approx((0.3 + 0.31) / 2)  # mean of each task's first metric
    table = (tmp_path / "out" / "results.md").read_text()
    header = "| Merging | Adaptation | math acc | math pass@5 | code acc | code pass@5 | Average |"
    assert table.splitlines()[0] == header  # counts such as n are not columns
    assert "| Concat | LoRI-D | 30.0 | 50.0 | 31.0 | 50.0 | 30.5 |" in table
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["rows"][2]["scores"] == results["rows"][2]["scores"]
    assert on_disk["evaluate"] == ["math", "code"]
    assert results_table(on_disk) == table.strip()


def test_single_adapter_row_is_each_adapter_alone(tmp_path):
    dirs = _lori_dirs(tmp_path, 2)
    _, rec = _run(tmp_path, dirs, ["concat"], weights=[0.4, 0.4], single_task=True)
    base = _base()
    for i, d in enumerate(dirs):
        a = load_adapter(d)
        assert all(torch.allclose(rec.seen[i][p], base[p] + a.delta(p), atol=1e-6) for p in PATHS)


def test_evaluate_false_merges_without_evaluating(tmp_path):
    results, rec = _run(tmp_path, _lori_dirs(tmp_path, 2), ["concat", "linear"], weights=[0.4, 0.4],
                        evaluate=False)
    assert rec.seen == [] and all(r["scores"] == {} for r in results["rows"])
    assert (tmp_path / "out" / "linear" / "merged_adapter").is_dir()


# ---- bad input: one line, before work, no output --------------------------------------------------
def _cli_fails(tmp_path, capsys, tiny_base, merge: dict, *fragments, loads_base: bool = False):
    out = tmp_path / "out"
    config = {"base_model": "tiny", "device": "cpu", "output_dir": str(out),
              "weights": [0.4] * len(merge.get("adapters", []))} | merge
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exc:
        lori_main(["merge", "--config", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lori: error:") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists()
    assert bool(tiny_base) == loads_base  # the base model was loaded only where it had to be


def test_adapters_from_different_bases(tmp_path, capsys, tiny_base):
    a = save_adapter(_lori(0), tmp_path / "a")
    b = save_adapter(_lori(1, base_seed=1), tmp_path / "b")
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": [str(a), str(b)]}, "another base model")


def test_adapters_of_another_architecture(tmp_path, capsys, tiny_base):
    a = save_adapter(_lori(0), tmp_path / "a")
    model = tiny_llama(hidden_size=48)
    cfg = LoRIConfig(r=4, alpha=8.0, target_modules=TARGETS, seed=1)
    inject_lori(model, cfg)
    b = save_adapter(adapter_from_model(model, cfg), tmp_path / "b")
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": [str(a), str(b)]}, "different base models")


def test_adapters_that_fit_each_other_but_not_the_base(tmp_path, capsys, tiny_base):
    dirs = _lori_dirs(tmp_path, 2)
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": dirs, "base_model": "other-base"}, "'task0'", "fingerprint",
               loads_base=True)


def test_different_ranks_where_the_method_needs_one(tmp_path, capsys, tiny_base):
    a, b = save_adapter(_lori(0, r=4), tmp_path / "a"), save_adapter(_lori(1, r=8), tmp_path / "b")
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": [str(a), str(b)], "method": ["concat", "linear"]},
               "rank 8", "rank 4")


def test_different_target_sets(tmp_path, capsys, tiny_base):
    a = save_adapter(_lori(0), tmp_path / "a")
    b = save_adapter(_lori(1, targets=["q_proj", "v_proj"]), tmp_path / "b")
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": [str(a), str(b)]}, "other modules")


def test_weights_not_matching_the_adapters(tmp_path, capsys, tiny_base):
    dirs = _lori_dirs(tmp_path, 3)
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": dirs, "weights": [0.4, 0.4]}, "2 weights", "3 adapters")


def test_missing_adapter_dir(tmp_path, capsys, tiny_base):
    dirs = _lori_dirs(tmp_path, 1) + [str(tmp_path / "no_such_adapter")]
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": dirs}, "no_such_adapter", "does not exist")


def test_a_directory_that_is_not_an_adapter(tmp_path, capsys, tiny_base):
    (tmp_path / "empty").mkdir()
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": _lori_dirs(tmp_path, 1) + [str(tmp_path / "empty")]},
               "empty", "adapter_config.json")


def test_density_out_of_range(tmp_path, capsys, tiny_base):
    dirs = [_lora_dir(tmp_path, s) for s in range(2)]
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": dirs, "method": "ties", "density": 1.5}, "density", "1.5")


def test_dora_and_mixed_adapter_sets(tmp_path, capsys, tiny_base):
    lora, dora = _lora_dir(tmp_path, 0), _lora_dir(tmp_path / "d", 1, dora=True)
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": [lora, dora]}, "DoRA")
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": [lora, _lori_dirs(tmp_path, 1)[0]]}, "different kinds")


def test_no_paper_weights_for_two_adapters(tmp_path):
    with pytest.raises(MergeConfigError, match="give weights for 2"):
        _run(tmp_path, _lori_dirs(tmp_path, 2), ["concat"], evaluate=False)


def test_output_dir_is_replaced_whole(tmp_path):
    dirs = _lori_dirs(tmp_path, 2)
    _run(tmp_path, dirs, ["concat", "linear"], weights=[0.4, 0.4], evaluate=False)
    _run(tmp_path, dirs, ["concat"], weights=[0.4, 0.4], evaluate=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["concat", "results.json", "results.md"]


def test_merge_command_runs_from_yaml(tmp_path, capsys):
    dirs = _lori_dirs(tmp_path, 2)
    config = {"base_model": "tiny", "adapters": dirs, "tasks": ["math", "code"], "method": ["concat", "linear"],
              "weights": [0.4, 0.4], "device": "cpu", "output_dir": str(tmp_path / "out")}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    lori_main(["merge", "--config", str(tmp_path / "merge.yaml"), "--method", "concat"])
    assert "| Concat | LoRI-D |" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["concat"]
    assert yaml.safe_load((tmp_path / "out" / "merge_config.yaml").read_text())["method"] == "concat"


def test_adaptation_is_checked(tmp_path, capsys, tiny_base):
    _cli_fails(tmp_path, capsys, tiny_base, {"adapters": _lori_dirs(tmp_path, 2), "adaptation": "lori_s"},
               "'lori_s'", "'lori_d'")


def test_shipped_merge_configs_parse():
    configs = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("merge/*.yaml"))
    assert any(p.parent.name == "merge" and p.parent.parent.name == "configs" for p in configs)
    for path in configs:  # an adapter set (configs/paper/merge/) runs one row: its concat of LoRI-D here
        row = ["--adaptation", "lori_d", "--method", "concat"] if "adapter_set:" in path.read_text() else []
        cfg, _ = parse_config(path, *row)
        assert cfg.adapters and cfg.methods, path
        weights = cfg.weights or []
        assert len(weights) in (0, len(cfg.adapters)), path
        if path.parent.parent.name == "paper":  # the paper's merges, as the official code ran them
            assert (cfg.protocol, cfg.dtype, cfg.space) == ("official", "float32", "factors"), path


def test_usage_lists_merge_and_diagnose(capsys):
    lori_main([])
    usage = capsys.readouterr().out
    assert "merge" in usage and "diagnose" in usage


def test_real_evaluation_on_a_tiny_model(tmp_path):
    """End to end with lori.eval.evaluator: generation (GSM8K) and option scoring (BoolQ), two items each."""
    from lori.eval.evaluator import EvalSettings

    model, _ = lori.training.module.build_model("tiny-llama", None, "float32", None)
    dirs = []
    for seed in range(2):
        base = {n: t.clone() for n, t in model.state_dict().items()}
        cfg = LoRIConfig(r=4, alpha=8.0, dropout=0.0, target_modules=TARGETS, seed=seed)
        inject_lori(model, cfg)
        for layer in lori_layers(model).values():
            layer.lori_B.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
        dirs.append(str(save_adapter(adapter_from_model(model, cfg, "tiny-llama"), tmp_path / f"a{seed}")))
        from lori.core import unload

        unload(model, merge=False)
        model.load_state_dict(base)
    cfg = MergeConfig(base_model="tiny-llama", adapters=dirs, tasks=["gsm8k", "boolq"], method=["concat", "linear"],
                      weights=[0.5, 0.5], evaluate=["gsm8k", "boolq"], single_task=True, device="cpu",
                      output_dir=str(tmp_path / "out"))
    settings = EvalSettings(max_examples=2, max_new_tokens=4, batch_size=2, progress=False)
    results = run_merge(cfg, settings)
    assert [r["merging"] for r in results["rows"]] == ["Single-Task", "Concat", "Linear"]
    assert [tuple(c) for c in results["columns"]] == [("gsm8k", "accuracy"), ("boolq", "accuracy_loglik")]
    for row in results["rows"]:
        assert row["scores"]["gsm8k"]["n"] == 2 and 0.0 <= row["scores"]["boolq"]["accuracy_loglik"] <= 1.0
        assert row["average"] is not None
    assert "| Concat | LoRI-D |" in (tmp_path / "out" / "results.md").read_text()


def test_bad_evaluation_settings_stop_before_the_base_loads(tmp_path, tiny_base):
    from lori.eval.evaluator import EvalError, EvalSettings

    cfg = MergeConfig(base_model="tiny", adapters=_lori_dirs(tmp_path, 2), weights=[0.5, 0.5],
                      evaluate=["no_such_benchmark"], output_dir=str(tmp_path / "out"))
    with pytest.raises(EvalError, match="no_such_benchmark"):
        run_merge(cfg, EvalSettings())
    assert not tiny_base and not (tmp_path / "out").exists()
