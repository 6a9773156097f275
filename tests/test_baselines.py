"""Baselines through the same LightningModule: only the intended tensors train, and are saved."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from pipeline_helpers import tiny_config, write_config
from test_method_registry import TRAINS  # the trainable tensors of each method, by name fragments
from test_resume import Crash, CrashAt  # dies after a step, before that step's checkpoint
from torch.utils.data import DataLoader

import lori.training.module
from lori.commands.lightning_cli import parse_config, parse_fit_config
from lori.commands.main import main
from lori.core import (
    AdapterFileError,
    LoRIConfig,
    LoRIConfigError,
    load_adapter,
    merge_lori,
    unmerge_lori,
)
from lori.training import baselines
from lori.training.base_model import tiny_llama
from lori.training.baselines import (
    LORI_METHODS,
    METHODS,
    PEFT_METHODS,
    BaselineOptionsError,
    kept_ranks,
    peft_handle,
)
from lori.training.dry_run import method_size
from lori.training.module import CheckpointMismatchError, LoRIModule

LORI = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"], "seed": 3}
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "experiment"


@pytest.fixture
def tiny(monkeypatch):
    """LoRIModule builds a 2-layer random Llama (vocab 128) without loading any tokenizer."""
    monkeypatch.setattr(lori.training.module, "build_model", lambda *args, **kwargs: (tiny_llama(), None))


def _module(method: str, **kwargs) -> LoRIModule:
    return LoRIModule(model="tiny", method=method, lori=LORI, lr=0.01, **kwargs)


def _batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (2, 10), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def _trainer(steps: int, **kwargs) -> L.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )


def _fit(module: LoRIModule, steps: int = 3) -> None:
    _trainer(steps).fit(module, DataLoader(_batches(), batch_size=None))


def _state(module: LoRIModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=_batches(1)[0]["input_ids"]).logits


# ---- training: what moves, what stays -------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_only_the_intended_tensors_train_and_the_loss_falls(tiny, method):
    module = _module(method)
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    batch = _batches(1)[0]
    with torch.no_grad():
        loss_before = module.model_step(batch).item()
    before = _state(module)
    _fit(module, 6)
    changed = _changed(before, _state(module))
    with torch.no_grad():
        assert module.model_step(batch).item() < loss_before
    if method == "full":
        assert "model.layers.0.self_attn.q_proj.weight" in changed
        assert "model.layers.1.mlp.gate_proj.weight" in changed  # not a LoRI target: trained too
        return
    assert trainable and all(any(f in n for f in TRAINS[method]) for n in trainable)
    assert all(any(f in n for n in changed) for f in TRAINS[method])  # every kind of tensor moved
    if method == "adalora":  # an E pruned at every step may end where it began (zero)
        assert changed <= trainable and len(changed) > 0.8 * len(trainable)
    else:
        assert changed == trainable  # the base, A of LoRI / LoRA-FA, VeRA's projections: bit-identical
    optimizer = module.trainer.optimizers[0]
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in module.model.parameters() if p.requires_grad} <= held
    if method != "lora_fa":  # LoRA-FA's optimizer also reads the frozen A
        assert len(held) == len(trainable)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_output_equals_the_base_at_init(tiny, method):
    want = _logits(tiny_llama())
    got = _logits(_module(method).model)
    assert torch.allclose(got, want, atol=1e-5)  # PiSSA: W0 - s B0 A0 + s B0 A0 (fp32 rounding)


def test_lori_d_is_lori_with_sparsity_zero(tiny):
    module = _module("lori_d")
    assert module.lori_config.sparsity == 0.0 and module.hparams.lori["sparsity"] == 0.0
    ref = _module("lori")
    assert all(torch.equal(a, b) for a, b in zip(module.model.buffers(), ref.model.buffers()))


@pytest.mark.parametrize("method", ["lora", "lora_fa", "adalora", "pissa"])
def test_init_is_seeded_not_global_rng(tiny, method):
    torch.manual_seed(1)
    first = _state(_module(method))
    torch.manual_seed(2)
    second = _state(_module(method))
    assert not _changed(first, second)
    other = _state(LoRIModule(model="tiny", method=method, lori=LORI | {"seed": 4}))
    if method != "pissa":  # PiSSA's exact SVD does not draw
        assert any(".lora_A." in k for k in _changed(first, other))


# ---- method specifics --------------------------------------------------------------------------
def test_loraplus_trains_B_at_ratio_times_the_lr(tiny):
    module = _module("loraplus", baseline={"loraplus_lr_ratio": 8.0})
    _fit(module, 1)
    groups = module.trainer.optimizers[0].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    lrs = {".lora_A." if ".lora_A." in names[id(p)] else ".lora_B.": g["initial_lr"]
           for g in groups for p in g["params"]}
    assert lrs == {".lora_A.": pytest.approx(0.01), ".lora_B.": pytest.approx(0.08)}


def test_lora_fa_steps_B_along_the_projected_gradient(tiny):
    """Adam's first step is -lr x sign(g): with LoRA-FA, g = (1/s^2) g_B (A A^T)^-1, not g_B."""
    module = _module("lora_fa")
    layer = module.model.get_submodule("model.layers.0.mlp.down_proj")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    b.data.normal_(generator=torch.Generator().manual_seed(0))  # B != 0, so A gets a nonzero use
    batch = _batches(1)[0]
    module.model.zero_grad()
    module.model_step(batch).backward()
    s = layer.scaling["default"]
    projected = (1 / s**2) * b.grad @ torch.linalg.pinv(a.detach() @ a.detach().T)
    before_a, before_b = a.detach().clone(), b.detach().clone()
    optimizer = baselines.build_optimizer("lora_fa", module.model, 0.01, 0.0, (0.9, 0.999), {})
    optimizer.step()
    step = (b.detach() - before_b) / 0.01
    big = projected.abs() > 0.05 * projected.abs().max()  # away from bf16 rounding of tiny entries
    assert torch.equal(a.detach(), before_a)
    assert torch.equal(torch.sign(step[big]), -torch.sign(projected[big]))
    assert not torch.equal(torch.sign(projected[big]), torch.sign(b.grad[big]))  # the projection matters


