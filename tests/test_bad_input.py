"""The bad-input catalogue: every case across the codebase stops with ONE clear line
(``lori: error: ...`` naming the problem, exit code 2, no traceback) and writes no output.
Cases in EARLY stop before the model is even built (the values are checked on the parsed config)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_helpers import tiny_config, write_config, write_tiny_gsm8k
from safetensors.torch import save_file

from lori.cli import main
from lori.core import LoRIConfig, adapter_from_model, inject_lori, lori_layers, save_adapter
from lori.models import tiny_llama
from lori.module import build_model

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


# --- case builders: each returns the argv of one command -------------------------------------------

def pipeline_case(edit: Callable[[dict, Path], None]) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        cfg = tiny_config(tmp, output_dir=str(tmp / OUT))
        edit(cfg, tmp)
        return ["pipeline", "--config", str(write_config(tmp, cfg))]
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


def fit_case(*args: str) -> Callable[[Path], list[str]]:
    def build(tmp: Path) -> list[str]:
        cfg = tiny_config(tmp)
        cfg["trainer"]["default_root_dir"] = str(tmp / OUT)
        return ["fit", "--config", str(write_config(tmp, cfg)), *args]
    return build


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
    "no held-out examples to validate on": (pipeline_option("data", "held_out", 0), ["held_out", "validate"]),
    "negative num_workers": (pipeline_option("data", "num_workers", -1), ["num_workers", "-1"]),
    "zero training examples": (pipeline_option("data", "max_train_examples", 0), ["max_train_examples", "0"]),
    "negative learning rate": (pipeline_option("model", "lr", -1e-4), ["lr", "-0.0001"]),
    "negative weight decay": (pipeline_option("model", "weight_decay", -0.1), ["weight_decay", "-0.1"]),
    "AdamW beta of 1.5": (pipeline_option("model", "betas", [1.5, 0.999]), ["betas", "1.5"]),
    "accumulate_grad_batches 0": (pipeline_option("trainer", "accumulate_grad_batches", 0),
                                  ["accumulate_grad_batches", "0"]),
    "negative gradient clipping": (pipeline_option("trainer", "gradient_clip_val", -1.0), ["gradient_clip_val"]),
    "zero devices": (pipeline_option("trainer", "devices", 0), ["devices", "0"]),
    "lori fit of -5 steps": (fit_case("--trainer.max_steps", "-5"), ["max_steps", "-5"]),
    "lori fit with batch size 0": (fit_case("--data.batch_size", "0"), ["batch_size", "0"]),
    "continual task phase of zero steps": (lambda t: continual_case(t, task_steps=0, task_mask=None),
                                           ["task_steps"]),
}

# cases refused on the parsed config: the base model is never built
EARLY = {name for name in CASES if name.startswith((
    "unknown config key", "sparsity 1.5", "rank 0", "unknown granularity", "unknown dtype", "world size",
    "ZeRO-3", "LoRI-D of", "negative", "LoRI-S of", "zero", "calibration after", "checkpoint every", "LoRI-S alpha",
    "empty output", "batch size", "eval_batch_size", "max_length 0", "held-out fraction", "no held-out", "AdamW",
    "accumulate", "lori fit", "continual", "unknown template"))}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line_and_no_output(name, tmp_path, capsys, monkeypatch):
    build, fragments = CASES[name]
    argv = build(tmp_path)
    if name in EARLY:
        def no_loading(*args, **kwargs):
            raise AssertionError(f"{name!r} should stop before the model loads")
        monkeypatch.setattr("lori.module.build_model", no_loading)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2, err[-5:]
    assert err and err[-1].startswith("lori: error: "), err[-5:]
    assert "Traceback" not in "\n".join(err)
    for fragment in fragments:
        assert fragment.lower() in err[-1].lower(), (fragment, err[-1])
    out = tmp_path / OUT
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.name != "last.ckpt"] if out.exists() else []
    assert not leftovers, leftovers  # no partial output (the planted foreign checkpoint aside)


def test_the_catalogue_is_at_least_fifteen_cases():
    assert len(CASES) >= 15
    assert len(EARLY) >= 30 and EARLY <= set(CASES)


def test_pipeline_refuses_a_baseline_method(tmp_path, capsys):
    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / OUT))
    cfg["model"]["method"] = "lora"
    with pytest.raises(SystemExit) as info:
        main(["pipeline", "--config", str(write_config(tmp_path, cfg))])
    assert info.value.code == 2
    assert "lori fit" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / OUT).exists()
