"""Diagnostics on constructed cases: the trace formula, Property 1's scale, mask overlap, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lori.commands.diagnose_command import main
from lori.core import Adapter, AdapterMismatchError, LoRIConfig, calibrate, save_adapter
from lori.core.layer import draw_A
from lori.eval.interference import (
    delta_cosine,
    delta_cosines,
    diagnose,
    frobenius_inner,
    overlap_report,
)

PATHS = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def _adapter(seed: int, r: int = 4, d_in: int = 32, d_out: int = 24, sparsity: float | None = None,
             B_seed: int | None = None) -> Adapter:
    g = torch.Generator().manual_seed(1000 + (seed if B_seed is None else B_seed))
    A = {p: draw_A(r, d_in, seed, p) for p in PATHS}
    B = {p: torch.randn(d_out, r, generator=g) for p in PATHS}
    masks = calibrate(B, sparsity) if sparsity is not None else None
    if masks is not None:
        B = {p: B[p] * masks[p] for p in PATHS}
    cfg = LoRIConfig(r=r, alpha=2.0 * r, target_modules=["q_proj", "v_proj"], sparsity=sparsity or 0.0, seed=seed)
    return Adapter(cfg, A, B, masks, "tiny", "fp0")


def test_trace_formula_equals_flattened_cosine():
    g = torch.Generator().manual_seed(0)
    A1, B1 = torch.randn(3, 40, generator=g), torch.randn(30, 3, generator=g)
    A2, B2 = torch.randn(5, 40, generator=g), torch.randn(30, 5, generator=g)  # other rank
    d1, d2 = (B1.double() @ A1.double()).flatten(), (B2.double() @ A2.double()).flatten()
    assert torch.allclose(frobenius_inner(A1, B1, A2, B2), d1 @ d2, rtol=1e-10)
    want = float(d1 @ d2 / (d1.norm() * d2.norm()))
    assert delta_cosine(A1, B1, A2, B2) == pytest.approx(want, abs=1e-12)
    assert delta_cosine(A1, -B1, A2, B2) == pytest.approx(-want, abs=1e-12)


def test_identical_adapters_have_cosine_one_and_zero_adapter_nan():
    a = _adapter(0)
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in delta_cosines(a, a).values())
    zero = Adapter(a.config, a.A, {p: torch.zeros_like(b) for p, b in a.B.items()})
    assert all(math.isnan(v) for v in delta_cosines(a, zero).values())


@pytest.mark.parametrize("d_in", [256, 4096])
def test_independent_A_gives_cosine_of_order_one_over_sqrt_r_d_in(d_in):
    """Property 1: even with the same B, independent A give |cos| ~ sqrt(2/pi) / sqrt(r d_in)."""
    r, values = 4, []
    for t in range(40):
        B = torch.randn(64, r, generator=torch.Generator().manual_seed(t))
        values.append(abs(delta_cosine(draw_A(r, d_in, 2 * t, "m"), B, draw_A(r, d_in, 2 * t + 1, "m"), B)))
    expected = math.sqrt(2 / math.pi) / math.sqrt(r * d_in)
    assert 0.6 * expected < sum(values) / len(values) < 1.5 * expected
    # while a shared A gives cos 1 for the same B
    A = draw_A(r, d_in, 0, "m")
    assert delta_cosine(A, B, A, B) == pytest.approx(1.0)


def test_independent_masks_overlap_about_one_percent_at_s09():
    g = torch.Generator().manual_seed(0)
    shapes = {f"model.layers.{i}.mlp.up_proj": (256, 64) for i in range(4)}  # 65,536 entries
    ma = calibrate({p: torch.randn(s, generator=g) for p, s in shapes.items()}, 0.9)
    mb = calibrate({p: torch.randn(s, generator=g) for p, s in shapes.items()}, 0.9)
    a = Adapter(LoRIConfig(r=64, target_modules=["up_proj"]), {p: torch.zeros(64, 8) for p in shapes},
                {p: torch.zeros(256, 64) for p in shapes}, ma)
    b = Adapter(a.config, a.A, a.B, mb)
    stats = overlap_report(a, b)
    assert stats["expected_independent"] == pytest.approx(0.01, abs=1e-4)
    # binomial std of the intersection fraction: sqrt(0.01 * 0.99 / 65536) ~ 4e-4
    assert stats["intersection"] == pytest.approx(0.01, abs=2e-3)
    assert stats["of_a"] == pytest.approx(0.1, abs=2e-2)
    assert overlap_report(a, a)["intersection"] == pytest.approx(0.1, abs=1e-4)


def test_report_files_and_tensorboard(tmp_path):
    ads = [_adapter(0, sparsity=0.9), _adapter(1, sparsity=0.9), _adapter(0, sparsity=0.9, B_seed=7)]
    report = diagnose(ads, ["math", "code", "math_again"], tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "diagnostics.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert [(p["a"], p["b"]) for p in report["pairs"]] == [("math", "code"), ("math", "math_again"),
                                                           ("code", "math_again")]
    pair = report["pairs"][0]
    assert pair["cosine"]["table"]["layers"] == [0, 1]
    assert pair["cosine"]["table"]["projections"] == ["q_proj", "v_proj"]
    assert pair["cosine"]["mean_abs"] == pytest.approx(
        sum(abs(v) for v in delta_cosines(ads[0], ads[1]).values()) / len(PATHS))
    assert pair["mask_overlap"]["expected_independent"] == pytest.approx(0.01, rel=0.2)
    assert report["sparsity"]["math"]["sparsity"] == pytest.approx(0.9, abs=5e-3)  # 384 entries
    for stem in ("cos_math_vs_code", "sparsity_code"):
        assert (tmp_path / "out" / f"{stem}.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "out" / "tb")).Reload()
    tags = events.Tags()["scalars"]
    assert "cos/math_vs_code/q_proj" in tags and "overlap/math_vs_code/intersection" in tags
    assert [e.step for e in events.Scalars("cos/math_vs_code/v_proj")] == [0, 1]


def test_mismatched_adapters_are_refused():
    a, b = _adapter(0), _adapter(1, d_in=48)
    with pytest.raises(AdapterMismatchError, match="different bases"):
        delta_cosines(a, b)
    with pytest.raises(AdapterMismatchError, match="two or more"):
        diagnose([a], ["a"])


def test_command_reads_adapter_dirs(tmp_path, capsys):
    for seed, name in ((0, "math"), (1, "code")):
        save_adapter(_adapter(seed, sparsity=0.9), tmp_path / name / "lori_s")
    report = main(["--adapters", str(tmp_path / "math" / "lori_s"), str(tmp_path / "code" / "lori_s"),
                   "--output", str(tmp_path / "diag"), "--tensorboard", "false"])
    assert [p["a"] for p in report["pairs"]] == ["math_lori_s"]
    assert (tmp_path / "diag" / "diagnostics.json").is_file() and not (tmp_path / "diag" / "tb").exists()
    assert "mean |cos(ΔW)|" in capsys.readouterr().out


def test_lori_diagnose_dispatch_and_one_line_error(tmp_path, capsys):
    from lori.commands.main import main as lori_main

    save_adapter(_adapter(0), tmp_path / "a")
    save_adapter(_adapter(1, d_in=48), tmp_path / "b")
    with pytest.raises(SystemExit) as exc:
        lori_main(["diagnose", "--adapters", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "d")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lori: error:") and "different bases" in err and "\n" not in err
    assert not (tmp_path / "d").exists()
