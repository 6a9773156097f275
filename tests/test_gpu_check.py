"""experiments/gpu_check.py: the --tiny run on CPU (every section, numbers, no errors), the budget that
skips what does not fit, and the pieces the GPU run leans on (requirement check, JUnit parsing,
tiny-llama's tokenizer from LORI_TINY_TOKENIZER)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import background_runs
import pytest

REPO = Path(__file__).resolve().parents[1]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "experiments" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


G = load_gpu_check()


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN


@pytest.fixture(scope="module")
def tiny_run() -> dict:
    """``gpu_check.py --tiny``, started in the background when collection ended (background_runs)."""
    done = background_runs.wait("gpu_check_tiny")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((done.workdir / "gpu_check_tiny.json").read_text())


def test_tiny_run_has_every_section_and_no_error(tiny_run):
    sections = tiny_run["sections"]
    assert list(sections) == G.SECTIONS
    assert tiny_run["errors"] == [] and tiny_run["skipped"] == [], {
        n: s.get("error") for n, s in sections.items() if s["status"] != "ok"}
    assert all(s["status"] == "ok" and _number(s["seconds"]) for s in sections.values())
    assert all(s["device"] == "cpu-tiny" for s in sections.values())
    env = sections["env"]
    assert env["torch"] and env["imports"]["lori.commands.main"] == "ok" and "datasets" in env["packages"]


def test_tiny_bench_gives_ratios_and_peak_memory_per_method(tiny_run):
    bench = tiny_run["sections"]["bench"]
    summary = bench["summary"]
    assert bench["settings"]["dtype"] == "bfloat16" and bench["settings"]["adapter_dtype"] == "float32"
    for key in ("lori_s_vs_lora", "lori_s_vs_floor", "opt_state_lori_s_vs_lori_d"):
        assert _number(summary["ratios"][key]) and summary["ratios"][key] > 0
    assert set(summary["peak_memory_bytes"]) == {"floor", "lori_d", "lori_s", "lora"}
    assert all(_number(v) and v > 0 for v in summary["peak_memory_bytes"].values())
    assert "VmHWM" in summary["peak_memory_is"] and _number(summary["peak_memory_lori_s_vs_lora"])


def test_tiny_memory_compares_the_dry_run_with_measured_peaks(tiny_run):
    memory = tiny_run["sections"]["memory"]
    assert memory["estimate_reproduces_dry_run"] is True
    runs = {(r["method"], r["checkpointing"]): r for r in memory["runs"]}
    assert set(runs) == {(m, c) for m in ("lori_d", "lori_s") for c in (False, True)}
    for run in runs.values():
        assert run["estimate_gib"]["total"] > run["estimate_gib"]["overhead"] == 1.0
        for key in ("peak_live_bytes", "peak_rss_bytes", "saved_bytes", "step_ms", "ratio",
                    "saved_vs_estimate_activations"):
            assert _number(run[key]) and run[key] > 0, key
        assert isinstance(run["within_15pct"], bool)
    # checkpointing keeps less, in the estimate and in what autograd saved
    for m in ("lori_d", "lori_s"):
        assert runs[m, True]["estimate_gib"]["activations"] < runs[m, False]["estimate_gib"]["activations"]
        assert runs[m, True]["saved_bytes"] < runs[m, False]["saved_bytes"]
        assert runs[m, True]["peak_live_bytes"] < runs[m, False]["peak_live_bytes"]
    settings = memory["settings"]
    assert (settings["r"], settings["batch"], settings["seq"], settings["base_dtype"]) == (32, 2, 64, "bfloat16")


def test_tiny_quantized_compares_nf4_with_checkpointing_to_the_dry_run(tiny_run):
    section = tiny_run["sections"]["quantized"]
    assert abs(section["stored_vs_dry_run"] - 1) <= 0.05  # the stored NF4 base vs the dry run's weights term
    assert section["estimate_fits_12_gib"] is True and _number(section["reference_step_ms"])
    runs = {r["method"]: r for r in section["runs"]}
    assert set(runs) == {"lori_d", "lori_s"}
    for run in runs.values():
        assert run["quantize"] == "nf4" and run["checkpointing"] is True
        assert run["estimate_gib"]["dequantized"] >= 0 and run["estimate_gib"]["total"] > 1.0
        for key in ("peak_live_bytes", "peak_rss_bytes", "step_ms", "ratio", "step_vs_bf16_plain"):
            assert _number(run[key]) and run[key] > 0, key
    # LoRI-S trains a tenth of B: less optimizer state in the estimate
    assert runs["lori_s"]["estimate_gib"]["optimizer"] <= runs["lori_d"]["estimate_gib"]["optimizer"]


def test_tiny_fsdp_calibrates_and_saves_through_lightnings_strategy(tiny_run):
    fsdp = tiny_run["sections"]["fsdp"]
    assert fsdp["strategy"]["class_path"] == "fsdp_cpu.CPUFSDPStrategy"
    assert fsdp["precision"]["trainer_precision"] == "bf16-mixed"
    assert fsdp["masks_are_calibration_of_lori_d"] and fsdp["lori_s_zero_outside_mask"] and fsdp["lori_s_trained"]
    assert fsdp["adapters_fp32"], fsdp["adapter_dtypes"]
    assert abs(fsdp["mask_density"] - 0.1) < 0.01
    assert all(_number(v) for v in fsdp["losses"].values()) and len(fsdp["losses"]) == 4


def test_tiny_pipeline_compares_two_runs(tiny_run):
    pipe = tiny_run["sections"]["pipeline"]
    device, cpu = pipe["runs"]["device"], pipe["runs"]["cpu"]
    assert device["dtype"] == "bfloat16" and device["precision"]["compute"] == "bfloat16"
    for run in (device, cpu):
        assert run["masks_are_calibration_of_lori_d"] and run["lori_s_zero_outside_mask"] and run["adapters_fp32"]
        assert len(run["losses"]) == 4 and all(_number(v) for v in run["losses"].values())
    assert 0 < pipe["mask_agreement"] <= 1 and _number(pipe["lori_d_B_relative_difference"])
    assert set(pipe["val_loss_difference_device_minus_cpu"]) == set(cpu["losses"])


def test_tiny_pytest_collects_the_gpu_tests(tiny_run):
    section = tiny_run["sections"]["pytest"]
    assert section["mode"] == "collect-only" and section["collected"] >= 3
    assert {"tests/test_cuda.py", "tests/test_zero3.py", "tests/test_core_masks.py"} <= set(section["files"])
    assert all("[cpu]" not in t for t in section["tests"])  # -m gpu: the CUDA parameters only


# ---- budget ------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_skips_what_would_not_fit_and_runs_what_does():
    clock = FakeClock()
    budget = G.Budget(100, clock)
    ran, recorded = [], {}

    def section(name: str, seconds: float):
        def run():
            ran.append(name)
            clock.now += seconds
            return {"value": seconds}
        return run

    funcs = {"a": section("a", 30), "b": section("b", 50), "c": section("c", 5), "d": section("d", 1)}
    estimates = {"a": 40, "b": 80, "c": 20, "d": 80}
    G.run_sections(["a", "b", "c", "d"], funcs, estimates, budget, lambda n, r: recorded.update({n: r}))
    # a: 40 <= 100; b: 80 > 70 left, skipped; c: 20 <= 70; d: 80 > 65, skipped
    assert ran == ["a", "c"]
    assert [recorded[n]["status"] for n in "abcd"] == ["ok", "skipped", "ok", "skipped"]
    assert "needs ~80 s, 70 s of the budget left" == recorded["b"]["why"]
    assert recorded["a"]["value"] == 30 and budget.remaining() == 65


def test_a_failing_section_is_recorded_and_the_next_one_runs():
    budget = G.Budget(100, FakeClock())
    recorded = {}

    def broken():
        raise ValueError("no such device")

    G.run_sections(["x", "y"], {"x": broken, "y": lambda: {"n": 1}}, {"x": 1, "y": 1}, budget,
                   lambda n, r: recorded.update({n: r}))
    assert recorded["x"]["status"] == "error" and recorded["x"]["error"] == "ValueError: no such device"
    assert "no such device" in recorded["x"]["traceback"]
    assert recorded["y"] == {"status": "ok", "n": 1, "seconds": recorded["y"]["seconds"]}


def test_subprocess_timeouts_stay_inside_the_budget():
    clock = FakeClock()
    budget = G.Budget(100, clock)
    assert budget.timeout(20) == 60  # three times the estimate
    assert budget.timeout(50) == 95  # never past the budget (5 s margin)
    clock.now = 99
    assert budget.timeout(50) == 10 and not budget.admits(2)


# ---- pieces ------------------------------------------------------------------------------
def test_unmet_requirements_names_the_version_conflict(monkeypatch):
    requires = {"pkg": ["dep>=2", "other; extra == 'docs'", "gone"]}
    versions = {"pkg": "1.0", "dep": "1.5"}

    def version(name):
        if name not in versions:
            raise G.importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(G.importlib.metadata, "requires", lambda name: requires[name])
    monkeypatch.setattr(G.importlib.metadata, "version", version)
    assert G.unmet_requirements(["pkg"]) == ["pkg needs dep>=2, found 1.5", "pkg needs gone (not installed)"]


def test_junit_outcomes(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped message="needs deepspeed"/></testcase>'
        '</testsuite></testsuites>')
    assert G.junit_outcomes(xml) == {"tests.test_a::test_ok": "passed", "tests.test_a::test_bad": "failed: assert 1 == 2",
                                     "tests.test_b::test_skip": "skipped: needs deepspeed"}


def test_tiny_llama_takes_its_tokenizer_from_the_environment(tmp_path, monkeypatch):
    import lori.training.base_model
    from lori.training.module import build_model

    folder = G.export_tokenizer(tmp_path / "tok")
    assert (folder / "tokenizer.json").is_file()

    def no_embedded_model(*args, **kwargs):
        raise AssertionError("the embedded model must not be loaded")

    monkeypatch.setattr(lori.training.base_model, "load_base_model", no_embedded_model)
    monkeypatch.setenv("LORI_TINY_TOKENIZER", str(folder))
    model, tokenizer = build_model("tiny-llama", None, "float32", None)
    assert model.config.vocab_size == len(tokenizer) == 49152 and tokenizer.pad_token is not None


def test_the_arch_config_of_smollm2_135m_has_its_shape():
    from lori.training.base_model import build_from_arch_config, count_parameters

    model = build_from_arch_config("smollm2_135m")
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (576, 30, 9, 3, 1536, 49152, True)
    assert count_parameters(model) == 134_515_008
