"""NaN and inf are refused where they enter: adapter and mask files (naming the file and tensor),
merges (all or nothing: base weights bit-identical after a refusal), calibration and checkpoints
(a run whose last step diverged stops in one line, exit 1, keeping its last good checkpoint)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import make_tiny_llama
from pipeline_helpers import tiny_config, write_config
from safetensors.torch import load_file, save_file

import lori.training.merge_run as merging
from lori.commands.main import main
from lori.core import (
    AdapterFileError,
    DeltaMerge,
    LoRIConfig,
    NonFiniteError,
    adapter_from_model,
    calibrate,
    inject_lori,
    load_adapter,
    load_masks,
    lori_layers,
    merge_lori,
    save_adapter,
    unload,
)
from lori.core.io import WEIGHTS_FILE, peft_key
from lori.training.module import build_model


def tiny_llama():
    """The base ``tiny-llama`` names in lori (what ``lori merge --base_model tiny-llama`` loads)."""
    return build_model("tiny-llama", None, "float32", None)[0]

CFG = LoRIConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def adapted(seed: int = 0):
    model = make_tiny_llama(seed)
    inject_lori(model, CFG)
    for layer in lori_layers(model).values():
        layer.lori_B.data.normal_()
    return model


def base_weights(model) -> dict[str, torch.Tensor]:
    return {p: l.base_layer.weight.detach().clone() for p, l in lori_layers(model).items()}


def poison_file(directory: Path, path: str, which: str = "B", value: float = float("nan")) -> str:
    """Write ``value`` into entry [0, 0] of one saved tensor; returns the tensor's key."""
    file = directory / WEIGHTS_FILE
    state = load_file(str(file))
    key = peft_key(path, which)
    state[key][0, 0] = value
    save_file(state, str(file))
    return key


# --- files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value,word", [(float("nan"), "1 NaN"), (float("inf"), "1 inf"), (float("-inf"), "1 inf")])
def test_adapter_file_with_non_finite_B_is_refused_naming_file_and_tensor(tmp_path, value, word):
    model = adapted()
    save_adapter(adapter_from_model(model, CFG, "tiny"), tmp_path / "ad")
    path = max(lori_layers(model))
    key = poison_file(tmp_path / "ad", path, "B", value)
    with pytest.raises(AdapterFileError) as info:
        load_adapter(tmp_path / "ad")
    message = str(info.value)
    assert str(tmp_path / "ad" / WEIGHTS_FILE) in message and key in message and word in message


def test_adapter_file_with_non_finite_A_is_refused(tmp_path):
    model = adapted()
    save_adapter(adapter_from_model(model, CFG, "tiny"), tmp_path / "ad")
    key = poison_file(tmp_path / "ad", min(lori_layers(model)), "A")
    with pytest.raises(AdapterFileError, match=key.replace(".", r"\.")):
        load_adapter(tmp_path / "ad")


def test_float_mask_file_with_nan_is_refused(tmp_path):
    """The original LoRI code's torch mask files may hold floats: a NaN would read as True."""
    masks = tmp_path / "masks.pt"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    torch.save({key: torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}, masks)
    with pytest.raises(AdapterFileError) as info:
        load_masks(masks)
    assert str(masks) in str(info.value) and key in str(info.value) and "1 NaN" in str(info.value)


# --- merging -------------------------------------------------------------------------------

def test_merge_lori_refuses_before_merging_any_layer():
    model = adapted()
    before = base_weights(model)
    last = list(lori_layers(model).values())[-1]  # every earlier layer would merge first
    last.lori_B.data[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="refusing to merge.*ΔW of .*NaN"):
        merge_lori(model)
    for path, layer in lori_layers(model).items():
        assert not layer.merged and torch.equal(layer.base_layer.weight, before[path]), path
    with pytest.raises(NonFiniteError):
        unload(model)
    assert all(torch.equal(l.base_layer.weight, before[p]) for p, l in lori_layers(model).items())


def test_merge_lori_refuses_an_overflow_of_the_weight_dtype():
    model = adapted()
    model.half()
    first = next(iter(lori_layers(model).values()))
    first.lori_B.data.fill_(1000.0)  # finite B; ΔW ~ 1e3 * 4 * 0.2 * 2, W0 + ΔW fine in fp16 ...
    first.lori_A.data.fill_(100.0)  # ... until A is large too: |ΔW| ~ 8e5 > 65504
    before = base_weights(model)
    with pytest.raises(NonFiniteError, match=r"refusing to merge.*inf"):
        merge_lori(model)
    assert all(torch.equal(l.base_layer.weight, before[p]) for p, l in lori_layers(model).items())


def test_delta_merge_refuses_before_touching_any_weight():
    model = make_tiny_llama()
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    before = {p: model.get_submodule(p).weight.detach().clone() for p in paths}
    deltas = {p: torch.ones_like(before[p]) for p in paths}
    deltas[paths[1]][3, 4] = float("inf")
    merge = DeltaMerge(model, deltas)
    with pytest.raises(NonFiniteError, match="1 inf"):
        merge.merge()
    assert not merge.merged
    for p in paths:
        assert torch.equal(model.get_submodule(p).weight, before[p]), p


def huge_adapter(directory: Path) -> tuple[Path, str]:
    """An adapter whose files hold finite values, but whose ΔW of its last module overflows fp32."""
    model = tiny_llama()
    cfg = LoRIConfig(r=4, alpha=8)
    inject_lori(model, cfg)
    layers = lori_layers(model)
    for layer in layers.values():
        layer.lori_B.data.normal_()
    path = list(layers)[-1]
    layers[path].lori_B.data.fill_(1e30)
    layers[path].lori_A.data.fill_(1e30)
    save_adapter(adapter_from_model(model, cfg, "tiny-llama"), directory)
    return directory, path


