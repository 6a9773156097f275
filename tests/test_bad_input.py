"""The bad-input catalogue: every case across the codebase stops with ONE clear line
(``lori: error: ...`` naming the problem, exit code 2, no traceback) and writes no output."""

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


def continual_case(tmp: Path) -> list[str]:
    cfg = tiny_config(tmp)
    del cfg["pipeline"]
    cfg["task_data"] = dict(cfg["data"])
    cfg["continual"] = {"output_dir": str(tmp / OUT), "task_mask": str(tmp / "missing_masks.safetensors")}
    cfg["eval"] = {"tasks": ["gsm8k"], "max_examples": 1}
    return ["continual", "--config", str(write_config(tmp, cfg))]


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
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line_and_no_output(name, tmp_path, capsys):
    build, fragments = CASES[name]
    argv = build(tmp_path)
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


def test_pipeline_refuses_a_baseline_method(tmp_path, capsys):
    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / OUT))
    cfg["model"]["method"] = "lora"
    with pytest.raises(SystemExit) as info:
        main(["pipeline", "--config", str(write_config(tmp_path, cfg))])
    assert info.value.code == 2
    assert "lori fit" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / OUT).exists()