def test_adalora_prunes_ranks_to_the_budget_and_saves_them(tiny, tmp_path):
    from peft import PeftModel

    module = _module("adalora", baseline={"target_r": 2})
    _fit(module, 8)
    config = peft_handle(module.model).config
    assert config.total_step == 8  # from the Trainer, not by hand
    ranks = kept_ranks(module.model)
    assert len(ranks) == 6 and sum(ranks.values()) == 2 * 6  # target_r x matrices
    assert len(set(ranks.values())) > 1  # reallocated, not a uniform cut
    module.save_adapter(tmp_path / "adapter")
    saved = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    for path, rank in ranks.items():
        assert saved.get_submodule(f"base_model.model.{path}").lora_A["default"].shape[0] == rank
    assert torch.allclose(_logits(saved), _logits(module.model), atol=1e-5)


def test_adalora_loss_includes_peft_orthogonality_penalty(tiny):
    module = _module("adalora")
    ids = _batches(1)[0]["input_ids"]
    wrapper = peft_handle(module.model).wrapper
    with torch.no_grad():
        task = module.model(input_ids=ids, labels=ids).loss
        peft_extra = wrapper.base_model(input_ids=ids, labels=ids).loss - task  # AdaLoraModel.forward adds it
        ours = baselines.orthogonality_penalty(module.model)
    assert ours > 0 and torch.allclose(ours, peft_extra, atol=1e-6)


def test_adalora_schedule_must_leave_a_pruning_phase(tiny):
    module = _module("adalora", baseline={"tinit": 3, "tfinal": 2})
    with pytest.raises(BaselineOptionsError, match="tinit=3"):
        _fit(module, 4)


# ---- saving, merging, resuming -------------------------------------------------------------------
@pytest.mark.parametrize("method", [*PEFT_METHODS, "lori_d"])
def test_saved_adapter_reloads_to_the_same_logits_and_merged_equals_unmerged(tiny, tmp_path, method):
    from peft import PeftModel

    module = _module(method)
    _fit(module)
    live = _logits(module.model)
    module.save_adapter(tmp_path / "adapter", stage="test")  # PEFT's format: PEFT reads it back
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    assert torch.allclose(_logits(reloaded), live, atol=1e-5)
    if method in LORI_METHODS:
        merge, unmerge = (lambda: merge_lori(module.model)), (lambda: unmerge_lori(module.model))
    else:
        merge, unmerge = peft_handle(module.model).wrapper.merge_adapter, peft_handle(module.model).wrapper.unmerge_adapter
    merge()
    assert torch.allclose(_logits(module.model), live, atol=1e-5)  # merged == unmerged
    unmerge()
    assert torch.allclose(_logits(module.model), live, atol=1e-5)


