"""The bad-input catalogue: every case across the codebase stops with ONE clear line
(``lori: error: ...`` naming the problem, exit code 2, no traceback) and writes no output
(no file beside those a case planted). Cases in EARLY stop before the model is even built (the values
are checked on the parsed config)."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_helpers import tiny_config, write_config, write_tiny_gsm8k
from safetensors.torch import load_file, save_file

from lori.commands.main import main
from lori.core import LoRIConfig, adapter_from_model, inject_lori, lori_layers, save_adapter
from lori.core.io import WEIGHTS_FILE
from lori.training.base_model import tiny_llama
from lori.training.module import build_model
from lori.training.run_lock import lock_path

PAPER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper" / "llama3_8b_r32_gsm8k.yaml"
OUT = "out"  # every case points its output at tmp/out, which must not exist afterwards


def tiny_adapter(directory: Path, seed_model: int | None = None, r: int = 4) -> Path:
    """A LoRI adapter with nonzero B on the tiny model (or on another random base)."""
    if seed_model is None:
        model, _ = build_model("tiny-llama", None, "float32", None)
    else:
        model = tiny_llama(seed=seed_model)
    config = LoRIConfig(r=r, alpha=2 * r)
    inject_lori(model, config)
    for layer in lori_layers(model).values():
        layer.lori_B.data.normal_()
    save_adapter(adapter_from_model(model, config, "tiny-llama" if seed_model is None else "another-base"), directory)
    return directory


def poisoned(directory: Path, value: float = float("nan"), which: str = "lora_B") -> Path:
    """Write ``value`` into the first entry of the first saved ``which`` tensor of an adapter."""
    state = load_file(str(directory / WEIGHTS_FILE))
    key = next(k for k in sorted(state) if which in k)
    state[key].view(-1)[0] = value
    save_file(state, str(directory / WEIGHTS_FILE))
    return directory


def overflowing_adapter(directory: Path) -> Path:
    """Finite files whose last module's ΔW = s B A overflows float32 (B and A entries 1e30)."""
    tiny_adapter(directory)
    state = load_file(str(directory / WEIGHTS_FILE))
    last = sorted(k for k in state if "lora_B" in k)[-1]
    state[last].fill_(1e30)
    state[last.replace("lora_B", "lora_A")].fill_(1e30)
    save_file(state, str(directory / WEIGHTS_FILE))
    return directory


HELD: list[int] = []  # lock files held as another live run holds them, closed after each case


def another_run_holds(tmp: Path) -> None:
    fd = os.open(lock_path(tmp / OUT), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": 4242, "host": "node7", "command": "lori pipeline --config a.yaml",
                             "started": "2025-01-01T12:00:00"}).encode())
    HELD.append(fd)


# --- case builders: each returns the argv of one command -------------------------------------------