def small_adapter(directory: Path) -> Path:
    model = tiny_llama()
    cfg = LoRIConfig(r=4, alpha=8)
    inject_lori(model, cfg)
    for layer in lori_layers(model).values():
        layer.lori_B.data.normal_()
    save_adapter(adapter_from_model(model, cfg, "tiny-llama"), directory)
    return directory


def test_lori_merge_refusal_leaves_the_base_bit_identical_and_writes_nothing(tmp_path, monkeypatch, capsys):
    (huge, path), small = huge_adapter(tmp_path / "huge"), small_adapter(tmp_path / "small")
    loaded = []
    real = merging.load_base

    def recording(cfg, aset):
        model, tokenizer = real(cfg, aset)
        loaded.append(model)
        return model, tokenizer

    monkeypatch.setattr(merging, "load_base", recording)
    cfg = {"base_model": "tiny-llama", "adapters": [str(small), str(huge)], "method": "concat",
           "weights": [0.5, 0.5], "evaluate": [], "output_dir": str(tmp_path / "out")}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as info:
        main(["merge", "--config", str(tmp_path / "merge.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("lori: error: refusing to merge") and path in err[-1]
    assert not (tmp_path / "out").exists()
    fresh = tiny_llama()
    model = loaded[0]
    for p in load_adapter(small).A:  # modules before the refused one were merged, then restored
        assert torch.equal(model.get_submodule(p).weight, fresh.get_submodule(p).weight), p


# --- calibration and checkpoints of a diverging run -----------------------------------------

def test_calibration_refuses_non_finite_B_naming_it():
    with pytest.raises(NonFiniteError, match=r"layers\.0\.q_proj.*1 NaN"):
        calibrate({"layers.0.q_proj": torch.tensor([[float("nan"), 1.0]])}, 0.5)


class PoisonB(L.Callback):
    """Puts a NaN into the first B of ``phase`` after optimizer step ``step`` (0 = at the end of the fit)."""

    def __init__(self, step: int = 0, phase: str = "dense") -> None:
        self.step, self.phase = step, phase

    def _poison(self, pl_module) -> None:
        layer = next(iter(lori_layers(pl_module.model).values()))
        trainable = layer.lori_B if layer.lori_B_values is None else layer.lori_B_values
        trainable.data.view(-1)[0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.step and trainer.global_step == self.step and pl_module.phase == self.phase:
            self._poison(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.step and pl_module.phase == self.phase:
            self._poison(pl_module)


def run_poisoned(tmp_path: Path, step: int, capsys, phase: str = "dense") -> tuple[int, str]:
    cfg = tiny_config(tmp_path, checkpoint_every=1, held_out_loss=False, dense_steps=4, sparse_steps=2)
    cfg["trainer"]["callbacks"] = [{"class_path": "test_non_finite.PoisonB", "init_args": {"step": step,
                                                                                         "phase": phase}}]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["pipeline", "--config", str(write_config(tmp_path, cfg))])
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return info.value.code, err[-1]


def test_a_last_step_that_diverges_stops_calibration_in_one_line(tmp_path, capsys):
    code, line = run_poisoned(tmp_path, 0, capsys)
    assert code == 1 and line.startswith("lori: error: B of 'model.layers.0.self_attn.q_proj' holds 1 NaN")
    assert "cannot calibrate" in line and "global step 4" in line
    run = tmp_path / "run"
    assert not (run / "calibration" / "masks.safetensors").exists() and not (run / "lori_d").exists()
    ckpt = torch.load(run / "lori_d_ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()
                                            if v.is_floating_point())


def test_a_checkpoint_holding_nan_is_not_written(tmp_path, capsys):
    code, line = run_poisoned(tmp_path, 3, capsys)
    assert code == 1 and line.startswith("lori: error: not writing checkpoint")
    assert "lori_d_ckpt/last.ckpt" in line and "1 NaN" in line and "global step 3" in line
    ckpt = torch.load(tmp_path / "run" / "lori_d_ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2  # the previous good one


def test_a_lori_s_whose_last_step_diverges_saves_no_adapter(tmp_path, capsys):
    code, line = run_poisoned(tmp_path, 0, capsys, phase="sparse")
    assert code == 1 and line.startswith("lori: error: lori_s ended with B of model.layers.0.self_attn.q_proj")
    assert "1 NaN" in line and "global step 2" in line
    assert (tmp_path / "run" / "lori_d").is_dir() and not (tmp_path / "run" / "lori_s").exists()


# --- the helpers themselves (lori.core.finite) -----------------------------------------------


def test_non_finite_counts_are_zero_for_integer_and_bool_tensors():
    from lori.core.finite import non_finite_counts
    assert non_finite_counts(torch.tensor([1, 2, 3])) == (0, 0)
    assert non_finite_counts(torch.tensor([True, False])) == (0, 0)
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    assert non_finite_counts(t) == (1, 2)


def test_check_finite_message_without_hint_ends_with_the_counts():
    from lori.core.finite import check_finite
    with pytest.raises(NonFiniteError) as info:
        check_finite([("ok", torch.ones(2)), ("w", torch.tensor([1.0, float("nan")]))], "merge")
    assert str(info.value) == "merge: tensor w holds 1 NaN and 0 inf of 2 values"
    check_finite([("ok", torch.ones(2)), ("i", torch.tensor([1, 2]))], "merge")  # finite: no error