def test_pissa_is_saved_as_a_lora_of_twice_the_rank_on_the_original_base(tiny, tmp_path):
    module = _module("pissa")
    _fit(module, 2)
    module.save_adapter(tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")  # plain LoRA: lori reads (and merges) it
    assert adapter.rank == 2 * LORI["r"] and adapter.config.alpha == 2 * LORI["alpha"]
    assert adapter.base_fingerprint == module.fingerprint  # the original base, not the residual


@pytest.mark.parametrize("method", METHODS)
def test_resume_from_last_ckpt_ends_as_an_uninterrupted_run(tiny, tmp_path, method):
    loader = DataLoader(_batches(1), batch_size=None)  # one batch per epoch: the data order cannot differ
    uninterrupted = _module(method)
    _trainer(4).fit(uninterrupted, loader)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    with pytest.raises(Crash):
        _trainer(4, callbacks=[CrashAt(2), ckpt], enable_checkpointing=True).fit(_module(method), loader)
    resumed = _module(method)
    _trainer(4).fit(resumed, loader, ckpt_path=str(tmp_path / "last.ckpt"))
    want = {n: p for n, p in uninterrupted.model.named_parameters() if p.requires_grad}
    got = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert want.keys() == got.keys()
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want), method


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_keeps_what_the_method_trains(tiny, method):
    module = _module(method)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    keys = set(checkpoint["state_dict"])
    assert checkpoint["lori"]["method"] == method
    if method in LORI_METHODS:
        assert keys and all(".lori_" in k for k in keys)
    elif method in PEFT_METHODS:
        assert keys == {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    else:
        assert keys == set(module.state_dict())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpoint_round_trip_and_method_check(tiny, tmp_path, method):
    module = _module(method)
    trainer = _trainer(2)
    trainer.fit(module, DataLoader(_batches(), batch_size=None))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    fresh = _module(method)
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    fresh.on_load_checkpoint(ckpt)
    fresh.load_state_dict(ckpt["state_dict"], strict=fresh.strict_loading)
    assert not _changed(_state(module), _state(fresh))
    with pytest.raises(CheckpointMismatchError, match=f"method '{method}'"):
        _module("dora" if method == "lora" else "lora").on_load_checkpoint(ckpt)


def test_lora_adapter_is_read_by_lori_with_the_base_identity(tiny, tmp_path):
    module = _module("lora")
    _fit(module)
    module.save_adapter(tmp_path / "adapter", stage="test")
    adapter = load_adapter(tmp_path / "adapter")  # for merging
    assert adapter.base_fingerprint == module.fingerprint
    assert adapter.meta["method"] == "lora" and adapter.meta["stage"] == "test"
    layer = module.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.allclose(adapter.delta("model.layers.0.self_attn.q_proj"), layer.get_delta_weight("default"))


def test_lori_adapter_from_save_adapter(tiny, tmp_path):
    module = _module("lori_d")
    _fit(module, 2)
    module.save_adapter(tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.config.sparsity == 0.0 and adapter.masks is None
    assert adapter.meta["method"] == "lori_d" and adapter.base_fingerprint == module.fingerprint


def test_files_written_as_lora_frozen_a_read_as_lori_d(tiny, tmp_path):
    """lori_d was lora_frozen_a: its checkpoints and adapters of before keep loading as lori_d; a
    module built from the old name (a checkpoint's hyperparameters) fails in one line naming lori_d."""
    from lori.training.merge_run import adaptation_of

    module = _module("lori_d")
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": {**module.hparams, "method": "lora_frozen_a"},
                  "pytorch-lightning_version": L.__version__}
    module.on_save_checkpoint(checkpoint)
    checkpoint["lori"]["method"] = "lora_frozen_a"  # as written before the rename
    fresh = _module("lori_d")  # a resume (lori fit --ckpt_path) of a run of before
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert not _changed(_state(module), _state(fresh))
    with pytest.raises(CheckpointMismatchError, match="trained with method 'lora_frozen_a', this run uses 'lori'"):
        _module("lori").on_load_checkpoint(checkpoint)  # the pipeline's method is another run
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(LoRIConfigError, match="^model.method 'lora_frozen_a' is now called 'lori_d'"):
        LoRIModule.load_from_checkpoint(tmp_path / "old.ckpt")
    loaded = LoRIModule.load_from_checkpoint(tmp_path / "old.ckpt", method="lori_d")
    assert loaded.hparams.method == "lori_d" and not _changed(_state(module), _state(loaded))
    module.save_adapter(tmp_path / "adapter", extra={"method": "lora_frozen_a"})  # an adapter dir of before
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.meta["method"] == "lora_frozen_a" and adaptation_of(adapter) == "lori_d"  # merged as LoRI-D


def test_method_options_are_recorded_in_the_adapter(tiny, tmp_path):
    import json

    module = _module("vera", baseline={"d_initial": 0.2})
    module.save_adapter(tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "lori_meta.json").read_text())["meta"]
    assert meta["options"] == {"d_initial": 0.2, "projection_prng_key": LORI["seed"]}
    assert module.hparams.baseline == {"d_initial": 0.2}