def pipeline_case(edit: Callable[[dict, Path], None]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        cfg = tiny_config(tmp, output_dir=str(tmp / OUT))
        edit(cfg, tmp)
        return ["pipeline", "--config", str(write_config(tmp, cfg))]
    return build


def fit_case(method: str, lori: dict | None = None, baseline: dict | None = None) -> Callable[[Path], list[str]]:
    """``lori fit`` of a baseline on the tiny config (model.lori fields / model.baseline options set)."""
    def build(tmp: Path) -> list[str]:
        cfg = tiny_config(tmp)
        cfg.pop("pipeline")
        cfg["model"]["method"] = method
        cfg["model"]["lori"].update(lori or {})
        if baseline is not None:
            cfg["model"]["baseline"] = baseline
        cfg["trainer"].update(max_steps=1, default_root_dir=str(tmp / OUT))
        return ["fit", "--config", str(write_config(tmp, cfg))]
    return build


def write_file(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


def foreign_checkpoint(cfg: dict, tmp: Path) -> None:
    ckpt_dir = tmp / OUT / "lori_d_ckpt"
    ckpt_dir.mkdir(parents=True)
    state = {"model.layers.0.self_attn.q_proj.lori_A": torch.zeros(8, 999)}
    torch.save({"state_dict": state, "lori": {"phase": "dense", "fingerprint": "0" * 16, "model": "other"}},
               ckpt_dir / "last.ckpt")


def eval_case(*args: str, setup: Callable[[Path], list[str]] | None = None) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        extra = setup(tmp) if setup else []
        return ["eval", "--model", "tiny-llama", "--output_dir", str(tmp / OUT), "--eval.max_examples", "2",
                "--eval.progress", "false", *args, *extra]
    return build


def truncated_adapter(tmp: Path) -> list[str]:
    d = tiny_adapter(tmp / "adapter")
    weights = d / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return ["--adapter", str(d)]


def truncated_masks(tmp: Path) -> list[str]:
    d = tiny_adapter(tmp / "adapter")
    masks = tmp / "masks.pt"
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight": torch.ones(4, 4).bool()}, masks)
    masks.write_bytes(masks.read_bytes()[:60])
    return ["--adapter", str(d), "--mask_file", str(masks)]


def wrong_shape_masks(tmp: Path) -> list[str]:
    d = tiny_adapter(tmp / "adapter")
    masks = tmp / "masks.safetensors"
    save_file({"model.layers.0.self_attn.q_proj": torch.ones(3, 3, dtype=torch.bool)}, str(masks))
    return ["--adapter", str(d), "--mask_file", str(masks)]


def merge_case(edit: Callable[[dict, Path], None]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        a, b = tiny_adapter(tmp / "a"), tiny_adapter(tmp / "b")
        cfg = {"base_model": "tiny-llama", "adapters": [str(a), str(b)], "method": "linear", "weights": [0.5, 0.5],
               "evaluate": [], "output_dir": str(tmp / OUT)}
        edit(cfg, tmp)
        return ["merge", "--config", write_file(tmp, "merge.yaml", yaml.safe_dump(cfg))]
    return build


def continual_case(tmp: Path, **continual) -> list[str]:
    cfg = tiny_config(tmp)
    del cfg["pipeline"]
    cfg["task_data"] = dict(cfg["data"])
    cfg["continual"] = {"output_dir": str(tmp / OUT), "task_mask": str(tmp / "missing_masks.safetensors")} | continual
    cfg["eval"] = {"tasks": ["gsm8k"], "max_examples": 1}
    return ["continual", "--config", str(write_config(tmp, cfg))]


def nan_task_mask(tmp: Path) -> list[str]:
    masks = tmp / "task_masks.pt"
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight":
                torch.tensor([[1.0, float("nan")]])}, masks)
    return continual_case(tmp, task_mask=str(masks))


def finished_stage_with_nan(cfg: dict, tmp: Path) -> None:
    """A LoRI-D stage on disk (adapter and masks) whose adapter file holds a NaN: reused, refused."""
    poisoned(tiny_adapter(tmp / OUT / "lori_d"))
    (tmp / OUT / "calibration").mkdir()
    save_file({"model.layers.0.self_attn.q_proj": torch.ones(4, 4, dtype=torch.bool)},
              str(tmp / OUT / "calibration" / "masks.safetensors"))


def diagnose_case(tmp: Path) -> list[str]:
    a, b = tiny_adapter(tmp / "a"), poisoned(tiny_adapter(tmp / "b"), float("inf"))
    return ["diagnose", "--adapters", str(a), str(b), "--output", str(tmp / OUT)]


def fit_args_case(*args: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        cfg = tiny_config(tmp)
        cfg["trainer"]["default_root_dir"] = str(tmp / OUT)
        return ["fit", "--config", str(write_config(tmp, cfg)), *args]
    return build


def prequantized(tmp: Path) -> str:
    """A local HF model folder whose config.json says it is stored quantized (GPTQ)."""
    folder = tmp / "gptq"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "gptq", "bits": 4}}))
    return str(folder)


def dryrun_quantize_case(tmp: Path) -> list[str]:
    cfg = yaml.safe_load(PAPER_CONFIG.read_text())
    cfg["model"]["quantize"] = "nf3"
    return ["dryrun", write_file(tmp, "q.yaml", yaml.safe_dump(cfg))]


def pipeline_option(section: str, key: str, value) -> Callable[[Path], list[str]]:
    """A pipeline case changing one value, as a user would on the command line."""
    return pipeline_case(lambda c, t: c[section].update({key: value}))