def test_full_model_reloads_with_transformers(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    module = _module("full")
    _fit(module, 2)
    module.save_adapter(tmp_path / "model")
    got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    assert torch.allclose(_logits(got), _logits(module.model), atol=1e-6)


def test_a_dora_adapter_is_not_read_as_lora(tiny, tmp_path):
    _module("dora").save_adapter(tmp_path / "dora")
    with pytest.raises(AdapterFileError, match="magnitude"):
        load_adapter(tmp_path / "dora")


# ---- counts on Llama-3-8B (meta device): the paper's "# Params" --------------------------------
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# per layer: q 4096, k 1024, v 1024, o 4096, gate 14336, up 14336, down 4096 outputs (sum 43008);
# inputs 4096 x 6 + 14336; 32 layers, r = 32
PAPER_COUNTS = {  # method -> (exact count, the paper's "# Params": Tables 1, 2, 11, 12)
    "lora": (32 * 32 * (43008 + 6 * 4096 + 14336), "84M"), "rslora": (83_886_080, "84M"),
    "pissa": (83_886_080, "84M"), "loraplus": (83_886_080, "84M"),
    "adalora": (83_886_080 + 32 * 7 * 32, "84M"),  # + E (r entries per matrix)
    "dora": (83_886_080 + 32 * 43008, "85M"),  # + the magnitude vector (d_out per matrix)
    "lora_fa": (32 * 32 * 43008, "44M"), "lori_d": (44_040_192, "44M"), "lori": (44_040_192, "44M"),
    "ia3": (32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 14336), "1.70M"),  # down_proj: its input
    "vera": (32 * (43008 + 7 * 32), "1.38M"),  # lambda_b (d_out) + lambda_d (r) per matrix
    "full": (8_030_261_248, "8.03G"),
}


def _paper_format(n: int) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


@pytest.mark.parametrize("method", METHODS)
def test_llama3_8b_counts_equal_the_paper(method):
    exact, paper = PAPER_COUNTS[method]
    trainable, _ = method_size("llama3_8b", method, 32, TARGETS)
    assert trainable == exact
    assert _paper_format(trainable) == paper


# ---- bad input: one-line errors before the model loads -----------------------------------------
@pytest.mark.parametrize("method,fields,baseline,fragments", [
    ("qlora", {}, {}, ["unknown method 'qlora'"]),
    ("vera", {"sparsity": 0.5}, {}, ["sparsity=0.5", "'vera'"]),
    ("lora", {"granularity": "layer"}, {}, ["granularity", "'lora'"]),
    ("lora", {}, {"target_r": 8}, ["target_r", "adalora", "'lora'"]),
    ("adalora", {}, {"target_r": 9}, ["target_r=9", "r=4"]),
    ("ia3", {}, {"feedforward_modules": ["gate_proj"]}, ["feedforward_modules", "gate_proj"]),
    ("loraplus", {}, {"loraplus_lr_ratio": 0}, ["loraplus_lr_ratio", "> 0"]),
    ("vera", {}, {"rank": 3}, ["unknown model.baseline keys ['rank']"]),
])
def test_bad_method_options_stop_before_the_model_loads(monkeypatch, method, fields, baseline, fragments):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lori.training.module, "build_model", no_loading)
    with pytest.raises(ValueError) as err:
        LoRIModule(model="tiny", method=method, lori=LORI | fields, baseline=baseline)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


@pytest.mark.parametrize("options,fragments", [
    ({"weight_decay": -0.1}, ["model.weight_decay must be >= 0", "-0.1"]),
    ({"betas": (0.9, 1.0)}, ["model.betas must both be in [0, 1)", "1.0"]),
])
def test_adamw_options_stop_before_the_model_loads(monkeypatch, options, fragments):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lori.training.module, "build_model", no_loading)
    with pytest.raises(LoRIConfigError) as err:
        LoRIModule(model="tiny", method="lora", lori=LORI, **options)
    assert all(f in str(err.value) for f in fragments), str(err.value)
    LoRIModule.check_options({"weight_decay": 0.0, "betas": (0.0, 0.999)})  # the edges that AdamW accepts


def test_lori_defaults_carried_by_every_config_are_accepted():
    for method in METHODS:  # sparsity 0.9 / granularity model: LoRIConfig's defaults
        baselines.check_method_options(method, LoRIConfig(), baselines.BaselineOptions())
        baselines.check_method_options(method, LoRIConfig(sparsity=0.0), baselines.BaselineOptions())


def test_unknown_target_is_one_line_error(tiny):
    with pytest.raises(ValueError, match="query_key_value"):
        LoRIModule(model="tiny", method="lora", lori=LORI | {"target_modules": ["query_key_value"]})


# ---- the fit command and the shipped configs ------------------------------------------------------
def test_fit_command_writes_the_peft_adapter(tmp_path, capsys):
    """`lori fit --config <pipeline config> --model.method adalora` trains and writes the adapter through
    SaveAdapter; LoRI-D's budget, checkpoints and logs, beside the run (lori.training.fit_settings)."""
    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / "runs" / "tiny"), dense_steps=3, checkpoint_every=1)
    cfg["model"]["baseline"] = {"target_r": 2}
    main(["fit", "--config", str(write_config(tmp_path, cfg)), "--model.method", "adalora"])
    adapter = tmp_path / "runs" / "adalora" / "tiny"
    config = yaml.safe_load((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 3 and config["target_r"] == 2
    assert config["rank_pattern"]  # pruned during the fit
    assert torch.load(adapter.parent / "tiny_ckpt" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert (adapter.parent / "tb" / "tiny").is_dir()
    assert f"lori: fit adalora from pipeline: max_steps 3, adapter {adapter}" in capsys.readouterr().err


EXPERIMENT_METHODS = sorted(set(METHODS) - {"lori"})


def test_a_pipeline_config_with_its_own_fit_settings_keeps_them():
    cfg = parse_fit_config("--config", str(CONFIGS / "default.yaml"), "--model.method", "dora",
                           "--trainer.max_epochs", "2", "--trainer.logger", "false")
    assert (cfg["trainer"]["max_epochs"], cfg["trainer"]["max_steps"], cfg["trainer"]["logger"]) == (2, -1, False)
    assert cfg["trainer"]["callbacks"][0]["init_args"]["directory"] == "runs/dora/default"
    assert parse_fit_config("--config", str(CONFIGS / "default.yaml"))["trainer"]["callbacks"] is None  # lori


@pytest.mark.parametrize("method", EXPERIMENT_METHODS)
def test_default_config_with_a_method_is_that_baseline(method):
    """configs/experiment/default.yaml + --model.method X: the same model, data and optimizer; the
    budget, adapter dir and logs derived from pipeline: (what configs/experiment/<method>.yaml held)."""
    default = parse_config(CONFIGS / "default.yaml")
    cfg = parse_fit_config("--config", str(CONFIGS / "default.yaml"), "--model.method", method)
    mine, theirs = cfg["model"].as_dict(), default["model"].as_dict()
    assert (mine.pop("method"), theirs.pop("method")) == (method, "lori")
    assert mine == theirs and cfg["data"] == default["data"]
    assert cfg["seed_everything"] == default["seed_everything"]
    trainer, ref = cfg["trainer"].as_dict(), default["trainer"].as_dict()
    assert {k for k in trainer if trainer[k] != ref.get(k)} == {"max_steps", "callbacks", "logger"}
    assert trainer["max_steps"] == default["pipeline"]["dense_steps"] == 20
    save, ckpt = trainer["callbacks"]
    assert save == {"class_path": "lori.training.callbacks.SaveAdapter",
                    "init_args": {"directory": f"runs/{method}/default", "stage": method}}
    assert ckpt["init_args"]["dirpath"] == f"runs/{method}/default_ckpt"
    assert ckpt["init_args"]["every_n_train_steps"] == default["pipeline"]["checkpoint_every"]
    logs = trainer["logger"]["init_args"]
    assert (logs["save_dir"], logs["name"], logs["version"]) == (f"runs/{method}", "tb", "default")
    LoRIModule.check_options(cfg["model"], cfg["trainer"])  # the method's defaults are valid options