CASES: dict[str, tuple[Callable[[Path], list[str]], list[str]]] = {
    # configs
    "unknown config key": (pipeline_case(lambda c, t: c["model"].update(sparsty=0.9)), ["sparsty"]),
    "sparsity 1.5": (pipeline_case(lambda c, t: c["model"]["lori"].update(sparsity=1.5)), ["sparsity", "1.5"]),
    "rank 0": (pipeline_case(lambda c, t: c["model"]["lori"].update(r=0)), ["r"]),
    "unknown granularity": (pipeline_case(lambda c, t: c["model"]["lori"].update(granularity="block")), ["block"]),
    "unknown target module": (pipeline_case(lambda c, t: c["model"]["lori"].update(target_modules=["qkv_proj"])),
                              ["qkv_proj"]),
    "unknown dtype": (pipeline_case(lambda c, t: c["model"].update(dtype="float13")), ["float13"]),
    "missing model path": (pipeline_case(lambda c, t: c["model"].update(model=str(t / "nope"))), ["nope"]),
    "unknown template": (pipeline_case(lambda c, t: c["data"].update(template="vicuna")), ["vicuna"]),
    "world size does not divide the global batch": (pipeline_case(lambda c, t: (
        c["data"].update(batch_size=2, global_batch_size=6), c["trainer"].update(devices=2, strategy="ddp"))),
        ["global_batch_size 6", "world size 2"]),
    "ZeRO-3 for a multi-stage command": (pipeline_case(lambda c, t: c["trainer"].update(strategy={
        "class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"stage": 3}})), ["ZeRO-3"]),
    # baselines (lori fit): a method that does not exist, an option that does not apply to the method
    "unknown method": (fit_case("qlora"), ["qlora"]),
    "sparsity for VeRA": (fit_case("vera", lori={"sparsity": 0.5}), ["sparsity=0.5", "vera"]),
    "AdaLoRA option for LoRA": (fit_case("lora", baseline={"target_r": 8}), ["target_r", "adalora"]),
    "unknown baseline option": (fit_case("vera", baseline={"rank": 3}), ["rank"]),
    "IA3 feed-forward module that is not a target": (fit_case(
        "ia3", lori={"target_modules": ["q_proj", "v_proj"]}, baseline={"feedforward_modules": ["down_proj"]}),
        ["feedforward_modules", "down_proj"]),
    "AdaLoRA target rank above the initial rank": (fit_case("adalora", baseline={"target_r": 9}), ["target_r=9"]),
    # data
    "empty dataset file": (pipeline_case(lambda c, t: c["data"].update(train_file=write_file(t, "e.jsonl", ""))),
                           ["no records"]),
    "dataset row without its answer": (pipeline_case(lambda c, t: c["data"].update(
        train_file=write_file(t, "m.jsonl", json.dumps({"question": "1+1?"}) + "\n"))), ["m.jsonl", "answer"]),
    "held-out part swallows the data": (pipeline_case(lambda c, t: c["data"].update(held_out=50)), ["held_out"]),
    "every example longer than max_length": (pipeline_case(lambda c, t: c["data"].update(max_length=8)),
                                             ["max_length"]),
    # checkpoints, adapters and mask files
    "resume checkpoint of another model": (pipeline_case(foreign_checkpoint), ["checkpoint"]),
    "truncated adapter weights": (eval_case(setup=truncated_adapter), ["adapter_model.safetensors"]),
    "truncated mask file": (eval_case(setup=truncated_masks), ["masks.pt"]),
    "mask of the wrong shape": (eval_case(setup=wrong_shape_masks), ["shape"]),
    "adapter of another base model": (eval_case(setup=lambda t: ["--adapter", str(tiny_adapter(t / "x", 1))]),
                                      ["fingerprint"]),
    "unknown evaluation task": (eval_case("--eval.tasks", "[gsm8k, mmlu]"), ["mmlu"]),
    # merging and continual learning
    "merge weights do not match the adapters": (merge_case(lambda c, t: c.update(weights=[1.0])), ["weights"]),
    "merge of adapters with different ranks": (merge_case(lambda c, t: c["adapters"].__setitem__(
        1, str(tiny_adapter(t / "r8", r=8)))), ["rank"]),
    "continual mask file missing": (continual_case, ["task_mask"]),
    # non-finite numbers, where they enter
    "adapter B holding NaN": (eval_case(setup=lambda t: ["--adapter", str(poisoned(tiny_adapter(t / "nan")))]),
                              ["adapter_model.safetensors", "lora_B", "1 NaN"]),
    "adapter whose merge overflows": (eval_case(setup=lambda t: ["--adapter", str(overflowing_adapter(t / "big"))]),
                                      ["refusing to merge", "inf", "no base weight was changed"]),
    "merge of an adapter holding inf": (merge_case(lambda c, t: c["adapters"].__setitem__(
        1, str(poisoned(tiny_adapter(t / "inf"), float("inf"))))), ["adapter_model.safetensors", "1 inf"]),
    "merge whose ΔW overflows": (merge_case(lambda c, t: c["adapters"].__setitem__(
        1, str(overflowing_adapter(t / "big")))), ["refusing to merge", "inf"]),
    "continual safety adapter holding NaN": (lambda t: continual_case(
        t, safety_adapter=str(poisoned(tiny_adapter(t / "safety"))), task_mask=None), ["safety", "1 NaN"]),
    "continual task mask holding NaN": (nan_task_mask, ["task_masks.pt", "1 NaN"]),
    "finished pipeline stage holding NaN": (pipeline_case(finished_stage_with_nan), ["lori_d", "1 NaN"]),
    "diagnose of an adapter holding inf": (diagnose_case, ["adapter_model.safetensors", "1 inf"]),
    # two runs in one directory
    "output directory in use by another run": (pipeline_case(lambda c, t: another_run_holds(t)),
                                               ["in use by another run", "pid 4242 on node7", "a.yaml"]),
    # budgets and sizes a new user might type (each checked on the parsed config, before loading)
    "LoRI-D of zero steps (a mask from B = 0)": (pipeline_option("pipeline", "dense_steps", 0), ["dense_steps", "0"]),
    "negative LoRI-D steps": (pipeline_option("pipeline", "dense_steps", -5), ["dense_steps", "-5"]),
    "LoRI-S of zero steps": (pipeline_option("pipeline", "sparse_steps", 0), ["sparse_steps", "0"]),
    "zero LoRI-D epochs": (pipeline_option("pipeline", "dense_epochs", 0), ["dense_epochs", "0"]),
    "negative LoRI-S epochs": (pipeline_option("pipeline", "sparse_epochs", -1), ["sparse_epochs", "-1"]),
    "calibration after LoRI-D ends": (pipeline_option("pipeline", "calibrate_at_step", 100),
                                      ["calibrate_at_step", "100"]),
    "checkpoint every -1 steps": (pipeline_option("pipeline", "checkpoint_every", -1), ["checkpoint_every", "-1"]),
    "negative LoRI-S learning rate": (pipeline_option("pipeline", "sparse_lr", -0.01), ["sparse_lr", "-0.01"]),
    "LoRI-S alpha 0": (pipeline_option("pipeline", "sparse_alpha", 0), ["sparse_alpha"]),
    "empty output directory": (pipeline_option("pipeline", "output_dir", " "), ["output_dir"]),
    "negative batch size": (pipeline_option("data", "batch_size", -1), ["batch_size", "-1"]),
    "batch size 0": (pipeline_option("data", "batch_size", 0), ["batch_size", "0"]),
    "eval_batch_size 0": (pipeline_option("data", "eval_batch_size", 0), ["eval_batch_size", "0"]),
    "max_length 0": (pipeline_option("data", "max_length", 0), ["max_length", "0"]),
    "negative held-out count": (pipeline_option("data", "held_out", -3), ["held_out", "-3"]),
    "held-out fraction above 1": (pipeline_option("data", "held_out", 1.5), ["held_out", "1.5"]),
    "no held-out examples to validate on": (pipeline_option("data", "held_out", 0),
                                            ["data.held_out", "pipeline.held_out_loss"]),
    "renamed pipeline.validate in a config": (pipeline_option("pipeline", "validate", False),
                                              ["lori: error: pipeline.validate is now pipeline.held_out_loss"]),
    "renamed pipeline.validate on the command line": (
        lambda t: [*pipeline_case(lambda c, _: None)(t), "--pipeline.validate", "false"],
        ["lori: error: pipeline.validate is now pipeline.held_out_loss"]),
    "renamed pipeline.validate under lori fit": (fit_args_case("--pipeline.validate", "true"),
                                                 ["lori: error: pipeline.validate is now pipeline.held_out_loss"]),
    "renamed continual.validate": (lambda t: continual_case(t, validate=True),
                                   ["lori: error: continual.validate is now continual.held_out_loss"]),
    "renamed method lora_frozen_a in a config": (fit_case("lora_frozen_a"),
                                                 ["model.method 'lora_frozen_a' is now called 'lori_d'"]),
    "renamed method lora_frozen_a on the command line": (fit_args_case("--model.method", "lora_frozen_a"),
                                                         ["model.method 'lora_frozen_a' is now called 'lori_d'"]),
    "negative num_workers": (pipeline_option("data", "num_workers", -1), ["num_workers", "-1"]),
    "zero training examples": (pipeline_option("data", "max_train_examples", 0), ["max_train_examples", "0"]),
    "negative learning rate": (pipeline_option("model", "lr", -1e-4), ["lr", "-0.0001"]),
    "negative weight decay": (pipeline_option("model", "weight_decay", -0.1), ["weight_decay", "-0.1"]),
    "AdamW beta of 1.5": (pipeline_option("model", "betas", [1.5, 0.999]), ["betas", "1.5"]),
    "accumulate_grad_batches 0": (pipeline_option("trainer", "accumulate_grad_batches", 0),
                                  ["accumulate_grad_batches", "0"]),
    "negative gradient clipping": (pipeline_option("trainer", "gradient_clip_val", -1.0), ["gradient_clip_val"]),
    "zero devices": (pipeline_option("trainer", "devices", 0), ["devices", "0"]),
    "lori fit of -5 steps": (fit_args_case("--trainer.max_steps", "-5"), ["max_steps", "-5"]),
    "lori fit with batch size 0": (fit_args_case("--data.batch_size", "0"), ["batch_size", "0"]),
    "continual task phase of zero steps": (lambda t: continual_case(t, task_steps=0, task_mask=None),
                                           ["task_steps"]),
    # lori dryrun (issue 23): a card size it cannot read, a base format it does not know
    "dryrun --gpu-memory 24XB": (lambda t: ["dryrun", "--gpu-memory", "24XB", "--config", str(PAPER_CONFIG)],
                                 ["--gpu-memory", "24XB"]),
    "dryrun of an unknown model.quantize": (dryrun_quantize_case, ["quantize", "nf3"]),
    # model.quantize (issue 23): a format bitsandbytes lacks, a method that trains the base, a base stored quantized
    # already, a sharding strategy, an adapter to merge into the quantized base
    "quantize: unknown format": (pipeline_option("model", "quantize", "nf3"), ["model.quantize", "nf3"]),
    "quantize: full fine-tuning": (pipeline_case(lambda c, t: c["model"].update(method="full", quantize="nf4")),
                                   ["quantize", "'full'", "trains every base weight"]),
    "quantize: a base stored quantized already": (pipeline_case(lambda c, t: c["model"].update(
        model=prequantized(t), quantize="nf4")), ["already stored quantized", "gptq"]),
    "quantize: under FSDP": (pipeline_case(lambda c, t: (c["model"].update(quantize="int8"),
                                                         c["trainer"].update(strategy="fsdp"))), ["int8", "fsdp"]),
    "quantize: lori eval merging into it": (eval_case("--quantize", "nf4", setup=lambda t: [
        "--adapter", str(tiny_adapter(t / "a"))]), ["merge", "--merge false"]),
}

# cases refused on the parsed config: the base model is never built
EARLY = {name for name in CASES if name.startswith((
    "unknown config key", "sparsity 1.5", "rank 0", "unknown granularity", "unknown dtype", "world size",
    "ZeRO-3", "LoRI-D of", "negative", "LoRI-S of", "zero", "calibration after", "checkpoint every", "LoRI-S alpha",
    "empty output", "batch size", "eval_batch_size", "max_length 0", "held-out fraction", "no held-out", "renamed", "AdamW",
    "accumulate", "lori fit", "continual", "unknown template", "dryrun", "quantize"))}


def files_under(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*") if p.is_file()} if directory.exists() else set()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line_and_no_output(name, tmp_path, capsys, monkeypatch):
    build, fragments = CASES[name]
    argv = build(tmp_path)
    planted = files_under(tmp_path / OUT)
    if name in EARLY:
        def no_loading(*args, **kwargs):
            raise AssertionError(f"{name!r} should stop before the model loads")
        monkeypatch.setattr("lori.training.module.build_model", no_loading)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as info:
            main(argv)
    finally:
        while HELD:
            os.close(HELD.pop())
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2, err[-5:]
    assert err and err[-1].startswith("lori: error: "), err[-5:]
    assert "Traceback" not in "\n".join(err)
    for fragment in fragments:
        assert fragment.lower() in err[-1].lower(), (fragment, err[-1])
    leftovers = files_under(tmp_path / OUT) - planted
    assert not leftovers, leftovers  # no partial output (what the case planted aside)


def test_the_catalogue_is_at_least_sixty_cases():
    assert len(CASES) >= 60
    assert len(EARLY) >= 30 and EARLY <= set(CASES)


def test_pipeline_refuses_a_baseline_method(tmp_path, capsys):
    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / OUT))
    cfg["model"]["method"] = "lora"
    with pytest.raises(SystemExit) as info:
        main(["pipeline", "--config", str(write_config(tmp_path, cfg))])
    assert info.value.code == 2
    assert "lori fit" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / OUT).exists()
